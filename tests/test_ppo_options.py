"""PPO's options each run and do what they say, on the tiny profile."""

from __future__ import annotations

import shutil

import pytest

from rlhf import stages
from rlhf.config import load_params
from rlhf.errors import DataError
from rlhf.paths import Paths
from rlhf.tracking import RecordingLogger

from .conftest import REPO, TINY_OVERRIDES


def run_ppo(root, *overrides: str) -> list[dict]:
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + list(overrides))
    logger = RecordingLogger()
    stages.get("ppo")(params, Paths(root), logger)
    return [metrics for step, metrics in logger.metrics if step is not None]


def test_value_head_on_the_policy_trunk(upstream_copy):
    rows = run_ppo(upstream_copy, "ppo.value_model=policy_head", "ppo.steps=3")
    assert len(rows) == 3
    assert all(row["loss/value_avg"] > 0 for row in rows)


def test_ptx_entropy_whitening_and_fixed_beta(upstream_copy):
    rows = run_ppo(upstream_copy, "ppo.ptx_coef=0.5", "ppo.ent_coef=0.01",
                   "ppo.whiten_rewards=true", "ppo.adaptive_kl=false", "ppo.kl_coef=0.3",
                   "ppo.steps=3")
    assert all(row["loss/ptx_avg"] > 0 for row in rows)
    assert [row["objective/kl_coef"] for row in rows] == [0.3, 0.3, 0.3]


def test_adaptive_beta_moves_towards_the_target(upstream_copy):
    # KL starts near 0, far below a target of 5 nats: beta must shrink every step.
    rows = run_ppo(upstream_copy, "ppo.kl_target=5", "ppo.kl_horizon=100", "ppo.steps=3")
    betas = [row["objective/kl_coef"] for row in rows]
    assert betas[0] == pytest.approx(0.2)
    assert betas[1] < betas[0] and betas[2] < betas[1]


def test_missing_eos_penalty_replaces_the_score_of_responses_without_eos(upstream_copy):
    import torch

    from rlhf.stages.ppo import RewardSource, collect_rollout, load_models

    prompts = ["31415=", "2020=", "987=", "5555="] * 4
    # One new token at most: most responses cannot end with EOS yet.
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        "ppo.max_new_tokens=1", "ppo.missing_eos_penalty=-7"])
    tokenizer, model, reference, reward_model, _ = load_models(params, Paths(upstream_copy))
    reward = RewardSource("model", reward_model)
    torch.manual_seed(0)
    penalised = collect_rollout(model, reference, reward, tokenizer, prompts, params.ppo,
                                torch.device("cpu"))
    torch.manual_seed(0)
    plain = collect_rollout(model, reference, reward, tokenizer, prompts,
                            params.ppo.model_copy(update={"missing_eos_penalty": None}),
                            torch.device("cpu"))
    assert torch.equal(penalised.responses, plain.responses)
    assert (~penalised.has_eos).any()
    assert torch.all(penalised.scores[~penalised.has_eos] == -7.0)
    assert torch.equal(penalised.scores[penalised.has_eos], plain.scores[plain.has_eos])


# --- the critic-free estimators, KL placement and reward sources (ppo.advantage, ppo.reward)

@pytest.mark.parametrize("options", [
    ["ppo.advantage=grpo", "ppo.num_generations=4", "ppo.kl_penalty=loss",
     "ppo.kl_estimator=k3"],
    ["ppo.advantage=grpo", "ppo.num_generations=2", "ppo.scale_rewards=false"],  # Dr. GRPO
    ["ppo.advantage=rloo", "ppo.num_generations=4", "ppo.kl_estimator=k2"],
    ["ppo.advantage=reinforce_pp", "ppo.ptx_coef=0.5"],
    ["ppo.kl_penalty=loss", "ppo.kl_estimator=k3"],  # PPO with GRPO's KL term
    ["ppo.advantage=grpo", "ppo.num_generations=2", "model.lora=true"],
], ids=["grpo-kl-loss", "dr-grpo", "rloo-k2", "reinforce_pp-ptx", "gae-kl-loss", "grpo-lora"])
def test_each_estimator_trains(upstream_copy, options):
    rows = run_ppo(upstream_copy, *options, "ppo.steps=2")
    assert len(rows) == 2
    critic = "ppo.advantage" not in options[0]
    kl_in_loss = "ppo.kl_penalty=loss" in options
    for row in rows:
        assert ("loss/value_avg" in row) == critic
        assert ("loss/kl_avg" in row) == kl_in_loss
        assert all(v == v for v in row.values())  # no NaN anywhere
    # After step 1 the policy has moved off the reference: the KL shows where it is charged.
    assert (rows[1]["objective/non_score_reward"] == 0.0) == kl_in_loss
    if kl_in_loss:
        assert rows[1]["loss/kl_avg"] > 0
    assert (upstream_copy / "models" / "policy" / "model.safetensors").exists()


