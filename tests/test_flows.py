"""The Prefect flows for real: a temporary Prefect server, an MLflow SQLite store in a
temporary project (a clone of this repository, so a DVC repository), the tiny profile. No mocks.

(a)-(c) run the flow in this process against `prefect_test_harness`. (d) and (e) need a server
that runs Prefect's scheduler (the harness's ephemeral server does not), so they start
`prefect server start` on a free port, then serve / deploy against it from subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY_OVERRIDES, clone_project

prefect = pytest.importorskip("prefect")
mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId,  # noqa: E402
                                            FlowRunFilter, FlowRunFilterId)
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.pipeline import promote_flow, rlhf_pipeline  # noqa: E402
from rlhf.config import Params  # noqa: E402
from rlhf.errors import ParamsError, UserError  # noqa: E402
from rlhf.mlops import dag  # noqa: E402
from rlhf.mlops.launch import free_port, wait_until_healthy  # noqa: E402
from rlhf.stages import COMPUTE_STAGES, REGISTRY  # noqa: E402

MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
STAGES = tuple(REGISTRY)
UPSTREAM_STAGES = ("prepare", "sft", "reward", "reference")
DOWNSTREAM_STAGES = ("ppo", "evaluate", "register")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session."""
    with prefect_test_harness(server_startup_timeout=90):
        yield


@contextlib.contextmanager
def mlflow_settings_restored():
    """Put this process's MLflow settings back afterwards: the flow sets them (and
    mlflow.set_tracking_uri/set_registry_uri also write the environment variables)."""
    old_uris = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    old_env = {key: os.environ.pop(key, None) for key in MLFLOW_ENV}
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(old_uris[0])
        mlflow.set_registry_uri(old_uris[1])
        for key, value in old_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture
def mlflow_store():
    """Point MLflow at the project the test names (`rlhf_pipeline` configures it)."""
    with mlflow_settings_restored():
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    """A clone of this repository on the tiny profile; MLflow's store is its mlflow.db."""
    root = tmp_path_factory.mktemp("flow-project")
    clone_project(root)
    with mlflow_settings_restored():
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        yield root


def run_flow(root: Path, overrides: list[str] | None = None) -> dict:
    return rlhf_pipeline(params_file=str(root / "params.yaml"), overrides=overrides,
                         root=str(root))


