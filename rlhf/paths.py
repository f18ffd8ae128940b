"""Where each stage reads and writes, relative to one project root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """The project's artifact layout (mirrors the outs in dvc.yaml)."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def base_model(self) -> Path:
        """The builtin model's freshly initialised weights and tokenizer."""
        return self.root / "models" / "base"

    @property
    def sft(self) -> Path:
        return self.root / "models" / "sft"

    @property
    def reward(self) -> Path:
        return self.root / "models" / "reward"

    @property
    def reference(self) -> Path:
        return self.root / "models" / "reference"

    @property
    def policy(self) -> Path:
        return self.root / "models" / "policy"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def metrics_file(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"
