"""Typed configuration: one section per stage, loaded from params.yaml.

Every field carries a one-line docstring (pydantic turns it into the field's description,
which `rlhf params` and error messages show). Unknown keys, wrong types and out-of-range
values are rejected before any work starts, with one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
import types
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from rlhf.errors import ParamsError


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, frozen=False,
        allow_inf_nan=False,  # `ppo.lr=inf` or `.nan` would only fail deep inside a stage
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `ppo.steps=true` would run one step.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and bool not in _types_of(annotation):
            raise PydanticCustomError("bool_not_allowed",
                                      f"Input should be {_expected(annotation)}, not a boolean")
        return value

    @field_validator("*")
    @classmethod
    def _counts_are_sane(cls, value: Any, info: ValidationInfo) -> Any:
        # `ppo.steps=1e23` parses as an integer; no count here is meant to be that large.
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT \
                and info.field_name != "seed":
            raise PydanticCustomError("too_large", f"Input should be at most {MAX_COUNT:,}")
        return value


MAX_COUNT = 10**9
"""The largest integer any param other than a seed may hold."""


def _expected(annotation: Any) -> str:
    kinds = _types_of(annotation)
    optional = " or null" if type(None) in kinds else ""
    choices = [repr(a) for k in kinds if get_origin(k) is Literal for a in get_args(k)]
    if choices:
        return "one of " + ", ".join(choices)
    if int in kinds:
        return "an integer" + optional
    if float in kinds:
        return "a number" + optional
    return "a string" + optional


def _types_of(annotation: Any) -> tuple:
    """The types a field's annotation admits (the members of an Optional or Union)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


