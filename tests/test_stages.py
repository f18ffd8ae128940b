"""The stages end to end on the tiny profile: behaviour, artifacts, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import stages
from rlhf.config import load_params
from rlhf.errors import DataError, MissingInputError, UserError
from rlhf.io import atomic_dir, sha256_file
from rlhf.paths import Paths
from rlhf.tracking import RecordingLogger

from .conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline run once, stage by stage; each stage's metrics and log kept."""
    root = tmp_path_factory.mktemp("project")
    params = load_params("params.yaml", TINY_OVERRIDES)
    paths = Paths(root)
    results, logs = {}, {}
    for name in stages.COMPUTE_STAGES:
        logs[name] = RecordingLogger()
        results[name] = stages.get(name)(params, paths, logs[name])
    return params, paths, results, logs


def test_prepare_writes_disjoint_splits_and_manifest(pipeline):
    params, paths, _, _ = pipeline
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    assert manifest["counts"]["sft"] == params.data.n_sft
    assert manifest["counts"]["eval_prompts"] == params.data.n_eval_prompts
    for name, digest in manifest["sha256"].items():
        assert sha256_file(paths.prepared / f"{name}.jsonl") == digest
    assert 0.5 < manifest["noise_ceiling"] < 1.0
    assert 0.0 < manifest["sft_demo_exact_match"] < 0.6


def test_prepare_is_deterministic(pipeline, tmp_path):
    params, paths, _, _ = pipeline
    stages.get("prepare")(params, Paths(tmp_path))
    again = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    first = json.loads((paths.prepared / "manifest.json").read_text())
    assert again["sha256"] == first["sha256"]


def test_sft_loss_falls_and_model_loads_by_path(pipeline):
    _, paths, results, logs = pipeline
    assert results["sft"]["sft/loss_final"] < results["sft"]["sft/loss_first"]
    steps = [step for step, metrics in logs["sft"].metrics if "sft/loss" in metrics]
    assert len(steps) >= 2
    assert (paths.sft / "model.safetensors").exists() and (paths.sft / "tokenizer.json").exists()