def output_mtimes(root: Path, stages) -> dict[str, int]:
    mtimes = {}
    for stage in stages:
        for rel in dag.read(REPO)[stage].outputs:
            base = root / rel
            for path in [base, *base.rglob("*")] if base.is_dir() else [base]:
                mtimes[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return mtimes


def task_run_states(flow_run_id: str, expected: int, timeout: float = 20.0) -> dict[str, str]:
    """Task run name -> state name, as the server recorded them (recording is asynchronous)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = {run.name: run.state.name for run in runs if run.state}
            done = len(states) >= expected and all(
                s in ("Completed", "Skipped", "Failed") for s in states.values())
            if done or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


@pytest.fixture(scope="module")
def first_run(project):
    return run_flow(project, ["ppo.kl_coef=0.15"])


# ---------------------------------------------------------------------------------------------
# (a) the pipeline completes, registers a model, leaves artifacts and MLflow runs


def test_pipeline_runs_every_stage_and_registers(first_run, project):
    summary = first_run
    assert summary["stages"] == {stage: "Completed" for stage in STAGES}
    assert summary["model_name"] == "rlhf-policy"
    assert summary["model_version"] >= 1
    assert 0.0 <= summary["eval"]["gold_reward"] <= 1.0 and "pass_at_1" in summary["eval"]
    assert summary["mlflow_run_url"] == (
        f"http://127.0.0.1:5000/#/experiments/{summary['mlflow_experiment_id']}"
        f"/runs/{summary['mlflow_run_id']}")
    registered = json.loads((project / "metrics" / "register.json").read_text())
    assert registered["version"] == summary["model_version"]
    # The override stays in the params file, so it describes what was produced, and DVC
    # recorded the run: nothing left to reproduce.
    assert yaml.safe_load((project / "params.yaml").read_text())["ppo"]["kl_coef"] == 0.15
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES) and lock["ppo"]["params"]["params.yaml"]["ppo"]["kl_coef"] == 0.15
    assert not (project / ".prefect-results").exists()


def test_pipeline_creates_artifacts(first_run):
    summary = first_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[summary["prefect_flow_run_id"]])))
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"rlhf-eval", "rlhf-mlflow-run", "rlhf-pass-at-k"} <= set(by_key)
    assert by_key["rlhf-eval"].type == "markdown"
    assert "gold_reward" in by_key["rlhf-eval"].data
    assert "mlflow ui --backend-store-uri sqlite:///" in by_key["rlhf-eval"].data
    assert "| ppo | Completed |" in by_key["rlhf-eval"].data
    # Prefect 3 stores a link artifact as markdown: "[text](url)".
    assert f"({summary['mlflow_run_url']})" in by_key["rlhf-mlflow-run"].data
    assert by_key["rlhf-pass-at-k"].type == "table"
    rows = json.loads(by_key["rlhf-pass-at-k"].data)
    assert [row["k"] for row in rows] == [1, 2, 4, 8]
    assert set(rows[0]) == {"k", "policy", "reference"}


def test_mlflow_parent_run_with_nested_stage_runs(first_run):
    summary = first_run
    client = MlflowClient()
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == summary["prefect_flow_run_id"]
    assert parent.data.tags["prefect.flow_run_name"] == summary["prefect_flow_run_name"]
    assert "eval/gold_reward" in parent.data.metrics
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(STAGES)
    assert all(run.info.status == "FINISHED" for run in children)
    ppo_run = next(run for run in children if run.info.run_name == "ppo")
    history = client.get_metric_history(ppo_run.info.run_id, "objective/kl")
    assert sorted({metric.step for metric in history}) == [1, 2]
    assert ppo_run.data.metrics["resources/wall_seconds"] > 0
    assert set(summary["resources"]["ppo"]) >= {"wall_seconds", "peak_rss_mb"}


def test_promote_flow_returns_the_decision(first_run, project):
    summary = first_run
    decision = promote_flow(params_file=str(project / "params.yaml"), root=str(project))
    assert decision["version"] == summary["model_version"]
    assert decision["model_name"] == "rlhf-policy"
    assert isinstance(decision["promoted"], bool)
    assert decision["promoted"] == (not decision["reasons"])


def test_running_stages_show_progress_and_completions_in_prefect(first_run):
    """What a user watching the Prefect UI sees: progress lines with an ETA in the ppo task's
    logs, and the completions tables as artifacts."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    progress = progress_lines(first_run["prefect_flow_run_id"], "ppo")
    assert "kl" in progress[-1] and "score" in progress[-1] and "loss" in progress[-1]
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["ppo-completions", "eval-completions"])))}
    assert keys == {"ppo-completions", "eval-completions"}


# ---------------------------------------------------------------------------------------------
# (b) DVC decides: nothing reruns when nothing changed; a param reruns its stage and below


def test_unchanged_second_run_runs_no_stage(first_run, project):
    before = output_mtimes(project, STAGES)
    again = run_flow(project)
    assert again["stages"] == {stage: "Skipped" for stage in STAGES}
    assert output_mtimes(project, STAGES) == before
    assert again["model_version"] == first_run["model_version"]
    assert again["eval"] == first_run["eval"]
    assert task_run_states(again["prefect_flow_run_id"], len(STAGES)) == {
        stage: "Skipped" for stage in STAGES}
    # A skipped stage opens no MLflow run; the parent says which stages were skipped.
    parent = MlflowClient().get_run(again["mlflow_run_id"])
    assert parent.data.tags["stages.skipped"] == ",".join(STAGES)