class DataConfig(Section):
    source: str = Field("builtin", min_length=1)
    """Where the data comes from: `builtin` (the sorting task), a local jsonl/json/parquet/csv file or folder, or a hub dataset id."""
    format: Literal["auto", "explicit", "hh", "conversational", "tldr"] = "auto"
    """Layout of the preference rows: explicit, hh, conversational, tldr, or auto (detected from the columns)."""
    split: str = Field("train", min_length=1)
    """Training split of a hub dataset, or of a folder whose files or subfolders are named by split."""
    eval_split: Optional[str] = Field(None, min_length=1)
    """Held-out split (hub dataset or folder); null holds out data.eval_fraction of the training prompts."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Fraction of the training prompts held out for evaluation when data.eval_split is null."""
    subset: Optional[str] = Field(None, min_length=1)
    """Hub dataset configuration (subset) name; null for its default."""
    revision: Optional[str] = Field(None, min_length=1)
    """Git revision (branch, tag or commit sha) of the data.source hub dataset; null is the hub's default branch. Pin a commit sha to reproduce a run."""
    sft_source: Optional[str] = Field(None, min_length=1)
    """Separate SFT data (prompt/completion or messages); null uses prompt + chosen of the training pairs."""
    prompts_source: Optional[str] = Field(None, min_length=1)
    """Separate RL prompts (a prompt string or messages); null uses the training pairs' prompts."""
    on_bad_row: Literal["error", "drop"] = "error"
    """A malformed row stops the run (`error`) or is dropped and counted by reason in the manifest (`drop`)."""
    max_length: int = Field(1024, ge=2)
    """Longest allowed row in tokens: prompt + its longest response + EOS; longer rows are bad rows."""
    max_rows: Optional[int] = Field(None, ge=1)
    """Read at most this many rows of each source (null reads them all)."""
    seed: int = 0
    """Seed of the builtin task generator (same seed, byte-identical splits) and of the eval hold-out."""
    min_digits: int = Field(4, ge=1, le=20)
    """Shortest list of digits in a builtin prompt."""
    max_digits: int = Field(7, ge=1, le=20)
    """Longest list of digits in a builtin prompt."""
    n_sft: int = Field(8000, ge=1)
    """Number of SFT demonstrations."""
    n_pairs: int = Field(6000, ge=1)
    """Number of preference pairs to train the reward model on."""
    n_pairs_eval: int = Field(1000, ge=1)
    """Number of held-out preference pairs (RM accuracy and the noise ceiling)."""
    n_rl_prompts: int = Field(4000, ge=1)
    """Number of RL prompts for PPO rollouts."""
    n_eval_prompts: int = Field(200, ge=1)
    """Number of held-out evaluation prompts."""
    demo_correct_prob: float = Field(0.4, ge=0.0, le=1.0)
    """Chance that an SFT demonstration is the exact sort (else a near miss)."""
    candidate_correct_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Chance that a preference candidate is the exact sort (else a near miss)."""
    label_temperature: float = Field(0.25, gt=0.0)
    """Bradley-Terry temperature of the simulated raters: P(a > b) = sigmoid((g_a - g_b) / T)."""

    @model_validator(mode="after")
    def _digits_range(self) -> "DataConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"data.min_digits ({self.min_digits}) must be <= data.max_digits ({self.max_digits})"
            )
        return self

    @model_validator(mode="after")
    def _external_only(self) -> "DataConfig":
        if self.source == "builtin":
            for key in ("eval_split", "subset", "revision", "sft_source", "prompts_source"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"data.{key} applies to external data only; with data.source=builtin "
                        f"set it to null, or point data.source at your data"
                    )
        elif self.eval_split is not None and self.eval_split == self.split:
            raise ValueError(
                f"data.eval_split ({self.eval_split!r}) must differ from data.split; "
                "set it to another split or to null to hold out data.eval_fraction"
            )
        return self


class ModelConfig(Section):
    name_or_path: str = "builtin"
    """Base causal LM: `builtin` (a tiny GPT-2 built locally) or a Hugging Face id or path."""
    revision: Optional[str] = Field(None, min_length=1)
    """Git revision (branch, tag or commit sha) of a hub model.name_or_path; null is the hub's default branch. Pin a commit sha to reproduce a run."""
    trust_remote_code: bool = False
    """Allow a model's own Python code to run when it is loaded. Off unless you trust it."""
    n_layer: int = Field(4, ge=1)
    """Builtin model: number of transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Builtin model: attention heads per block."""
    n_embd: int = Field(128, ge=8)
    """Builtin model: width of the residual stream."""
    n_positions: int = Field(64, ge=8)
    """Builtin model: longest sequence (prompt + response) in tokens."""
    seed: int = 0
    """Seed of the builtin model's random initialisation."""
    lora: bool = False
    """Train LoRA adapters (peft) on a frozen base in sft, reward and ppo instead of every weight."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank: width of each adapter's low-rank update."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA alpha: the adapter update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input in sft and reward (ppo runs without dropout)."""
    lora_target_modules: Optional[Union[str, list[str]]] = None
    """Modules that get adapters: a list of names, `all-linear`, or null for peft's default for the architecture."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of the trained models (less memory, slower; turns use_cache off while training)."""

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _target_modules_type(cls, value: Any) -> Any:
        if value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError(
            f"model.lora_target_modules ({value!r}) must be a list of module names, "
            "`all-linear`, or null for peft's default for the architecture"
        )

    @model_validator(mode="after")
    def _revision_of_a_hub_model(self) -> "ModelConfig":
        if self.name_or_path == "builtin" and self.revision is not None:
            raise ValueError(
                f"model.revision ({self.revision!r}) pins a hub model; with "
                "model.name_or_path=builtin set it to null, or point model.name_or_path at one")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        # Each head gets n_embd / n_head dimensions; GPT-2 fails deep inside sft otherwise.
        if self.name_or_path == "builtin" and self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_head ({self.n_head}) must divide model.n_embd ({self.n_embd}); "
                "pick a head count that divides the width")
        return self

    @model_validator(mode="after")
    def _target_modules(self) -> "ModelConfig":
        targets = self.lora_target_modules
        if isinstance(targets, str) and targets != "all-linear":
            raise ValueError(
                f"model.lora_target_modules ({targets!r}) must be a list of module names, "
                "`all-linear`, or null for peft's default for the architecture"
            )
        if isinstance(targets, list) and (not targets or not all(t.strip() for t in targets)):
            raise ValueError(
                f"model.lora_target_modules ({targets!r}) must name at least one module and no "
                "empty names; or set it to null for peft's default for the architecture"
            )
        return self


