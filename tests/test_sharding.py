"""FSDP2 sharding (`train.sharding=fsdp`) on 2 CPU processes (gloo): every model split over the
processes computes what one process computes with whole models, for sft, reward, ppo (ptx,
LoRA, both kinds of value model) and evaluate; checkpoints hold the whole state, gathered from
every process, and resume on 2 processes or 1 (the kill -9 test of test_distributed, run
sharded too); the saved models are whole Hugging Face models.

The same code runs on NCCL over GPUs: nothing here is CPU-specific but the launcher's choice of
backend. Tolerances as in test_distributed (the same float-summation-order argument).
"""

from __future__ import annotations

import pytest
import torch

from rlhf import checkpoints as ckpt
from rlhf.engine import SHARDED_FILES
from rlhf.models.loading import ScalarHeadModel, load_causal_lm

from .test_distributed import (EXTRA, TWO, _approx_tree, launch, metrics, one_and_two, per_step,
                               project, run_here)

FSDP = "train.sharding=fsdp"


def assert_same_weights(ours, theirs) -> None:
    """Equal up to Adam's amplified rounding: a parameter whose gradient is 0 but for rounding
    (ln_f's bias under the reward model's pairwise loss, which no shift of the scores changes)
    moves by +-lr a step on that rounding. Measured after the reward stage, the same under DDP
    as under FSDP: 1.3e-3 on it, 7.9e-4 on the head's bias (the normalisation shift, computed
    from scores it moves), below 7e-6 on every other parameter."""
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-3, atol=3e-3), name


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sharded_training_matches_one_process(stage, trained_upstream, tmp_path):
    one, two = one_and_two(trained_upstream, tmp_path, stage, EXTRA[stage], FSDP)
    assert metrics(two, stage)[f"{stage}/sharding"] == "fsdp"
    assert metrics(one, stage)[f"{stage}/sharding"] == "none"
    # The checkpoint holds the whole state, gathered from both processes' shards.
    newest = ckpt.checkpoint_dirs(two / "checkpoints" / stage)[-1]
    assert {name for name in SHARDED_FILES} <= {p.name for p in newest.iterdir()}
    # The saved model is whole: it loads with from_pretrained and equals one process's.
    load = (lambda root: load_causal_lm(root / "models" / "sft")) if stage == "sft" else \
        (lambda root: ScalarHeadModel.load(root / "models" / "reward"))
    assert_same_weights(load(two), load(one))


@pytest.mark.parametrize("extra", [
    # The ptx term (a second forward of the policy), the value head on the policy's trunk
    # (its own root unit), micro-batches (gradients reduce-scattered after the last only).
    # The value model copied from the reward model is the default: the kill -9 test.
    ["ppo.ptx_coef=0.5", "ppo.value_model=policy_head", "train.grad_accum=2"],
    # LoRA: the reference is the policy with adapters off, the reward model the value model's
    # trunk with adapters off.
    ["model.lora=true", "model.lora_r=4"],
], ids=["ptx-policy-head-micro-batches", "lora"])
def test_sharded_ppo_matches_one_process(extra, trained_upstream, tmp_path):
    one, two = one_and_two(trained_upstream, tmp_path, "ppo", EXTRA["ppo"] + extra, FSDP)
    assert metrics(two, "ppo")["ppo/sharding"] == "fsdp"
    assert_same_weights(load_causal_lm(two / "models" / "policy"),
                        load_causal_lm(one / "models" / "policy"))


def test_sharded_ppo_in_bf16_trains_and_saves_a_whole_policy(trained_upstream, tmp_path):
    """bf16 autocast over the sharded models (on CPU here; the GPU path is the same code)."""
    root = project(trained_upstream, tmp_path / "bf16", EXTRA["ppo"] + ["train.precision=bf16"])
    launch(root, "ppo", *TWO, FSDP)
    history = per_step(root, "ppo")
    assert all(torch.isfinite(torch.tensor(values)).all() for values in history.values())
    assert metrics(root, "ppo")["ppo/sharding"] == "fsdp"
    assert load_causal_lm(root / "models" / "policy").num_parameters() > 0


def test_sharded_evaluation_equals_one_process(trained_upstream, tmp_path):
    """Each process samples its share of the rows; with sharded weights every forward is a
    collective, so the process with fewer rows runs as many batches (9 rows in batches of 2:
    2 and 3 batches)."""
    extra = ["ppo.steps=1", "eval.max_prompts=3", "eval.n_samples=3", "eval.max_k=2",
             "eval.batch_size=2"]
    one = project(trained_upstream, tmp_path / "one", extra)
    run_here(one, "ppo")
    run_here(one, "evaluate")
    two = project(trained_upstream, tmp_path / "two", extra)
    (two / "models" / "policy").symlink_to(one / "models" / "policy")
    launch(two, "evaluate", *TWO, FSDP)
    ours, theirs = metrics(two, "eval"), metrics(one, "eval")
    assert (ours.pop("sharding"), theirs.pop("sharding")) == ("fsdp", "none")
    assert (ours.pop("world_size"), theirs.pop("world_size")) == (2, 1)
    assert _approx_tree(ours, theirs)
