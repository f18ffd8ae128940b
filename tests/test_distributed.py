"""Multi-process training on Accelerate (gloo on CPU): 2 processes at global batch B compute
what 1 process computes at B, for sft, reward, ppo and evaluate, and their checkpoints resume.

Every 2-process run is a real `rlhf stage NAME --set train.num_processes=2` subprocess, which
starts `accelerate launch` (torchrun underneath) as a user's command does.

Tolerance. The 2-process run sums the same float32 terms in another order (each rank's shard
is its own matmul with its own padding width, the gloo all-reduce adds the two halves, torch
runs one thread per rank), so the two runs differ by float rounding, which Adam's steps carry
forward: measured here, at most ~1e-6 relative on any per-step loss over these runs, and
~2e-7 absolute on the KL, a difference of nearly equal log-probs (so relative error means
nothing near 0). The tolerance, 1e-4 relative or 1e-5 absolute, leaves room for that and
still catches every way of dividing the work wrongly we have seen: gradients not all-reduced (the old reward stage), a scheduler
stepped once per process, or losses averaged per rank instead of over the global batch each
move a loss by 5e-3 or more within three steps.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhf import checkpoints as ckpt
from rlhf import stages
from rlhf.config import load_params, write_overrides
from rlhf.paths import Paths

from .conftest import REPO, TINY_OVERRIDES
from .test_resume import kill_after_first_checkpoint, own_env, rlhf_stage, run_ok

RTOL, ATOL = 1e-4, 1e-5
TWO = ["train.num_processes=2"]
EXTRA = {"sft": [], "reward": ["reward.epochs=2"], "ppo": ["ppo.steps=4"]}
OUTPUT = {"sft": "models/sft", "reward": "models/reward", "ppo": "models/policy"}


def project(trained_upstream: Path, root: Path, extra: list[str] = ()) -> Path:
    root.mkdir(parents=True)
    for folder in ("data", "models"):
        shutil.copytree(trained_upstream / folder, root / folder)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_overrides(root / "params.yaml", TINY_OVERRIDES + list(extra))
    return root


def run_here(root: Path, stage: str, *overrides: str) -> None:
    """One process, in this one (as `rlhf run` runs a stage)."""
    stages.get(stage)(load_params(root / "params.yaml", list(overrides)), Paths(root))


def launch(root: Path, stage: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_ok(rlhf_stage(root, stage, "--no-track",
                             *[a for o in overrides for a in ("--set", o)]), root)


def per_step(root: Path, stage: str) -> dict[str, list[float]]:
    """The per-step figures a run recorded: sft and reward keep them in their last checkpoint,
    ppo in metrics/ppo_history.csv."""
    if stage == "ppo":
        with open(root / "metrics" / "ppo_history.csv") as handle:
            rows = list(csv.DictReader(handle))
        keys = ("loss/policy_avg", "loss/value_avg", "loss/kl_avg", "objective/kl",
                "objective/scores", "policy/entropy_avg", "objective/gold_reward")
        return {k: [float(r[k]) for r in rows] for k in keys if k in rows[0]}
    state = ckpt.read_state(ckpt.checkpoint_dirs(root / "checkpoints" / stage)[-1])
    if stage == "sft":
        return {"loss": state["losses"]}
    return {"loss": [h[0] for h in state["history"]], "accuracy": [h[1] for h in state["history"]]}


def assert_close(ours: dict[str, list[float]], theirs: dict[str, list[float]]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert len(ours[key]) == len(theirs[key]) > 1, key
        assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL), key


def one_and_two(trained_upstream: Path, tmp_path: Path, stage: str, extra: list[str],
                *launched: str) -> tuple[Path, Path]:
    """`stage` run in this process and launched on 2 processes (with the `launched`
    overrides), each in its own project with the `extra` params; their per-step figures must
    agree. Returns the two projects."""
    one = project(trained_upstream, tmp_path / "one", extra)
    run_here(one, stage)
    two = project(trained_upstream, tmp_path / "two", extra)
    launch(two, stage, *TWO, *launched)
    assert_close(per_step(two, stage), per_step(one, stage))
    return one, two


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_two_processes_match_one(stage, trained_upstream, tmp_path):
    one, two = one_and_two(trained_upstream, tmp_path, stage, EXTRA[stage])
    assert metrics(one, stage)[f"{stage}/world_size"] == 1.0
    assert metrics(two, stage)[f"{stage}/world_size"] == 2.0
    # Rank 0 alone wrote the outputs and checkpoints; the other rank left nothing behind.
    assert (two / OUTPUT[stage]).is_dir()
    assert not list(two.glob("**/.tmp-*"))


def test_gradient_accumulation_matches_one_batch(trained_upstream, tmp_path):
    """train.grad_accum splits each process's share into micro-batches: the same updates."""
    for stage in ("reward", "ppo"):
        whole = project(trained_upstream, tmp_path / f"{stage}-whole", EXTRA[stage])
        run_here(whole, stage)
        micro = project(trained_upstream, tmp_path / f"{stage}-micro", EXTRA[stage])
        run_here(micro, stage, "train.grad_accum=2")
        assert_close(per_step(micro, stage), per_step(whole, stage))


def test_two_processes_with_micro_batches_ptx_and_a_policy_value_head(trained_upstream, tmp_path):
    """The other PPO paths: the ptx term (a second forward of the policy), the value head on
    the policy's trunk, and micro-batches on each rank."""
    one_and_two(trained_upstream, tmp_path, "ppo",
                EXTRA["ppo"] + ["ppo.ptx_coef=0.5", "ppo.value_model=policy_head"],
                "train.grad_accum=2")


