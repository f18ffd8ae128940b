"""Model folders a stage hands to the next: checked whole before use, and hashed where a
silent change would falsify later figures (the reference: every KL; the reward model: every
score PPO optimises).

A model folder is complete when its config and every JSON file parse, it has weights, and
each safetensors file is as long as its own header says (a copy or a download cut short is
the usual corruption). The hash covers every file that defines the model (config, generation
config, tokenizer, weights, the reward head), not the weights alone: an edited config.json
changes the model as surely as edited weights do.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

from rlhf.errors import MissingInputError, UserError
from rlhf.io import read_json, sha256_files, write_json

SAFETENSORS_INDEX = "model.safetensors.index.json"


class CorruptArtifactError(UserError):
    """A stage output that exists but is truncated, unreadable or changed since it was written."""


def _rerun(produced_by: Optional[str]) -> str:
    return f"rerun `rlhf stage {produced_by}`" if produced_by else "replace the file"


def check_safetensors(path: Path, produced_by: Optional[str] = None) -> None:
    """Header parses and the file holds every byte the header points to."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than its header")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise ValueError("shorter than its header says")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [entry["data_offsets"][1] for name, entry in header.items()
                if name != "__metadata__"]
        data = size - 8 - header_len
        if max(ends, default=0) != data:
            problem = (f"truncated: its tensors need {max(ends, default=0)} bytes of data, "
                       f"the file has {data}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        problem = f"not a readable safetensors file ({exc})"
    if problem:
        raise CorruptArtifactError(f"{path} is {problem}; {_rerun(produced_by)}")


def require_model(directory: Path, produced_by: Optional[str] = None) -> Path:
    """Fail with one line unless `directory` holds a complete model folder: config.json and
    any other JSON parse, weights exist (all shards an index names), and no safetensors file
    is cut short. Cheap: reads headers, never the tensors."""
    directory = Path(directory)
    config = directory / "config.json"
    if not config.exists():
        fix = f"run `rlhf stage {produced_by}` first" if produced_by else "check the path"
        raise MissingInputError(f"missing input {config}; {fix}")
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptArtifactError(
                f"{path} is not valid JSON ({detail}); {_rerun(produced_by)}") from None
    weights = sorted(directory.glob("*.safetensors"))
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (directory / name).exists()]
        if missing:
            raise CorruptArtifactError(
                f"{directory} is incomplete: {index.name} names {', '.join(missing)}, which "
                f"is missing; {_rerun(produced_by)}")
    if not weights:
        raise CorruptArtifactError(
            f"{directory} is incomplete: it has config.json but no .safetensors weights; "
            f"{_rerun(produced_by)}")
    for path in weights:
        check_safetensors(path, produced_by)
    return directory


def defining_files(directory: Path, record: str) -> list[Path]:
    """Every file of a model folder except its own hash record (and hidden files)."""
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and p.name != record and not p.name.startswith("."))


def write_record(directory: Path, record: str, **extra) -> str:
    """Hash every defining file of `directory` into `directory/record`; returns the sha256."""
    files = defining_files(directory, record)
    digest = sha256_files(files, Path(directory))
    write_json(Path(directory) / record, {"sha256": digest, "files": [p.name for p in files],
                                          **extra})
    return digest


def verify_record(directory: Path, record: str, produced_by: str, what: str) -> str:
    """The recorded sha256 of a model folder, after checking it is complete and that its
    files (names and contents) still match the record."""
    directory = Path(directory)
    require_model(directory, produced_by)
    recorded = read_json(directory / record, produced_by=produced_by)
    files = defining_files(directory, record)
    names = [p.name for p in files]
    if names != recorded.get("files"):
        added = sorted(set(names) - set(recorded.get("files", [])))
        removed = sorted(set(recorded.get("files", [])) - set(names))
        change = "; ".join(part for part in (
            f"added {', '.join(added)}" if added else "",
            f"missing {', '.join(removed)}" if removed else "") if part)
        raise CorruptArtifactError(
            f"the {what} in {directory} does not match its record {record} ({change}); "
            f"rerun `rlhf stage {produced_by}`")
    actual = sha256_files(files, directory)
    if actual != recorded["sha256"]:
        raise CorruptArtifactError(
            f"the {what} in {directory} does not match its recorded sha256 "
            f"({actual[:12]} != {recorded['sha256'][:12]}: a file was changed after it was "
            f"written); rerun `rlhf stage {produced_by}`")
    return recorded["sha256"]
