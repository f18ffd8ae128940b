"""Stage `reference`: a frozen copy of the SFT policy, with a sha256 of its weights.

PPO reads the KL anchor from here and refuses a reference whose weights no longer match
the recorded hash (a reference that drifted silently would make every KL figure a lie).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf.config import Params
from rlhf.errors import UserError
from rlhf.io import atomic_dir, read_json, require, sha256_files, write_json
from rlhf.paths import Paths
from rlhf.tracking import MetricsLogger, NullLogger

HASH_FILE = "reference.json"


def weight_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    require(paths.sft / "config.json", produced_by="sft")
    with atomic_dir(paths.reference) as out:
        for item in paths.sft.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
        digest = sha256_files(weight_files(out), out)
        write_json(out / HASH_FILE, {"sha256": digest,
                                     "files": [p.name for p in weight_files(out)],
                                     "copied_from": str(paths.sft)})
    metrics = {"reference/sha256": digest}
    return metrics


def verify(directory: Path) -> str:
    """The reference's recorded hash, after checking its weights still match it."""
    record = read_json(Path(directory) / HASH_FILE, produced_by="reference")
    actual = sha256_files(weight_files(directory), Path(directory))
    if actual != record["sha256"]:
        raise UserError(
            f"reference weights in {directory} do not match their recorded sha256 "
            f"({actual[:12]} != {record['sha256'][:12]}); rerun `rlhf stage reference`"
        )
    return record["sha256"]
