"""MLflow glue against a real SQLite store in a temporary directory (no mocks of MLflow)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from rlhf.config import ModelConfig, Params, PromoteConfig  # noqa: E402
from rlhf.data.builtin_sort import ALPHABET  # noqa: E402
from rlhf.mlops import mlflow_tracking as mt  # noqa: E402
from rlhf.mlops import registry  # noqa: E402
from rlhf.models.builtin import save_builtin  # noqa: E402

SECRET = "s3cr3t-Value-42"
NAME = "rlhf-policy-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite tracking + registry store; the previous URIs are restored afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield root
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(old_tracking)
    mlflow.set_registry_uri(old_registry)


def _eval(gold: float, kl: float, within: bool, gold_ratio: float = 1.3) -> dict:
    policy = {"gold_reward": gold, "rm_score": 0.5, "kl": kl, "exact_match": 0.6,
              "pass_at_k": {"1": 0.6, "2": 0.7}}  # fmt: skip
    reference = {**policy, "gold_reward": gold / gold_ratio, "kl": 0.0}
    return {"policy": policy, "reference": reference, "win_rate": 0.62,
            "gold_ratio": gold_ratio, "kl_budget": 5.0, "kl_within_budget": within}  # fmt: skip


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mt.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mt.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_redact():
    clean = mt.redact({
        "aws_secret_access_key": SECRET, "db.password": SECRET, "apiKey": SECRET,
        "MLFLOW_TRACKING_TOKEN": SECRET, "eval.max_new_tokens": 10, "ppo.kl_coef": 0.05,
        "backend": f"postgresql+psycopg2://mlflow:{SECRET}@127.0.0.1:5432/mlflow",
        "header": f"Bearer {SECRET}", "plain": "https://example.org/a@b", "none": None,
    })  # fmt: skip
    assert SECRET not in json.dumps(clean)
    assert clean["aws_secret_access_key"] == clean["apiKey"] == mt.REDACTED
    assert clean["backend"] == "postgresql+psycopg2://mlflow:<redacted>@127.0.0.1:5432/mlflow"
    assert clean["eval.max_new_tokens"] == "10" and clean["ppo.kl_coef"] == "0.05"
    assert clean["plain"] == "https://example.org/a@b" and clean["none"] == ""


def test_pipeline_and_stage_runs(store, tmp_path):
    params = Params()
    tags = {"prefect.flow_run_id": "flow-123", "dvc.models/sft": "abc123.dir",
            "aws_secret_access_key": SECRET,
            "mlflow_backend": f"postgresql+psycopg2://u:{SECRET}@localhost/db"}  # fmt: skip
    plot = tmp_path / "curve.json"
    plot.write_text("{}")

    def stage(name: str) -> str:  # runs in a worker thread, like a Prefect task
        with mt.tracked_run(name, "rlhf-test", parent_run_id=parent.run_id,
                            tags={"stage": name, "token": SECRET}) as logger:
            assert mlflow.active_run().info.run_id == logger.run_id
            for step in range(3):
                logger.log_metrics({"objective/kl": 0.1 * step, "loss/value_avg": 1.0}, step)
            return logger.run_id

    with mt.tracked_run("pipeline", "rlhf-test", params, tags=tags) as parent:
        # the same thread: nested
        with mt.tracked_run("sft", "rlhf-test", parent_run_id=parent.run_id) as logger:
            logger.log_metrics({"loss": 2.0}, step=0)
            logger.log_metrics({"loss": 1.5}, step=1)
            logger.log_artifact(plot)
            sft_id = logger.run_id
        assert mlflow.active_run().info.run_id == parent.run_id
        with ThreadPoolExecutor(2) as pool:
            threaded = list(pool.map(stage, ["reward", "ppo"]))
        with pytest.raises(RuntimeError):
            with mt.tracked_run("evaluate", "rlhf-test", parent_run_id=parent.run_id) as logger:
                failed_id = logger.run_id
                raise RuntimeError("stage crashed")
        assert mlflow.active_run().info.run_id == parent.run_id
    assert mlflow.active_run() is None

    client = MlflowClient()
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["ppo.kl_coef"] == str(Params().ppo.kl_coef)
    assert run.data.params["eval.max_new_tokens"] == "10"
    assert len(run.data.params) == len(params.flat())
    assert run.data.tags["params.digest"] == params.digest()
    assert run.data.tags["prefect.flow_run_id"] == "flow-123"
    assert run.data.tags["dvc.models/sft"] == "abc123.dir"
    assert run.data.tags["git.commit"] == mt.git_commit()  # pytest runs inside the repo
    assert run.data.tags["aws_secret_access_key"] == mt.REDACTED
    assert run.data.tags["mlflow_backend"] == "postgresql+psycopg2://u:<redacted>@localhost/db"

    children = {r.info.run_name: r for r in client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")}  # fmt: skip
    assert set(children) == {"sft", "reward", "ppo", "evaluate"}
    assert children["evaluate"].info.run_id == failed_id
    assert children["evaluate"].info.status == "FAILED"
    for name, run_id in zip(["reward", "ppo"], threaded):
        child = children[name]
        assert child.info.run_id == run_id and child.info.status == "FINISHED"
        assert child.data.tags["token"] == mt.REDACTED and child.data.tags["stage"] == name
        history = client.get_metric_history(run_id, "objective/kl")
        assert [m.step for m in history] == [0, 1, 2]
        assert [round(m.value, 6) for m in history] == [0.0, 0.1, 0.2]
    assert [m.value for m in client.get_metric_history(sft_id, "loss")] == [2.0, 1.5]
    assert [a.path for a in client.list_artifacts(sft_id)] == ["curve.json"]
    # artifacts live next to the SQLite store, not in ./mlruns under the working directory
    assert client.get_run(sft_id).info.artifact_uri.startswith((store / "mlartifacts").as_uri())

    everything = [r.data.to_dictionary() for r in [run, *children.values()]]
    assert SECRET not in json.dumps(everything)


def test_no_git_commit_outside_a_repository(store, tmp_path):
    with mt.tracked_run("pipeline", "rlhf-test", Params(), project_root=tmp_path) as parent:
        pass
    tags = MlflowClient().get_run(parent.run_id).data.tags
    assert "git.commit" not in tags and tags["params.digest"] == Params().digest()


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory):
    """Two versions: v1 (good) registered in the active parent run; v2 (worse, KL over budget)
    registered from another thread into a run that is not active there."""
    model_dir = save_builtin(
        ModelConfig(n_layer=1, n_embd=16, n_head=2), ALPHABET, tmp_path_factory.mktemp("policy")
    )
    lineage = {"git.commit": "0" * 40, "params.digest": Params().digest(), "db_password": SECRET}
    with mt.tracked_run("register-1", "rlhf-test", Params()) as parent:
        v1 = registry.register_policy(
            model_dir, NAME, _eval(0.80, 2.1, True), lineage, run_id=parent.run_id
        )
    with mt.tracked_run("register-2", "rlhf-test", Params()) as parent2:
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(v=registry.register_policy(
            model_dir, NAME, _eval(0.71, 6.5, False), lineage, run_id=parent2.run_id)))  # fmt: skip
        thread.start()
        thread.join()
    return v1, result["v"], parent.run_id, parent2.run_id


def test_register_twice_sets_candidate_and_tags(registered):
    v1, v2, run1, run2 = registered
    assert (v1, v2) == (1, 2)
    client = MlflowClient()
    assert registry.alias_version(NAME, "candidate") == 2
    assert registry.alias_version(NAME, "champion") is None
    tags = client.get_model_version(NAME, "1").tags
    assert tags["eval.policy.gold_reward"] == "0.8"
    assert tags["eval.policy.pass_at_k.2"] == "0.7"
    assert tags["eval.kl_within_budget"] == "true"
    assert tags["params.digest"] == Params().digest()
    assert tags["db_password"] == mt.REDACTED
    for version, run_id in [("1", run1), ("2", run2)]:
        mv = client.get_model_version(NAME, version)
        assert mv.run_id == run_id
        # MLflow 3.17 + SQLite: ModelVersion.model_id stays None; the source names the model.
        assert mv.source.startswith("models:/m-")
        logged = client.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
        assert logged.source_run_id == run_id
        assert logged.experiment_id == client.get_run(run_id).info.experiment_id


def test_the_candidate_loads_by_alias_and_generates(registered):
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@candidate")  # as the README says
    out = pipe("31415=", max_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and text.startswith("31415=")


def test_promote_then_refuse(registered):
    gate = PromoteConfig()
    first = registry.promote(NAME, version=1, gate=gate)
    assert first.promoted and first.reasons == [] and first.previous_champion is None
    assert registry.alias_version(NAME, "champion") == 1

    second = registry.promote(NAME, gate=gate)  # the candidate: version 2
    assert second.version == 2 and not second.promoted and second.previous_champion == 1
    assert "gold reward 0.71 < champion's 0.8 (version 1)" in second.reasons
    assert any("KL 6.5 vs budget 5" in reason for reason in second.reasons)
    assert len(second.reasons) == 2
    assert registry.alias_version(NAME, "champion") == 1
    assert registry.alias_version(NAME, "candidate") == 2
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert tags["promotion.decision"] == "refused" and "0.71" in tags["promotion.reasons"]

    lenient = PromoteConfig(min_gold_ratio_vs_champion=0.5, require_kl_within_budget=False)
    assert registry.promote(NAME, version=2, gate=lenient).promoted
    assert registry.alias_version(NAME, "champion") == 2


def test_alias_version_of_a_missing_model_raises(store):
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.alias_version("no-such-model", "champion")


def test_configure_follows_the_project_not_the_last_configured_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first = mt.configure(tmp_path / "a")
    second = mt.configure(tmp_path / "b")
    assert first.endswith("a/mlflow.db") and second.endswith("b/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert mt.configure(tmp_path / "c") == "http://mlflow.team:5000"
    # Called again in the same process (the flow, then its register task): still the server.
    assert mt.configure(tmp_path / "c") == "http://mlflow.team:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mt.configure(tmp_path / "d")  # leave MLflow on a local store for the tests after this one
