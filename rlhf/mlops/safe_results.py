"""The flow's result cache holds JSON and nothing else: a record that asks for more is refused.

Prefect reads a persisted result record with the serializer the *record* names: a record whose
`serializer` was edited to `pickle` (or to JSON with another `object_decoder`, or with
`__class__` markers that Prefect's decoder imports) would run code on the next `rlhf run`.
Prefect even deserialises a record just to check that it exists (`ResultStore._exists`).

So the flow checks every record in the cache folder (`check_results_dir`) when it starts and
again right before each stage task, before any Prefect code reads the bytes, and stops with one
line naming the first record that is not plain JSON as this project writes it. (A storage
block that checks on read would close the window between check and read, but Prefect 3.8 takes
only blocks saved on the server as a task's result storage.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

JSON_SERIALIZER = {
    "type": "json",
    "jsonlib": "json",
    "object_encoder": "prefect.serializers.prefect_json_object_encoder",
    "object_decoder": "prefect.serializers.prefect_json_object_decoder",
    "dumps_kwargs": {},
    "loads_kwargs": {},
}
"""The serializer of every record this project writes (`result_serializer="json"`)."""

_MARKERS = ("__class__", "__exc_type__")  # keys Prefect's JSON decoder turns into imports


class UnsafeResultError(UserError):
    """A result record that is not plain JSON: never deserialised."""


def _has_markers(value: Any) -> bool:
    if isinstance(value, dict):
        return any(key in _MARKERS for key in value) or any(map(_has_markers, value.values()))
    if isinstance(value, list):
        return any(map(_has_markers, value))
    return False


def problem(content: bytes) -> str | None:
    """Why a record's bytes must not be loaded, or None if it is plain JSON as written here."""
    try:
        record = json.loads(content)
    except (UnicodeDecodeError, ValueError):
        return "it is not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("metadata"), dict):
        return "it is not a result record"
    serializer = record["metadata"].get("serializer")
    if not isinstance(serializer, dict) or serializer.get("type") != "json":
        kind = serializer.get("type") if isinstance(serializer, dict) else serializer
        return f"its serializer is {kind!r}, not 'json'"
    if {key: serializer.get(key, JSON_SERIALIZER[key]) for key in JSON_SERIALIZER} \
            != JSON_SERIALIZER or set(serializer) - set(JSON_SERIALIZER):
        return "its JSON serializer was changed"
    payload = record.get("result")
    if not isinstance(payload, str):
        return "its result is not a JSON text"
    try:
        result = json.loads(payload)
    except ValueError:
        return "its result is not JSON"
    if _has_markers(result):
        return "its result names Python classes to import"
    return None


def _refusal(path: Path, why: str) -> UnsafeResultError:
    return UnsafeResultError(
        f"result record {path} was not written by this pipeline ({why}); it is never loaded: "
        f"delete it (or the whole {path.parent.name}/ folder) to rebuild the cache")


def check_record(location: Any, key: str, shown: str) -> None:
    """Stop with one line if the record `key` exists in `location` (a folder, or a Prefect
    file-system block for remote storage) and is not plain JSON."""
    if isinstance(location, Path):
        path = location / key
        if not path.is_file():
            return
        content = path.read_bytes()
    else:
        from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method

        try:
            content = call_explicitly_sync_block_method(location, "read_path", (key,), {})
        except Exception:  # not there (each file system says so its own way)
            return
    why = problem(content)
    if why is not None:
        raise _refusal(Path(shown) / key, why)


def check_results_dir(folder: Any) -> None:
    """Stop with one line at the first record in a local `folder` that is not plain JSON
    (remote storage is checked record by record, see `check_record`)."""
    if not isinstance(folder, Path) or not folder.is_dir():
        return
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.suffix == ".lock":
            continue
        why = problem(path.read_bytes())
        if why is not None:
            raise _refusal(path, why)
