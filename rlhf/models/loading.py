"""Loading any causal LM and tokenizer by path or hub id, and the scalar-head model used for
reward and value: a transformer trunk plus a linear head read per token.

Safety: every `from_pretrained` passes `trust_remote_code` (false unless model.trust_remote_code
says otherwise) and loads weights from safetensors only (`use_safetensors=True`: a pickled
`.bin` checkpoint can run code when it is loaded). Weights load in float32 whatever dtype they
were saved in (train.precision autocasts on top of fp32 master weights).

The reward model is saved as a standard `AutoModelForSequenceClassification` checkpoint
(`ScalarHeadModel.save`), so anyone loads it with transformers; see `ScalarHeadModel` for the
two config fields (`rlhf_score_bias`, `rlhf_score_std`) that carry its score normalisation.

Padding: sequences are padded by the collate functions, never by the tokenizer, so the side is
explicit at each call: generation left-pads queries (`rlhf.generation`), training batches are
right-padded, rollouts are left-padded queries followed by right-padded responses. Every forward
pass gets the attention mask and, where the architecture takes them, position ids counted from
the first real token, so a sequence scores the same whatever padding surrounds it.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging

from rlhf.errors import UserError

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

OLD_HEAD_FILE = "score_head.safetensors"
"""The head file of reward models saved before they were standard seq-cls checkpoints."""
PAD_TOKEN = "<|pad|>"
"""The pad token added to a reward model's tokenizer that pads with EOS (see `scoring_tokenizer`)."""


