"""Progress bars for long loops (rich), quiet when output is not a terminal."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def _enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("RLHF_NO_PROGRESS")


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator["_Bar"]:
    """A bar with elapsed time and an ETA; `completed` steps are already done (a resume)."""
    if not _enabled():
        yield _Bar(None, None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=info)
