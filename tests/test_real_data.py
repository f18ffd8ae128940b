"""Bring your own data, end to end, as a user does: a small conversational preference set and
a local Llama-architecture model (built here), `rlhf run` in a DVC repository, the completions
in MLflow, `rlhf promote` deciding on reward-model criteria (no gold reward exists), and the
champion loaded back from the registry to generate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf.config import write_overrides

from .conftest import clone_project, sh
from .test_architectures import rows_for, save_tiny_model

pytestmark = pytest.mark.slow


def own_data_and_model(root: Path) -> None:
    (root / "prefs.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows_for("conversational")))
    save_tiny_model("llama", root / "base-llama")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A clone of this repository with the tiny profile, a conversational data file and a
    local model beside the code; its first `rlhf run` done."""
    root = tmp_path_factory.mktemp("own-data")
    env = clone_project(root, own_data_and_model)
    result = sh("rlhf", "run", "--set", "data.source=prefs.jsonl",
                "--set", "model.name_or_path=base-llama", cwd=root, env=env)
    return root, env, result


def gate(root: Path, name: str, *overrides: str) -> Path:
    """A params file with a promotion gate of its own."""
    path = root / f"{name}.yaml"
    shutil.copy(root / "params.yaml", path)
    write_overrides(path, list(overrides))
    return path


def test_rlhf_run_on_own_data_and_model_registers_and_records(project):
    root, env, result = project
    assert "model version: rlhf-policy v1" in result.stdout
    report = json.loads((root / "metrics/eval.json").read_text())
    assert "gold_reward" not in report["policy"] and "pass_at_k" not in report["policy"]
    for key in ("rm_score", "kl", "response_length", "eos_rate"):
        assert key in report["policy"] and key in report["reference"], key
    assert 0.0 <= report["rm_win_rate"] <= 1.0
    # The flow recorded every stage in dvc.lock: nothing left for DVC to do.
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=root, env=env).stdout


def test_completions_are_in_mlflow(project):
    from mlflow import MlflowClient

    root, _, _ = project
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("rlhf")
    runs = {r.data.tags.get("stage"): r for r in client.search_runs([experiment.experiment_id])}
    ppo_tables = [a.path for a in client.list_artifacts(runs["ppo"].info.run_id, "tables")]
    assert any(path.startswith("tables/ppo_completions-step") for path in ppo_tables)
    eval_tables = [a.path for a in client.list_artifacts(runs["evaluate"].info.run_id, "tables")]
    assert "tables/eval_completions.json" in eval_tables
    table = json.loads(Path(client.download_artifacts(
        runs["evaluate"].info.run_id, "tables/eval_completions.json", str(root))).read_text())
    assert {"prompt", "policy", "policy_rm_score", "reference"} <= set(table["columns"])


def verdict(report: str, criterion: str) -> str:
    """'pass' or 'FAIL' in the row of `criterion` of the printed promotion table."""
    row = next(line for line in report.splitlines() if f" {criterion} " in line)
    return "FAIL" if "FAIL" in row else "pass" if "pass" in row else row


def test_promote_decides_on_reward_model_criteria(project):
    root, env, _ = project
    strict = gate(root, "strict", "promote.min_rm_win_rate_vs_reference=1.0")
    refused = sh("rlhf", "promote", "--params", str(strict), cwd=root, env=env, check=False)
    assert refused.returncode == 1, refused.stderr
    assert verdict(refused.stdout, "rm_win_rate_vs_reference") == "FAIL"
    assert "not promoted" in refused.stderr and "Traceback" not in refused.stderr

    lenient = gate(root, "lenient", "promote.min_rm_win_rate_vs_reference=0",
                   "promote.require_kl_within_budget=false")
    promoted = sh("rlhf", "promote", "--params", str(lenient), cwd=root, env=env)
    assert verdict(promoted.stdout, "rm_win_rate_vs_reference") == "pass"
    assert "promoted version 1 to champion" in promoted.stdout

    # A second run registers version 2; against the champion it is judged by sampling both.
    sh("rlhf", "run", "--set", "ppo.kl_coef=0.3", cwd=root, env=env)
    head_to_head = gate(root, "h2h", "promote.min_rm_win_rate_vs_reference=0",
                        "promote.require_kl_within_budget=false",
                        "promote.min_rm_win_rate_vs_champion=1.0",
                        "promote.head_to_head_samples=2")
    refused = sh("rlhf", "promote", "--params", str(head_to_head), cwd=root, env=env, check=False)
    assert refused.returncode == 1 and verdict(refused.stdout, "rm_win_rate_vs_champion") == "FAIL"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db",
                          registry_uri=f"sqlite:///{root}/mlflow.db")
    tags = client.get_model_version("rlhf-policy", "2").tags
    assert tags["promotion.decision"] == "refused"
    assert "(needs >= 1): FAIL" in tags["promotion.rm_win_rate_vs_champion"]
    assert str(client.get_model_version_by_alias("rlhf-policy", "champion").version) == "1"


def test_champion_loads_and_generates_as_evaluated(project):
    root, env, _ = project
    code = ("import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
            "m = mlflow.transformers.load_model('models:/rlhf-policy@champion'); "
            "g = m.model.generation_config; "
            "print(g.do_sample, g.top_k, g.temperature, g.max_new_tokens); "
            "print(type(m('user: 1+2?')[0]['generated_text']).__name__)")
    result = sh("python", "-c", code, cwd=root, env=env)
    assert result.stdout.split() == ["True", "0", "1.0", "10", "str"]


def test_status_shows_candidate_and_champion_from_the_active_store(project):
    root, env, _ = project
    result = sh("rlhf", "status", cwd=root, env=env)
    text = " ".join(result.stdout.split())
    assert "candidate: rlhf-policy v2" in text and "champion: rlhf-policy v1" in text
    assert "RM win rate" in text and "git " in text and "/#/experiments/" in text
    assert f"--backend-store-uri sqlite:///{root}/mlflow.db" in text


def test_reward_model_is_registered_and_the_policy_names_its_version(project):
    root, env, _ = project
    code = ("import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
            "c = mlflow.MlflowClient(); "
            "tags = c.get_model_version('rlhf-policy', '1').tags; "
            "print(tags['reward_model.name'], tags['reward_model.version']); "
            "rm = mlflow.transformers.load_model('models:/rlhf-policy-reward/' "
            "+ tags['reward_model.version'], return_type='components')['model']; "
            "print(type(rm).__name__, rm.config.num_labels, rm.config.pad_token_id is not None)")
    lines = sh("python", "-c", code, cwd=root, env=env).stdout.split("\n")
    assert lines[0] == "rlhf-policy-reward 1"
    assert lines[1] == "LlamaForSequenceClassification 1 True"
