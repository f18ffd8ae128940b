"""Raw rows from a local file or folder (jsonl, json, parquet, csv) or a hub dataset.

Every row keeps where it came from (a file name or `id split S`, and its 1-based row
number) so a bad row can be named in one line. Row numbers are the line number in jsonl,
the position in a json array or a parquet file, and the record number after the header in
csv. A jsonl line that is not JSON is not an error here: it becomes a row whose `error` says
so, and the caller decides (stop, or drop and count).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from rlhf.errors import DataError
from rlhf.io import sha256_file

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class RawRow:
    """One row as read: a mapping, or None with `error` saying why it could not be read."""

    origin: str
    number: int
    data: Optional[dict] = None
    error: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.origin} row {self.number}"


@dataclass
class Loaded:
    """The rows of one source split, and what was read (for the manifest's lineage)."""

    rows: list[RawRow]
    description: str
    inputs: list[dict] = field(default_factory=list)
    truncated: bool = False


def looks_like_path(source: str) -> bool:
    """True where `source` can only be meant as a local path (never as a hub id)."""
    return (source.lower().endswith(EXTENSIONS) or source.startswith(("/", "./", "../", "~", "."))
            or "\\" in source or source.count("/") > 1)


def resolve_local(source: str, root: Path) -> Optional[Path]:
    """The local path `source` names (relative to the project root), or None for a hub id.

    A source that looks like a path but does not exist is an error, not a hub lookup."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(root) / path
    if path.exists():
        return path
    if looks_like_path(source):
        raise DataError(
            f"data source {source!r} not found (looked for {path}); check the path (relative "
            "paths are relative to the project root) or give a hub dataset id"
        )
    return None


def load(source: str, split: str, subset: Optional[str], root: Path,
         max_rows: Optional[int] = None, key: str = "data.source",
         whole_file_split: bool = True, revision: Optional[str] = None) -> Loaded:
    """Rows of `split` of `source`: a local file or folder, else a hub dataset (at `revision`,
    a branch, tag or commit sha; None for its default branch).

    `whole_file_split`: a single local file holds this split (the training split does);
    a held-out split cannot come from a single file."""
    local = resolve_local(source, root)
    if local is None:
        return load_hub(source, subset, split, max_rows, key, revision)
    if revision is not None:
        raise DataError(
            f"data.revision ({revision!r}) pins a hub dataset, but {key} is the local path "
            f"{local} (its content hash is recorded instead); set data.revision to null"
        )
    if subset is not None:
        raise DataError(
            f"data.subset ({subset!r}) names a hub dataset configuration, but {key} is the "
            f"local path {local}; set data.subset to null or point {key} at the subfolder"
        )
    if local.is_file():
        if not whole_file_split:
            raise DataError(
                f"data.eval_split ({split!r}) needs a folder with per-split files or a hub "
                f"dataset, but {key} is the single file {local}; set data.eval_split to null "
                "to hold out data.eval_fraction of its prompts"
            )
        files = [local]
        description = str(local)
    else:
        files = folder_files(local, split, key, whole_file_split)
        description = f"{local} (split {split})"
    rows: list[RawRow] = []
    inputs = []
    truncated = False
    for path in files:
        inputs.append({"path": str(path), "sha256": sha256_file(path)})
        for row in read_file(path):
            if max_rows is not None and len(rows) >= max_rows:
                truncated = True
                break
            rows.append(row)
        if truncated:
            break
    return Loaded(rows, description, inputs, truncated)


def _split_of(relative: Path, split: str) -> bool:
    """Whether a file belongs to `split`: a folder of that name on its path, or a file name
    that is the split or starts with it (`train.jsonl`, `train-00000-of-00002.parquet`)."""
    if split in relative.parts[:-1]:
        return True
    stem = relative.name.split(".")[0]
    return stem == split or any(stem.startswith(split + sep) for sep in "-_")


def folder_files(folder: Path, split: str, key: str, main_split: bool) -> list[Path]:
    """The data files of `split` in `folder`, sorted. Files named for no split at all belong
    to the training split (a folder of unsplit files is one training split)."""
    files = sorted(
        path for path in folder.rglob("*")
        if path.is_file() and path.name.lower().endswith(EXTENSIONS)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        raise DataError(
            f"{key} folder {folder} holds no {'/'.join(e[1:] for e in EXTENSIONS)} files; "
            "add data files or point it at a file"
        )
    chosen = [path for path in files if _split_of(path.relative_to(folder), split)]
    if chosen:
        return chosen
    if main_split:
        return files
    raise DataError(
        f"{key} folder {folder} has no files for split {split!r} (expected e.g. "
        f"{split}.jsonl or {split}/...); add them or set data.eval_split to null"
    )


def read_file(path: Path) -> Iterator[RawRow]:
    suffix = path.name.lower().rsplit(".", 1)[-1]
    reader = {"jsonl": read_jsonl, "json": read_json, "parquet": read_parquet, "csv": read_csv}
    return reader[suffix](path)


def _row(origin: str, number: int, value: Any) -> RawRow:
    if isinstance(value, dict):
        if _undecodable(value):
            return RawRow(origin, number, error=NOT_UTF8)
        return RawRow(origin, number, value)
    return RawRow(origin, number, error=f"not a JSON object but {type(value).__name__}")


NOT_UTF8 = "not UTF-8 text"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _undecodable(value: Any) -> bool:
    """Whether a value read with errors="surrogateescape" holds bytes that were not UTF-8.

    A whole file is decoded that way so one bad byte spoils only its own row, which can then
    be named or dropped like any other bad row; the escapes are lone surrogates, which valid
    UTF-8 never decodes to."""
    if isinstance(value, str):
        return _ESCAPED_BYTE.search(value) is not None
    if isinstance(value, dict):
        return any(_undecodable(k) or _undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_undecodable(v) for v in value)
    return False


def read_jsonl(path: Path) -> Iterator[RawRow]:
    """One row per non-blank line; the row number is the line number."""
    origin = str(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield RawRow(origin, number, error="not UTF-8 text")
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow(origin, number, error=f"not JSON ({exc.msg})")
                continue
            yield _row(origin, number, value)


def read_json(path: Path) -> Iterator[RawRow]:
    """A JSON array of rows (or an object holding one such array); else JSON Lines."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise DataError(
                f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); fix the file"
            ) from None
        yield from read_jsonl(path)
        return
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path} is a JSON object, not an array of rows; write the rows as a JSON "
                "array or as JSON Lines"
            )
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path} is not an array of rows; write the rows as a JSON array or "
                        "as JSON Lines")
    origin = str(path)
    for number, value in enumerate(document, start=1):
        yield _row(origin, number, value)


