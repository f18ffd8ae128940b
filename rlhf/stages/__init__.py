"""What the pipeline's stages are beyond what DVC knows.

`dvc.yaml` holds the stage list, their order, params, deps and outputs (`rlhf.mlops.dag`
reads it). This registry holds the rest, one entry per stage: where its `run(params, paths,
logger) -> metrics` lives, whether it may run as a process group, how often Prefect retries
it, and the global batch it splits over processes and micro-batches. A test checks that the
two name the same stages.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class StageInfo:
    module: str
    """The module whose `run` is the stage (imported on demand: stages pull in torch)."""
    launchable: bool = False
    """Runs as an Accelerate process group when train.num_processes > 1."""
    retries: int = 0
    """Prefect retries after a transient failure (a training stage resumes its checkpoint)."""
    batch: Optional[Callable[[Any], tuple[str, int, dict]]] = None
    """(param name, global batch size, other parts it splits into) of its training batch."""
    report: str = ""
    """Its metrics file is metrics/<report>.json (default: the stage's name)."""
    needs_tracking: bool = False
    """Talks to MLflow by nature: skipped by `rlhf run --no-track`, refused by `rlhf stage`."""
    saved_models: int = 0
    """Model-sized outputs it writes under models/ (for the free-space check before it runs)."""
    trained_models: int = 0
    """Models it trains: each checkpoint holds their weights and Adam's two moments."""


REGISTRY: dict[str, StageInfo] = {
    "prepare": StageInfo("rlhf.stages.prepare", retries=2),  # may download a dataset
    "sft": StageInfo("rlhf.stages.sft", launchable=True, retries=1, saved_models=1,
                     trained_models=1,
                     batch=lambda p: ("sft.batch_size", p.sft.batch_size, {})),
    "reward": StageInfo("rlhf.stages.reward", launchable=True, retries=1, saved_models=1,
                        trained_models=1,
                        batch=lambda p: ("reward.batch_size", p.reward.batch_size, {})),
    "reference": StageInfo("rlhf.stages.reference", saved_models=1),
    "ppo": StageInfo("rlhf.stages.ppo", launchable=True, retries=1, saved_models=1,
                     trained_models=2,  # the policy and its value model
                     batch=lambda p: ("ppo.batch_size", p.ppo.batch_size,
                                      {"ppo.num_minibatches": p.ppo.num_minibatches})),
    "evaluate": StageInfo("rlhf.stages.evaluate", launchable=True, report="eval"),
    "register": StageInfo("rlhf.mlops.register", retries=2, needs_tracking=True),
}


def info(name: str) -> StageInfo:
    if name not in REGISTRY:
        from rlhf.errors import UserError

        raise UserError(f"unknown stage {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def get(name: str) -> Callable:
    """The `run` function of a stage."""
    return importlib.import_module(info(name).module).run


COMPUTE_STAGES = tuple(name for name, stage in REGISTRY.items() if not stage.needs_tracking)
"""The stages that compute (all but register), in order: what runs without MLflow."""
