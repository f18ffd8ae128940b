"""Sampling responses with the KV cache (Hugging Face `generate`), batched.

What PPO assumes: a response is drawn from softmax(logits / temperature) of the policy, the
same distribution whose log-probs it scores afterwards. transformers 5 fills every sampling
field a generation config leaves unset from the model's own `generation_config.json`
(repetition_penalty, top_k, top_p, min_p, suppress_tokens, ...), so a model that ships
repetition_penalty 1.1 would sample from another distribution than the one PPO scores.
`generate` therefore runs with this module's config as the model's own for the duration of
the call, and sets the truncation fields that transformers would default (top_k 50) itself.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rlhf.data.tokenize import collate_sequences


def sampling_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                    temperature: float) -> GenerationConfig:
    """Pure ancestral sampling: no top-k/top-p truncation, so the sampled tokens follow the
    same distribution whose log-probs PPO uses."""
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, min_new_tokens=0,
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
             max_new_tokens: int, temperature: float, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded queries (B, Q), their mask (B, Q), and responses (B, R).

    Responses are padded with `pad_token_id` after the first EOS (generate does that once a
    row is finished) and are always `max_new_tokens` wide so batches concatenate.
    """
    query, query_mask = collate_sequences(prompts, tokenizer.pad_token_id, side="left")
    query, query_mask = query.to(device), query_mask.to(device)
    config = sampling_config(tokenizer, max_new_tokens, temperature)
    with only_this_config(model, config):
        out = model.generate(input_ids=query, attention_mask=query_mask, generation_config=config)
    responses = out[:, query.shape[1]:]
    if responses.shape[1] < max_new_tokens:
        fill = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]),
                                  tokenizer.pad_token_id)
        responses = torch.cat([responses, fill], dim=1)
    return query, query_mask, responses  # (B, Q), (B, Q), (B, R)


def decode_responses(tokenizer: PreTrainedTokenizerBase, responses: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode(responses, skip_special_tokens=True)
