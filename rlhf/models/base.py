"""Resolving `model.name_or_path` to a directory or hub id that from_pretrained accepts."""

from __future__ import annotations


from rlhf.config import ModelConfig
from rlhf.data.builtin_sort import ALPHABET
from rlhf.io import atomic_dir, write_json
from rlhf.models.builtin import save_builtin
from rlhf.paths import Paths


def resolve_base_model(cfg: ModelConfig, paths: Paths, write: bool = True) -> str:
    """`builtin` builds the tiny GPT-2 into models/base (idempotent: same config, same weights).

    Any other model is loaded from where it is; models/base then records which model that was
    (`source.json`), so the sft stage's declared output exists whatever the model (dvc.yaml).
    With `write=False` (the other ranks of a launched group) only the location is returned."""
    if not write:
        return cfg.name_or_path if cfg.name_or_path != "builtin" else str(paths.base_model)
    if cfg.name_or_path != "builtin":
        with atomic_dir(paths.base_model) as out:
            write_json(out / "source.json", {"name_or_path": cfg.name_or_path,
                                             "revision": cfg.revision})
        return cfg.name_or_path
    with atomic_dir(paths.base_model) as out:
        save_builtin(cfg, ALPHABET, out)
    return str(paths.base_model)
