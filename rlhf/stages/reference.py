"""Stage `reference`: a frozen copy of the SFT policy, with a sha256 of every file defining it.

PPO reads the KL anchor from here and refuses a reference whose files (weights, config,
generation config, tokenizer) no longer match the recorded hash: a reference that drifted
silently would make every KL figure a lie. An edited config.json is as much a change as edited
weights (a different rope_theta or layer-norm epsilon gives a KL far from 0 at step 1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf.artifacts import require_model, verify_record, write_record
from rlhf.config import Params
from rlhf.io import atomic_dir
from rlhf.paths import Paths
from rlhf.tracking import MetricsLogger, NullLogger

HASH_FILE = "reference.json"


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    require_model(paths.sft, produced_by="sft")
    with atomic_dir(paths.reference) as out:
        for item in paths.sft.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
        # Checked again on the copy: the SFT folder may have changed while it was copied.
        require_model(out, produced_by="sft")
        # Relative: the same project in another clone writes the same bytes.
        source = paths.sft.relative_to(paths.root).as_posix()
        digest = write_record(out, HASH_FILE, copied_from=source)
    metrics = {"reference/sha256": digest}
    return metrics


def verify(directory: Path) -> str:
    """The reference's recorded hash, after checking every defining file still matches it."""
    return verify_record(directory, HASH_FILE, produced_by="reference", what="reference model")
