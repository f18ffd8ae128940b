"""A temporary Prefect server that dies with the `rlhf run` that started it.

With no PREFECT_API_URL, Prefect 3.8 starts a temporary server itself
(`prefect.server.api.server.SubprocessASGIServer`: `python -m uvicorn ... create_app` on a
random port) and stops it from an `atexit` hook, which never runs after kill -9: the server is
orphaned, holding its port and database. `rlhf run` starts the same server itself instead,
with the kernel's parent-death signal set (Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`), and
points Prefect at it; when `rlhf run` dies, however it dies, the kernel kills the server.
(Prefect's public `prefect server start --no-ui` would do too, but each start costs about 1.3 s
more, in time and CPU, and it runs the full server's background services: measured side by
side on this project's 2-core machine.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

from rlhf.mlops.launch import die_with_parent, free_port, wait_until_healthy

LOG = Path(".rlhf") / "prefect-server.log"


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues in the background while the server is
    up (Prefect's own temporary server is stopped only at exit, after they are sent)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10, at_exit=False)
        except Exception:  # best effort: the run itself is over
            pass


def _api_url_set() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@contextlib.contextmanager
def temporary_server(root: Path, timeout: Optional[float] = None) -> Iterator[Optional[str]]:
    """Yield the API URL of a temporary server for the block, or None if one is configured."""
    if _api_url_set():
        yield None
        return
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  get_current_settings, temporary_settings)

    import prefect

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    env.pop("PREFECT_API_URL", None)
    log_path = Path(root) / LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: die_with_parent(parent))
    try:
        # A fresh database is migrated on the first start, which can take a while.
        wait_until_healthy(f"{url}/health", server, timeout or max(
            90.0, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()),
            "the temporary Prefect server", log_path,
            or_else=", or set PREFECT_API_URL to a running server")
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
