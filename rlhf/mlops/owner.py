"""Who owns a run: this host and process, recorded so the next start can tell a dead one.

A run whose process was killed (kill -9, a lost machine) stays RUNNING in MLflow and Prefect
forever. Each run records `host`, `pid` and the process's start time; a later start on the
same host sees the process gone (or the pid reused by another process, which has another
start time) and ends the run KILLED / Crashed.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from rlhf.io import pid_alive


def host() -> str:
    return socket.gethostname()


def start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # field 22 of stat, counted from field 3


def me() -> dict[str, str]:
    """{host, pid, pid_start} of this process."""
    pid = os.getpid()
    return {"host": host(), "pid": str(pid), "pid_start": start_time(pid) or ""}


def is_dead(owner: dict[str, str]) -> bool:
    """True if `owner` ran on this host and its process is gone; False if alive or unknown
    (another host's process cannot be checked from here)."""
    if owner.get("host") != host() or not str(owner.get("pid", "")).isdigit():
        return False
    pid = int(owner["pid"])
    if not pid_alive(pid):
        return True
    recorded, now = owner.get("pid_start") or "", start_time(pid)
    return bool(recorded and now and recorded != now)
