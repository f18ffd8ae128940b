"""Sampling responses with the KV cache (Hugging Face `generate`), batched."""

from __future__ import annotations

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
    out = model.generate(input_ids=query, attention_mask=query_mask,
                         generation_config=sampling_config(tokenizer, max_new_tokens, temperature))
    responses = out[:, query.shape[1]:]
    if responses.shape[1] < max_new_tokens:
        fill = responses.new_full((responses.shape[0], max_new_tokens - responses.shape[1]),
                                  tokenizer.pad_token_id)
        responses = torch.cat([responses, fill], dim=1)
    return query, query_mask, responses  # (B, Q), (B, Q), (B, R)


def decode_responses(tokenizer: PreTrainedTokenizerBase, responses: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode(responses, skip_special_tokens=True)
