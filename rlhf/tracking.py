"""The small interface through which stages report metrics.

Stages never import MLflow, Prefect or DVC. They receive a `MetricsLogger` from the glue
(the CLI, the Prefect flow or `dvc repro` through the CLI) and call it. The default one just
prints nothing; the MLflow one lives in `rlhf.mlops.mlflow_logger`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence


class MetricsLogger(Protocol):
    """What a stage may report while it runs."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics, optionally at a training step."""

    def log_artifact(self, path: Path) -> None:
        """Record a file (a plot, a metrics json) produced by the stage."""

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]],
                  step: int | None = None) -> None:
        """Record a small table (e.g. sample completions with their scores) at a step."""


class NullLogger:
    """Discards everything: the default when a stage runs without tracking (and the
    pipeline's stand-in for its parent run under `--no-track`)."""

    run_id = None
    experiment_id = None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]],
                  step: int | None = None) -> None:
        pass


class RecordingLogger:
    """Keeps everything in memory; handy in tests and for summaries."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[Path] = []
        self.tables: list[tuple[str, int | None, list[dict]]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path) -> None:
        self.artifacts.append(Path(path))

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]],
                  step: int | None = None) -> None:
        self.tables.append((name, step, [dict(row) for row in rows]))
