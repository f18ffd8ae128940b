"""The stages as `dvc.yaml` declares them: the one place where each stage's params, deps and
outputs are written down. DVC runs and checks the DAG; the flow reads the stage order here
(it must match `rlhf.stages.REGISTRY`, checked by the flow and by a test).

`outputs` are a stage's `outs:`, `metrics:` and `plots:` (`cache: false` ones included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import UserError

DVC_YAML = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    """Params sections or section.key names the stage reads."""
    deps: tuple[str, ...]
    """Code and data paths it reads, relative to the project root."""
    outputs: tuple[str, ...]
    """What it writes, relative to the project root."""


def _path(entry: Any) -> str:
    """`path` or `{path: {options}}`, as dvc.yaml lists deps and outputs."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def parse(document: dict) -> dict[str, Stage]:
    """The stages of a parsed dvc.yaml, in order."""
    return {name: Stage(name, tuple(str(p) for p in spec.get("params") or []),
                        tuple(_path(entry) for entry in spec.get("deps") or []),
                        tuple(_path(entry) for kind in ("outs", "metrics", "plots")
                              for entry in spec.get(kind) or []))
            for name, spec in ((document or {}).get("stages") or {}).items()}


def dag_file(root: str | Path) -> Path:
    """The project's dvc.yaml, else the one shipped with this code (a project directory that
    holds only a params file runs the pipeline as the repository declares it)."""
    for candidate in (Path(root) / DVC_YAML, Path(__file__).resolve().parents[2] / DVC_YAML):
        if candidate.is_file():
            return candidate
    raise UserError(f"no {DVC_YAML} in {Path(root).resolve()} (it declares the pipeline's "
                    "stages); run from the project directory or copy the repository's dvc.yaml")


def read(root: str | Path) -> dict[str, Stage]:
    """The stages of the DAG that applies to project `root` (see `dag_file`)."""
    path = dag_file(root)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix it") from None
    return parse(document)
