"""PPO's options each run and do what they say, on the tiny profile."""

from __future__ import annotations

import pytest

from rlhf import stages
from rlhf.config import load_params
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

    from rlhf.stages.ppo import collect_rollout, load_models

    prompts = ["31415=", "2020=", "987=", "5555="] * 4
    # One new token at most: most responses cannot end with EOS yet.
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [
        "ppo.max_new_tokens=1", "ppo.missing_eos_penalty=-7"])
    tokenizer, model, reference, reward_model, _ = load_models(params, Paths(upstream_copy))
    torch.manual_seed(0)
    penalised = collect_rollout(model, reference, reward_model, tokenizer, prompts, params.ppo,
                                torch.device("cpu"))
    torch.manual_seed(0)
    plain = collect_rollout(model, reference, reward_model, tokenizer, prompts,
                            params.ppo.model_copy(update={"missing_eos_penalty": None}),
                            torch.device("cpu"))
    assert torch.equal(penalised.responses, plain.responses)
    assert (~penalised.has_eos).any()
    assert torch.all(penalised.scores[~penalised.has_eos] == -7.0)
    assert torch.equal(penalised.scores[penalised.has_eos], plain.scores[plain.has_eos])
