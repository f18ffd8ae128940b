"""MLflow writes that survive an outage: what the server cannot take now goes to disk.

A tracking server that goes away mid-PPO must cost neither the training nor a single metric.
Every write of an `MLflowLogger` (metrics, tags, params, artifacts, the run's final status)
goes through `RunBuffer.write`:

- while nothing is pending it is sent at once; if the server does not answer (connection
  refused, timeout, 5xx) the write is appended to `<root>/.rlhf/mlflow-buffer/<run_id>.jsonl`
  and the run goes *offline* (one warning line on stderr);
- while offline every write is appended, in order, and at most every `RETRY_SECONDS` a short
  probe (`PROBE_TIMEOUT`) decides whether to replay the file: records are sent in order with
  their original steps and timestamps, and the file shrinks as they land;
- when the run ends, replaying may take `END_SECONDS`; whatever is still there is sent by the
  next command (`rlhf sync`, or the start of the next `rlhf run` / `rlhf stage`).

Replaying is idempotent: MLflow keeps one metric value per (key, step, timestamp, value), so a
record sent twice (a crash between sending and trimming the file) is not counted twice.
MLflow's HTTP client would wait on a dead or hung server for minutes; `http_defaults` shortens
that (unless the user set MLFLOW_HTTP_REQUEST_* themselves) so a failed write costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from rlhf.redact import redact_text, redact_value

BUFFER_DIR = Path(".rlhf") / "mlflow-buffer"
RETRY_SECONDS = float(os.environ.get("RLHF_MLFLOW_RETRY_SECONDS", "15"))
"""How often an offline run probes the server (a probe costs at most PROBE_TIMEOUT)."""
PROBE_TIMEOUT = 1.5  # training waits on an offline run's probes
END_SECONDS = 3.0  # replaying at a run's end; with a last batch and one try to end the run
# (<= 6 s each), a hung server costs a run's end ~8 s, 15 at worst
MAX_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics
API_CHECK = "/api/2.0/mlflow/experiments/search"
NOT_MLFLOW = "is not an MLflow tracking server"

HTTP_DEFAULTS = {
    # MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) give minutes of silence
    # per call against a dead or hung server (one that accepts and never answers); these give
    # two tries of 3 s (MLflow uses the timeout for connect and read), then the buffer takes
    # over. An MLflow server answers in milliseconds; the timeout bounds silence, not uploads.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
}

_root: Optional[Path] = None
_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def http_defaults() -> None:
    """Short timeouts and retries for MLflow's HTTP client, unless the user chose their own."""
    import logging

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # urllib3 prints a line per retry; the buffer's one warning says what matters.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def set_root(project_root: Path | None) -> None:
    """The project whose `.rlhf/mlflow-buffer` new loggers use (`configure` sets it)."""
    global _root
    _root = None if project_root is None else Path(project_root).resolve()


def current_root() -> Optional[Path]:
    return _root


def buffer_dir(project_root: Path) -> Path:
    return Path(project_root) / BUFFER_DIR


def _lock(path: Path) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.RLock())


def is_outage(exc: BaseException) -> bool:
    """True when the server is unreachable or failing, not when it refused a bad request."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # A dead server surfaces as INTERNAL_ERROR ("API request to ... failed with exception
        # ... Max retries exceeded"); a 4xx (a bad metric, a deleted run) must not be retried.
        return exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE",
                                  "REQUEST_LIMIT_EXCEEDED", "ENDPOINT_NOT_FOUND")
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or \
        type(exc).__module__.startswith(("requests", "urllib3"))


def outage_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    for needle, reason in (("refused", "connection refused"), ("timed out", "timed out"),
                           ("timeout", "timed out"), ("max retries", "cannot connect")):
        if needle in text:
            return reason
    return redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:120]


def probe(tracking_uri: str, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """None if the tracking server answers an MLflow API call, else why not (no credentials;
    starts with NOT_MLFLOW if something else answers).

    Only http(s) stores can be down in this sense; a local SQLite store always answers.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        # An API call, not /health, which any web server may answer; MLflow's own client
        # sends it, with the credentials and TLS settings the run's writes will use.
        response = http_request(get_default_host_creds(tracking_uri), API_CHECK, "GET",
                                params={"max_results": 1}, max_retries=0, timeout=timeout,
                                raise_on_status=False)
    except Exception as exc:
        why = outage_reason(exc)
        return f"no answer within {timeout:g} s" if why == "timed out" else why
    code = response.status_code
    if code in (401, 403):
        return f"answered {code}: check the credentials in the URI or " \
               "MLFLOW_TRACKING_USERNAME/PASSWORD"
    if code >= 500:
        return f"answered {code}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if code != 200 or not isinstance(body, dict):
        return f"{NOT_MLFLOW} (GET {API_CHECK} answered {code}" \
               f"{'' if code != 200 else ', not MLflow JSON'})"
    return None


