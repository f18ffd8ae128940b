"""Run one stage: its MLflow run, resumption, a process group when asked, its cost.

The one stage runner: `rlhf stage NAME` (what each dvc.yaml stage runs) and the Prefect flow's
stage task both call `run_stage`.

- MLflow: the stage logs to a run of its own, nested under `parent_run_id` (the flow's
  pipeline run, or `RLHF_MLFLOW_PARENT_RUN_ID` for `dvc repro` under a parent); without a
  parent, a top-level run `stage-NAME`. A stage interrupted earlier resumes from its
  checkpoints and continues the MLflow run they were logged to. `track=False`: no MLflow.
- Processes: with train.num_processes > 1 a launchable stage runs as an Accelerate process
  group (`rlhf.mlops.launch`), its rank 0 logging to the same run.
- Cost: wall time and peak memory, logged as `resources/*` and returned with the metrics.
- Guards: one run of a stage per project at a time; before any work, its folders must be
  writable with room for its outputs and checkpoints; a disk that fills up is one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional

from rlhf import stages
from rlhf.config import Params
from rlhf.errors import UserError
from rlhf.io import read_json
from rlhf.mlops import launch
from rlhf.paths import Paths

PARENT_RUN_ENV = "RLHF_MLFLOW_PARENT_RUN_ID"
"""The MLflow run a stage started by `dvc repro` nests under, when set."""


def _tracked_run(name: str, params: Params, paths: Paths, parent_run_id: Optional[str],
                 tags: Mapping[str, Any]) -> ContextManager:
    from rlhf.checkpoints import resumable
    from rlhf.mlops import mlflow_tracking as mt

    # A launched group's rank 0 logs to the run its launcher opened; an interrupted stage
    # continues the run its checkpoints were logged to.
    interrupted = resumable(paths.checkpoints / name) or {}
    resume = mt.existing_run(os.environ.get(launch.RUN_ID_ENV)
                             or interrupted.get("tracking_run_id"))
    if parent_run_id or resume:
        return mt.tracked_run(name, params.registry.experiment, parent_run_id=parent_run_id,
                              resume_run_id=resume and resume.info.run_id,
                              tags={"stage": name, **tags})
    return mt.tracked_run(f"stage-{name}", params.registry.experiment, params,
                          tags={"stage": name, **tags}, project_root=paths.root)


def run_stage(name: str, params: Params, root: Path, parent_run_id: Optional[str] = None,
              track: bool = True, tags: Optional[Mapping[str, Any]] = None,
              reporting: Callable[[Any], ContextManager] = contextlib.nullcontext,
              on_line: Callable[[str], None] = logging.getLogger("rlhf.launch").info) -> dict:
    """Run stage `name` of the project at `root`; returns its scalar metrics and cost.

    `reporting` wraps the stage's logger (the flow forwards logs and tables to Prefect);
    `on_line` receives a launched group's output lines."""
    from rlhf.mlops.resources import measure
    from rlhf.tracking import NullLogger

    info = stages.info(name)
    paths = Paths(root)
    if info.needs_tracking and not track:
        raise UserError(f"stage {name} talks to the MLflow registry: run it without --no-track")
    _offline_if_hub_unreachable(params, paths)
    if launch.rank() != 0:  # another rank of a launched group: rank 0 tracks and reports
        with _disk_errors_in_one_line(name):
            return stages.get(name)(params, paths) or {}
    # The launcher of a group checked the disk and holds the lock for its ranks.
    with (_disk_errors_in_one_line(name) if launch.in_launched_group()
          else _one_at_a_time(name, params, paths)):
        run = contextlib.nullcontext(None)
        if track:
            from rlhf.mlops import mlflow_tracking as mt

            mt.ensure_reachable(mt.configure(paths.root))
            mt.recover(params.registry.experiment, paths.root)
            run = _tracked_run(name, params, paths, parent_run_id, tags or {})
        launched = launch.wants_launch(name, params)
        with run as tracked:
            with reporting(tracked or NullLogger()) as logger, \
                    measure(children=launched) as cost:
                if launched:
                    launch.run_launched(name, params, paths.root, track=track, on_line=on_line,
                                        run_id=tracked.run_id if tracked else None)
                    metrics = read_json(paths.metrics_file(info.report or name),
                                        produced_by=name)
                else:
                    metrics = stages.get(name)(params, paths, logger) or {}
            figures = {f"resources/{key}": value for key, value in cost.items()}
            if tracked:
                tracked.log_metrics(figures)
        return {**{key: value for key, value in metrics.items()
                   if isinstance(value, (int, float, str, bool))}, **figures}


