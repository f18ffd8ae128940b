"""The Prefect flows: `rlhf-pipeline` (every stage of dvc.yaml, one task each) and `promote`.

    rlhf run [--set ppo.kl_coef=0.1]             # now, in this process
    rlhf serve --cron "0 3 * * *"                # flow.serve: on a schedule until Ctrl-C
    prefect work-pool create local --type process   # or: a deployment and a worker
    prefect deploy --all                         # reads prefect.yaml in this directory
    prefect worker start --pool local
    prefect deployment run 'rlhf-pipeline/scheduled'

The stages, their order, params, deps and outputs are dvc.yaml's; what else a stage needs
(retries, processes) is its entry in `rlhf.stages.REGISTRY`. DVC alone decides whether a
stage runs (`rlhf.mlops.dvc.reproduce`): a stage it finds unchanged, or restores from its
run-cache (filled by another machine through the default DVC remote), ends `Skipped`; the
others run in this process through `rlhf.mlops.runner.run_stage`, as `rlhf stage` does, and
DVC records them in dvc.lock. Prefect keeps what it is for: the flow, its tasks, retries,
logs, artifacts, schedules, deployments and workers. Nothing is cached or pickled by Prefect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact,
                               create_table_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run
from prefect.states import Completed

from rlhf import stages
from rlhf.config import Params, load_params
from rlhf.errors import UserError
from rlhf.mlops import dag, dvc, report
from rlhf.mlops.overrides import applied as overrides_applied
from rlhf.mlops.overrides import hide as hide_overrides
from rlhf.mlops.overrides import reveal as reveal_overrides
from rlhf.paths import Paths
from rlhf.redact import redact_override, redact_text, redact_value
from rlhf.tracking import NullLogger


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


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures, not a user's mistake (bad data, missing input)."""
    return not isinstance(getattr(state, "data", None), UserError)


@task(cache_policy=NO_CACHE, persist_result=False, result_serializer="json",
      retry_delay_seconds=10, retry_condition_fn=_retry_unless_user_error)
def stage_task(stage: str, params: dict, root: str, parent_run_id: Optional[str],
               track: bool, use_dvc: bool) -> Any:
    """Stage `stage`, if DVC finds it has something to do; its metrics, or a Skipped state."""
    from flows.prefect_logging import stage_reporting
    from rlhf.mlops.runner import run_stage

    project = Path(root)
    metrics: dict = {}

    def run() -> None:
        with _redacted_errors():
            metrics.update(run_stage(
                stage, Params.model_validate(params), project, parent_run_id, track,
                tags={"prefect.flow_run_id": current_flow_run.id,
                      "prefect.task_run_id": current_task_run.id},
                reporting=lambda logger: stage_reporting(stage, logger)))

    outcome = dvc.reproduce(project, stage, run) if use_dvc else (run() or dvc.RAN)
    if outcome != dvc.RAN:
        return Completed(name="Skipped", message=f"DVC: {outcome}", data={})
    return metrics


# Prefect writes a failed run's exception to its result storage whatever persist_result says:
# JSON, so that nothing is ever pickled.
@flow(name="rlhf-pipeline", persist_result=False, result_serializer="json")
def rlhf_pipeline(params_file: str = "params.yaml", overrides: Optional[list[str]] = None,
                  root: str = ".", track: bool = True) -> dict:
    """Every stage of dvc.yaml in order, each run only if DVC finds it changed.

    `params_file` is read relative to the current directory, `root` is the project holding
    data/, models/, metrics/ (and mlflow.db unless MLFLOW_TRACKING_URI is set). `overrides`
    (`section.key=value`) hold for this run only (`rlhf.mlops.overrides.applied`) and are
    recorded with it (MLflow params, tag `rlhf.overrides`, dvc.lock). `track=False` runs
    without MLflow (and without register).
    """
    from flows.prefect_logging import user_errors_in_one_line

    user_errors_in_one_line()
    with _redacted_errors():
        return _pipeline(params_file, reveal_overrides(overrides or []), root, track)