def test_a_critic_free_estimator_builds_no_value_model_and_a_group_shares_its_prompt(
        upstream_copy):
    from rlhf.stages.ppo import load_models

    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        "ppo.advantage=rloo", "ppo.num_generations=4", "ppo.reward=gold"])
    _, model, _, reward_model, _ = load_models(params, Paths(upstream_copy))
    assert model.value_model is None and not hasattr(model, "value_head")
    assert reward_model is None  # gold scores; nothing to copy a value model from
    assert all(name.startswith("policy.") for name, _ in model.named_parameters())


def test_gold_reward_is_the_verifier_score(upstream_copy):
    rows = run_ppo(upstream_copy, "ppo.advantage=grpo", "ppo.num_generations=4",
                   "ppo.reward=gold", "ppo.steps=2")
    for row in rows:
        assert row["objective/scores"] == pytest.approx(row["objective/gold_reward"], abs=1e-6)


def _params_with_reward_module(root, source: str, *overrides: str):
    (root / "my_rewards.py").write_text(source)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return load_params(root / "params.yaml", TINY_OVERRIDES + list(overrides))


def test_a_users_reward_function_scores_the_responses(upstream_copy):
    params = _params_with_reward_module(
        upstream_copy, "def constant(prompts, responses):\n    return [0.5] * len(responses)\n",
        "ppo.reward=my_rewards:constant", "ppo.advantage=grpo", "ppo.num_generations=4",
        "ppo.steps=2")
    logger = RecordingLogger()
    stages.get("ppo")(params, Paths(upstream_copy), logger)
    rows = [metrics for step, metrics in logger.metrics if step is not None]
    for row in rows:
        assert row["objective/scores"] == 0.5
        # Every group's rewards are equal: zero advantages, so a zero policy loss, not NaN.
        assert row["loss/policy_avg"] == 0.0


@pytest.mark.parametrize("body, message", [
    ("return [1.0]", "returned 1 scores for 16 responses; return one per response"),
    ("return [float('nan')] * len(responses)", "returned nan for response"),
    ("return ['good'] * len(responses)", "must return one number per response"),
])
def test_a_reward_function_that_returns_bad_scores_stops_before_any_update(
        upstream_copy, body, message):
    params = _params_with_reward_module(
        upstream_copy, f"def score(prompts, responses):\n    {body}\n",
        "ppo.reward=my_rewards:score")
    with pytest.raises(DataError, match=message) as info:
        stages.get("ppo")(params, Paths(upstream_copy))
    assert "\n" not in str(info.value)
    assert not list((upstream_copy / "checkpoints").glob("ppo/*/"))
    assert not (upstream_copy / "models" / "policy").exists()


def test_lineage_names_the_estimator_and_the_reward_functions_file(tmp_path):
    import hashlib

    from rlhf.mlops.register import lineage_tags

    params = _params_with_reward_module(
        tmp_path, "def constant(prompts, responses):\n    return [0.5] * len(responses)\n",
        "ppo.reward=my_rewards:constant", "ppo.advantage=rloo", "ppo.num_generations=2")
    tags = lineage_tags(params, Paths(tmp_path))
    assert (tags["ppo.advantage"], tags["ppo.reward"], tags["ppo.kl_penalty"]) == (
        "rloo", "my_rewards:constant", "reward")
    source = (tmp_path / "my_rewards.py").read_bytes()
    assert tags["ppo.reward.sha256"] == hashlib.sha256(source).hexdigest()


def test_a_critic_free_run_resumes_exactly(upstream_copy):
    import json

    from rlhf import checkpoints as ckpt

    options = ["ppo.advantage=rloo", "ppo.num_generations=4", "ppo.kl_penalty=loss",
               "ppo.steps=3"]
    whole = run_ppo(upstream_copy, *options)
    # As if killed after step 2: the finished run's last checkpoint goes, the one of step 2
    # (not marked complete) is what the rerun finds.
    shutil.rmtree(ckpt.checkpoint_dirs(upstream_copy / "checkpoints" / "ppo")[-1])
    resumed = run_ppo(upstream_copy, *options)
    assert len(resumed) == 1  # step 3 only
    assert {k: v for k, v in resumed[0].items() if k != "eps"} == \
        {k: v for k, v in whole[2].items() if k != "eps"}
    assert json.loads((upstream_copy / "metrics" / "ppo.json").read_text())["steps"] == 3.0


def test_a_batch_of_one_with_one_token_responses_trains(upstream_copy):
    # One valid token in the whole batch: whitening has no variance to divide by.
    rows = run_ppo(upstream_copy, "ppo.batch_size=1", "ppo.num_minibatches=1",
                   "ppo.max_new_tokens=1", "ppo.steps=2")
    assert len(rows) == 2 and all(v == v for row in rows for v in row.values())
