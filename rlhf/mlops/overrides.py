"""`rlhf run --set k=v`: the overrides hold for that run only, and credentials stay hidden.

DVC reads the params file to decide what reruns and records it in dvc.lock, so during the run
the file holds the overrides (as under `dvc exp run -S`). `applied` writes them and puts the
file back as it was unless the run's training stages succeed: on an error, and, through a
small guard process, when the run is killed (kill -9 included). After success the file keeps
them, so the file, the artifacts and dvc.lock agree.

Prefect stores a flow's parameters: overrides holding a credential are passed to the flow
redacted (`hide`), and the flow takes the originals from this process (`reveal`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rlhf.config import write_overrides
from rlhf.errors import UserError
from rlhf.redact import REDACTED, redact_override

# Waits for the run to end (its stdin closes, however the run dies), then puts the saved
# file back if the run has not kept the overrides (it removes the saved copy when it does).
_GUARD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()
saved, target = sys.argv[1:3]
if os.path.exists(saved):
    os.replace(saved, target)
"""


@contextlib.contextmanager
def applied(params_file: str | Path, overrides: list[str]) -> Iterator[Callable[[], None]]:
    """Within the block the params file holds `overrides`; call the yielded `keep()` once
    they produced what the file now describes, else the file is put back when the block
    ends (or the process dies)."""
    if not overrides:
        yield lambda: None
        return
    target = Path(params_file).resolve()
    saved = target.with_name(f".{target.name}.before-run-{os.getpid()}")
    saved.write_bytes(target.read_bytes())
    guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(saved), str(target)],
                             stdin=subprocess.PIPE, start_new_session=True)
    try:
        write_overrides(target, overrides)
        yield lambda: saved.unlink(missing_ok=True)
    finally:
        if saved.exists():
            os.replace(saved, target)
        guard.stdin.close()
        guard.wait()


_HELD: dict[str, str] = {}
"""Overrides holding a credential, by their redacted text (this process only)."""


def hide(overrides: Iterable[str]) -> list[str]:
    """The overrides as Prefect may store them; the originals stay in this process."""
    shown = []
    for text in overrides:
        safe = redact_override(text)
        if safe != text:
            _HELD[safe] = text
        shown.append(safe)
    return shown


def reveal(overrides: Iterable[str]) -> list[str]:
    """The overrides as given, credentials included (from `hide`, this process)."""
    revealed = []
    for text in overrides:
        if REDACTED in text:
            if text not in _HELD:
                raise UserError(f"override {text!r} held a credential, which is never stored "
                                "in Prefect; put it in the params file (or the environment it "
                                "reads) instead of --set")
            text = _HELD[text]
        revealed.append(text)
    return revealed