class TrainConfig(Section):
    seed: int = 0
    """Seed for torch, numpy and Python's random in every training stage."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision: fp32, or bf16/fp16 autocast through Accelerate (GPU)."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""
    num_threads: int = Field(0, ge=0)
    """torch CPU threads; 0 leaves torch's default."""
    checkpoint_keep: int = Field(2, ge=1)
    """Resumable checkpoints kept per stage (the newest ones); older ones are deleted."""
    num_processes: int = Field(1, ge=1)
    """Processes per training stage: > 1 launches sft, reward, ppo and evaluate with Accelerate's launcher (DDP; gloo on CPU), each rank on its shard of every batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches each process splits its shard of a batch into, accumulating gradients: the global batch stays the stage's batch_size, memory per step shrinks."""
    accelerate_config: Optional[str] = Field(None, min_length=1)
    """An Accelerate config file for launched stages (configs/accelerate/: DDP, DeepSpeed ZeRO-2/3); null launches plain DDP with train.num_processes (sharding is train.sharding)."""
    sharding: Literal["none", "fsdp"] = "none"
    """fsdp: split every model's weights (and a trained one's gradients and optimizer state) over the processes with PyTorch's FSDP2, on CPU and GPU alike; none: whole models on every process (DDP)."""

    @model_validator(mode="after")
    def _sharding_precision(self) -> "TrainConfig":
        # fp16's loss scaling lives in Accelerate's prepared optimizer, which sharding bypasses.
        if self.sharding == "fsdp" and self.precision == "fp16":
            raise ValueError("train.precision=fp16 does not work with train.sharding=fsdp "
                             "(no loss scaling); use train.precision=bf16")
        return self


