"""The stage DAG, read from `dvc.yaml`: the one place where each stage's params, deps and
outputs are written down. `dvc repro` runs it; the Prefect flow (`flows/pipeline.py`) reads it
here, so the two cannot drift apart.

Per stage, the flow takes:

- `params`: its `params:` list (whole sections like `ppo`, or keys like `data.seed`): what its
  cache key hashes;
- `upstream`: the stages whose outputs are among its `deps:` (the DAG's edges);
- `outputs`: its `outs:`, `metrics:` and `plots:` (`cache: false` ones included), which must
  exist and whose content hash keys the stages below it. Not `persist: true` outs: those are
  resumable checkpoints (`checkpoints/<stage>`) that outlive a run, not what it produces.

Stages come in dvc.yaml's order, which must be a topological order (each after its upstream).
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
    """What it writes, relative to the project root (persistent checkpoints excluded)."""
    upstream: tuple[str, ...]
    """Stages that write one of its deps, in DAG order."""


def _path(entry: Any) -> str:
    """`path` or `{path: {options}}`, as dvc.yaml lists deps and outputs."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def _options(entry: Any) -> dict:
    return (next(iter(entry.values())) or {}) if isinstance(entry, dict) else {}


def _outputs(spec: dict) -> tuple[str, ...]:
    return tuple(_path(entry) for kind in ("outs", "metrics", "plots")
                 for entry in spec.get(kind) or [] if not _options(entry).get("persist"))


def _covers(output: str, dep: str) -> bool:
    """Whether a dep lies in (or is) an output: `models/sft` covers `models/sft/config.json`."""
    return dep == output or dep.startswith(output.rstrip("/") + "/")


def parse(document: dict, source: str = DVC_YAML) -> dict[str, Stage]:
    """The stages of a parsed dvc.yaml, in order."""
    specs = (document or {}).get("stages") or {}
    outputs = {name: _outputs(spec) for name, spec in specs.items()}
    stages: dict[str, Stage] = {}
    for name, spec in specs.items():
        deps = tuple(_path(entry) for entry in spec.get("deps") or [])
        upstream = tuple(other for other in specs if other != name and any(
            _covers(out, dep) for out in outputs[other] for dep in deps))
        later = [other for other in upstream if other not in stages]
        if later:
            raise UserError(f"{source}: stage {name!r} reads outputs of {later}, which come "
                            f"after it; list the stages in the order they run")
        stages[name] = Stage(name, tuple(str(p) for p in spec.get("params") or []), deps,
                             outputs[name], upstream)
    return stages


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
    return parse(document, str(path))
