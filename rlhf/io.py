"""File helpers: atomic outputs, jsonl, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhf.errors import DataError, MissingInputError


# Temp names carry their writer's pid and host: what a killed writer left behind is recognised
# (its pid is gone) and removed by the next write into the same directory.
_ORPHAN = re.compile(r"^\.(tmp|old)-.*\.pid(?P<pid>\d+)@(?P<host>[^.]*)\.")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphans(directory: Path) -> list[Path]:
    """Delete the temp files and dirs that killed writers left in `directory`; return them."""
    removed = []
    host = socket.gethostname().split(".")[0]
    for entry in Path(directory).iterdir() if Path(directory).is_dir() else ():
        match = _ORPHAN.match(entry.name)
        if match and match["host"] == host and not pid_alive(int(match["pid"])):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _owner_tag() -> str:
    return f".pid{os.getpid()}@{socket.gethostname().split('.')[0]}."


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename.

    A crash inside the block leaves `final` as it was (old or absent), never half written;
    the temp dir it leaves is removed by the next write into the same directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}{_owner_tag()}", dir=final.parent))
    try:
        yield tmp
        follow_umask(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}{_owner_tag()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(directory: Path) -> None:
    """Give a tree the modes the umask gives new files and folders.

    mkdtemp makes folders 0700 and transformers writes weights 0600; a team sharing a project
    directory (umask 002) needs every output group-readable and writable like any new file."""
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(directory, dir_mode)
    for parent, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(parent, name), dir_mode)
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, file_mode | (executable & ~umask))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}{_owner_tag()}", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    # mkstemp makes the file private (0600): keep the old file's mode, else the umask's default.
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        mode = 0o666 & ~current_umask()
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_json(path: Path, data: Any, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: Path, produced_by: str | None = None) -> Any:
    require(path, produced_by)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fix = f"rerun `rlhf stage {produced_by}`" if produced_by else "fix or replace the file"
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise DataError(f"{path} is not valid JSON ({detail}); {fix}") from None


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: Path, produced_by: str | None = None) -> list[dict]:
    require(path, produced_by)
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fix = f"rerun `rlhf stage {produced_by}`" if produced_by else "fix or replace the file"
        raise DataError(f"{path} is not UTF-8 text; {fix}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove that row") from None
    return rows


def require(path: Path, produced_by: str | None = None) -> Path:
    """Fail with a one-line fix if an input is missing."""
    path = Path(path)
    if not path.exists():
        fix = f"run `rlhf stage {produced_by}` first" if produced_by else "check the path"
        raise MissingInputError(f"missing input {path}; {fix}")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hashes(directory: Path) -> dict[str, str]:
    """{name relative to `directory` (POSIX): sha256} of every file under it."""
    directory = Path(directory)
    return {path.relative_to(directory).as_posix(): sha256_file(path)
            for path in sorted(directory.rglob("*")) if path.is_file()}


def sha256_files(paths: Iterable[Path], root: Path) -> str:
    """One hash over several files' relative names and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(Path(path).relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()