class SFTConfig(Section):
    epochs: float = Field(10.0, gt=0)
    """Passes over the SFT demonstrations."""
    batch_size: int = Field(64, ge=1)
    """Sequences per optimiser step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (AdamW, linear warmup then cosine decay)."""
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    """Fraction of steps spent warming the learning rate up."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    log_every: int = Field(20, ge=1)
    """Log the training loss every this many steps."""
    checkpoint_every: int = Field(250, ge=1)
    """Write a resumable checkpoint every this many steps (and at the last)."""


class RewardConfig(Section):
    epochs: float = Field(2.0, gt=0)
    """Passes over the preference pairs."""
    batch_size: int = Field(64, ge=1)
    """Pairs per optimiser step."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate (AdamW, linear warmup then cosine decay)."""
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    """Fraction of steps spent warming the learning rate up."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    n_normalise_samples: int = Field(512, ge=1)
    """SFT samples whose mean score is shifted to 0 after training."""
    log_every: int = Field(20, ge=1)
    """Log the training loss and accuracy every this many steps."""
    checkpoint_every: int = Field(50, ge=1)
    """Write a resumable checkpoint every this many steps (and at the last)."""


class PPOConfig(Section):
    steps: int = Field(150, ge=1)
    """PPO iterations (one rollout batch and its updates each)."""
    batch_size: int = Field(64, ge=1)
    """Samples per rollout: batch_size / num_generations prompts, num_generations samples each."""
    num_generations: int = Field(1, ge=1)
    """Samples per prompt in a rollout: the group of grpo and rloo (at least 2 there)."""
    num_minibatches: int = Field(2, ge=1)
    """Minibatches per PPO epoch (batch_size must divide evenly)."""
    ppo_epochs: int = Field(4, ge=1)
    """Passes over each rollout batch."""
    lr: float = Field(1e-4, gt=0)
    """Learning rate of the policy and value model (AdamW, linear decay to 0)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts (log-probs use the same scaled logits)."""
    max_new_tokens: int = Field(10, ge=1)
    """Longest response in tokens; responses without EOS stop here."""
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """Advantage estimator: gae (PPO, with a value model) or a critic-free one: grpo (group-normalised rewards), rloo (leave-one-out baseline), reinforce_pp (REINFORCE++: batch-whitened returns)."""
    scale_rewards: bool = True
    """grpo: divide by the group's reward std; false only centres them (Dr. GRPO)."""
    reward: str = Field("model", min_length=1)
    """Reward source: model (the trained reward model), gold (the builtin task's verifier), or module:function, your function scoring (prompts, responses) lists."""
    kl_coef: float = Field(0.2, ge=0)
    """beta: initial weight of the per-token KL penalty."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where beta * KL goes: into the per-token reward (InstructGPT) or into the loss (GRPO)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator of the penalty (Schulman): k1 log(pi/pi_ref), k2 its square / 2, k3 ratio - 1 - log ratio (GRPO's)."""
    adaptive_kl: bool = True
    """Adapt beta to hold `kl_target` (Ziegler et al.); false keeps beta fixed."""
    kl_target: float = Field(1.0, gt=0)
    """Adaptive controller: target KL per response, in nats."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive controller: horizon in episodes."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """lambda of GAE."""
    cliprange: float = Field(0.2, gt=0)
    """Clip range of the policy ratio."""
    cliprange_value: float = Field(0.2, gt=0)
    """Clip range of the value prediction around its rollout value."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    ent_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (0 disables it)."""
    ptx_coef: float = Field(0.0, ge=0)
    """Weight of the SFT log-likelihood mixed into the loss (0 disables ptx)."""
    whiten_rewards: bool = False
    """Whiten the shaped rewards before GAE (N+ default on, TRL default off)."""
    missing_eos_penalty: Optional[float] = None
    """Score given to responses that never emit EOS; null keeps the RM score."""
    value_model: Literal["reward", "policy_head"] = "reward"
    """Value model of gae: a copy of the reward model, or an extra head on the policy trunk."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    checkpoint_every: int = Field(50, ge=1)
    """Write a resumable checkpoint every this many steps (and at the last)."""
    gold_every: int = Field(1, ge=1)
    """Score the rollouts with the gold reward every this many steps (builtin task only)."""
    log_completions_every: int = Field(25, ge=1)
    """Log a table of sample completions (prompt, response, RM score, gold) every this many steps."""

    @property
    def critic(self) -> bool:
        """Whether the estimator needs a value model (only gae does)."""
        return self.advantage == "gae"

    @property
    def reward_function(self) -> Optional[str]:
        """`reward` when it names a user's module:function; None for model and gold."""
        return None if self.reward in ("model", "gold") else self.reward

    @model_validator(mode="after")
    def _minibatches_divide(self) -> "PPOConfig":
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"ppo.batch_size ({self.batch_size}) must be divisible by "
                f"ppo.num_minibatches ({self.num_minibatches})"
            )
        if self.advantage in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ValueError(
                f"ppo.advantage={self.advantage} compares samples of one prompt: set "
                f"ppo.num_generations to 2 or more (it is {self.num_generations})")
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"ppo.batch_size ({self.batch_size}) must be divisible by "
                f"ppo.num_generations ({self.num_generations}): a rollout is whole groups")
        if self.reward_function and not _is_function_name(self.reward_function):
            raise ValueError(
                f"ppo.reward={self.reward!r} is not a reward source: use model, gold, or "
                "module:function (e.g. my_rewards:score)")
        return self