def test_two_processes_match_one_for_a_critic_free_estimator(trained_upstream, tmp_path):
    """GRPO's groups span the gathered batch; its KL term is in the loss, its reward gold."""
    one_and_two(trained_upstream, tmp_path, "ppo",
                EXTRA["ppo"] + ["ppo.advantage=grpo", "ppo.num_generations=4",
                                "ppo.reward=gold", "ppo.kl_penalty=loss", "ppo.kl_estimator=k3"])


def test_sharded_evaluation_equals_one_process(trained_upstream, tmp_path):
    one = project(trained_upstream, tmp_path / "one", ["ppo.steps=1"])
    run_here(one, "ppo")
    two = project(trained_upstream, tmp_path / "two", ["ppo.steps=1"])
    shutil.copytree(one / "models" / "policy", two / "models" / "policy")
    run_here(one, "evaluate")
    launch(two, "evaluate", *TWO)
    ours, theirs = metrics(two, "eval"), metrics(one, "eval")
    assert (ours.pop("world_size"), theirs.pop("world_size")) == (2, 1)
    assert ours.pop("sharding") == theirs.pop("sharding") == "none"
    assert _approx_tree(ours, theirs)


def _approx_tree(ours, theirs) -> bool:
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        return all(_approx_tree(ours[k], theirs[k]) for k in ours)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)  # KLs near 0: absolute
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_a_killed_two_process_run_resumes_on_one_or_two(sharding, trained_upstream, tmp_path):
    """kill -9 of the launched group between checkpoints, which every rank wrote; the rerun
    resumes from that checkpoint, on two processes or on one (the division of work does not
    shape the run; a sharded checkpoint holds the whole state), and ends where an
    uninterrupted one-process run ends."""
    extra = ["ppo.steps=6", "ppo.checkpoint_every=2", f"train.sharding={sharding}"]
    whole = project(trained_upstream, tmp_path / "whole", extra)
    run_here(whole, "ppo")
    killed = project(trained_upstream, tmp_path / "killed", extra)
    step = kill_after_first_checkpoint(
        rlhf_stage(killed, "ppo", "--no-track", "--set", "train.num_processes=2"),
        killed, "ppo")
    assert 0 < step < 6
    # Each rank took part in the save (a collective where the weights are sharded).
    newest = ckpt.checkpoint_dirs(killed / "checkpoints" / "ppo")[-1]
    assert {p.name for p in newest.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    # The killed project resumes on two processes; a copy of it, as the kill left it, on one.
    copy = tmp_path / "killed-copy"
    shutil.copytree(killed, copy)
    for world, resumed in ((2, killed), (1, copy)):
        result = launch(resumed, "ppo", f"train.num_processes={world}")
        assert "resuming" in result.stdout + result.stderr
        final = ckpt.read_state(ckpt.checkpoint_dirs(resumed / "checkpoints" / "ppo")[-1])
        assert final["complete"] and final["resumed_from"] == step
        assert_close(per_step(resumed, "ppo"), per_step(whole, "ppo"))


@pytest.mark.parametrize("overrides, expected", [
    (["train.num_processes=4096"], "is more than this machine's"),
    (["train.num_processes=2", "train.accelerate_config=configs/accelerate/none.yaml"],
     "no such file"),
    (["train.num_processes=2", "train.grad_accum=2",
      f"train.accelerate_config={REPO / 'configs/accelerate/deepspeed_zero2.yaml'}"],
     "train.grad_accum=2 with DeepSpeed"),
    (["train.num_processes=2", "ppo.batch_size=18"],
     "ppo.batch_size=18 does not split evenly into train.num_processes (2)"),
    (["train.num_processes=2", "train.sharding=fsdp",
      f"train.accelerate_config={REPO / 'configs/accelerate/deepspeed_zero2.yaml'}"],
     "train.sharding=fsdp and DeepSpeed"),
])
def test_bad_launches_stop_with_one_line(overrides, expected, trained_upstream, tmp_path):
    root = project(trained_upstream, tmp_path / "p")
    result = subprocess.run(rlhf_stage(root, "ppo", "--no-track",
                                       *[a for o in overrides for a in ("--set", o)]),
                            cwd=root, env=own_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


def test_deepspeed_without_its_package_names_the_extra(trained_upstream, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    root = project(trained_upstream, tmp_path / "p")
    config = root / "ds.yaml"
    config.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n"
                      "deepspeed_config:\n  zero_stage: 2\n")
    result = subprocess.run(rlhf_stage(root, "sft", "--no-track", "--set", "train.num_processes=2",
                                       "--set", f"train.accelerate_config={config}"),
                            cwd=root, env=own_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "pip install -e '.[deepspeed]'" in result.stderr


def test_accelerates_fsdp_is_refused_for_train_sharding(monkeypatch, tmp_path):
    """An Accelerate FSDP config, through rlhf (before launch) or `accelerate launch` straight
    (in the ranks): Accelerate would run DDP without GPUs, and leave the frozen models whole
    with them. One line names train.sharding=fsdp instead."""
    from rlhf.config import TrainConfig, load_params
    from rlhf.engine import make_accelerator
    from rlhf.errors import ParamsError
    from rlhf.mlops.launch import check_launchable

    expected = "asks for FSDP, which rlhf does itself: set train.sharding=fsdp"
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    with pytest.raises(ParamsError, match=expected):
        check_launchable(load_params(REPO / "params.yaml", [
            "train.num_processes=2", f"train.accelerate_config={config}"]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ParamsError, match=expected):
        make_accelerator(TrainConfig(cpu=True))
