"""Turning canonical rows into token tensors."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_sft(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> dict:
    """Prompt + completion + EOS; labels mask the prompt so only response tokens are learned."""
    prompt_ids = encode(tokenizer, prompt)
    completion_ids = encode(tokenizer, completion) + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> list[int]:
    """A full prompt + response + EOS sequence, as the reward model scores it."""
    return encode(tokenizer, prompt) + encode(tokenizer, response) + [tokenizer.eos_token_id]


def pad(sequences: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    rows = [
        seq + [pad_value] * (width - len(seq)) if side == "right"
        else [pad_value] * (width - len(seq)) + seq
        for seq in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)


def collate_sft(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    input_ids = [row["input_ids"] for row in batch]
    return {
        "input_ids": pad(input_ids, pad_token_id),
        "attention_mask": pad([[1] * len(seq) for seq in input_ids], 0),
        "labels": pad([row["labels"] for row in batch], IGNORE_INDEX),
    }


def collate_sequences(sequences: list[list[int]], pad_token_id: int,
                      side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for a list of token lists."""
    return (pad(sequences, pad_token_id, side),
            pad([[1] * len(seq) for seq in sequences], 0, side))
