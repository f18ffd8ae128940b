"""Shared test fixtures: the tiny profile and a prepared tiny project."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RLHF_NO_PROGRESS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent

# A params override that runs the whole pipeline in seconds: a 1-layer model, little data,
# two PPO steps. Tests assert on behaviour, never on the figures of the full default run.
TINY_OVERRIDES = [
    "data.n_sft=400", "data.n_pairs=200", "data.n_pairs_eval=100", "data.n_rl_prompts=64",
    "data.n_eval_prompts=8", "data.max_digits=5",
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "sft.epochs=2", "sft.batch_size=32", "sft.log_every=5",
    "reward.epochs=1", "reward.batch_size=32", "reward.n_normalise_samples=32", "reward.log_every=2",
    "ppo.steps=2", "ppo.batch_size=16", "ppo.checkpoint_every=1",
    "eval.n_samples=8", "eval.max_k=8", "eval.batch_size=256",
]


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A project directory with the repo's params.yaml and the tiny profile written into it."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    from rlhf.config import write_overrides

    write_overrides(tmp_path / "params.yaml", TINY_OVERRIDES)
    return tmp_path


@pytest.fixture(scope="session")
def trained_upstream(tmp_path_factory) -> Path:
    """prepare, sft, reward and reference run once on the tiny profile; copy before changing."""
    from rlhf import stages
    from rlhf.config import load_params
    from rlhf.paths import Paths

    root = tmp_path_factory.mktemp("upstream")
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES)
    for name in ("prepare", "sft", "reward", "reference"):
        stages.get(name)(params, Paths(root))
    return root


@pytest.fixture
def upstream_copy(trained_upstream: Path, tmp_path: Path) -> Path:
    """A private copy of the trained upstream artifacts."""
    for folder in ("data", "models"):
        shutil.copytree(trained_upstream / folder, tmp_path / folder)
    return tmp_path
