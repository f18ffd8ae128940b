"""The builtin small model: a GPT-2-style causal LM and a character tokenizer, built locally.

Both are saved with `save_pretrained`, so every later stage loads them by path exactly as it
would load any Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf.config import ModelConfig

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_tokenizer(alphabet: list[str]) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, plus pad, eos and unk."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *alphabet])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's tanh-approximated GELU as one fused kernel: the same function as "gelu_new",
        # whose eager implementation costs a fifth of the builtin model's training step.
        activation_function="gelu_pytorch_tanh",
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def save_builtin(cfg: ModelConfig, alphabet: list[str], out_dir: Path) -> Path:
    """Build and save the untrained builtin model and its tokenizer to `out_dir`."""
    tokenizer = build_tokenizer(alphabet)
    model = build_model(cfg, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def weight_bytes(cfg: ModelConfig, alphabet: list[str]) -> int:
    """The size of the builtin model's fp32 weights, from its shapes alone (nothing built)."""
    with torch.device("meta"):
        model = build_model(cfg, build_tokenizer(alphabet))
    return 4 * sum(p.numel() for p in model.parameters())  # tied embeddings counted once