class RunBuffer:
    """Writes of one MLflow run, sent now or kept on disk until the server is back."""

    def __init__(self, run_id: str, project_root: Path, tracking_uri: str) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.path = buffer_dir(project_root) / f"{run_id}.jsonl"
        self.files = self.path.with_suffix(".files")
        self._last_attempt = 0.0
        self._warned = False

    # -- writing

    def pending(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def write(self, record: dict[str, Any], client) -> None:
        """Send `record` now, or keep it (in order) if the server is away."""
        with _lock(self.path):
            if self.pending():
                self._append(record)
                self._maybe_flush(client)
                return
            try:
                send(client, self.run_id, record, self.files)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.keep(record, exc)

    def keep(self, record: dict[str, Any], exc: Optional[BaseException] = None) -> None:
        """Append `record` without trying the server (it just failed with `exc`)."""
        with _lock(self.path):
            self._append(record)
            self._last_attempt = time.monotonic()
            if exc is not None:
                self._warn(exc)

    def flush(self, client, deadline: Optional[float] = None) -> bool:
        """Replay the file now, until `deadline` (time.monotonic()); True if empty after."""
        with _lock(self.path):
            return self._maybe_flush(client, force=True, deadline=deadline)

    def _append(self, record: dict[str, Any]) -> None:
        if record["op"] == "artifact" and "path" in record:
            # A copy: the file may be rewritten before the server is back.
            source = Path(record["path"])
            name = f"{uuid.uuid4().hex[:8]}-{source.name}"
            self.files.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, self.files / name)
            else:
                shutil.copy2(source, self.files / name)
            record = {"op": "artifact", "file": name, "artifact_path": record.get("artifact_path")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        with open(self.path, "a") as handle:
            if fresh:
                # The URI is kept redacted: `rlhf sync` sends to the configured server only
                # if it is the one the run was on.
                handle.write(json.dumps({"op": "header", "run_id": self.run_id,
                                         "tracking_uri": redact_value(self.tracking_uri)}) + "\n")
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _warn(self, exc: BaseException) -> None:
        if self._warned:
            return
        self._warned = True
        print(f"warning: MLflow server {redact_value(self.tracking_uri)} is not answering "
              f"({outage_reason(exc)}); training goes on and run {self.run_id}'s metrics are "
              f"kept in {self.path}; "
              "they are sent when the server is back, or by `rlhf sync`",
              file=sys.stderr, flush=True)

    def _maybe_flush(self, client, force: bool = False, deadline: Optional[float] = None) -> bool:
        if not self.pending():
            return True
        now = time.monotonic()
        if not force and now - self._last_attempt < RETRY_SECONDS:
            return False
        self._last_attempt = now
        if probe(self.tracking_uri) is not None:
            return False
        sent = replay(self.path, client, deadline)
        if sent is not None and self._warned:
            print(f"MLflow server {redact_value(self.tracking_uri)} is back: sent {sent} "
                  f"buffered records of run {self.run_id}", file=sys.stderr, flush=True)
            self._warned = False
        return sent is not None


# ---------------------------------------------------------------------------------------------
# Sending and replaying


def send(client, run_id: str, record: dict[str, Any], files: Path) -> None:
    """One buffered record to MLflow, with its original steps and timestamps."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "metrics":
        metrics = [Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in record["metrics"]]
        for start in range(0, len(metrics), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH], synchronous=True)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()],
                         synchronous=True)
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()],
                         synchronous=True)
    elif op == "artifact":
        path = Path(record["path"]) if "path" in record else files / record["file"]
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "table":
        import mlflow

        mlflow.log_table(data=record["data"], artifact_file=record["artifact_file"],
                         run_id=run_id)
    elif op == "terminate":
        client.set_terminated(run_id, record["status"], end_time=record.get("end_time"))
    elif op != "header":
        raise ValueError(f"unknown buffered record {op!r}")


def _read(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write: the rest is still good
    return records


def _coalesce(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neighbouring metric records merged into batches (order kept): a long outage replays in
    a few requests rather than one per step."""
    merged: list[dict[str, Any]] = []
    for record in records:
        last = merged[-1] if merged else None
        if (record["op"] == "metrics" and last is not None and last["op"] == "metrics"
                and len(last["metrics"]) + len(record["metrics"]) <= MAX_BATCH):
            last["metrics"] = last["metrics"] + record["metrics"]
        else:
            merged.append(dict(record))
    return merged


def replay(path: Path, client, deadline: Optional[float] = None) -> Optional[int]:
    """Send a buffer file's records in order; the number sent, or None if the server went
    away again or `deadline` (time.monotonic()) passed (the file then holds what is left)."""
    records = _read(path)
    header = next((r for r in records if r["op"] == "header"), {"op": "header"})
    body = [r for r in records if r["op"] != "header"]
    run_id = header.get("run_id") or path.stem
    files = path.with_suffix(".files")
    batches = _coalesce(body)
    for index, record in enumerate(batches):
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("out of time")
            send(client, run_id, record, files)
        except Exception as exc:
            if not is_outage(exc):
                raise
            left = [header, *batches[index:]]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in left))
            os.replace(tmp, path)
            return None
    path.unlink(missing_ok=True)
    shutil.rmtree(files, ignore_errors=True)
    return len(body)


def buffered_runs(project_root: Path) -> list[Path]:
    folder = buffer_dir(project_root)
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def sync_file(path: Path, tracking_uri: str, client) -> tuple[Optional[int], str]:
    """Send one buffer file if it was kept for this server: (records sent or None, note)."""
    header = next((r for r in _read(path) if r["op"] == "header"), {})
    recorded, shown = header.get("tracking_uri"), redact_value(tracking_uri)
    if recorded and recorded != shown:
        return None, f"recorded for {recorded}, not {shown}; set MLFLOW_TRACKING_URI to it " \
                     "and run `rlhf sync`"
    with _lock(path):
        sent = replay(path, client)
    return sent, "sent" if sent is not None else "server went away"
