"""DVC glue: record in-process outputs in dvc.lock, and read content hashes for lineage.

`rlhf run` executes the stage functions in-process (under Prefect) rather than through
`dvc repro`, then runs `dvc commit` for the stages it ran. `dvc commit` hashes every
stage's deps, params and outs and writes them to dvc.lock, exactly as `dvc repro` would
have after running the same commands, so afterwards `dvc status` is clean and `dvc repro`
has nothing to do.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from rlhf.errors import UserError


def is_dvc_repo(root: str | Path) -> bool:
    root = Path(root)
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def record(root: str | Path, stages: list[str] | None = None) -> bool:
    """`dvc commit` the given stages (all by default). False outside a DVC repo."""
    if not is_dvc_repo(root):
        return False
    # Not --quiet: it silences the error line too, which the message below needs.
    command = ["dvc", "commit", "--force", *(stages or [])]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"`{' '.join(command)}` failed in {root}: "
                        f"{detail[-1] if detail else 'no output'}; run it by hand to see why")
    return True


def artifact_hashes(root: str | Path) -> dict[str, str]:
    """`dvc.<path>` -> the md5 DVC recorded for each cached output in dvc.lock."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    hashes: dict[str, str] = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if "md5" in out:
                hashes[f"dvc.{out['path']}"] = out["md5"]
    return hashes
