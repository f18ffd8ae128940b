"""Resolving `model.name_or_path` to a directory or hub id that from_pretrained accepts."""

from __future__ import annotations


from rlhf.config import ModelConfig
from rlhf.data.builtin_sort import ALPHABET
from rlhf.io import atomic_dir
from rlhf.models.builtin import save_builtin
from rlhf.paths import Paths


def resolve_base_model(cfg: ModelConfig, paths: Paths) -> str:
    """`builtin` builds the tiny GPT-2 into models/base (idempotent: same config, same weights)."""
    if cfg.name_or_path != "builtin":
        return cfg.name_or_path
    with atomic_dir(paths.base_model) as out:
        save_builtin(cfg, ALPHABET, out)
    return str(paths.base_model)