@contextlib.contextmanager
def _one_at_a_time(name: str, params: Params, paths: Paths):
    """Check the disk, then hold `.rlhf/locks/<stage>.lock`: a second run of the stage in this
    project stops with one line naming the first, instead of interleaving writes and pruning
    its checkpoints. The kernel drops the lock when its holder dies, kill -9 included."""
    _check_disk(name, params, paths)
    path = paths.root / ".rlhf" / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"stage {name} is already running in {paths.root.resolve()} "
                            f"({holder}); wait for it to end, or stop it") from None
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        with _disk_errors_in_one_line(name):
            yield


# How a full or read-only disk surfaces: OSError, safetensors' IoError, torch's zip writer
# (whose short write, "unexpected pos" or "file write failed", is a full disk).
_DISK_TROUBLE = re.compile(r"No space left|StorageFull|Disk quota|Read-only file system|"
                           r"(unexpected pos|file write failed)")


@contextlib.contextmanager
def _disk_errors_in_one_line(name: str):
    try:
        yield
    except Exception as exc:
        trouble = _DISK_TROUBLE.search(str(exc))
        if trouble is None:
            raise
        where = getattr(exc, "filename", None) or "its outputs"
        why = "No space left on device" if trouble[1] else trouble[0]
        raise UserError(f"stage {name} could not write {where} ({why}); "
                        "its previous outputs and checkpoints are kept: free some space and "
                        "rerun it to resume") from None


def _mb(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_disk(name: str, params: Params, paths: Paths) -> None:
    """Before any work: the stage's folders are writable and have room for its outputs and
    checkpoints, estimated from the size of the weights it starts from."""
    info = stages.info(name)
    base = params.model.name_or_path
    start = next((folder for folder in (paths.sft, Path(base)) if folder.is_dir()), None)
    if start is not None:
        weights = sum(f.stat().st_size for f in start.glob("*.safetensors"))
    elif base == "builtin":
        from rlhf.data.builtin_sort import ALPHABET
        from rlhf.models.builtin import weight_bytes

        weights = weight_bytes(params.model, ALPHABET)
    else:  # a hub model not downloaded yet: its size is unknown here
        weights = 0
    checkpoint = 3 * weights * info.trained_models  # weights and Adam's two moments
    # The newest `keep` checkpoints and the one being written, less those already there.
    checkpoints = ((params.train.checkpoint_keep + 1) * checkpoint
                   - _folder_bytes(paths.checkpoints / name))
    for folder, need in ((paths.root / "models", weights * info.saved_models),
                         (paths.checkpoints, checkpoints), (paths.metrics, 0)):
        folder = folder.resolve()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise UserError(f"stage {name} cannot write in {existing} ({exc.strerror}); make "
                            "it writable, or run the project from another folder") from None
        free = shutil.disk_usage(existing).free
        if need > free:
            lower = (" or lower train.checkpoint_keep" if folder.name == "checkpoints" else "")
            raise UserError(f"stage {name} needs about {_mb(need)} free in {existing} for its "
                            f"{folder.name}, which has {_mb(free)}; free some space{lower}")


def _offline_if_hub_unreachable(params: Params, paths: Paths) -> None:
    """Go offline at once when a hub id is named and the hub cannot be reached: its client
    would retry each file for a minute; offline, what is cached still loads and anything else
    fails in one line. (Set before the stage imports the hub client, which reads it once.)"""
    from rlhf.data.sources import looks_like_path

    named = (params.model.name_or_path, params.data.source, params.data.sft_source,
             params.data.prompts_source)
    if os.environ.get("HF_HUB_OFFLINE") or not any(
            name and name != "builtin" and not looks_like_path(name)
            and not (paths.root / name).exists() and not Path(name).exists()
            for name in named):
        return
    hub = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((hub.hostname, hub.port or 443), timeout=5).close()
    except OSError as exc:
        os.environ["HF_HUB_OFFLINE"] = "1"
        logging.getLogger("rlhf").warning(
            f"the hub {hub.geturl()} cannot be reached ({exc.strerror or exc}): only models "
            "and datasets in the local cache can load")
