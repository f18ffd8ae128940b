"""Sampling responses with the KV cache (Hugging Face `generate`), batched.

What PPO assumes: a response is drawn from softmax(logits / temperature) of the policy, the
same distribution whose log-probs it scores afterwards. transformers 5 fills every sampling
field a generation config leaves unset from the model's own `generation_config.json`
(repetition_penalty, top_k, top_p, min_p, suppress_tokens, ...), so a model that ships
repetition_penalty 1.1 would sample from another distribution than the one PPO scores.
`generate` therefore runs with this module's config as the model's own for the duration of
the call.

Each sampled row draws its randomness from its own generator, seeded by (`seed`, the row's
index in the global batch), through the Gumbel-max trick: argmax(logits / T + Gumbel noise)
is an exact sample from softmax(logits / T). So a row's response does not depend on which
other rows share its batch or its process: a run split over N processes (each sampling its
shard of the batch) samples exactly what one process sampling the whole batch does.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList,
                          PreTrainedTokenizerBase)

from rlhf.data.tokenize import collate_sequences


def sampling_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                    temperature: float) -> GenerationConfig:
    """Pure ancestral sampling: no top-k/top-p truncation, so the sampled tokens follow the
    same distribution whose log-probs PPO uses. (What a registered model generates with.)"""
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (the run's seed, a purpose, a step, a row): distinct parts
    give unrelated streams, unlike `seed + offset` arithmetic, whose streams can collide."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededGumbel(LogitsProcessor):
    """Adds Gumbel noise to logits / T, row i's drawn from its own generator seeded by
    (seed, first_row + i); greedy decoding of the result samples from softmax(logits / T)."""

    def __init__(self, seed: int, rows: Sequence[int], temperature: float):
        self.seeds = [derive_seed(seed, row) for row in rows]
        self.temperature = temperature
        self.generators: list[torch.Generator] = []
        self.seen: list[torch.Tensor] = []  # the scaled logits of each step, when recording
        self.record = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s)
                               for s in self.seeds]
        scaled = scores.float() / self.temperature  # (B, V)
        uniform = torch.stack([torch.rand(scaled.shape[1], generator=g, device=scores.device)
                               for g in self.generators])  # (B, V)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
        if self.record:
            self.seen.append(scaled)
        return scaled + gumbel


def greedy_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """Argmax decoding with nothing else: the sampling happens in `SeededGumbel`."""
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


@contextlib.contextmanager
def only_this_config(model, config: GenerationConfig) -> Iterator[None]:
    """`config` as the model's own generation config while the block runs, so generate has
    nothing of the checkpoint's generation_config.json to fill unset fields from. Set on every
    module that holds one (a peft model reads its base model's)."""
    targets = [(module, module.generation_config) for module in model.modules()
               if vars(module).get("generation_config") is not None]
    for target, _ in targets:
        target.generation_config = config
    try:
        yield
    finally:
        for target, saved in targets:
            target.generation_config = saved


@torch.no_grad()
def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
             max_new_tokens: int, temperature: float, device: torch.device, seed: int = 0,
             first_row: int = 0, sampler: SeededGumbel | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded queries (B, Q), their mask (B, Q), and responses (B, R).

    Row i is sampled with the generator of (`seed`, `first_row` + i): its index in the
    global batch when this process samples a shard of it. Responses are padded with
    `pad_token_id` after the first EOS (generate does that once a row is finished) and are
    always `max_new_tokens` wide so batches concatenate. (`sampler`, for tests: a
    `SeededGumbel` to use instead, e.g. one that records what it sampled from.)
    """
    query, query_mask = collate_sequences(prompts, tokenizer.pad_token_id, side="left")
    query, query_mask = query.to(device), query_mask.to(device)
    config = greedy_config(tokenizer, max_new_tokens)
    if sampler is None:
        sampler = SeededGumbel(seed, range(first_row, first_row + len(prompts)), temperature)
    with only_this_config(model, config):
        # A sharded model's forward is a collective: every process decodes until all are done.
        out = model.generate(input_ids=query, attention_mask=query_mask, generation_config=config,
                             logits_processor=LogitsProcessorList([sampler]),
                             synced_gpus=isinstance(model, FSDPModule))
    responses = out[:, query.shape[1]:]
    if responses.shape[1] < max_new_tokens:
        fill = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]),
                                  tokenizer.pad_token_id)
        responses = torch.cat([responses, fill], dim=1)
    return query, query_mask, responses  # (B, Q), (B, Q), (B, R)


def decode_responses(tokenizer: PreTrainedTokenizerBase, responses: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode(responses, skip_special_tokens=True)