def _pipeline(params_file: str, overrides: list[str], root: str, track: bool) -> dict:
    from rlhf.io import read_json
    from rlhf.mlops import prefect_runs

    logger = get_run_logger()
    params = load_params(params_file, overrides)  # a ParamsError ends the flow here
    project = Path(root).resolve()
    declared = tuple(dag.read(project))
    if declared != tuple(stages.REGISTRY):
        raise UserError(f"{dag.dag_file(project)} declares the stages {', '.join(declared)}, "
                        f"but rlhf.stages.REGISTRY has {', '.join(stages.REGISTRY)}; make "
                        "them agree")
    use_dvc = dvc.is_dvc_repo(project) and Path(params_file).resolve() == project / "params.yaml"
    if not use_dvc:
        logger.warning(f"{project} is not a DVC repository reading {params_file}: every stage "
                       "runs (`git init && dvc init` there lets DVC skip unchanged stages)")
    to_run = declared if track else stages.COMPUTE_STAGES
    for crashed in prefect_runs.end_dead(project):
        logger.warning(f"flow run {crashed} was left Running by a process that is gone: "
                       "set Crashed")
    running = prefect_runs.record(project, current_flow_run.id)
    tracking_uri = url = None
    registered: dict = {}
    results: dict[str, dict] = {}
    states: dict[str, str] = {}
    try:
        with overrides_applied(params_file, overrides) as keep_overrides:
            parent_run = contextlib.nullcontext(NullLogger())
            if track:
                from rlhf.mlops.mlflow_tracking import (configure, ensure_reachable, recover,
                                                        tracked_run)

                tracking_uri = configure(project)
                ensure_reachable(tracking_uri)
                recover(params.registry.experiment, project)
                parent_run = tracked_run(
                    f"pipeline-{current_flow_run.name}", params.registry.experiment, params,
                    project_root=project, tags={"prefect.flow_run_id": current_flow_run.id,
                          "prefect.flow_run_name": current_flow_run.name,
                          "prefect.flow_name": "rlhf-pipeline",
                          "rlhf.overrides": json.dumps([redact_override(o) for o in overrides])})
            if use_dvc and dvc.pull_run_cache(project):
                logger.info("fetched the run-cache of the default DVC remote")
            with parent_run as parent:
                for stage in to_run:
                    state = stage_task.with_options(
                        name=stage, task_run_name=stage, retries=stages.info(stage).retries)(
                        stage, params.model_dump(mode="json"), str(project), parent.run_id,
                        track, use_dvc, return_state=True)
                    results[stage], states[stage] = state.result(), state.name
                    logger.info(f"{stage}: {state.name} {state.message or ''}".rstrip())
                    if stage == "evaluate":  # the trained stages succeeded: the file keeps them
                        keep_overrides()
                evaluation = read_json(Paths(project).metrics_file("eval"),
                                       produced_by="evaluate")
                headline = report.headline(evaluation)
                parent.log_metrics({f"eval/{k}": float(v) for k, v in headline.items()})
                if track:
                    url = report.mlflow_run_url(tracking_uri, parent.experiment_id,
                                                 parent.run_id)
                    create_link_artifact(key="rlhf-mlflow-run", link=url,
                                         link_text=f"MLflow run {parent.run_id}")
                    registered = read_json(Paths(project).metrics_file("register"))
                    parent.set_tags({
                        "stages.skipped": ",".join(s for s in to_run if states[s] == "Skipped"),
                        "registry.version": registered["version"],
                        **dvc.artifact_hashes(project)})
            if use_dvc and dvc.push(project):
                logger.info("pushed outputs and run-cache to the default DVC remote")
    finally:
        running.unlink(missing_ok=True)

    resources = {stage: {key.split("/", 1)[1]: value for key, value in metrics.items()
                         if key.startswith("resources/")} for stage, metrics in results.items()}
    create_markdown_artifact(
        key="rlhf-eval", description="Held-out evaluation: policy vs reference",
        markdown=report.run_report(project, states, resources, url, tracking_uri))
    if evaluation["policy"].get("pass_at_k"):
        create_table_artifact(key="rlhf-pass-at-k", table=report.pass_at_k_table(evaluation),
                              description="pass@k on held-out prompts (unbiased estimator), "
                                          "policy vs reference")
    # Promotion chained to training: a subflow, its decision a Prefect artifact. Its
    # parameters are stored in Prefect: credentials in the overrides stay hidden.
    promotion = (promote_flow(params_file=params_file, version=registered["version"],
                              root=root, overrides=hide_overrides(overrides))
                 if track and params.promote.auto else None)
    return {
        "eval": headline,
        "model_name": registered.get("model_name"),
        "model_version": registered.get("version"),
        "model_alias": registered.get("alias"),
        "mlflow_run_id": parent.run_id,
        "mlflow_experiment_id": parent.experiment_id,
        "mlflow_run_url": url,
        "mlflow_tracking_uri": redact_value(tracking_uri) if track else None,
        "prefect_flow_run_id": str(current_flow_run.id),
        "prefect_flow_run_name": current_flow_run.name,
        "stages": states,
        "resources": resources,
        "promotion": promotion,
    }


@flow(name="promote", persist_result=False, result_serializer="json")
def promote_flow(params_file: str = "params.yaml", version: Optional[int] = None,
                 root: str = ".", overrides: Optional[list[str]] = None) -> dict:
    """Judge a model version (default: the `candidate`) with the gate in params `promote`;
    move the `champion` alias to it if it passes. Returns the decision as a dict."""
    from mlflow.exceptions import MlflowException

    from rlhf.mlops import registry
    from flows.prefect_logging import user_errors_in_one_line
    from rlhf.mlops.mlflow_tracking import configure, ensure_reachable

    user_errors_in_one_line()
    params = load_params(params_file, reveal_overrides(overrides or []))
    project = Path(root).resolve()
    ensure_reachable(configure(project), or_else="")
    name = params.registry.model_name
    gate = params.promote

    def against_champion(candidate: int, champion: int) -> float:
        from rlhf.mlops.head_to_head import rm_win_rate  # torch and the stages: seconds

        get_run_logger().info(f"sampling version {candidate} against champion {champion}")
        return rm_win_rate(name, candidate, champion, params, Paths(project))

    try:
        decision = registry.promote(name, version, gate, champion_win_rate=(
            against_champion if gate.min_rm_win_rate_vs_champion > 0 else None))
    except ValueError as exc:
        raise UserError(f"{exc}; run the pipeline first (`rlhf run`)") from None
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            which = f"{name!r} version {version}" if version is not None else repr(name)
            raise UserError(f"no registered model {which} in the MLflow registry; run the "
                            "pipeline first (`rlhf run`)") from None
        raise
    result = {"model_name": name, **dataclasses.asdict(decision)}
    create_markdown_artifact(key="rlhf-promotion", markdown=report.promotion_report(name, result),
                             description=f"Promotion gate for {name} v{decision.version}")
    return result


def run_pipeline(params_file: str = "params.yaml", overrides: Optional[list[str]] = None,
                 root: str = ".", track: bool = True) -> dict:
    """Run the `rlhf-pipeline` flow now, in this process (what `rlhf run` calls)."""
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
