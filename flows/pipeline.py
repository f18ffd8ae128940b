"""The Prefect flows: `rlhf-pipeline` (every stage, each a cached task) and `promote`.

    rlhf run [--set ppo.kl_coef=0.1]             # now, in this process
    rlhf serve --cron "0 3 * * *"                # flow.serve: on a schedule until Ctrl-C
    prefect work-pool create local --type process   # or: a deployment and a worker
    prefect deploy --all                         # reads prefect.yaml in this directory
    prefect worker start --pool local
    prefect deployment run 'rlhf-pipeline/scheduled'

The flow runs the same stage functions as `dvc repro` (`rlhf.stages`), one Prefect task per
stage: prepare → sft → reward → reference → ppo → evaluate → register. Which params each stage
reads, which stages it waits for and what it writes come from `dvc.yaml` (`rlhf.mlops.dag`),
written down once for both.

Caching. A stage that has nothing new to do is not run again; its task ends `Cached` and
returns what it returned last time. The cache key of a stage (`stage_cache_key`) hashes

- the stage's name;
- the params the stage reads (its `params:` in dvc.yaml);
- the content hashes of its inputs: each upstream task returns a sha256 of the files it wrote
  (its outs, metrics and plots in dvc.yaml), so a stage reruns exactly when an input's *content* changed (an upstream
  rerun that rewrites identical bytes leaves everything downstream cached);
- the source of the `rlhf` package (all its .py files; `rlhf/mlops` and `rlhf/cli.py` only
  for `register`, since the compute stages never import them) and the versions of the
  libraries that decide the numbers (torch, transformers, ...);
- for `register`, a hash of the MLflow tracking/registry URIs (a new store needs a new version).

Results (small dicts) are persisted as JSON under `<root>/.prefect-results`, so the cache
lives with the project and survives across processes (serve, workers); `RLHF_RESULT_STORAGE`
moves it to shared storage (`flows/results.py`) that every worker of a team reads. The cache
is never trusted blindly: if a stage's outputs are missing the task runs with `refresh_cache=True`,
and if a cached stage's outputs no longer hash to what it recorded (edited or replaced by
hand) it is run again the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import platform
from pathlib import Path
from typing import Any, Iterable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact,
                               create_table_artifact)
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run

from flows.results import RESULTS_DIR, describe, results_location  # noqa: F401 (RESULTS_DIR: API)
from rlhf.config import Params, load_params, write_overrides
from rlhf.errors import UserError
from rlhf.mlops import dag
from rlhf.mlops.safe_results import check_record, check_results_dir
from rlhf.paths import Paths
from rlhf.redact import REDACTED, redact_override, redact_text, redact_value


LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy")
"""Libraries whose versions are part of every compute stage's cache key."""

