"""Outputs follow the umask, so a team can share a project directory: under umask 002 every
folder a stage writes is 0775 and every file 0664 (mkdtemp alone would give 0700 folders, and
transformers writes weights 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from rlhf import stages
from rlhf.config import load_params
from rlhf.paths import Paths

from .conftest import REPO, TINY_OVERRIDES


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_every_stage_output_follows_the_umask(tmp_path, umask_002):
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + ["ppo.steps=1"])
    for name in stages.COMPUTE_STAGES:
        stages.get(name)(params, Paths(tmp_path))
    outputs = [tmp_path / name for name in ("data", "models", "metrics", "checkpoints", "plots")]
    assert all(path.is_dir() for path in outputs)
    wrong, seen = [], 0
    for top in outputs:
        for path in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            expected = 0o775 if path.is_dir() else 0o664
            seen += 1
            if mode != expected:
                wrong.append(f"{path.relative_to(tmp_path)} {oct(mode)}")
    assert not wrong, wrong
    assert seen > 30
    assert (tmp_path / "models/reference/model.safetensors").exists()
