"""What a stage cost: wall time, peak resident memory (RSS) and, on a GPU, peak GPU memory.

The peak RSS is per stage although every stage of `rlhf run` shares one process: Linux resets
a process's high-water mark (VmHWM) when "5" is written to /proc/self/clear_refs. A launched
multi-process stage runs in child processes; their peak is the largest child's (getrusage of
the children, which covers the launcher's ranks once they have exited).
"""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Iterator


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_kib() -> int:
    """This process's peak RSS since the last reset, in KiB (VmHWM; ru_maxrss elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@contextlib.contextmanager
def measure(children: bool = False) -> Iterator[dict]:
    """Fills the yielded dict with `wall_seconds`, `peak_rss_mb` (and `peak_gpu_mb` with a
    GPU) when the block ends; `children`: the work ran in child processes."""
    import torch

    _reset_peak_rss()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    figures: dict = {}
    start = time.perf_counter()
    try:
        yield figures
    finally:
        figures["wall_seconds"] = round(time.perf_counter() - start, 3)
        peak = _peak_rss_kib()
        if children:
            peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        figures["peak_rss_mb"] = round(peak / 1024, 1)
        if gpu:
            figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
