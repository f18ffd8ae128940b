"""The pipeline's stages, in order. Each is `run(params, paths, logger) -> metrics`."""

from __future__ import annotations

import importlib
from typing import Callable

ORDER = ("prepare", "sft", "reward", "reference", "ppo", "evaluate")


def get(name: str) -> Callable:
    """The `run` function of a stage, imported on demand (stages pull in torch)."""
    if name not in ORDER:
        from rlhf.errors import UserError

        raise UserError(f"unknown stage {name!r}; choose one of: {', '.join(ORDER)}")
    return importlib.import_module(f"rlhf.stages.{name}").run