def test_deleted_or_edited_outputs_come_back_from_dvcs_cache(first_run, project):
    """What DVC has run before it restores instead of recomputing: a deleted model and a
    metrics file edited by hand are checked out again, byte for byte."""
    reference = project / "models" / "reference" / "model.safetensors"
    weights = reference.read_bytes()
    shutil.rmtree(project / "models" / "reference")
    eval_file = project / "metrics" / "eval.json"
    original = eval_file.read_bytes()
    eval_file.write_text('{"edited": "by hand"}\n')
    summary = run_flow(project)
    assert summary["stages"] == {stage: "Skipped" for stage in STAGES}
    assert reference.read_bytes() == weights and eval_file.read_bytes() == original


def test_changing_kl_coef_reruns_only_ppo_and_below(first_run, project):
    before = output_mtimes(project, UPSTREAM_STAGES)
    policy_before = output_mtimes(project, ["ppo"])
    changed = run_flow(project, ["ppo.kl_coef=0.05"])
    assert changed["stages"] == {**{s: "Skipped" for s in UPSTREAM_STAGES},
                                 **{s: "Completed" for s in DOWNSTREAM_STAGES}}
    assert output_mtimes(project, UPSTREAM_STAGES) == before
    assert output_mtimes(project, ["ppo"]) != policy_before
    assert changed["model_version"] > first_run["model_version"]
    assert yaml.safe_load((project / "params.yaml").read_text())["ppo"]["kl_coef"] == 0.05
    children = MlflowClient().search_runs(
        [changed["mlflow_experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{changed['mlflow_run_id']}'")
    assert sorted(run.info.run_name for run in children) == sorted(DOWNSTREAM_STAGES)
    # Back to the first value: DVC's run-cache has that ppo run, nothing is recomputed.
    back = run_flow(project, ["ppo.kl_coef=0.15"])
    assert {s: back["stages"][s] for s in ("ppo", "evaluate")} == {
        "ppo": "Skipped", "evaluate": "Skipped"}


def test_a_critic_free_run_on_the_gold_reward_registers_a_version_the_gate_judges(first_run,
                                                                                  project):
    algorithm = ["ppo.advantage=grpo", "ppo.num_generations=4", "ppo.reward=gold",
                 "ppo.kl_penalty=loss", "ppo.kl_estimator=k3"]
    changed = run_flow(project, algorithm)
    assert changed["stages"]["ppo"] == "Completed" and changed["stages"]["sft"] == "Skipped"
    version = MlflowClient().get_model_version("rlhf-policy", str(changed["model_version"]))
    assert {k: version.tags[k] for k in ("ppo.advantage", "ppo.reward", "ppo.kl_penalty",
                                         "ppo.kl_estimator")} == {
        "ppo.advantage": "grpo", "ppo.reward": "gold", "ppo.kl_penalty": "loss",
        "ppo.kl_estimator": "k3"}
    decision = promote_flow(params_file=str(project / "params.yaml"), root=str(project))
    assert decision["version"] == changed["model_version"]
    assert decision["promoted"] == (not decision["reasons"])
    # Back to PPO for the tests after this one: DVC's run-cache has it, nothing reruns.
    back = run_flow(project, ["ppo.advantage=gae", "ppo.num_generations=1", "ppo.reward=model",
                              "ppo.kl_penalty=reward", "ppo.kl_estimator=k1"])
    assert back["stages"]["ppo"] == "Skipped"


def test_a_fresh_clone_restores_every_stage_another_clone_pushed(first_run, project,
                                                                  tmp_path, monkeypatch):
    """RLHF_DVC_REMOTE (here a folder; S3 in infra/): the flow pushes outputs and run-cache at
    its end, and a fresh clone with an empty cache recomputes nothing, byte for byte."""
    monkeypatch.setenv("RLHF_DVC_REMOTE", str(tmp_path / "remote"))
    run_flow(project, ["ppo.kl_coef=0.15"])
    clone = tmp_path / "clone-b"
    clone.mkdir()
    clone_project(clone)
    summary = run_flow(clone, ["ppo.kl_coef=0.15"])
    assert [summary["stages"][s] for s in COMPUTE_STAGES] == ["Skipped"] * len(COMPUTE_STAGES)
    for stage in COMPUTE_STAGES:
        for rel in dag.read(REPO)[stage].outputs:
            files = [p for p in (project / rel).rglob("*") if p.is_file()] \
                if (project / rel).is_dir() else [project / rel]
            for path in files:
                assert (clone / path.relative_to(project)).read_bytes() == path.read_bytes()


# ---------------------------------------------------------------------------------------------
# (c) bad params or a bad dvc.yaml end the flow before any task, with the one-line message


def test_params_error_fails_before_any_task(project):
    params_before = (project / "params.yaml").read_bytes()
    state = rlhf_pipeline(params_file=str(project / "params.yaml"),
                          overrides=["ppo.kl_coef=-1"], root=str(project), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ParamsError)
    assert "ppo.kl_coef" in str(error) and "\n" not in str(error)
    assert (project / "params.yaml").read_bytes() == params_before
    time.sleep(1.0)  # task runs are recorded asynchronously: give any a chance to appear
    assert task_run_states(str(state.state_details.flow_run_id), 0, timeout=0) == {}


def test_dvc_yaml_names_real_params_and_deps():
    """Each stage's params name real params, and each dep is either a file of the repository
    or an output of a stage before it."""
    declared = dag.read(REPO)
    assert dag.dag_file(REPO) == REPO / "dvc.yaml"
    sections = Params.model_fields
    produced: set[str] = set()
    for stage in declared.values():
        for key in stage.params:
            section, _, field = key.partition(".")
            assert section in sections, (stage.name, key)
            assert not field or field in sections[section].annotation.model_fields, (stage.name, key)
        for dep in stage.deps:
            assert (REPO / dep).exists() or any(
                dep == out or dep.startswith(out + "/") for out in produced), (stage.name, dep)
        produced.update(stage.outputs)
    assert "metrics/ppo.json" in declared["ppo"].outputs  # a cache: false metric is one
    assert dag.parse({"stages": {"a": {"outs": ["o", {"m.json": {"cache": False}}],
                                       "plots": [{"p": {"cache": False}}]}}})["a"].outputs == (
        "o", "m.json", "p")


def test_a_dvc_yaml_that_disagrees_with_the_registry_stops_it(tmp_path, prefect_harness):
    """A project whose dvc.yaml declares other stages fails before any task runs."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    document = yaml.safe_load((REPO / "dvc.yaml").read_text())
    del document["stages"]["register"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    state = rlhf_pipeline(params_file=str(tmp_path / "params.yaml"), root=str(tmp_path),
                          return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, UserError) and "make them agree" in str(error), error
    assert task_run_states(str(state.state_details.flow_run_id), 0, timeout=0) == {}


def progress_lines(flow_run_id: str, stage: str, timeout: float = 20.0) -> list[str]:
    """The flow run's `<stage> step ... eta ...` lines as Prefect stored them (asynchronously)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = [log.message for log in client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            progress = [m for m in logs if m.startswith(f"{stage} step") and "eta" in m]
            if progress or time.monotonic() > deadline:
                assert progress, logs[-20:]
                return progress
            time.sleep(0.5)


@pytest.mark.slow
def test_multi_process_stages_run_launched_under_the_flow(tmp_path, prefect_harness,
                                                          mlflow_store):
    """train.num_processes=2 with train.sharding=fsdp: each training stage and evaluate runs
    as its own launched process group from its task, every model sharded over the two; rank 0
    logs to the task's MLflow stage run, the group's progress reaches the task's Prefect logs,
    the registered policy is whole, and DVC skips the stages on a second run. (Two processes
    without sharding, DDP, are the same launch: tests/test_distributed.py.)"""
    root = tmp_path / "two"
    root.mkdir()
    clone_project(root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    summary = run_flow(root, ["train.num_processes=2", "train.sharding=fsdp"])
    assert summary["stages"] == {stage: "Completed" for stage in STAGES}
    for stage in ("sft", "reward", "ppo"):
        report = json.loads((root / "metrics" / f"{stage}.json").read_text())
        assert (report[f"{stage}/world_size"], report[f"{stage}/sharding"]) == (2.0, "fsdp")
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert (evaluation["world_size"], evaluation["sharding"]) == (2, "fsdp")
    assert progress_lines(summary["prefect_flow_run_id"], "ppo")
    # The ppo stage run holds every PPO step, logged by rank 0, nested under the parent.
    client = MlflowClient()
    (ppo_run,) = client.search_runs(
        [summary["mlflow_experiment_id"]],
        f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' and tags.stage = 'ppo'")
    assert ppo_run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(ppo_run.info.run_id, "objective/kl")}
    assert steps == {1, 2}
    assert ppo_run.data.metrics["resources/peak_rss_mb"] > 0
    assert set(summary["resources"]) == set(STAGES)
    again = run_flow(root)
    assert set(again["stages"].values()) == {"Skipped"}


# ---------------------------------------------------------------------------------------------
# (d), (e): a real Prefect server, a served schedule, a deployment run by a worker


def _stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group this test started (serve's flow-run children included)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """`prefect server start` (scheduler included) on a free port, SQLite in a temp dir."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "home"),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    client_env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home / "client"),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RLHF_NO_PROGRESS": "1",
                  "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    try:
        wait_until_healthy(f"{url}/health", server, 120, "prefect server", log)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url, client_env, home
    finally:
        _stop(server)


def _flow_runs(deployment_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@pytest.mark.slow
def test_cron_schedule_fires_and_the_run_completes(real_server, tmp_path):
    """`serve_pipeline` with cron `* * * * *`: a run the scheduler created reaches Completed."""
    _, env, _ = real_server
    root = tmp_path / "served"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    script = ("import json, sys; from flows.pipeline import serve_pipeline; "
              "serve_pipeline('* * * * *', sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], "
              "name='test-schedule')")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-c", script, str(root / "params.yaml"), json.dumps(TINY_OVERRIDES),
             str(root)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        deployment = None
        while deployment is None:
            assert serve.poll() is None, f"serve exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no deployment:\n{_tail(log)}"
            with get_client(sync_client=True) as client:
                try:
                    deployment = client.read_deployment_by_name("rlhf-pipeline/test-schedule")
                except prefect.exceptions.ObjectNotFound:
                    time.sleep(1)
        assert deployment.schedules[0].schedule.cron == "* * * * *"
        while True:
            runs = [run for run in _flow_runs(deployment.id) if run.auto_scheduled]
            finished = [run for run in runs if run.state and run.state.is_final()]
            if finished:
                break
            assert serve.poll() is None, f"serve exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, (
                f"no scheduled run finished in 150 s: {[(r.name, r.state_name) for r in runs]}"
                f"\n{_tail(log)}")
            time.sleep(2)
        run = finished[0]
        assert run.state.is_completed(), f"{run.state}\n{_tail(log)}"
        assert run.parameters["root"] == str(root)
        assert json.loads((root / "metrics" / "register.json").read_text())["version"] == 1
    finally:
        _stop(serve)  # before the server, or serve hangs pausing its deployment


def test_prefect_yaml_deploys_a_git_clone_not_the_deploying_directory(real_server, tmp_path):
    """prefect.yaml as a user would use it: the pull step clones the repository and branch
    (RLHF_GIT_REPO / RLHF_GIT_BRANCH) instead of recording this directory. A worker running
    it against real servers is tested in tests/test_infra.py."""
    _, env, _ = real_server
    env = {**env, "RLHF_GIT_REPO": "file:///srv/git/rlhf.git", "RLHF_GIT_BRANCH": "nightly"}
    project = tmp_path / "checkout"
    (project / "infra").mkdir(parents=True)
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    shutil.copy(REPO / "infra" / "git-source.sh", project / "infra" / "git-source.sh")
    shutil.copytree(REPO / "flows", project / "flows",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)

    def prefect_cli(*args, cwd=project, timeout=120):
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, (
            f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    prefect_cli("work-pool", "create", "local", "--type", "process")
    prefect_cli("--no-prompt", "deploy", "--name", "scheduled")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("rlhf-pipeline/scheduled")
    assert deployment.work_pool_name == "local"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    (step,) = deployment.pull_steps
    clone = step["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == "file:///srv/git/rlhf.git" and clone["branch"] == "nightly"
    assert str(project) not in json.dumps(deployment.pull_steps)