SQLITE_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` serves a local (SQLite) store by default."""


# ---------------------------------------------------------------------------------------------
# Hashes: outputs, sources, cache keys


def _sha256_tree(root: Path, relpaths: Iterable[str]) -> str:
    """One sha256 over the files under `relpaths` (files or directories): names and contents."""
    digest = hashlib.sha256()
    for rel in relpaths:
        base = root / rel
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else (
            [base] if base.is_file() else [])
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def outputs_exist(root: Path, stage: str) -> bool:
    """Whether every output dvc.yaml declares for `stage` exists."""
    return all((Path(root) / rel).exists() for rel in dag.read(root)[stage].outputs)


def outputs_hash(root: Path, stage: str) -> str:
    """The content hash of what `stage` wrote under `root`."""
    return _sha256_tree(Path(root), dag.read(root)[stage].outputs)


def source_hash(stage: str) -> str:
    """sha256 of the `rlhf` package's .py files that `stage` can depend on."""
    import rlhf

    package = Path(rlhf.__file__).resolve().parent
    files = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if stage != "register" and (rel.startswith("mlops/") or rel == "cli.py"):
            continue
        files.append(path)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def stage_params(params: Params, keys: Iterable[str]) -> dict[str, Any]:
    """The part of the params named by `keys` (a stage's `params:` in dvc.yaml), e.g.
    {"ppo": {...}, "data.source": "builtin"}."""
    dumped = params.model_dump(mode="json")
    picked: dict[str, Any] = {}
    for key in keys:
        section, _, field = key.partition(".")
        picked[key] = dumped[section][field] if field else dumped[section]
    return picked


def _external_inputs(params: Params, root: Path) -> dict[str, str]:
    """Content hashes of the local files a stage reads that no stage wrote: data sources and
    the base model when they name a local path (relative to the project root). A hub id is
    keyed by its name and its pinned revision (data.revision, model.revision: stage params),
    so with no revision pinned, a dataset or model changed upstream under the same name does
    not invalidate the cache: pin a commit sha, or delete the stage's outputs to rerun."""
    hashes = {}
    for key in ("data.source", "data.sft_source", "data.prompts_source", "model.name_or_path"):
        section, _, field = key.partition(".")
        value = getattr(getattr(params, section), field, None)
        if not value or value == "builtin":
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else root / path
        if path.exists():
            hashes[key] = _sha256_tree(path.parent, [path.name])
    return hashes


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The cache key of a stage task (named after its stage): see the module docstring."""
    stage = context.task.name
    params = Params.model_validate(parameters["params"])
    blob = {
        "stage": stage,
        "params": stage_params(params, dag.read(parameters["root"])[stage].params),
        "inputs": dict(sorted((parameters.get("inputs") or {}).items())),
        "source": source_hash(stage),
        "libraries": {"python": platform.python_version(),
                      **{name: _version(name) for name in LIBRARIES}},
    }
    if stage == "register":
        blob["libraries"]["mlflow"] = _version("mlflow")
    return f"{stage}-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:40]}"


# ---------------------------------------------------------------------------------------------
# One task per stage


@contextlib.contextmanager
def _redacted_errors():
    """Re-raise an error whose message holds a credential with the credential hidden: Prefect
    stores the message in the run's state and logs."""
    try:
        yield
    except Exception as exc:
        message = str(exc)
        if redact_text(message) == message:
            raise
        try:
            clean = type(exc)(redact_text(message))
        except Exception:
            clean = RuntimeError(f"{type(exc).__name__}: {redact_text(message)}")
        raise clean from None


_HELD_OVERRIDES: dict[str, str] = {}
"""Overrides holding a credential, by their redacted text. Only this process has them: Prefect
stores the flow's parameters, so the flow is given the redacted text (see `run_pipeline`)."""


def hide_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides as Prefect may store them; the originals stay in this process."""
    shown = []
    for text in overrides:
        safe = redact_override(text)
        if safe != text:
            _HELD_OVERRIDES[safe] = text
        shown.append(safe)
    return shown


def reveal_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides as given, credentials included (from `hide_overrides`, this process)."""
    revealed = []
    for text in overrides:
        if REDACTED in text:
            if text not in _HELD_OVERRIDES:
                raise UserError(f"override {text!r} held a credential, which is never stored "
                                "in Prefect; put it in the params file (or the environment it "
                                "reads) instead of --set")
            text = _HELD_OVERRIDES[text]
        revealed.append(text)
    return revealed


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures, not a user's mistake (bad data, missing input)."""
    return not isinstance(getattr(state, "data", None), UserError)


def _run_stage(stage: str, params: dict, root: str, parent_run_id: Optional[str],
               inputs: Optional[dict[str, str]] = None) -> dict:
    """Run one stage under an MLflow child run of `parent_run_id`; return what it wrote.

    The result: stage, hash (of its outputs), outputs, metrics (scalars), mlflow_run_id and
    the Prefect flow run that produced it (a later cached run returns the same dict).
    """
    from flows.prefect_logging import stage_reporting
    from rlhf import stages
    from rlhf.checkpoints import resumable
    from rlhf.io import read_json
    from rlhf.mlops import launch
    from rlhf.mlops.resources import measure
    from rlhf.tracking import NullLogger

    if parent_run_id:
        from rlhf.mlops.mlflow_tracking import stage_run
    project = Path(root)
    paths = Paths(project)
    parsed = Params.model_validate(params)
    tags = {"prefect.flow_run_id": current_flow_run.id, "prefect.task_run_id": current_task_run.id}
    # A stage interrupted earlier resumes from its checkpoints and continues its MLflow run.
    interrupted = resumable(paths.checkpoints / stage) or {}
    with _redacted_errors(), (
            stage_run(stage, parent_run_id, tags=tags,
                      resume_run_id=interrupted.get("tracking_run_id"))
            if parent_run_id else contextlib.nullcontext(None)) as logger:
        if stage == "register":
            from rlhf.mlops.register import register

            lineage = {f"content.{name}": value for name, value in (inputs or {}).items()}
            metrics = register(parsed, paths, parent_run_id=logger.run_id,
                               tags={"prefect.flow_run_id": current_flow_run.id, **lineage})
        else:
            launched = launch.wants_launch(stage, parsed)
            with stage_reporting(stage, logger or NullLogger()) as reporting, \
                    measure(children=launched) as cost:
                if launched:
                    # Its own process group; rank 0 logs to this task's MLflow stage run, and
                    # the group's output lines reach this task's Prefect logs.
                    launch.run_launched(stage, parsed, project,
                                        run_id=logger.run_id if logger else None,
                                        track=logger is not None,
                                        on_line=logging.getLogger("rlhf.launch").info)
                    written = paths.metrics_file("eval" if stage == "evaluate" else stage)
                    report = read_json(written, produced_by=stage)
                    metrics = {k: v for k, v in report.items() if not isinstance(v, dict)}
                else:
                    metrics = stages.get(stage)(parsed, paths, reporting)
            cost = {f"resources/{key}": value for key, value in cost.items()}
            if logger:
                logger.log_metrics(cost)
            metrics = {**(metrics or {}), **cost}
    return {
        "stage": stage,
        "hash": outputs_hash(project, stage),
        "outputs": [rel for rel in dag.read(project)[stage].outputs if (project / rel).exists()],
        "metrics": {key: value for key, value in (metrics or {}).items()
                    if isinstance(value, (int, float, str, bool))},
        "mlflow_run_id": logger.run_id if logger else None,
        "flow_run_id": current_flow_run.id,
    }


_TASK_OPTIONS = dict(cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json",
                     cache_result_in_memory=False)
_RETRY = dict(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_user_error)
# A training stage's retry resumes from its newest checkpoint (rlhf.checkpoints), so a
# transient fault (a lost GPU, a network filesystem hiccup) costs the steps since it only.
_RESUMING_RETRY = dict(retries=1, retry_delay_seconds=10,
                       retry_condition_fn=_retry_unless_user_error)


@task(name="prepare", task_run_name="prepare", **_TASK_OPTIONS, **_RETRY)
def prepare(params: dict, root: str, parent_run_id: str,
            inputs: Optional[dict[str, str]] = None) -> dict:
    """Build the data splits (may download a dataset: retried)."""
    return _run_stage("prepare", params, root, parent_run_id, inputs)


@task(name="sft", task_run_name="sft", **_TASK_OPTIONS, **_RESUMING_RETRY)
def sft(params: dict, root: str, parent_run_id: str,
        inputs: Optional[dict[str, str]] = None) -> dict:
    """Supervised fine-tuning of the base model."""
    return _run_stage("sft", params, root, parent_run_id, inputs)


@task(name="reward", task_run_name="reward", **_TASK_OPTIONS, **_RESUMING_RETRY)
def reward(params: dict, root: str, parent_run_id: str,
           inputs: Optional[dict[str, str]] = None) -> dict:
    """Train the reward model on preference pairs."""
    return _run_stage("reward", params, root, parent_run_id, inputs)


@task(name="reference", task_run_name="reference", **_TASK_OPTIONS)
def reference(params: dict, root: str, parent_run_id: str,
              inputs: Optional[dict[str, str]] = None) -> dict:
    """Freeze a hashed copy of the SFT model."""
    return _run_stage("reference", params, root, parent_run_id, inputs)


@task(name="ppo", task_run_name="ppo", **_TASK_OPTIONS, **_RESUMING_RETRY)
def ppo(params: dict, root: str, parent_run_id: str,
        inputs: Optional[dict[str, str]] = None) -> dict:
    """PPO with a per-token KL penalty against the reference."""
    return _run_stage("ppo", params, root, parent_run_id, inputs)


@task(name="evaluate", task_run_name="evaluate", **_TASK_OPTIONS)
def evaluate(params: dict, root: str, parent_run_id: str,
             inputs: Optional[dict[str, str]] = None) -> dict:
    """Gold reward, RM score, KL, win rate and pass@k on held-out prompts."""
    return _run_stage("evaluate", params, root, parent_run_id, inputs)


@task(name="register", task_run_name="register", **_TASK_OPTIONS, **_RETRY)
def register(params: dict, root: str, parent_run_id: str,
             inputs: Optional[dict[str, str]] = None) -> dict:
    """Log the policy as a new model version, alias `candidate` (talks to MLflow: retried)."""
    return _run_stage("register", params, root, parent_run_id, inputs)


STAGE_TASKS = {t.name: t for t in (prepare, sft, reward, reference, ppo, evaluate, register)}
STAGES = tuple(STAGE_TASKS)
"""The stages the flow has a task for: exactly dvc.yaml's stages, in its order (tested)."""


class _TaskContext:
    """What `stage_cache_key` reads of a task run context, to compute a key before the run."""

    def __init__(self, stage: str) -> None:
        self.task = type("Task", (), {"name": stage})()


def _run_task(stage: str, params: Params, project: Path, parent_run_id: Optional[str],
              inputs: dict[str, str]) -> tuple[dict, str]:
    """Submit one stage task, using the cache only when it is safe; returns (result, state)."""
    logger = get_run_logger()
    location = results_location(project)
    kwargs = dict(params=params.model_dump(mode="json"), root=str(project),
                  parent_run_id=parent_run_id, inputs=inputs)
    # Prefect would unpickle a record whose serializer was edited to pickle (even to check
    # that it exists): the record this task may read is checked first.
    check_record(location, stage_cache_key(_TaskContext(stage), kwargs), describe(location))
    base = STAGE_TASKS[stage].with_options(result_storage=location)
    if outputs_exist(project, stage):
        state = base(**kwargs, return_state=True)
        result = state.result()  # raises the stage's error if it failed
        if state.name != "Cached" or result["hash"] == outputs_hash(project, stage):
            return result, state.name
        logger.warning(f"{stage}: outputs changed since the cached run; running it again")
    else:
        logger.info(f"{stage}: outputs missing under {project}; running it (cache refreshed)")
    state = base.with_options(refresh_cache=True)(**kwargs, return_state=True)
    return state.result(), state.name


# ---------------------------------------------------------------------------------------------
# Artifacts and the summary


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> tuple[str, str]:
    """(URL of the run in the MLflow UI, a description saying which UI it assumes)."""
    if tracking_uri.startswith(("http://", "https://")):
        base = redact_value(tracking_uri.rstrip("/"))
        note = f"MLflow server {redact_value(base)}"
    else:
        base = SQLITE_UI
        note = (f"local store {redact_value(tracking_uri)}: start its UI with "
                f"`mlflow ui --backend-store-uri {redact_value(tracking_uri)}` "
                f"(serves {SQLITE_UI})")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}", note


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def eval_markdown(report: dict, stage_states: dict[str, str], url: str) -> str:
    rows = ["| metric | policy | reference (SFT) |", "| --- | --- | --- |"]
    for key in ("gold_reward", "exact_match", "rm_score", "kl"):
        if key in report["policy"]:
            rows.append(f"| {key} | {_fmt(report['policy'][key])} | "
                        f"{_fmt(report['reference'][key])} |")
    lines = ["# rlhf: held-out evaluation", "", *rows, ""]
    if "gold_ratio" in report:
        lines.append(f"- gold ratio policy/reference: **{_fmt(report['gold_ratio'])}x**, "
                     f"win rate {_fmt(report['win_rate'])}")
    lines.append(f"- KL to the reference: {_fmt(report['policy']['kl'])} nats "
                 f"(budget {_fmt(report['kl_budget'])}: "
                 f"{'within' if report['kl_within_budget'] else '**EXCEEDED**'})")
    lines.append("- stages: " + ", ".join(f"{name} {state}" for name, state
                                            in stage_states.items()))
    lines.append(f"- MLflow run: {url}")
    return "\n".join(lines) + "\n"


def pass_at_k_table(report: dict) -> list[dict]:
    policy = report["policy"].get("pass_at_k", {})
    reference = report["reference"].get("pass_at_k", {})
    return [{"k": int(k), "policy": policy[k], "reference": reference.get(k)}
            for k in sorted(policy, key=int)]


def _headline(report: dict) -> dict:
    headline = {
        "gold_reward": report["policy"].get("gold_reward"),
        "reference_gold_reward": report["reference"].get("gold_reward"),
        "gold_ratio": report.get("gold_ratio"),
        "win_rate": report.get("win_rate"),
        "rm_score": report["policy"].get("rm_score"),
        "kl": report["policy"].get("kl"),
        "kl_budget": report.get("kl_budget"),
        "kl_within_budget": report.get("kl_within_budget"),
    }
    for k, value in report["policy"].get("pass_at_k", {}).items():
        headline[f"pass_at_{k}"] = value
    return {key: value for key, value in headline.items() if value is not None}


# ---------------------------------------------------------------------------------------------
# Flows


class _Untracked:
    """The parent run's stand-in under `track=False`: stages get no logger, nothing is sent."""

    run_id = None
    experiment_id = None

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass


@flow(name="rlhf-pipeline")
def rlhf_pipeline(params_file: str = "params.yaml", overrides: Optional[list[str]] = None,
                  root: str = ".", track: bool = True) -> dict:
    """prepare → sft → reward → reference → ppo → evaluate → register, each stage cached.

    `params_file` is read relative to the current directory, `root` is the project holding
    data/, models/, metrics/ (and mlflow.db unless MLFLOW_TRACKING_URI is set). `overrides`
    (`section.key=value`) are validated and recorded with the run (MLflow params and the tag
    `rlhf.overrides`), and written into the params file only once the training stages have
    succeeded, as `dvc exp run -S` does: the file then describes what the run produced, and a
    run that crashes leaves it as it was. `track=False` runs without MLflow (no register).
    """
    with _redacted_errors():
        return _pipeline(params_file, reveal_overrides(overrides or []), root, track)


def _pipeline(params_file: str, overrides: list[str], root: str, track: bool) -> dict:
    from rlhf.io import read_json
    from rlhf.mlops import dvc, prefect_runs

    logger = get_run_logger()
    params = load_params(params_file, overrides)  # a ParamsError ends the flow here
    project = Path(root).resolve()
    paths = Paths(project)
    check_results_dir(results_location(project))  # before anything: one line, no work lost
    declared = dag.read(project)
    if tuple(declared) != STAGES:
        raise UserError(f"{dag.dag_file(project)} declares the stages {', '.join(declared)}, "
                        f"but the flow runs {', '.join(STAGES)}; make them agree")
    flow_run_id, flow_run_name = current_flow_run.id, current_flow_run.name
    for crashed in prefect_runs.end_dead(project):
        logger.warning(f"flow run {crashed} was left Running by a process that is gone: "
                       "set Crashed")
    running = prefect_runs.record(project, flow_run_id)
    try:
        if track:
            import mlflow

            from rlhf.mlops.mlflow_tracking import (configure, ensure_reachable, pipeline_run,
                                                    recover)

            tracking_uri = configure(project)
            ensure_reachable(tracking_uri)
            recover(params.registry.experiment, project)
            store = f"{tracking_uri}|{mlflow.get_registry_uri()}"
            tags = {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name,
                    "prefect.flow_name": "rlhf-pipeline",
                    "rlhf.overrides": json.dumps([redact_override(o) for o in overrides])}
            parent_run = pipeline_run(params.registry.experiment, params, tags=tags,
                                      run_name=f"pipeline-{flow_run_name}", project_root=project)
        else:
            tracking_uri, store = "", "untracked"
            parent_run = contextlib.nullcontext(_Untracked())
        store_hash = hashlib.sha256(store.encode()).hexdigest()[:16]
        to_run = STAGES if track else tuple(s for s in STAGES if s != "register")

        results: dict[str, dict] = {}
        states: dict[str, str] = {}
        url = None
        with parent_run as parent:
            for stage in to_run:
                inputs = {up: results[up]["hash"] for up in declared[stage].upstream}
                inputs.update(_external_inputs(params, project)
                              if stage in ("prepare", "sft") else {})
                if stage == "register":
                    inputs["mlflow_store"] = store_hash
                results[stage], states[stage] = _run_task(stage, params, project,
                                                          parent.run_id, inputs)
                logger.info(f"{stage}: {states[stage]}")
                if stage == "evaluate":
                    # The trained stages all succeeded: only now may params.yaml change (DVC
                    # needs it to match what produced the outputs). Recorded in dvc.lock before
                    # register, so the version's lineage tags carry this run's DVC hashes.
                    if overrides:
                        write_overrides(params_file, overrides)
                    dvc.record(project, [s for s in STAGES if s != "register"])
                    report = read_json(paths.metrics_file("eval"), produced_by="evaluate")
                    if track:
                        url, note = mlflow_run_url(tracking_uri, parent.experiment_id,
                                                   parent.run_id)
                        create_link_artifact(
                            key="rlhf-mlflow-run", link=url,
                            link_text=f"MLflow run {parent.run_id}",
                            description=f"The pipeline's parent run in MLflow ({note})")
                    create_markdown_artifact(
                        key="rlhf-eval",
                        markdown=eval_markdown(report, states, url or "not tracked"),
                        description="Held-out evaluation: policy vs reference")
                    if report["policy"].get("pass_at_k"):
                        create_table_artifact(key="rlhf-pass-at-k",
                                              table=pass_at_k_table(report),
                                              description="pass@k on held-out prompts "
                                                          "(unbiased estimator), policy vs "
                                                          "reference")
            headline = _headline(report)
            parent.log_metrics({f"eval/{k}": float(v) for k, v in headline.items()})
            if track:
                parent.set_tags({
                    "stages.cached": ",".join(s for s in to_run if states[s] == "Cached"),
                    "registry.version": results["register"]["metrics"]["version"],
                    **dvc.artifact_hashes(project)})
    finally:
        running.unlink(missing_ok=True)

    dvc_recorded = dvc.record(project, ["register"]) if track else bool(
        dvc.is_dvc_repo(project))
    registered = results["register"]["metrics"] if track else {}
    # Promotion chained to training: a subflow, its decision a Prefect artifact. Its
    # parameters are stored in Prefect: credentials in the overrides stay hidden.
    promotion = (promote_flow(params_file=params_file, version=registered["version"],
                              root=root, overrides=hide_overrides(overrides))
                 if track and params.promote.auto else None)
    alias = registered.get("alias", "candidate")
    return {
        "eval": headline,
        "model_name": registered.get("model_name"),
        "model_version": registered.get("version"),
        "model_alias": alias if track else None,
        "mlflow_run_id": parent.run_id,
        "mlflow_experiment_id": parent.experiment_id,
        "mlflow_run_url": url,
        "mlflow_tracking_uri": redact_value(tracking_uri) if track else None,
        "prefect_flow_run_id": str(flow_run_id),
        "prefect_flow_run_name": flow_run_name,
        "stages": states,
        "resources": {stage: {key.split("/", 1)[1]: value
                              for key, value in results[stage]["metrics"].items()
                              if key.startswith("resources/")}
                      for stage in to_run if stage != "register"},
        "dvc_recorded": dvc_recorded,
        "promotion": promotion,
        "where": {
            "metrics": str(paths.metrics),
            "plots": str(paths.plots),
            "policy": str(paths.policy),
            "mlflow": url,
            "registry": f"models:/{registered['model_name']}@{alias}" if track else None,
            "prefect_cache": describe(results_location(project)),
        },
    }


@flow(name="promote")
def promote_flow(params_file: str = "params.yaml", version: Optional[int] = None,
                 root: str = ".", overrides: Optional[list[str]] = None) -> dict:
    """Judge a model version (default: the `candidate`) with the gate in params `promote`;
    move the `champion` alias to it if it passes. Returns the decision as a dict."""
    from mlflow.exceptions import MlflowException

    from rlhf.mlops import registry
    from rlhf.mlops.head_to_head import rm_win_rate
    from rlhf.mlops.mlflow_tracking import configure

    params = load_params(params_file, reveal_overrides(overrides or []))
    project = Path(root).resolve()
    configure(project)
    name = params.registry.model_name
    gate = registry.PromotionGate(**params.promote.model_dump(exclude={"auto"}))

    def against_champion(candidate: int, champion: int) -> float:
        get_run_logger().info(f"sampling version {candidate} against champion {champion}")
        return rm_win_rate(name, candidate, champion, params, Paths(project))

    try:
        decision = registry.promote(name, version, gate, champion_win_rate=(
            against_champion if gate.min_rm_win_rate_vs_champion > 0 else None))
    except ValueError as exc:
        raise UserError(f"{exc}; run the pipeline first (`rlhf run`)") from None
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"no registered model {name!r} (or version {version}) in the "
                            f"MLflow registry; run the pipeline first (`rlhf run`)") from None
        raise
    result = {"model_name": name, **dataclasses.asdict(decision)}
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    lines = [f"# {name} version {decision.version}: {verdict}", "",
             f"Previous champion: {decision.previous_champion or 'none'}", "",
             "| criterion | value | threshold | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['criterion']} | {_fmt(c['value'])} | {c['threshold']} | "
              f"{'pass' if c['passed'] else '**FAIL**'} |" for c in decision.criteria]
    lines += ["", *[f"- passed: {line}" for line in decision.passed]]
    lines += [f"- **failed**: {line}" for line in decision.reasons]
    create_markdown_artifact(key="rlhf-promotion", markdown="\n".join(lines) + "\n",
                             description=f"Promotion gate for {name} v{decision.version}")
    return result


def run_pipeline(params_file: str = "params.yaml", overrides: Optional[list[str]] = None,
                 root: str = ".", track: bool = True) -> dict:
    """Run the `rlhf-pipeline` flow now, in this process (what `rlhf run` calls).

    Prefect stores the flow's parameters: overrides holding a credential are passed redacted,
    the flow takes the originals from this process (`reveal_overrides`)."""
    return rlhf_pipeline(params_file=params_file, overrides=hide_overrides(overrides or []),
                         root=root, track=track)


def serve_pipeline(cron: str, params_file: str = "params.yaml",
                   overrides: Optional[list[str]] = None, root: str = ".",
                   name: str = "rlhf-pipeline-scheduled") -> None:
    """Serve `rlhf-pipeline` on a cron schedule until interrupted (what `rlhf serve` calls).

    Paths are made absolute so each scheduled run finds the project wherever the runner
    starts it. Needs a Prefect server (`prefect server start`, PREFECT_API_URL).
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise UserError(f"cron {cron!r} is not a valid cron expression "
                        "(e.g. '0 3 * * *')") from None
    load_params(params_file, overrides or [])
    for text in overrides or []:
        if redact_override(text) != text:
            raise UserError(f"override {redact_override(text)!r} holds a credential, and a "
                            "deployment's parameters are stored in Prefect; put it in the "
                            "params file instead of --set")
    parameters = {"params_file": str(Path(params_file).resolve()),
                  "overrides": list(overrides or []), "root": str(Path(root).resolve())}
    rlhf_pipeline.serve(name=name, cron=cron, parameters=parameters)
