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
"""

from __future__ import annotations

import contextlib
import logging
import os
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
        return mt.stage_run(name, parent_run_id, tags=tags,
                            resume_run_id=resume and resume.info.run_id)
    return mt.pipeline_run(params.registry.experiment, params, tags={"stage": name, **tags},
                           run_name=f"stage-{name}", project_root=paths.root)


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
    if launch.rank() != 0:  # another rank of a launched group: rank 0 tracks and reports
        return stages.get(name)(params, paths) or {}
    run = contextlib.nullcontext(None)
    if track:
        from rlhf.mlops import mlflow_tracking as mt

        mt.ensure_reachable(mt.configure(paths.root))
        mt.recover(params.registry.experiment, paths.root)
        run = _tracked_run(name, params, paths, parent_run_id, tags or {})
    launched = launch.wants_launch(name, params)
    with run as tracked:
        with reporting(tracked or NullLogger()) as logger, measure(children=launched) as cost:
            if launched:
                launch.run_launched(name, params, paths.root, track=track, on_line=on_line,
                                    run_id=tracked.run_id if tracked else None)
                metrics = read_json(paths.metrics_file(info.report or name), produced_by=name)
            else:
                metrics = stages.get(name)(params, paths, logger) or {}
        figures = {f"resources/{key}": value for key, value in cost.items()}
        if tracked:
            tracked.log_metrics(figures)
    return {**{key: value for key, value in metrics.items()
               if isinstance(value, (int, float, str, bool))}, **figures}