def _revision(revision: str | None) -> dict:
    """`{"revision": ...}` for a pinned hub revision, else nothing (the hub's default branch)."""
    return {"revision": revision} if revision else {}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False,
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, left-padding (for generation) and with a pad token the model can embed
    (its EOS token when it has none, or when its own is outside the model's vocabulary: masks
    come from lengths and the first EOS, never from pad ids, so any in-vocabulary id pads).
    `revision` pins a hub model's branch, tag or commit (model.revision); local folders
    ignore it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                  **_revision(revision))
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", path, exc) from None
    if tokenizer.eos_token is None:
        raise UserError(
            f"the tokenizer of {path} has no EOS token, and responses end with one; use a model "
            "whose tokenizer defines eos_token (or add it to its tokenizer_config.json)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab_size = model_vocab_size(path, trust_remote_code, revision)
    if vocab_size is not None and tokenizer.pad_token_id >= vocab_size:
        # transformers 5 gives some tokenizers (Qwen2's) a default pad token, <|endoftext|>,
        # when the checkpoint has none, with an id past the embedding matrix: the first padded
        # batch would raise IndexError.
        warnings.warn(
            f"the tokenizer of {path} pads with {tokenizer.pad_token!r} (id "
            f"{tokenizer.pad_token_id}), outside the model's {vocab_size}-token vocabulary; "
            f"padding with its EOS token {tokenizer.eos_token!r} instead", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_vocab_size(path: str | Path, trust_remote_code: bool = False,
                     revision: str | None = None) -> int | None:
    """Rows of the embedding matrix, from the config beside the tokenizer; None if unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                            **_revision(revision))
    except Exception:  # a tokenizer without a model config: nothing to check against
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def _load_error(what: str, path: str | Path, exc: Exception) -> Exception:
    """One line for what the user can fix: missing files, no safetensors weights, an
    unreachable hub id, or code the model needs that trust_remote_code does not allow."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return UserError(
            f"the {what} at {path} needs its own Python code to load; set "
            "model.trust_remote_code=true only if you trust that code"
        )
    if isinstance(exc, json.JSONDecodeError):
        return UserError(f"cannot load the {what} at {path}: a JSON file there is not valid JSON "
                         f"({detail}); replace it or check model.name_or_path")
    if isinstance(exc, OSError):
        weights = " (weights are only read from .safetensors files)" if what == "model" else ""
        return UserError(f"cannot load the {what} at {path} ({detail}); check "
                         f"model.name_or_path{weights}")
    return exc


def _from_pretrained(auto_class, path: str | Path, trust_remote_code: bool, **kwargs):
    try:
        return auto_class.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                          use_safetensors=True, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error("model", path, exc) from None
    except SafetensorError as exc:  # stage outputs are checked before (rlhf.artifacts), a base not
        raise UserError(f"cannot load the model at {path}: a .safetensors file is corrupt or "
                        f"truncated ({exc}); replace it or check model.name_or_path") from None


def load_causal_lm(path: str | Path, trust_remote_code: bool = False,
                   revision: str | None = None) -> nn.Module:
    return _from_pretrained(AutoModelForCausalLM, path, trust_remote_code, **_revision(revision))


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding on either side: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


@lru_cache(maxsize=None)
def _takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


def takes_position_ids(model: nn.Module) -> bool:
    """Whether the architecture's forward has a `position_ids` argument (GPT-2, Llama, Qwen2,
    GPT-NeoX, OPT... do; ALiBi models such as Bloom and MPT derive positions from the
    attention mask and have none). Looks through DDP/FSDP and peft wrappers to the model."""
    from accelerate.utils import extract_model_from_parallel

    if isinstance(model, nn.Module):
        model = extract_model_from_parallel(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    return _takes_position_ids(type(model))


def position_kwargs(model: nn.Module, attention_mask: torch.Tensor) -> dict:
    """`{"position_ids": ...}` for architectures that take them, else nothing."""
    return ({"position_ids": position_ids_from(attention_mask)} if takes_position_ids(model)
            else {})


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **position_kwargs(model, attention_mask),
        use_cache=False,
    )
    return out.logits  # (B, T, V)


class AdaptersDisabled:
    """A peft model with its adapters switched off, i.e. its frozen base: the PPO reference
    when the policy is LoRA adapters on that base, with no second copy of the weights."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def get_base_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def to(self, *args, **kwargs) -> "AdaptersDisabled":
        return self  # the weights are the policy's, and move with it

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


class ScalarHeadModel(nn.Module):
    """A transformer trunk with a scalar head per token.

    As a reward model, the score of a sequence is the head at its last non-padding token
    (causal attention: that token has seen everything). As a value model, the head at each
    position is V(s_t).

    On disk (`save`/`load`) it is a standard `AutoModelForSequenceClassification` checkpoint
    with `num_labels=1`: the trunk under the architecture's `base_model_prefix`, the head's
    weight as `score.weight`. Hugging Face's score heads have no bias, so two fields of its
    config.json carry what the head adds:

    - `rlhf_score_bias`: the head's bias, i.e. the score normalisation (the shift that makes
      the mean score of SFT samples 0). Our score = `logits + config.rlhf_score_bias`.
    - `rlhf_score_std`: the std of the SFT samples' scores, recorded after normalising.

    Scoring it with plain transformers: tokenize prompt + response + EOS (as it was trained)
    with the tokenizer saved beside it, which pads on the right with a pad token that is not
    EOS (`scoring_tokenizer`); the model reads the last token that is not `config.pad_token_id`,
    i.e. the EOS. Left padding works too if the position ids are passed (`position_ids_from`).
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

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **position_kwargs(self.trunk, attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                head: nn.Linear | None = None) -> torch.Tensor:
        """The head's value at each position; `head` instead of the model's own (a frozen
        copy, `BaseScorer`)."""
        head = head if head is not None else self.head
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        # A copy, not a view: FSDP's backward hook on a module's output is lost on a view.
        return head(hidden.to(head.weight.dtype)).squeeze(-1).clone()  # (B, T)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = self(input_ids, attention_mask)  # (B, T)
        index = last_token_index(attention_mask)
        return values.gather(1, index[:, None]).squeeze(1)  # (B,)

    @classmethod
    def from_causal_lm(cls, path: str | Path, trust_remote_code: bool = False) -> "ScalarHeadModel":
        """A fresh head on the trunk of a causal LM (its LM head is dropped)."""
        return cls(_from_pretrained(AutoModel, path, trust_remote_code))

    def merge_adapters(self) -> "ScalarHeadModel":
        """Merge LoRA adapters on the trunk into its weights (in place); no-op without any."""
        from rlhf.models.lora import merged

        self.trunk = merged(self.trunk)
        return self

    def base_scorer(self) -> "BaseScorer":
        """The scores of this model as loaded, before its trunk's adapters learn anything:
        the trunk with its adapters switched off and a frozen copy of the current head. PPO's
        reward model when the value model is LoRA adapters on a copy of it (one trunk for both)."""
        return BaseScorer(self)

    def save(self, directory: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """A standard seq-cls checkpoint (see the class docstring); LoRA adapters are merged
        into the trunk first. With `tokenizer`, the tokenizer to score with is saved beside
        it (`scoring_tokenizer`) and its pad token id goes in the config."""
        directory = Path(directory)
        self.merge_adapters()
        state = {name: tensor.detach().contiguous().cpu()
                 for name, tensor in self.trunk.state_dict().items()}
        config = copy.deepcopy(self.trunk.config)
        if tokenizer is not None:
            tokenizer = scoring_tokenizer(tokenizer)
            _cover_token_id(self.trunk, state, config, tokenizer.pad_token_id)
            config.pad_token_id = tokenizer.pad_token_id
        config.num_labels = 1
        config.problem_type = "regression"
        config.rlhf_score_bias = self.head.bias.item()
        config.rlhf_score_std = float(self.score_std)
        with torch.device("meta"):  # only its class, config and key names are needed
            seq_cls = AutoModelForSequenceClassification.from_config(config)
        prefix = seq_cls.base_model_prefix
        state = {f"{prefix}.{name}": tensor for name, tensor in state.items()}
        state["score.weight"] = self.head.weight.detach().contiguous().cpu()  # (1, H)
        seq_cls.save_pretrained(directory, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def load(cls, directory: str | Path, trust_remote_code: bool = False) -> "ScalarHeadModel":
        """A reward model saved by `save` (or any seq-cls checkpoint with one label: no
        rlhf_score_* fields read as bias 0, std 1)."""
        directory = Path(directory)
        if (directory / OLD_HEAD_FILE).exists():
            raise UserError(f"the reward model at {directory} is in the old format "
                            f"({OLD_HEAD_FILE}); rerun the reward stage (`rlhf stage reward`)")
        seq_cls, info = _from_pretrained(AutoModelForSequenceClassification, directory,
                                         trust_remote_code, output_loading_info=True)
        if seq_cls.config.num_labels != 1 or any(k.startswith("score.")
                                                 for k in info["missing_keys"]):
            raise UserError(f"{directory} is not a reward model (a sequence-classification "
                            "checkpoint with num_labels=1 and a trained score head); rerun "
                            "the reward stage (`rlhf stage reward`)")
        model = cls(getattr(seq_cls, seq_cls.base_model_prefix))
        with torch.no_grad():
            model.head.weight.copy_(seq_cls.score.weight)
            model.head.bias.fill_(getattr(seq_cls.config, "rlhf_score_bias", 0.0))
        model.score_std = getattr(seq_cls.config, "rlhf_score_std", 1.0)
        return model


def scoring_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` for scoring with transformers' seq-cls models: right padding,
    and a pad token that is not EOS. (Those models read the last token that is not the pad
    id; a tokenizer that pads with EOS would make them skip the EOS every scored sequence
    ends with, one token earlier than our score. Such a tokenizer gets PAD_TOKEN.)"""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    return tokenizer


def _cover_token_id(trunk: nn.Module, state: dict, config, token_id: int) -> None:
    """Grow the input embedding in `state` (and config.vocab_size) with zero rows until it
    has a row for `token_id`: an added pad token's row, read only at padded positions, which
    no real token attends to."""
    weight = trunk.get_input_embeddings().weight
    name = next(name for name, param in trunk.named_parameters() if param is weight)
    rows, width = state[name].shape
    if token_id >= rows:
        state[name] = torch.cat([state[name], state[name].new_zeros(token_id + 1 - rows, width)])
        config.vocab_size = token_id + 1


class BaseScorer(nn.Module):
    """Scores from a ScalarHeadModel's trunk with its LoRA adapters disabled and a frozen copy
    of its head (see `ScalarHeadModel.base_scorer`). Only the head is a submodule here: the
    trunk belongs to (and is moved, trained and prepared with) the model it was taken from."""

    def __init__(self, model: ScalarHeadModel):
        super().__init__()
        self._source = [model]  # a list, so the trunk is not registered as a submodule
        self.head = nn.Linear(model.head.in_features, 1)
        self.head.load_state_dict(model.head.state_dict())
        self.head.to(model.head.weight.device).requires_grad_(False)
        self.score_std = model.score_std

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self._source[0]
        with model.trunk.disable_adapter():
            values = model(input_ids, attention_mask, head=self.head)  # (B, T)
        index = last_token_index(attention_mask)
        return values.gather(1, index[:, None]).squeeze(1)  # (B,)