def read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path} is not a readable parquet file ({exc}); fix the file") from None
    origin = str(path)
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            number += 1
            yield RawRow(origin, number, value)


def read_csv(path: Path) -> Iterator[RawRow]:
    """A header row, then one row per record; every value is a string (empty cells too)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    origin = str(path)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        try:
            if _undecodable(reader.fieldnames or []):
                raise DataError(f"{path} line 1: the header is {NOT_UTF8}; fix the file")
            for number, record in enumerate(reader, start=1):
                record.pop(None, None)  # values beyond the header
                yield _row(origin, number, record)
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc}); "
                            "fix the file") from None


def load_hub(source: str, subset: Optional[str], split: str, max_rows: Optional[int] = None,
             key: str = "data.source", revision: Optional[str] = None) -> Loaded:
    """Rows of a dataset through `datasets.load_dataset(source, subset, split=split,
    revision=revision)`."""
    import datasets

    try:
        dataset = datasets.load_dataset(source, subset, split=split, revision=revision)
    except Exception as exc:  # network, unknown id/config/split: all one fix for the user
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{key} {source!r} is not a local path and the hub could not load it "
            f"(subset {subset!r}, split {split!r}, revision {revision!r}: {detail}); check the "
            "path, the dataset id, data.revision, "
            "data.subset and the split"
        ) from None
    truncated = max_rows is not None and len(dataset) > max_rows
    if truncated:
        dataset = dataset.select(range(max_rows))
    description = source + (f" ({subset})" if subset else "") + f" split {split}"
    rows = [RawRow(description, number, dict(value))
            for number, value in enumerate(dataset, start=1)]
    inputs = [{"dataset": source, "subset": subset, "split": split, "revision": revision,
               "fingerprint": getattr(dataset, "_fingerprint", None)}]
    return Loaded(rows, description, inputs, truncated)
