"""Progress of long loops: a rich bar with an ETA on a terminal, and log lines for everyone else.

Every 5% of the loop (and at its end) a line goes to the `rlhf.progress` logger: step, the
loop's latest figures (score, KL, loss...) and an ETA. The Prefect flow forwards `rlhf` loggers
to the task's run logger, so a running PPO shows in the Prefect UI; the CLI prints them when
stderr is not a terminal (DVC, CI, a worker's log).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

log = logging.getLogger("rlhf.progress")
LOG_LINES = 20
"""Log lines per loop (one every 5%)."""


def _enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("RLHF_NO_PROGRESS")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator["_Bar"]:
    """A bar with elapsed time and an ETA; `completed` steps are already done (a resume)."""
    if not _enabled():
        yield _Bar(None, None, description, total, completed)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task, description, total, completed)


class _Bar:
    def __init__(self, progress: Optional[Progress], task, description: str, total: int,
                 completed: int):
        self._progress, self._task = progress, task
        self._description, self._total = description, total
        self._start_step, self._step = completed, completed
        self._started = time.monotonic()
        self._every = max(1, total // LOG_LINES)

    def advance(self, info: str = "") -> None:
        self._step += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=info)
        if self._step % self._every == 0 or self._step == self._total:
            done = self._step - self._start_step
            rate = (time.monotonic() - self._started) / max(done, 1)
            eta = format_seconds(rate * (self._total - self._step))
            log.info("%s step %d/%d (%d%%) %s eta %s", self._description, self._step,
                     self._total, 100 * self._step // max(self._total, 1), info, eta)