GROUP_ESTIMATORS = ("grpo", "rloo")
"""Advantage estimators that compare the samples of one prompt with each other."""


def _is_function_name(spec: str) -> bool:
    module, sep, function = spec.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) \
        and function.isidentifier()


class EvalConfig(Section):
    n_samples: int = Field(64, ge=1)
    """Samples per eval prompt and model (n of pass@k; must be >= the largest k)."""
    max_k: int = Field(64, ge=1)
    """pass@k is reported for k = 1, 2, 4, ... up to this."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for evaluation."""
    max_new_tokens: int = Field(10, ge=1)
    """Longest evaluated response in tokens."""
    batch_size: int = Field(1024, ge=1)
    """Sequences per generation batch."""
    kl_budget: float = Field(5.0, gt=0, le=5.0)
    """Largest allowed KL(policy || reference), summed over a response's tokens, in nats."""
    max_prompts: Optional[int] = Field(None, ge=1)
    """Evaluate at most this many eval prompts, a sample seeded by data.seed (null evaluates them all)."""

    @model_validator(mode="after")
    def _enough_samples(self) -> "EvalConfig":
        if self.n_samples < self.max_k:
            raise ValueError(
                f"eval.n_samples ({self.n_samples}) must be >= eval.max_k ({self.max_k})"
            )
        return self


class RegistryConfig(Section):
    model_name: str = Field("rlhf-policy", min_length=1)
    """Registered model name in the MLflow registry; each pipeline run adds a version."""
    experiment: str = Field("rlhf", min_length=1)
    """MLflow experiment that holds the pipeline runs."""

    @field_validator("model_name")
    @classmethod
    def _registrable_name(cls, value: str) -> str:
        # MLflow refuses '/' and ':' and names that are paths ('.', '..'), but only at the
        # register step, after hours of training; '@' would break `models:/NAME@alias` URIs.
        bad = sorted({c for c in value if c in "/:@" or not c.isprintable()})
        if bad or value.strip() != value or value in (".", ".."):
            why = (f"it contains {', '.join(map(repr, bad))}" if bad else
                   "it has leading or trailing spaces" if value.strip() != value
                   else "it is a path")
            raise ValueError(
                f"registry.model_name ({value!r}) is not a valid MLflow model name: {why}; "
                "use letters, digits, '-', '_' and '.' (e.g. rlhf-policy)")
        return value


class PromoteConfig(Section):
    auto: bool = False
    """Run the promotion gate (the `promote` flow) right after each pipeline run registers a version."""
    min_rm_win_rate_vs_reference: float = Field(0.5, ge=0, le=1)
    """The candidate must beat its reference (SFT) on at least this share of eval samples, as the reward model judges."""
    min_rm_win_rate_vs_champion: float = Field(0.5, ge=0, le=1)
    """The candidate must beat the current champion on at least this share of samples, as its reward model judges."""
    head_to_head_samples: int = Field(8, ge=1)
    """Samples per eval prompt and model when the candidate is compared with the champion."""
    require_kl_within_budget: bool = True
    """Refuse a candidate whose KL to its reference exceeds eval.kl_budget."""
    min_gold_ratio_vs_champion: float = Field(1.0, ge=0)
    """Gold-reward tasks only: the candidate's gold reward must be at least this times the current champion's."""
    min_gold_ratio_vs_reference: float = Field(1.0, ge=0)
    """Gold-reward tasks only: the candidate's gold reward must be at least this times its reference (SFT) model's."""
    min_gold_reward: float = Field(0.0, ge=0)
    """Gold-reward tasks only: refuse a candidate whose mean gold reward is below this."""