def test_reward_model_beats_chance_and_is_normalised(pipeline):
    _, paths, results, _ = pipeline
    metrics = results["reward"]
    assert metrics["reward/accuracy"] > 0.5
    assert metrics["reward/accuracy_gold"] > 0.55
    assert metrics["reward/noise_ceiling"] > metrics["reward/accuracy"] - 0.05
    config = json.loads((paths.reward / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["rlhf_score_std"] > 0  # num_labels=1
    # The file also names the sharding it ran with (a string: not an MLflow metric).
    assert json.loads(paths.metrics_file("reward").read_text()) == {
        **metrics, "reward/sharding": "none"}


def test_reference_is_a_hashed_copy_of_sft(pipeline):
    _, paths, results, _ = pipeline
    assert sha256_file(paths.reference / "model.safetensors") == sha256_file(
        paths.sft / "model.safetensors")
    assert json.loads((paths.reference / "reference.json").read_text())["sha256"] == (
        results["reference"]["reference/sha256"])


TRL_NAMES = ["objective/kl", "objective/entropy", "objective/non_score_reward",
             "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
             "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg",
             "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "lr", "eps",
             "objective/gold_reward"]


def test_ppo_logs_trl_metrics_each_step_and_checkpoints(pipeline):
    params, paths, _, logs = pipeline
    per_step = [(step, m) for step, m in logs["ppo"].metrics if step is not None]
    assert [step for step, _ in per_step] == list(range(1, params.ppo.steps + 1))
    for _, metrics in per_step:
        assert set(TRL_NAMES) <= set(metrics)
    with open(paths.metrics / "ppo_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == params.ppo.steps and set(TRL_NAMES) <= set(rows[0])
    checkpoint = paths.checkpoints / "ppo" / f"step-{params.ppo.steps:08d}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == params.ppo.steps and "value" in state["kl_controller"]
    assert state["complete"] and len(state["history"]) == params.ppo.steps
    # checkpoint_every=1 with train.checkpoint_keep=2: only the newest two are kept.
    assert len(list((paths.checkpoints / "ppo").glob("step-*"))) == min(2, params.ppo.steps)
    assert list(checkpoint.glob("*.safetensors")) and list(checkpoint.glob("optimizer*"))
    assert list(checkpoint.glob("random_states*"))
    assert (paths.policy / "model.safetensors").exists()


def test_ppo_raises_the_reward_model_score(pipeline, tmp_path):
    """On a fixed seed, 20 PPO steps move the RM score of the rollouts up."""
    _, paths, _, _ = pipeline
    params = load_params("params.yaml", TINY_OVERRIDES + [
        "ppo.steps=20", "ppo.lr=1e-3", "ppo.checkpoint_every=100"])
    subprocess.run(["cp", "-r", str(paths.root / "data"), str(paths.root / "models"),
                    str(tmp_path)], check=True)
    logger = RecordingLogger()
    stages.get("ppo")(params, Paths(tmp_path), logger)
    scores = [m["objective/scores"] for step, m in logger.metrics if step is not None]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.2


def test_evaluate_reports_pass_at_k_and_plots(pipeline):
    params, paths, results, logs = pipeline
    report = json.loads(paths.metrics_file("eval").read_text())
    for model in ("policy", "reference"):
        curve = report[model]["pass_at_k"]
        assert list(curve) == ["1", "2", "4", "8"]
        values = [curve[k] for k in ("1", "2", "4", "8")]
        assert values == sorted(values)  # pass@k never falls as k grows
        assert curve["1"] == pytest.approx(report[model]["exact_match"])
        assert {"gold_reward", "rm_score", "kl"} <= set(report[model])
    assert report["reference"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert 0.0 <= report["win_rate"] <= 1.0
    assert report["kl_within_budget"] == (report["policy"]["kl"] <= params.eval.kl_budget)
    for plot in ("pass_at_k.png", "ppo_reward_kl.png", "reward_vs_kl.png"):
        assert (paths.plots / plot).stat().st_size > 1000
    assert {p.name for p in logs["evaluate"].artifacts} >= {"pass_at_k.png"}


def test_evaluate_max_prompts_evaluates_a_seeded_sample(pipeline, tmp_path, monkeypatch):
    from rlhf.stages import evaluate

    _, paths, _, _ = pipeline
    subprocess.run(["cp", "-r", str(paths.root / "data"), str(paths.root / "models"),
                    str(tmp_path)], check=True)
    seen = []
    real = evaluate.sample_and_score

    def spy(model, reference, reward_model, tokenizer, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real(model, reference, reward_model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "sample_and_score", spy)
    params = load_params("params.yaml", TINY_OVERRIDES + ["eval.max_prompts=3"])
    report = stages.get("evaluate")(params, Paths(tmp_path))
    everything = [json.loads(line)["prompt"] for line in
                  (paths.prepared / "eval_prompts.jsonl").read_text().splitlines()]
    assert report["n_prompts"] == 3 and report["n_prompts_available"] == len(everything) == 8
    chosen = evaluate.select_prompts(everything, 3, params.data.seed)
    assert seen == [chosen, chosen]  # policy and reference on the same sampled prompts
    assert chosen == [p for p in everything if p in chosen]  # in file order
    assert evaluate.select_prompts(everything, 3, params.data.seed) == chosen  # seeded
    assert evaluate.select_prompts(everything, 3, params.data.seed + 1) != chosen
    assert evaluate.select_prompts(everything, 8, 0) == everything
    assert evaluate.select_prompts(everything, None, 0) == everything


def test_too_few_rows_for_one_batch_is_a_data_error_not_a_hang(pipeline, tmp_path):
    """drop_last leaves no batch when there are fewer rows than batch_size."""
    _, paths, _, _ = pipeline
    subprocess.run(["cp", "-r", str(paths.root / "data"), str(paths.root / "models"),
                    str(tmp_path)], check=True)
    params = load_params("params.yaml", TINY_OVERRIDES + ["sft.batch_size=401",
                                                          "reward.batch_size=201"])
    with pytest.raises(DataError, match=r"^400 SFT demonstrations are fewer than sft.batch_size "
                                        r"\(401\); lower sft.batch_size to at most 400 or add "
                                        r"demonstrations$"):
        stages.get("sft")(params, Paths(tmp_path))
    with pytest.raises(DataError, match=r"^200 training preference pairs are fewer than "
                                        r"reward.batch_size \(201\); lower reward.batch_size to "
                                        r"at most 200 or add pairs$"):
        stages.get("reward")(params, Paths(tmp_path))


def test_ppo_refuses_a_reference_whose_weights_changed(pipeline, tmp_path):
    params, paths, _, _ = pipeline
    subprocess.run(["cp", "-r", str(paths.root / "data"), str(paths.root / "models"),
                    str(tmp_path)], check=True)
    weights = tmp_path / "models/reference/model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="rerun `rlhf stage reference`"):
        stages.get("ppo")(params, Paths(tmp_path))


def test_missing_input_names_the_stage_to_run(tmp_path):
    params = load_params("params.yaml", TINY_OVERRIDES)
    with pytest.raises(MissingInputError, match=r"run `rlhf stage prepare` first"):
        stages.get("sft")(params, Paths(tmp_path))


def test_cli_missing_input_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "stage", "ppo", "--no-track", "--root", str(tmp_path)],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "missing input" in lines[0] and "rlhf stage prepare" in lines[0]


def test_atomic_dir_keeps_the_old_output_when_writing_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_writes_keep_ordinary_file_modes(tmp_path):
    from rlhf.io import atomic_write_text

    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "x")
    assert fresh.stat().st_mode & 0o044  # readable by group/others, like any new file
    shared = tmp_path / "params.yaml"
    shared.write_text("a: 1\n")
    shared.chmod(0o664)
    atomic_write_text(shared, "a: 2\n")
    assert shared.stat().st_mode & 0o777 == 0o664
