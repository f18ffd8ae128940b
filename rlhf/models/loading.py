"""Loading any causal LM and tokenizer by path, and the scalar-head model used for reward
and value: a transformer trunk plus a linear head read per token."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

HEAD_FILE = "score_head.safetensors"
HEAD_META = "score_head.json"


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer, left-padding (for generation) and with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, use_safetensors=True
    )


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding on either side: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    )
    return out.logits  # (B, T, V)


class ScalarHeadModel(nn.Module):
    """A transformer trunk with a scalar head per token.

    As a reward model, the score of a sequence is the head at its last non-padding token
    (causal attention: that token has seen everything). As a value model, the head at each
    position is V(s_t).
    """

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (trunk.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.score_std = 1.0

    @property
    def config(self):
        return self.trunk.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        return self.head(hidden).squeeze(-1)  # (B, T)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = self(input_ids, attention_mask)  # (B, T)
        index = last_token_index(attention_mask)
        return values.gather(1, index[:, None]).squeeze(1)  # (B,)

    @classmethod
    def from_causal_lm(cls, path: str | Path, trust_remote_code: bool = False) -> "ScalarHeadModel":
        """A fresh head on the trunk of a causal LM (its LM head is dropped)."""
        trunk = AutoModel.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True
        )
        return cls(trunk)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.trunk.save_pretrained(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  directory / HEAD_FILE)
        (directory / HEAD_META).write_text(json.dumps({"score_std": self.score_std}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, trust_remote_code: bool = False) -> "ScalarHeadModel":
        directory = Path(directory)
        model = cls.from_causal_lm(directory, trust_remote_code)
        model.head.load_state_dict(load_file(directory / HEAD_FILE))
        model.score_std = json.loads((directory / HEAD_META).read_text())["score_std"]
        return model
