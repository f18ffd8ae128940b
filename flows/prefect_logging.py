"""What a running stage shows in Prefect: its log lines and its completions tables.

Stages log progress through Python's `rlhf` loggers (step, figures, ETA: `rlhf.progress`) and
report tables through their `MetricsLogger`. Inside a Prefect task, `stage_reporting` forwards
both: log records to the task's run logger (the Prefect UI's logs tab), tables to a Prefect
table artifact per stage (in addition to MLflow).

A user's mistake (`rlhf.errors.UserError`) is one line on the console: `user_errors_in_one_line`
keeps Prefect's traceback and repeated state lines off it (the Prefect UI keeps them).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.logging.handlers import PrefectConsoleHandler

from rlhf.errors import UserError


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger) -> None:
        super().__init__(level=logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


class PrefectReportingLogger:
    """A stage's `MetricsLogger` whose tables also become Prefect table artifacts; everything
    else (metrics, artifacts, `run_id`) goes to the wrapped logger."""

    def __init__(self, inner, stage: str) -> None:
        self._inner, self._stage = inner, stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]],
                  step: int | None = None) -> None:
        self._inner.log_table(name, rows, step=step)
        at = f" at step {step}" if step is not None else ""
        create_table_artifact(key=name.replace("_", "-").lower(), table=[dict(r) for r in rows],
                              description=f"{self._stage}: {name}{at}")


@contextmanager
def stage_reporting(stage: str, logger) -> Iterator[PrefectReportingLogger]:
    """Within the block, `rlhf` log records reach this task's Prefect logs, and only them:
    the run logger prints each line once and sends it to the Prefect UI (the CLI's own
    progress handler and the root logger's Prefect handler would print it twice more)."""
    package_logger = logging.getLogger("rlhf")
    saved = package_logger.level, package_logger.handlers[:], package_logger.propagate
    package_logger.handlers[:] = [_ToRunLogger(get_run_logger())]
    package_logger.propagate = False
    package_logger.setLevel(logging.INFO)
    try:
        yield PrefectReportingLogger(logger, stage)
    finally:
        package_logger.setLevel(saved[0])
        package_logger.handlers[:], package_logger.propagate = saved[1], saved[2]


def _user_error_names() -> set[str]:
    found, todo = set(), [UserError]
    while todo:
        kind = todo.pop()
        found.add(kind.__name__)
        todo += kind.__subclasses__()
    return found


class _UserErrorsInOneLine(logging.Filter):
    """For a UserError, the console drops Prefect's traceback and the task's "Finished in
    state Failed" line; the flow's state line stays unless the caller prints the error."""

    def __init__(self, caller_prints_error: bool) -> None:
        super().__init__()
        self.caller_prints_error = caller_prints_error

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            return False
        if record.levelno < logging.INFO or not isinstance(record.msg, str) \
                or not record.msg.startswith("Finished in state Failed"):
            return True
        text = record.getMessage()
        if not any(f"{name}: " in text for name in _user_error_names()):
            return True
        return record.name == "prefect.flow_runs" and not self.caller_prints_error


def user_errors_in_one_line(caller_prints_error: bool = False) -> None:
    """Install the console filter once per process (the first caller's choice holds: `rlhf
    run` prints the error itself; a deployment's flow run leaves Prefect's one state line)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _UserErrorsInOneLine) for f in handler.filters):
            handler.addFilter(_UserErrorsInOneLine(caller_prints_error))
