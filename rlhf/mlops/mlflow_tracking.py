"""MLflow glue: where runs go, a `MetricsLogger` that writes to a run, parent and stage runs.

Stages never import this module; the CLI and the Prefect flow do:

    with tracked_run("pipeline", "rlhf", params, tags={"prefect.flow_run_id": fid}) as parent:
        with tracked_run("ppo", "rlhf", parent_run_id=parent.run_id) as logger:
            ppo.run(params, paths, logger=logger)

A stage run may be opened from another thread (a Prefect task runner) while the parent is
open in the main thread: MLflow's active-run stack is thread-local, so `tracked_run` names its
parent explicitly (`parent_run_id=`) and every logger call names its run (`run_id=`) instead
of relying on "the active run".

Nothing that looks like a credential is ever sent to MLflow: see `rlhf.redact`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow import MlflowClient

from rlhf.config import Params
from rlhf.errors import UserError
from rlhf.mlops import buffered, owner
from rlhf.redact import REDACTED, is_secret_key, redact, redact_value  # noqa: F401  (re-exported)

# MLflow's set_tracking_uri/set_registry_uri also write MLFLOW_*_URI into os.environ. What
# `configure` wrote there is remembered, so a later call for another project is not mistaken
# for a user's setting.
_written_by_configure: dict[str, str] = {}


def _user_setting(name: str) -> str | None:
    value = os.environ.get(name)
    return None if not value or value == _written_by_configure.get(name) else value


def store_root(project_root: Path) -> Path:
    """Where the default SQLite store lives: the project root, except in the copy of the
    repository that `dvc exp run --temp` or `--queue` runs in (under <repo>/.dvc/tmp/exps/,
    deleted afterwards): there, the same place in the repository the experiment came from,
    which DVC names in DVC_ROOT, so the experiment's runs and model versions are kept."""
    project = Path(project_root).resolve()
    origin = os.environ.get("DVC_ROOT")
    if not origin:
        return project
    origin_root = Path(origin).resolve()
    temp_area = origin_root / ".dvc" / "tmp"
    if not project.is_relative_to(temp_area):  # a workspace run: DVC_ROOT is this repository
        return project
    for copy_root in (project, *project.parents):  # the temporary copy's own .dvc
        if copy_root == temp_area:
            break
        if (copy_root / ".dvc").is_dir():
            return origin_root / project.relative_to(copy_root)
    return project


def tracking_uri(project_root: Path) -> str:
    """`MLFLOW_TRACKING_URI` if the user set it, else a SQLite store `mlflow.db` in the
    project (`store_root`)."""
    return (_user_setting("MLFLOW_TRACKING_URI")
            or f"sqlite:///{store_root(project_root) / 'mlflow.db'}")


