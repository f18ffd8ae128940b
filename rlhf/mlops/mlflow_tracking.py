"""MLflow glue: where runs go, a `MetricsLogger` that writes to a run, parent and stage runs.

Stages never import this module; the CLI and the Prefect flow do:

    with pipeline_run("rlhf", params, tags={"prefect.flow_run_id": fid}) as parent:
        with stage_run("ppo", parent.run_id) as logger:
            ppo.run(params, paths, logger=logger)

A stage run may be opened from another thread (a Prefect task runner) while the parent is
open in the main thread: MLflow's active-run stack is thread-local, so `stage_run` names its
parent explicitly (`parent_run_id=`) and every logger call names its run (`run_id=`) instead
of relying on "the active run".

Nothing that looks like a credential is ever sent to MLflow: see `redact`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from rlhf.config import Params

REDACTED = "<redacted>"

# Words of a key (split on `_ . - /`, spaces and camelCase) that mark its value as a secret.
_SECRET_WORDS = {
    "password", "passwd", "pwd", "secret", "token", "key", "apikey", "accesskey",
    "secretkey", "credential", "credentials", "auth", "authorization", "private",
    "privatekey", "cookie",
}  # fmt: skip
# Values that are secrets whatever their key is called.
_SECRET_VALUES = [
    re.compile(r"^\s*(bearer|basic|token)\s+\S+", re.IGNORECASE),  # HTTP auth headers
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face tokens
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
# scheme://user:password@host -> scheme://user:<redacted>@host
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<pw>[^@/\s]*)@")


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
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry_uri)
    for name, value in (("MLFLOW_TRACKING_URI", uri), ("MLFLOW_REGISTRY_URI", registry_uri)):
        # A user's own setting stays theirs, or a second call would fall back to SQLite.
        if users[name] is None and os.environ.get(name) == value:
            _written_by_configure[name] = value
    return uri


def _key_words(key: str) -> set[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return {word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word}


def is_secret_key(key: str) -> bool:
    """True for keys like `aws_secret_access_key`, `db.password`, `apiKey`, `MLFLOW_TRACKING_TOKEN`.

    Matches whole words, so `eval.max_new_tokens` or `ppo.kl_coef` are not secrets.
    """
    return bool(_key_words(key) & _SECRET_WORDS)


def redact_value(value: str) -> str:
    """Hide the password of `scheme://user:pw@host` URIs; hide known token formats entirely."""
    if any(pattern.search(value) for pattern in _SECRET_VALUES):
        return REDACTED
    return _URI_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", value)


def redact(items: Mapping[str, Any]) -> dict[str, str]:
    """Params or tags as strings, with anything that looks like a credential replaced."""
    clean: dict[str, str] = {}
    for key, value in items.items():
        text = "" if value is None else str(value)
        clean[str(key)] = REDACTED if is_secret_key(str(key)) and text else redact_value(text)
    return clean


def git_commit(cwd: Path | None = None) -> str | None:
    """`git rev-parse HEAD` in `cwd`, or None outside a git repository (or before any commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _git_dirty(cwd: Path | None = None) -> bool | None:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


class MLflowLogger:
    """A `rlhf.tracking.MetricsLogger` that writes to one MLflow run, named by id.

    Every call passes `run_id` explicitly, so the logger works from any thread, whether or
    not its run is the thread's active run.
    """

    def __init__(self, run_id: str | None = None) -> None:
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("MLflowLogger() needs a run_id or an active MLflow run")
            run_id = active.info.run_id
        self.run_id = run_id
        self._client = MlflowClient()

    @property
    def experiment_id(self) -> str:
        return self._client.get_run(self.run_id).info.experiment_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One batched write; names such as `objective/kl` are kept as they are."""
        timestamp = int(time.time() * 1000)
        batch = [
            Metric(key=str(name), value=float(value), timestamp=timestamp, step=step or 0)
            for name, value in metrics.items()
        ]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, to the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, name: str, rows, step: int | None = None) -> None:
        """A table artifact `tables/<name>-step<step>.json` (MLflow's table view reads it)."""
        if not rows:
            return
        columns = list(rows[0])
        data = {column: [row.get(column) for row in rows] for column in columns}
        suffix = f"-step{step:06d}" if step is not None else ""
        mlflow.log_table(data=data, artifact_file=f"tables/{name}{suffix}.json",
                         run_id=self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, redacted (see `redact`)."""
        if params:
            mlflow.log_params(redact(params), run_id=self.run_id, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, redacted (see `redact`)."""
        for key, value in redact(tags).items():
            self._client.set_tag(self.run_id, key, value)


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
def pipeline_run(
    experiment: str,
    params: Params,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    project_root: Path | None = None,
) -> Iterator[MLflowLogger]:
    """The parent run of one pipeline execution; yields a logger bound to it (`.run_id`).

    Logs the flattened params and tags: `git.commit` (absent outside a git repository),
    `git.dirty`, `params.digest`, plus `tags` (Prefect flow run id, DVC hashes, ...).
    The run ends FINISHED, or FAILED if the body raises.
    """
    all_tags: dict[str, Any] = {"params.digest": params.digest()}
    commit = git_commit(project_root)
    if commit is not None:
        all_tags["git.commit"] = commit
        all_tags["mlflow.source.git.commit"] = commit
        dirty = _git_dirty(project_root)
        if dirty is not None:
            all_tags["git.dirty"] = str(dirty).lower()
    all_tags.update(tags or {})
    with mlflow.start_run(
        experiment_id=experiment_id(experiment),
        run_name=run_name,
        nested=mlflow.active_run() is not None,
        tags=redact(all_tags),
    ) as run:
        logger = MLflowLogger(run.info.run_id)
        logger.log_params(params.flat())
        yield logger


@contextlib.contextmanager
def stage_run(
    stage_name: str, parent_run_id: str | None, tags: Mapping[str, Any] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[MLflowLogger]:
    """A child run of `parent_run_id` for one stage; yields a logger bound to it.

    `resume_run_id` (from the checkpoint of an interrupted stage) continues that run instead
    of starting one, re-parented under `parent_run_id`, so one stage run holds every step.
    Works from any thread: with no active run in this thread the child starts as a top-level
    fluent run whose parent is set by id; if the parent is this thread's active run it starts
    with `nested=True`. The stage run is this thread's active run inside the block (so
    `mlflow.*` fluent calls made there land in it) and ends FAILED if the body raises.
    """
    client = MlflowClient()
    active = mlflow.active_run()
    all_tags = redact({"stage": stage_name, **(tags or {})})
    resumed = existing_run(resume_run_id)
    if resumed is not None:
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        context = mlflow.start_run(run_id=resumed.info.run_id, nested=active is not None)
    else:
        parent = client.get_run(parent_run_id) if parent_run_id else None
        context = mlflow.start_run(
            experiment_id=parent.info.experiment_id if parent else None,
            run_name=stage_name,
            parent_run_id=parent_run_id,
            nested=active is not None,
            tags=all_tags,
        )
    with context as run:
        logger = MLflowLogger(run.info.run_id)
        if resumed is not None:
            logger.set_tags({**all_tags, "rlhf.resumed": "true"})
        yield logger


def existing_run(run_id: str | None):
    """The run `run_id` if this tracking store has it, else None (a new store, a deleted run)."""
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