class Params(Section):
    """All of params.yaml."""

    data: DataConfig = DataConfig()
    """Data source and the builtin task generator."""
    model: ModelConfig = ModelConfig()
    """Base model."""
    train: TrainConfig = TrainConfig()
    """Engine settings shared by every training stage."""
    sft: SFTConfig = SFTConfig()
    """Supervised fine-tuning."""
    reward: RewardConfig = RewardConfig()
    """Reward-model training."""
    ppo: PPOConfig = PPOConfig()
    """PPO with a per-token KL penalty, or a critic-free estimator (GRPO, RLOO, REINFORCE++)."""
    eval: EvalConfig = EvalConfig()
    """Evaluation on held-out prompts."""
    registry: RegistryConfig = RegistryConfig()
    """Model registry (MLflow)."""
    promote: PromoteConfig = PromoteConfig()
    """The gate a model version must pass to become `champion`."""

    @model_validator(mode="after")
    def _gold_needs_a_verifier(self) -> "Params":
        if self.ppo.reward == "gold" and self.data.source != "builtin":
            raise ValueError(
                f"ppo.reward=gold needs a task with a verifier, and data.source "
                f"({self.data.source!r}) has none: use ppo.reward=model or module:function")
        return self

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, as DVC and MLflow want params."""
        return {
            f"{section}.{key}": value
            for section, values in self.model_dump().items()
            for key, value in values.items()
        }

    def digest(self) -> str:
        """A short content hash of the params, for lineage tags."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`ppo.kl_coef=0.1` -> (["ppo", "kl_coef"], 0.1); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r} is not of the form section.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ParamsError(f"override {text!r}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        section_cls = Params
        for part in error["loc"][:-1]:
            section_cls = section_cls.model_fields[str(part)].annotation
        allowed = ", ".join(section_cls.model_fields)
        return f"unknown key {key!r} in {source}; allowed keys here: {allowed}"
    message = error["msg"]
    if message.startswith("Value error, "):
        return f"{message.removeprefix('Value error, ')} (in {source})"
    allowed = ""
    field = _field_of(error["loc"])
    if field is not None:
        allowed = f" ({field.description})" if field.description else ""
    return f"{key} = {error['input']!r} is not allowed: {message}{allowed}. Fix it in {source}"


def _field_of(loc: tuple) -> Any:
    cls: Any = Params
    field = None
    for part in loc:
        fields = getattr(cls, "model_fields", None)
        if not fields or str(part) not in fields:
            return field
        field = fields[str(part)]
        cls = field.annotation
    return field


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (missing sections take their defaults), apply `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ParamsError(f"params file {path} not found; pass --params FILE or create it")
        if path.is_dir():
            raise ParamsError(f"params file {path} is a directory; pass --params with a YAML "
                              "file (e.g. params.yaml)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise ParamsError(f"params file {path} is not UTF-8 text (line {line}); save it "
                              "as UTF-8") from None
        except OSError as exc:
            raise ParamsError(f"cannot read params file {path} ({exc.strerror}); check the "
                              "path and its permissions") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ParamsError(f"params file {path} is not valid YAML{where}; fix its syntax") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"params file {path} must be a mapping of sections")
        source = str(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " or --set"
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_describe(exc.errors()[0], source)) from None
    if params.ppo.reward_function:  # a function that cannot load stops the run now
        from rlhf.rewards import load_function

        load_function(params.ppo.reward_function,
                      Path(path).resolve().parent if path else Path.cwd())
    return params


def write_overrides(params_file: str | Path, overrides: list[str]) -> None:
    """Write `--set` overrides into the params file, keeping its comments and layout.

    What `dvc exp run -S` does: afterwards the file describes what the run produced, so
    `dvc repro` agrees with it and the change shows up in `git diff`. The overrides are
    validated first, so a bad one leaves the file untouched.
    """
    from ruamel.yaml import YAML

    from rlhf.io import atomic_write_text

    load_params(params_file, overrides)
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    path = Path(params_file)
    document = yaml_rt.load(path.read_text()) or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = document
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    buffer = io.StringIO()
    yaml_rt.dump(document, buffer)
    atomic_write_text(path, buffer.getvalue())
