"""LoRA adapters (peft) and the training switches every trained model shares.

With `model.lora: true` a stage freezes its base weights and trains low-rank adapters on the
modules named by `model.lora_target_modules` (null: peft's default for the architecture's
`model_type`, e.g. `c_attn` for GPT-2, `q_proj, v_proj` for Llama and Qwen2,
`query_key_value` for GPT-NeoX). What a stage writes is always a plain Hugging Face model:
adapters are merged into the weights before saving, so every later stage, the registry and
any user load the outputs as usual.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from rlhf.config import ModelConfig
from rlhf.errors import ParamsError


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def default_target_modules(model_type: str) -> Optional[list[str]]:
    """peft's default LoRA target modules for a `model_type`; None where it has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return list(targets) if targets is not None else None


def add_adapters(model: nn.Module, cfg: ModelConfig, task_type: Optional[str] = None) -> nn.Module:
    """`model` wrapped as a peft model: base weights frozen, fresh LoRA adapters trainable.

    `task_type="CAUSAL_LM"` for a causal LM (the wrapper then has `generate`); None for a
    bare trunk (the reward and value models' transformer)."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.config, "model_type", None)
    targets = cfg.lora_target_modules
    if targets is None and default_target_modules(model_type or "") is None:
        raise ParamsError(
            f"model.lora_target_modules is null and peft has no default target modules for "
            f"model_type {model_type!r}; set it to the names of the modules to adapt "
            "(e.g. [q_proj, v_proj]) or to all-linear"
        )
    config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, bias="none", task_type=task_type,
    )
    try:
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers store their weight transposed; peft notices and adapts.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            # peft 0.21 asks transformers 5 a deprecated question (is_gradient_checkpointing).
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"})
        raise ParamsError(
            f"model.lora_target_modules {targets} matches no module of this {model_type} model; "
            f"its linear layers are named: {', '.join(names)}"
        ) from None


def merged(model: nn.Module) -> nn.Module:
    """A plain model: the adapters of a peft model merged into its weights (in place: the
    peft wrapper must not be used afterwards); any other model unchanged."""
    return model.merge_and_unload() if is_peft(model) else model


def prepare_for_training(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Gradient checkpointing (and no KV cache while training) where the params ask for it.

    Call before `add_adapters`; `restore_config` undoes the config change before saving."""
    if cfg.gradient_checkpointing:
        enable = (getattr(model, "activation_checkpointing_enable", None)
                  or model.gradient_checkpointing_enable)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            enable({"use_reentrant": False})
        if getattr(model.config, "use_cache", None) is not None:
            model._rlhf_use_cache = model.config.use_cache  # on the model: the config is saved
            model.config.use_cache = False
    return model


def restore_config(model: nn.Module) -> nn.Module:
    """Undo the config change of `prepare_for_training`, so a saved model generates with its
    KV cache as before."""
    if "_rlhf_use_cache" in model.__dict__:
        model.config.use_cache = model.__dict__.pop("_rlhf_use_cache")
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout set to p = 0 (PPO: a sample's log-prob must not depend on the forward
    pass it came from, or the ratio is not 1 at the first minibatch; TRL does the same).

    Dropout layers, and the float rates that Llama, Qwen2, Mistral and others keep on their
    attention modules (`attention_dropout`, read from the config in train mode)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_RATES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


DROPOUT_RATES = ("attention_dropout", "attn_dropout", "dropout_p")
"""Attribute names under which transformers' modules hold a dropout rate as a plain float."""


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
