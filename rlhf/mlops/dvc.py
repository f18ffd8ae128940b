"""DVC decides whether a stage runs; the flow runs it in-process and DVC records it.

`dvc repro` would run each changed stage's `cmd` (`rlhf stage NAME`) in a new Python process,
importing torch each time. The flow does what `dvc repro --pull` does for one stage, with the
stage function called in this process instead of the command (`reproduce`):

1. `Stage.changed()`: deps, params, outputs and command against dvc.lock. Unchanged: skipped.
2. The run-cache: the same deps and params ran before, here or on a machine that pushed to
   the default remote (`dvc push --run-cache`): its outputs are checked out. Skipped too.
3. Otherwise the stage runs, and DVC saves deps and outputs to its cache, the run-cache and
   dvc.lock, exactly as after `dvc repro`.

Before 2 and 3 the stage's outputs are removed, as `dvc repro` does before it runs a stage.

So `rlhf run`, a deployment on a worker and `dvc repro` share one answer: DVC's.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from rlhf.errors import UserError

UNCHANGED = "unchanged"
RESTORED = "restored from the run-cache"
RAN = "ran"


def is_dvc_repo(root: str | Path) -> bool:
    root = Path(root)
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


REMOTE_ENV = "RLHF_DVC_REMOTE"
"""A DVC remote URL (e.g. s3://dvc/rlhf) that the flow pulls from and pushes to, in place of
the project's default remote: how a worker's fresh git clone shares a team's store. S3
credentials and endpoint come from the usual AWS_* variables."""


def _env_remote() -> Optional[dict]:
    url = os.environ.get(REMOTE_ENV, "").strip()
    if not url:
        return None
    remote = {"url": url}
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        remote["endpointurl"] = os.environ["AWS_ENDPOINT_URL_S3"]
    return {"core": {"remote": "rlhf-env"}, "remote": {"rlhf-env": remote}}


@contextlib.contextmanager
def _repo(root: Path) -> Iterator:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo

    try:
        # DVC resolves targets and paths against the working directory. lock_repo, not
        # repo.lock: DVC's own locked calls inside (repo.push) then reuse the lock.
        with (contextlib.chdir(root), Repo(str(root), config=_env_remote()) as repo,
              lock_repo(repo)):
            yield repo
    except DvcException as exc:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # DVC colours its links
        raise UserError(f"DVC in {root}: {message}; run `dvc status` there to see why") from None


def _remote(repo) -> Optional[str]:
    return repo.config["core"].get("remote")


def _run_cacheable(stage) -> bool:
    """What `dvc repro` saves to the run-cache: not a stage with an uncached output."""
    return not any(not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot))


def pull_run_cache(root: Path) -> bool:
    """Fetch the run-cache of the default remote, if there is one (`dvc pull --run-cache`)."""
    with _repo(root) as repo:
        if not _remote(repo):
            return False
        repo.stage_cache.pull(None)
        return True


def reproduce(root: Path, name: str, run: Callable[[], None]) -> str:
    """Bring stage `name` up to date (see the module docstring); returns UNCHANGED, RESTORED
    or RAN. `run` runs the stage in this process."""
    from dvc.stage.cache import RunCacheNotFoundError

    with _repo(root) as repo:
        stage = repo.stage.get_target(name)
        if not stage.changed():
            return UNCHANGED
        # As before a `dvc repro` run; and an output edited by hand is replaced, not refused.
        stage.remove_outs(ignore_remove=False, force=False)
        try:
            repo.stage_cache.restore(stage, pull=bool(_remote(repo)))
            outcome = RESTORED
        except RunCacheNotFoundError:
            outcome = RAN
    if outcome == RAN:
        run()
    with _repo(root) as repo:
        stage = repo.stage.get_target(name)
        stage.save(run_cache=_run_cacheable(stage))
        stage.commit()
        stage.dump(update_pipeline=False)
    return outcome


def push(root: Path) -> bool:
    """Send outputs and run-cache to the default remote, if there is one, so that another
    machine's run skips what this one computed (`dvc push --run-cache`)."""
    with _repo(root) as repo:
        if not _remote(repo):
            return False
        entries = repo.stage_cache.push(None)  # the run-cache entries the remote lacked
        # `dvc push --run-cache` sends those entries but not the uncached outputs they name
        # (metrics/*.json, `cache: false`), without which another machine cannot restore
        # the stage from them: so those objects go too.
        for objs in repo.stage_cache.get_used_objs(entries).values():
            repo.cloud.push(objs)
        repo.push()
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
