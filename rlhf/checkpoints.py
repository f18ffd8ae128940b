"""Resumable training checkpoints: written every N steps, read back after a crash.

A checkpoint is one directory, `checkpoints/<stage>/step-00000013/`, written atomically
(a kill -9 mid-write leaves the previous checkpoints as they were):

- Accelerate's state: weights (safetensors), optimizer and scheduler, and the Python, numpy
  and torch RNG states (Accelerate loads them back with torch's weights-only unpickler); with
  `train.sharding=fsdp`, the weights, optimizer and scheduler gathered whole from every
  process instead (`rlhf.engine.Engine.save_state`), which resume on any number of them;
- `trainer_state.json`: the step, the stage's own state (data position, the states of its
  private `torch.Generator`s, the KL controller, the history so far), the fingerprint of
  what made it, and the tracking run id, so a resumed stage continues the same MLflow run.

A stage asks `resume()` once everything is built. With the same seed on CPU in fp32 the
resumed run is the uninterrupted run: same per-step history, same final weights, byte for
byte. A checkpoint whose fingerprint (the params that shape training and the content hashes
of the inputs, named relative to the project so a moved or copied project resumes) differs
from the current one is refused with one line naming what differs; `--fresh` (or deleting the
directory) starts over. A stage that finished marks its last checkpoint `complete`, and the next
run of that stage starts fresh. A damaged checkpoint (a file emptied or cut short after it was
written) is skipped with one line naming the file, and the run resumes from the one before it.

Only the last `train.checkpoint_keep` checkpoints are kept, so disk use stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from accelerate.utils import broadcast_object_list
from safetensors import safe_open

from rlhf.errors import UserError
from rlhf.io import atomic_dir, atomic_write_text, sha256_file, sha256_files

STATE_FILE = "trainer_state.json"
_log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointMismatch(UserError):
    """A checkpoint was made by a run with other params or inputs."""


# Params that change how often a run writes or logs, how fast it runs or how its work is divided
# over processes and micro-batches (rlhf.distributed: the same result), not what it computes.
_NOT_SHAPING = {"checkpoint_every", "checkpoint_keep", "num_threads", "log_every",
                "num_processes", "grad_accum", "accelerate_config"}


def fingerprint(flat_params: Mapping[str, Any], sections: Iterable[str],
                inputs: Iterable[Path], root: Path) -> dict:
    """What defines a training run: the params under `sections` (`section` or `section.key`)
    that shape it, and the sha256 of each input file or directory (names and contents), named
    relative to the project `root` (an input outside it, such as a base model, as given)."""
    sections = tuple(sections)
    params = {key: value for key, value in flat_params.items()
              if key.split(".")[-1] not in _NOT_SHAPING
              and any(key == s or key.startswith(s + ".") for s in sections)}
    hashes = {}
    for path in inputs:
        path = Path(path)
        if path.is_dir():
            hashes[_name(path, root)] = sha256_files((p for p in path.rglob("*") if p.is_file()),
                                                     path)
        elif path.exists():
            hashes[_name(path, root)] = sha256_file(path)
    return {"params": {k: params[k] for k in sorted(params)}, "inputs": hashes}


def _name(path: Path, root: Path) -> str:
    # abspath, not resolve: an input linked from DVC's cache keeps its name in the project.
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def differences(saved: dict, current: dict) -> list[str]:
    """One short phrase per param or input that differs between two fingerprints."""
    found = []
    old, new = saved.get("params", {}), current.get("params", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            found.append(f"{key} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}")
    old, new = saved.get("inputs", {}), current.get("inputs", {})
    found += [f"{name} changed" for name in sorted(set(old) | set(new))
              if old.get(name) != new.get(name)]
    return found


def generator_state(generator: torch.Generator) -> list[int]:
    """A torch.Generator's state as JSON-friendly bytes."""
    return generator.get_state().tolist()


def set_generator_state(generator: torch.Generator, state: list[int]) -> None:
    generator.set_state(torch.tensor(state, dtype=torch.uint8))