def configure(project_root: Path) -> str:
    """Point MLflow's tracking (and, unless `MLFLOW_REGISTRY_URI` is set, registry) at the store."""
    users = {name: _user_setting(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uri = tracking_uri(project_root)
    registry_uri = users["MLFLOW_REGISTRY_URI"] or uri
    buffered.set_root(project_root)
    if uri.startswith(("http://", "https://")):
        buffered.http_defaults()
    if redact_value(uri) != uri:
        # MLflow prints "View run ... at: <the URI>" on stdout, password included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    for name, value in (("MLFLOW_TRACKING_URI", uri), ("MLFLOW_REGISTRY_URI", registry_uri)):
        # A user's own setting stays theirs, or a second call would fall back to SQLite.
        if users[name] is None and os.environ.get(name) == value:
            _written_by_configure[name] = value
    return uri


def _git(cwd: Path | None, *args: str) -> str | None:
    """`git ARGS` in `cwd`: its output, or None outside a git repository (or on an error)."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(cwd: Path | None = None) -> str | None:
    """`git rev-parse HEAD` in `cwd`, or None outside a git repository (or before any commit)."""
    commit = _git(cwd, "rev-parse", "HEAD")
    return commit if commit and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


class MLflowLogger:
    """A `rlhf.tracking.MetricsLogger` that writes to one MLflow run, named by id.

    Every call passes `run_id` explicitly, so the logger works from any thread, whether or
    not its run is the thread's active run. With a project root (`configure` sets one) every
    write survives an outage: see `rlhf.mlops.buffered`. `logged` (metric key -> last step in
    the run) makes a resumed run skip the steps its stage replays from its checkpoint.
    """

    def __init__(self, run_id: str | None = None, project_root: Path | None = None,
                 logged: Mapping[str, int] | None = None) -> None:
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("MLflowLogger() needs a run_id or an active MLflow run")
            run_id = active.info.run_id
        self.run_id = run_id
        self._client = MlflowClient()
        self._logged = dict(logged or {})
        root = project_root or buffered.current_root()
        self._buffer = (buffered.RunBuffer(run_id, root, mlflow.get_tracking_uri())
                        if root is not None else None)

    @property
    def experiment_id(self) -> str:
        return self._client.get_run(self.run_id).info.experiment_id

    def _write(self, record: dict) -> None:
        if self._buffer is None:
            buffered.send(self._client, self.run_id, record, Path("."))
        else:
            self._buffer.write(record, self._client)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One batched write; names such as `objective/kl` are kept as they are. Steps a
        resumed run already holds are dropped: resuming is exact, they are the same values."""
        timestamp, step = int(time.time() * 1000), step or 0
        batch = [[str(name), float(value), timestamp, step] for name, value in metrics.items()
                 if step > self._logged.get(str(name), -1)]
        if batch:
            self._write({"op": "metrics", "metrics": batch})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, to the run's artifacts (a copy is kept
        while MLflow is away)."""
        self._write({"op": "artifact", "path": str(Path(path)), "artifact_path": artifact_path})

    def log_table(self, name: str, rows, step: int | None = None) -> None:
        """A table artifact `tables/<name>-step<step>.json` (MLflow's table view reads it)."""
        if not rows:
            return
        columns = list(rows[0])
        data = {column: [row.get(column) for row in rows] for column in columns}
        suffix = f"-step{step:06d}" if step is not None else ""
        self._write({"op": "table", "data": data, "artifact_file": f"tables/{name}{suffix}.json"})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, redacted (see `redact`)."""
        if params:
            clean = redact(params)
            items = list(clean.items())
            for start in range(0, len(items), 100):  # log_batch takes at most 100 params
                self._write({"op": "params", "params": dict(items[start:start + 100])})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, redacted (see `redact`)."""
        if tags:
            self._write({"op": "tags", "tags": redact(tags)})

    def flush(self, deadline: float | None = None) -> bool:
        """Send what an outage kept on disk now (until `deadline`, time.monotonic()); True if
        nothing is left."""
        return True if self._buffer is None else self._buffer.flush(self._client,
                                                                    deadline=deadline)

    def end(self, status: str) -> None:
        """End this thread's active run (this logger's) with `status`, even while offline:
        the status is then buffered after the metrics and sent with them. Waits on MLflow
        for ~15 s at most, then leaves the rest to `rlhf sync`, in one line."""
        self.flush(deadline=time.monotonic() + buffered.END_SECONDS)
        why = "before MLflow took all its records"
        try:
            mlflow.end_run(status)  # pops the active run first, then tells the server
        except Exception as exc:
            if self._buffer is None or not buffered.is_outage(exc):
                raise
            self._buffer.keep({"op": "terminate", "status": status,
                               "end_time": int(time.time() * 1000)})
            why = f"while MLflow server {redact_value(self._buffer.tracking_uri)} is not " \
                  f"answering ({buffered.outage_reason(exc)})"
        if self._buffer is not None and self._buffer.pending():
            print(f"warning: run {self.run_id} ends {status} {why}: {self._buffer.path} keeps "
                  "what MLflow has not got; `rlhf sync` sends it", file=sys.stderr, flush=True)


def default_artifact_location(uri: str) -> str | None:
    """For a local SQLite store `sqlite:///DIR/x.db`: `file://DIR/mlartifacts`, else None.

    MLflow's own default for a SQLite store is `./mlruns` under whatever the *current working
    directory* is when an experiment is created; keeping artifacts next to the database makes
    the store self-contained. Servers (http URIs) choose their artifact root themselves.
    """
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def experiment_id(name: str) -> str:
    """The experiment's id; created (artifacts next to a SQLite store) if it does not exist."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=default_artifact_location(mlflow.get_tracking_uri())
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def tracked_run(
    run_name: str, experiment: str, params: Params | None = None,
    parent_run_id: str | None = None, resume_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None, project_root: Path | None = None,
) -> Iterator[MLflowLogger]:
    """A run of `experiment`, this thread's active run inside the block; yields a logger
    bound to it (`.run_id`). It ends FINISHED, FAILED if the body raises, KILLED on Ctrl-C.

    - `parent_run_id`: a child of that run (a stage of a pipeline run), from any thread:
      MLflow's active-run stack is thread-local, so the parent is named by id.
    - `resume_run_id` (from the checkpoint of an interrupted stage): that run continues,
      re-parented under `parent_run_id`, so one stage run holds every step.
    - `params`: logged flattened, with the tags `params.digest`, `git.commit` and `git.dirty`
      (of the git repository at `project_root`; absent outside one).

    `tags` (Prefect ids, DVC hashes, ...) and the owner tags are set too, redacted.
    """
    client, active = MlflowClient(), mlflow.active_run()
    all_tags: dict[str, Any] = {**(tags or {}), **owner_tags()}
    if params is not None:
        all_tags["params.digest"] = params.digest()
        commit = git_commit(project_root)
        if commit is not None:
            all_tags["git.commit"] = all_tags["mlflow.source.git.commit"] = commit
            changes = _git(project_root, "status", "--porcelain", "--untracked-files=no")
            if changes is not None:
                all_tags["git.dirty"] = str(bool(changes)).lower()
    all_tags = redact(all_tags)
    resumed = existing_run(resume_run_id)
    if resumed is not None:
        run = mlflow.start_run(run_id=resumed.info.run_id, nested=active is not None)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
    else:
        run = mlflow.start_run(
            experiment_id=(client.get_run(parent_run_id).info.experiment_id if parent_run_id
                           else experiment_id(experiment)),
            run_name=run_name, parent_run_id=parent_run_id, nested=active is not None,
            tags=all_tags)
    # Resumed: the stage replays the steps after its checkpoint; their values are on the server.
    logged = {m.key: m.step for m in resumed.data.to_proto().metrics} if resumed else None
    logger = MLflowLogger(run.info.run_id, logged=logged)
    with _ending(logger):
        if resumed is not None:
            # The owner tags now name this process: the run is alive again.
            logger.set_tags({**all_tags, "rlhf.resumed": "true"})
        elif params is not None:
            logger.log_params(params.flat())
        yield logger


def existing_run(run_id: str | None):
    """The run `run_id` if this tracking store has it, else None (a new store, a deleted run)."""
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def owner_tags() -> dict[str, str]:
    """`rlhf.host`, `rlhf.pid`, `rlhf.pid_start`: lets a later start end the run KILLED if
    this process dies without ending it (see `end_dead_runs`)."""
    return {f"rlhf.{key}": value for key, value in owner.me().items()}


def _owner(run) -> dict[str, str]:
    """The process that `owner_tags` named in the run's tags."""
    return {key: run.data.tags.get(f"rlhf.{key}", "") for key in ("host", "pid", "pid_start")}


@contextlib.contextmanager
def _ending(logger: MLflowLogger) -> Iterator[None]:
    """End the run FINISHED, FAILED if the body raises, KILLED on Ctrl-C; while MLflow is
    away the status is buffered with the metrics instead of raising."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        logger.end("KILLED")
        raise
    except BaseException:
        logger.end("FAILED")
        raise
    logger.end("FINISHED")


def ensure_reachable(uri: str, or_else: str = ", or run without tracking (--no-track)") -> None:
    """Stop with one line if the tracking server does not answer as MLflow (within ~10 s);
    `or_else` ends the line with what else the command can do."""
    why = buffered.probe(uri, timeout=5.0)
    if why is not None and why.startswith(("no answer", "cannot", "connection")):
        why = buffered.probe(uri, timeout=5.0)  # one more chance: a server still starting
    if why is not None and why.startswith(buffered.NOT_MLFLOW):
        raise UserError(f"{redact_value(uri)} {why}; fix MLFLOW_TRACKING_URI{or_else}")
    if why is not None:
        raise UserError(f"MLflow tracking server {redact_value(uri)} is unreachable ({why}); "
                        f"start it or fix MLFLOW_TRACKING_URI{or_else}")


def end_dead_runs(experiment: str, project_root: Path) -> list[str]:
    """Runs of `experiment` left RUNNING by a process of this host that is gone: ended KILLED
    once their buffered records are sent (`sync_buffers`, which `recover` runs first; a
    buffer may hold the run's own end). Returns their ids."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`rlhf.host` = '{owner.host()}'",
        max_results=1000)
    ended = []
    for run in runs:
        who = _owner(run)
        if not owner.is_dead(who) or buffered.RunBuffer(
                run.info.run_id, project_root, mlflow.get_tracking_uri()).pending():
            continue  # alive, or records not sent yet: the next start tries again
        client.set_tag(run.info.run_id, "rlhf.ended_by",
                       f"a later start: process {who['pid']} on {who['host']} was gone")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def sync_buffers(project_root: Path) -> list[tuple[str, int | None, str]]:
    """Send what outages left in `<root>/.rlhf/mlflow-buffer` to the configured server:
    [(run_id, records sent or None, note)]. A run still alive in another process of this host
    is left to that process."""
    client, uri = MlflowClient(), mlflow.get_tracking_uri()
    results = []
    for path in buffered.buffered_runs(project_root):
        run_id = path.stem
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            results.append((run_id, None, f"{redact_value(uri)}: "
                            f"{buffered.probe(uri) or 'not answering'}"
                            if buffered.is_outage(exc) else "no such run on this server"))
            continue
        who = _owner(run)
        if run.info.status == "RUNNING" and who["pid"] and who["host"] == owner.host() \
                and not owner.is_dead(who):  # alive: it flushes its own file
            results.append((run_id, None, f"still running in process {who['pid']}; it sends "
                                          "its own records"))
            continue
        results.append((run_id, *buffered.sync_file(path, uri, client)))
    return results


def recover(experiment: str, project_root: Path) -> None:
    """At the start of a command: send buffers left by earlier outages, end dead runs KILLED."""
    for run_id, sent, note in sync_buffers(project_root):
        if sent is not None:
            print(f"sent {sent} records that an MLflow outage had kept for run {run_id}",
                  file=sys.stderr, flush=True)
    for run_id in end_dead_runs(experiment, project_root):
        print(f"run {run_id} was left RUNNING by a process that is gone: ended KILLED",
              file=sys.stderr, flush=True)