def checkpoint_dirs(directory: Path) -> list[Path]:
    """A stage's complete checkpoints, oldest first (a directory appears only once its
    atomic write has finished, so each one listed was whole; `damage` tells if it still is)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def damage(checkpoint: Path, thorough: bool = False) -> Optional[str]:
    """The first file of `checkpoint` that is damaged (emptied, cut short), and how; None if
    none is found. Only headers and zip directories are read, unless `thorough`: then the torch
    files are unpickled too (the optimizer's state is twice the model's size)."""
    for path in sorted(Path(checkpoint).iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in (".bin", ".pkl"):  # torch.save writes zip archives
                with zipfile.ZipFile(path):
                    pass
                if thorough:
                    from accelerate.utils import load  # how load_state unpickles them

                    load(path, map_location="cpu")
            elif path.name == STATE_FILE:
                json.loads(path.read_text())
        except Exception as exc:  # noqa: BLE001 - whatever reading it raises, it is unreadable
            return f"{path.name} is damaged ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {checkpoint} is unreadable ({exc}); delete it or rerun "
                        "with --fresh") from None


def resumable(directory: Path) -> Optional[dict]:
    """The trainer state of the checkpoint a rerun would resume from, or None (no checkpoint,
    or the last run finished). The glue reads `tracking_run_id` here to reopen its run."""
    for checkpoint in reversed(checkpoint_dirs(directory)):  # as resume() picks it
        state = _state_or_none(checkpoint)
        if state is not None and state.get("complete"):
            return None
        if damage(checkpoint) is None:
            return state
    return None


def _state_or_none(checkpoint: Path) -> Optional[dict]:
    try:
        return read_state(checkpoint)
    except UserError:
        return None


class Checkpoints:
    """The checkpoints of one stage: resume from the newest, save new ones, keep the last few."""

    def __init__(self, directory: Path, fingerprint: dict, keep: int, tracking_run_id=None):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.keep = keep
        self.tracking_run_id = tracking_run_id
        self._resumed_from: Optional[int] = None

    def resume(self, accelerator) -> Optional[dict]:
        """Load the newest whole checkpoint into the prepared objects and return its trainer
        state, or None to start from step 0. Every process loads; only the main one writes."""
        damaged = []
        for checkpoint in reversed(checkpoint_dirs(self.directory)):
            state = _state_or_none(checkpoint)
            if state is not None and state.get("complete"):
                return None
            problem = damage(checkpoint) or self._load(accelerator, checkpoint, state)
            if problem is not None:
                damaged.append(f"{checkpoint}: {problem}")
                continue
            if damaged:
                _log.warning("skipping %s", "; ".join(damaged))
            self._resumed_from = state["step"]
            _log.warning("resuming from %s (step %d)", checkpoint, state["step"])
            return state
        if damaged:
            raise UserError(f"no checkpoint can be resumed: {'; '.join(damaged)}; rerun with "
                            "--fresh to start over")
        return None

    def _load(self, accelerator, checkpoint: Path, state: dict) -> Optional[str]:
        """Load a checkpoint whose files look whole; None, or what turned out damaged."""
        diff = differences(state.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise CheckpointMismatch(
                f"checkpoint {checkpoint} was made by another run ({'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}); rerun with the same params and inputs "
                f"to resume it, or with --fresh to start over")
        _quiet_accelerate()
        try:
            accelerator.load_state(str(checkpoint))
        except Exception:
            # Damage the headers do not show (a garbled pickle). What load_state restored
            # before it failed, the next checkpoint's load_state overwrites whole.
            problem = damage(checkpoint, thorough=True)
            if problem is None:
                raise
            return problem
        return None

    @property
    def resumed_from(self) -> Optional[int]:
        """The step the run resumed from, or None if it started fresh."""
        return self._resumed_from

    def save(self, accelerator, step: int, state: dict[str, Any]) -> None:
        """Write `step-<step>/` atomically, then drop all but the last `keep` checkpoints.

        Every process takes part: Accelerate's save_state is a collective where the weights
        are sharded (FSDP, DeepSpeed) and writes each process's RNG state; the main process
        writes the rest into the temp dir it shares with the others, and renames it once all
        are done. A fresh run's first save also drops the checkpoints of the run before it."""
        _quiet_accelerate()
        record = {**state, "step": step, "fingerprint": self.fingerprint,
                  "tracking_run_id": self.tracking_run_id, "complete": False,
                  "resumed_from": self._resumed_from}
        with contextlib.ExitStack() as main_only:
            tmp = (main_only.enter_context(atomic_dir(self.directory / f"step-{step:08d}"))
                   if accelerator.is_main_process else None)
            tmp = Path(broadcast_object_list([tmp])[0])
            accelerator.save_state(str(tmp), safe_serialization=True)
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                return
            (tmp / STATE_FILE).write_text(json.dumps(record))

        def is_stale(checkpoint: Path) -> bool:
            # Later than `step`: damaged ones a resume skipped; kept, they would count as the
            # newest and push the whole ones out.
            state = _state_or_none(checkpoint) or {}
            return (checkpoint.name > f"step-{step:08d}" or state.get("complete")
                    or state.get("fingerprint") != self.fingerprint)

        found = checkpoint_dirs(self.directory)
        stale = [p for p in found if is_stale(p)]
        for old in stale + [p for p in found if p not in stale][:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def finish(self, accelerator) -> None:
        """Mark the newest checkpoint complete: the next run of the stage starts fresh."""
        if not accelerator.is_main_process:
            return
        found = checkpoint_dirs(self.directory)
        if found:
            state = read_state(found[-1])
            atomic_write_text(found[-1] / STATE_FILE, json.dumps({**state, "complete": True}))


def _quiet_accelerate() -> None:
    # Tied input/output embeddings are stored once; Accelerate warns about that every time.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
