"""Stage `ppo`: PPO with a per-token KL penalty against the frozen reference.

Each iteration (`ppo_iteration`), in the order of the N+ reference implementation:
  1. rollout: sample responses to a batch of RL prompts (temperature, stop at EOS);
  2. score: per-token log-probs under policy and reference, values, one RM score each;
  3. shape rewards: r_t = -beta * KL_t, plus the RM score on the last response token;
  4. GAE advantages and returns, advantages whitened over valid tokens;
  5. several epochs of clipped policy + clipped value updates over minibatches;
  6. adapt beta towards the KL target.
The math of steps 3-5 lives in `rlhf.rl_math` as pure, unit-tested functions.

That is the default, `ppo.advantage=gae`. The critic-free estimators replace step 4 and drop
the value model and its loss: `grpo` and `rloo` compare the `ppo.num_generations` samples of
each prompt (a rollout is whole groups), `reinforce_pp` whitens the returns over the batch.
`ppo.kl_penalty=loss` moves beta * KL from step 3 into step 5's loss, `ppo.kl_estimator`
picks Schulman's k1, k2 or k3, and `ppo.reward` scores with the reward model, the builtin
task's gold verifier or a user's function (`rlhf.rewards`).

With `train.num_processes` > 1 each rank samples and scores its shard of the rollout batch
(row i of the global batch is sampled with its own seeded generator, so the samples do not
depend on the world size), the shards are gathered so every rank holds the whole batch for
steps 3-4, and each rank takes its shard of every PPO minibatch (split into
`train.grad_accum` micro-batches), its losses weighted by its share of the minibatch's
tokens: the all-reduced gradient is the one a single process computes (`rlhf.distributed`).
With `train.sharding=fsdp` every model is also split over the processes (`rlhf.engine`): each
one PPO calls directly is a unit of its own (`shard_models`), and the policy samples from its
sharded weights.

Writes `models/policy/`, `metrics/ppo.json`, `metrics/ppo_history.csv` (one row per step,
for plots), and every `ppo.checkpoint_every` steps a checkpoint under `checkpoints/ppo/` from
which a rerun resumes exactly (`rlhf.checkpoints`). The history lives in the checkpoints while
the run goes on: `metrics/` changes only when the run has finished.

Dropout is switched off in every model (as TRL does): a sample's log-prob must not depend on
which forward pass computed it, or the PPO ratio is not 1 before the first update.

With `model.lora`, the policy is LoRA adapters on a frozen base loaded from `models/reference/`
(whose sha256 is verified), and the reference is that same model with its adapters disabled:
one copy of the weights. A value model copied from the reward model likewise trains adapters
(and its head) on the reward model's frozen trunk, and the reward score is that trunk with the
adapters disabled and the reward head. `models/policy/` gets the adapters merged into the base:
a plain Hugging Face model, as without LoRA.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from rlhf import distributed as dist
from rlhf import rewards
from rlhf import rl_math as rl
from rlhf.artifacts import require_model
from rlhf.config import Params, PPOConfig
from rlhf.data import builtin_sort
from rlhf.data.tokenize import IGNORE_INDEX, collate_sft, encode, encode_sft
from rlhf import checkpoints as ckpt
from rlhf.engine import adamw, make_accelerator
from rlhf.errors import DataError
from rlhf.generation import decode_responses, derive_seed, generate
from rlhf.io import atomic_dir, atomic_write_text, read_jsonl, write_json
from rlhf.models import lora
from rlhf.models.loading import (AdaptersDisabled, ScalarHeadModel, lm_logits, load_causal_lm,
                                 load_tokenizer, position_kwargs)
from rlhf.paths import Paths
from rlhf.progress import progress_bar
from rlhf.stages import reference as reference_stage
from rlhf.stages import reward as reward_stage
from rlhf.stages.sft import summed_token_nll
from rlhf.tracking import MetricsLogger, NullLogger


class PolicyAndValue(nn.Module):
    """Policy and value model in one module, so one optimizer and one Accelerate `prepare`
    cover both. The value model is either a separate scalar-head transformer (initialised
    from the reward model) or an extra head on the policy's own trunk; a critic-free
    estimator (`critic=False`) has none, and its forward returns no values."""

    def __init__(self, policy: nn.Module, value_model: Optional[ScalarHeadModel],
                 critic: bool = True):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.critic = critic
        if critic and value_model is None:
            self.value_head = nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if not self.critic:
            return lm_logits(self.policy, input_ids, attention_mask), None
        if self.value_model is not None:
            logits = lm_logits(self.policy, input_ids, attention_mask)  # (B, T, V)
            values = self.value_model(input_ids, attention_mask)  # (B, T)
            return logits, values
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          **position_kwargs(self.policy, attention_mask),
                          output_hidden_states=True, use_cache=False)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


@dataclass
class Rollout:
    """One batch of experience. B = prompts, Q = query width, R = response width."""

    query_responses: torch.Tensor  # (B, Q+R) left-padded query, then response
    attention_mask: torch.Tensor  # (B, Q+R)
    responses: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) True on response tokens up to and including EOS
    logprobs: torch.Tensor  # (B, R) under the policy, INVALID_LOGPROB at padding
    ref_logprobs: torch.Tensor  # (B, R) under the reference
    values: torch.Tensor  # (B, R) V(s_t), 0 at padding (and everywhere without a critic)
    scores: torch.Tensor  # (B,) rewards of `ppo.reward` (after the missing-EOS penalty)
    has_eos: torch.Tensor  # (B,)
    texts: list[str]
    prompts: list[str]


@dataclass
class RewardSource:
    """What scores a rollout's responses (`ppo.reward`): the reward model, or a scorer of
    texts (`rlhf.rewards`: the gold verifier or the user's function)."""

    spec: str
    model: Optional[ScalarHeadModel] = None
    texts: Optional[rewards.TextScorer] = None

    def __call__(self, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                 prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self.model is not None:
            return self.model.score(query_responses, attention_mask).float()  # (B,)
        scores = rewards.score(self.texts, self.spec, prompts, responses)
        return torch.tensor(scores, dtype=torch.float32, device=query_responses.device)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, query_width: int,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens and the logits that produced them.

    The logit at position t predicts token t+1, so the response's logits start one position
    before the response; they are scaled by the sampling temperature, as sampling did.
    """
    logits = logits[:, query_width - 1:-1] / temperature  # (B, R, V)
    return rl.logprobs_from_logits(logits, responses), logits


@torch.no_grad()
def collect_rollout(model: PolicyAndValue, reference: nn.Module, reward: RewardSource,
                    tokenizer, prompts: list[str], cfg: PPOConfig, device,
                    autocast: Callable = contextlib.nullcontext, seed: int = 0,
                    first_row: int = 0) -> Rollout:
    """Sample and score `prompts`, rows `first_row`... of the global batch sampled with the
    generators of (`seed`, row)."""
    policy = model.policy
    policy.eval()
    query, query_mask, responses = generate(
        policy, tokenizer, [encode(tokenizer, p) for p in prompts], cfg.max_new_tokens,
        cfg.temperature, device, seed=seed, first_row=first_row)
    responses = rl.truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths = rl.response_lengths(responses, tokenizer.eos_token_id)  # (B,)
    mask = rl.mask_from_lengths(lengths, responses.shape[1])  # (B, R)
    query_responses = torch.cat([query, responses], 1)
    attention_mask = torch.cat([query_mask, mask.long()], 1)
    width = query.shape[1]

    texts = decode_responses(tokenizer, responses)
    logits, values = model(query_responses, attention_mask)
    logprobs, _ = response_logprobs(logits, responses, width, cfg.temperature)
    # The policy's forward runs under the accelerator's autocast (bf16/fp16), so the
    # reference and reward forwards must too: else the KL at step 1 is precision noise, not 0.
    with autocast():
        ref_logits = lm_logits(reference, query_responses, attention_mask).float()
        scores = reward(query_responses, attention_mask, prompts, texts)  # (B,)
    ref_logprobs, _ = response_logprobs(ref_logits, responses, width, cfg.temperature)
    # V(s_t) read where a_t is predicted; none without a critic.
    values = values[:, width - 1:-1] if values is not None else torch.zeros_like(logprobs)
    has_eos = (responses == tokenizer.eos_token_id).any(1)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    return Rollout(
        query_responses=query_responses, attention_mask=attention_mask, responses=responses,
        mask=mask,
        logprobs=logprobs.masked_fill(~mask, rl.INVALID_LOGPROB),
        ref_logprobs=ref_logprobs.masked_fill(~mask, rl.INVALID_LOGPROB),
        values=values.masked_fill(~mask, 0.0), scores=scores.float(), has_eos=has_eos,
        texts=texts, prompts=prompts)


def gather_rollout(accelerator, local: Rollout, pad_token_id: int) -> Rollout:
    """The whole rollout batch on every rank, rows in rank order (queries re-padded on the
    left to the widest; responses are `max_new_tokens` wide on every rank)."""
    if accelerator.num_processes == 1:
        return local
    width = local.query_responses.shape[1] - local.responses.shape[1]
    query = dist.gather_rows(accelerator, local.query_responses[:, :width], pad_token_id,
                             pad_first=True)
    query_mask = dist.gather_rows(accelerator, local.attention_mask[:, :width], 0,
                                  pad_first=True)
    responses = dist.gather_rows(accelerator, local.responses)
    mask = dist.gather_rows(accelerator, local.mask)
    return Rollout(
        query_responses=torch.cat([query, responses], 1),
        attention_mask=torch.cat([query_mask, mask.long()], 1), responses=responses, mask=mask,
        logprobs=dist.gather_rows(accelerator, local.logprobs),
        ref_logprobs=dist.gather_rows(accelerator, local.ref_logprobs),
        values=dist.gather_rows(accelerator, local.values),
        scores=dist.gather_rows(accelerator, local.scores),
        has_eos=dist.gather_rows(accelerator, local.has_eos),
        texts=dist.gather_list(accelerator, local.texts),
        prompts=dist.gather_list(accelerator, local.prompts))


STATS = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio",
         "ratio_sq", "ptx_loss", "kl_loss")
"""What `ppo_update` averages over a minibatch's tokens (ratio_sq: to combine ratio_var)."""


def advantages_and_returns(batch: Rollout, cfg: PPOConfig,
                           kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-4: (advantages, returns, non-score rewards), all (B, R) and 0 at padding.

    With `ppo.kl_penalty=reward` each token's reward is -beta * KL_t (by `ppo.kl_estimator`)
    plus the score on the last token, as in InstructGPT; with `loss` the rewards are the
    scores alone and `ppo_update` adds the KL to the loss. `gae` then whitens GAE
    advantages; `reinforce_pp` whitens the returns-to-go over the batch; `grpo` and `rloo`
    turn each sample's summed reward into one advantage against its group, on every token.
    Returns are the value model's targets (0 without a critic)."""
    mask = batch.mask
    penalty = (rl.kl_estimate(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator)
               if cfg.kl_penalty == "reward" else torch.zeros_like(batch.logprobs))
    rewards, non_score = rl.shape_rewards(penalty, batch.scores, mask.sum(1), kl_coef)
    if cfg.whiten_rewards and cfg.advantage in ("gae", "reinforce_pp"):
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False).masked_fill(~mask, 0.0)
    no_returns = torch.zeros_like(rewards)
    if cfg.advantage == "gae":
        advantages, returns = rl.gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        return rl.masked_whiten(advantages, mask).masked_fill(~mask, 0.0), returns, non_score
    if cfg.advantage == "reinforce_pp":
        return rl.reinforce_pp_advantages(rewards, mask, cfg.gamma), no_returns, non_score
    summed = rewards.sum(1)  # (B,): the score plus the response's KL penalty, if any
    per_sample = (rl.group_advantages(summed, cfg.num_generations, cfg.scale_rewards)
                  if cfg.advantage == "grpo"
                  else rl.leave_one_out_advantages(summed, cfg.num_generations))
    return rl.sequence_advantages_to_tokens(per_sample, mask), no_returns, non_score


def ppo_update(model: PolicyAndValue, optimizer, accelerator, batch: Rollout,
               advantages: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig,
               ptx_batches: Optional[Callable[[], dict]], generator: torch.Generator,
               grad_accum: int = 1, kl_coef: float = 0.0) -> dict:
    """`ppo_epochs` passes of clipped policy + value updates over shuffled minibatches.

    Without a critic there is no value loss; with `ppo.kl_penalty=loss` the loss gains
    `kl_coef` times the mean per-token KL (by `ppo.kl_estimator`) to the reference.

    `batch` is the whole rollout (every rank holds it); each rank backpropagates its shard of
    each minibatch, micro-batch by micro-batch, each micro-batch's mean losses weighted by
    its share of the minibatch's valid tokens (times the world size, which DDP's averaging
    divides out), so the update is the one of the whole minibatch at once."""
    model.train()
    size = batch.responses.shape[0]
    width = batch.query_responses.shape[1] - batch.responses.shape[1]
    world = accelerator.num_processes
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    minibatch_tokens: list[int] = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(size, generator=generator).to(batch.responses.device)
        for index in order.chunk(cfg.num_minibatches):
            tokens = batch.mask[index].sum().item()
            minibatch_tokens.append(tokens)
            mine = index[dist.shard_slice(len(index), accelerator)]
            demo = ptx_batches() if ptx_batches is not None else None  # the global ptx batch
            demo_tokens = (demo["labels"][:, 1:] != IGNORE_INDEX).sum().item() if demo else 0
            mine_demo = ({k: v[dist.shard_slice(len(v), accelerator)] for k, v in demo.items()}
                         if demo else None)
            sums = torch.zeros(len(STATS), dtype=torch.float64)
            parts = dist.micro_slices(len(mine), grad_accum)
            for i, part in enumerate(parts):
                micro = mine[part]
                mask = batch.mask[micro]
                n = mask.sum().item()
                weight = n / tokens  # this micro-batch's share of the minibatch's tokens
                with dist.sync_gradients_if(i == len(parts) - 1, accelerator, model):
                    logits, vpred = model(batch.query_responses[micro],
                                          batch.attention_mask[micro])
                    new_logprobs, scaled_logits = response_logprobs(
                        logits, batch.responses[micro], width, cfg.temperature)
                    new_logprobs = new_logprobs.masked_fill(~mask, rl.INVALID_LOGPROB)
                    pg = rl.policy_loss(new_logprobs, batch.logprobs[micro], advantages[micro],
                                        mask, cfg.cliprange)
                    vf = (rl.value_loss(vpred[:, width - 1:-1], batch.values[micro],
                                        returns[micro], mask, cfg.cliprange_value)
                          if vpred is not None else rl.ValueLoss(*torch.zeros(2)))
                    entropy = rl.masked_mean(rl.entropy_from_logits(scaled_logits), mask)
                    kl_loss = (rl.masked_mean(rl.kl_estimate(
                        new_logprobs, batch.ref_logprobs[micro], cfg.kl_estimator), mask)
                        if cfg.kl_penalty == "loss" else torch.zeros(()))
                    loss = weight * (pg.loss + cfg.vf_coef * vf.loss - cfg.ent_coef * entropy
                                     + kl_coef * kl_loss)
                    ptx = torch.zeros(())
                    if mine_demo is not None:
                        piece = {k: v[part] for k, v in mine_demo.items()}
                        policy = accelerator.unwrap_model(model).policy
                        ptx_logits = policy(
                            input_ids=piece["input_ids"], attention_mask=piece["attention_mask"],
                            **position_kwargs(policy, piece["attention_mask"]),
                            use_cache=False).logits
                        ptx = summed_token_nll(ptx_logits, piece["labels"]) / max(1, demo_tokens)
                        loss = loss + cfg.ptx_coef * ptx
                    accelerator.backward(loss * world)
                ratio_sq = pg.ratio_var * (n - 1) / n + pg.ratio_mean ** 2  # E[ratio^2]
                sums += torch.tensor([weight * float(v.detach()) for v in (
                    pg.approxkl, pg.clipfrac, pg.loss, vf.loss, vf.clipfrac, entropy,
                    pg.ratio_mean, ratio_sq)] + [float(ptx.detach()),
                                                 weight * float(kl_loss.detach())],
                                     dtype=torch.float64)
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in zip(STATS, dist.sum_over_ranks(accelerator, sums).tolist()):
                stats[key].append(value)
    means = {key: sum(vals) / len(vals) for key, vals in stats.items()}
    # Var of the ratio over each minibatch's tokens (unbiased), from its first two moments.
    variances = [(sq - mean ** 2) * n / (n - 1) if n > 1 else 0.0
                 for sq, mean, n in zip(stats["ratio_sq"], stats["ratio"], minibatch_tokens)]
    means["ratio_var"] = sum(variances) / len(variances)
    del means["ratio_sq"]
    for key, used in (("ptx_loss", ptx_batches is not None),
                      ("kl_loss", cfg.kl_penalty == "loss"),
                      ("vf_loss", cfg.critic), ("vf_clipfrac", cfg.critic)):
        if not used:
            del means[key]
    return means


def ppo_iteration(model: PolicyAndValue, reference: nn.Module, reward: RewardSource,
                  tokenizer, optimizer, accelerator, cfg: PPOConfig, prompts: list[str], *,
                  kl_ctl, minibatch_generator: torch.Generator, seed: int, scheduler=None,
                  ptx_batches: Optional[Callable[[], dict]] = None,
                  grad_accum: int = 1) -> tuple[Rollout, dict]:
    """Steps 1-6 on the global batch `prompts`, sampled with `seed`, stepping the `scheduler` if
    any: the whole rollout and the step's stats (the history's columns but `step` and gold)."""
    start = time.perf_counter()
    # Steps 1-2 on this rank's shard of the prompts, then the whole batch on every rank.
    rows = dist.shard_slice(len(prompts), accelerator)
    batch = gather_rollout(accelerator, collect_rollout(
        accelerator.unwrap_model(model), reference, reward, tokenizer, prompts[rows], cfg,
        accelerator.device, accelerator.autocast, seed=seed, first_row=rows.start),
        tokenizer.pad_token_id)
    # Steps 3-4: shaped rewards, advantages.
    advantages, returns, non_score = advantages_and_returns(batch, cfg, kl_ctl.value)
    # Step 5: the PPO epochs.
    update = ppo_update(model, optimizer, accelerator, batch, advantages, returns, cfg,
                        ptx_batches, minibatch_generator, grad_accum, kl_ctl.value)
    if scheduler is not None:
        scheduler.step()
    kl = rl.per_token_kl(batch.logprobs, batch.ref_logprobs)  # (B, R) k1, 0 at padding
    stats = {
        "objective/kl": kl.sum(1).mean().item(),
        "objective/kl_coef": kl_ctl.value,
        "objective/entropy": (-batch.logprobs.masked_fill(~batch.mask, 0)).sum(1).mean().item(),
        "objective/non_score_reward": non_score.sum(1).mean().item(),
        "objective/rlhf_reward": (batch.scores + non_score.sum(1)).mean().item(),
        "objective/scores": batch.scores.mean().item(),
        "policy/approxkl_avg": update["approxkl"],
        "policy/clipfrac_avg": update["clipfrac"],
        "policy/entropy_avg": update["entropy"],
        "loss/policy_avg": update["pg_loss"],
        "val/ratio": update["ratio"],
        "val/ratio_var": update["ratio_var"],
        "val/num_eos_tokens": float(batch.has_eos.sum().item()),
        "val/response_length": batch.mask.sum(1).float().mean().item(),
        "lr": scheduler.get_last_lr()[0] if scheduler else optimizer.param_groups[0]["lr"],
        "eps": len(prompts) / (time.perf_counter() - start),
    }
    for key, name in (("vf_loss", "loss/value_avg"), ("vf_clipfrac", "val/clipfrac_avg"),
                      ("ptx_loss", "loss/ptx_avg"), ("kl_loss", "loss/kl_avg")):
        if key in update:
            stats[name] = update[key]
    # Step 6: adapt beta to the KL just measured.
    kl_ctl.update(stats["objective/kl"], len(prompts))
    return batch, stats


def gold_reward_fn(params: Params) -> Optional[Callable[[str, str], float]]:
    """The gold reward where the task has one (the builtin task); None otherwise."""
    return builtin_sort.gold_score if params.data.source == "builtin" else None


def text_scorer(params: Params, paths: Paths) -> Optional[rewards.TextScorer]:
    """What scores responses as text by `ppo.reward`: the gold verifier or the user's
    function; None for the reward model."""
    if params.ppo.reward == "model":
        return None
    if params.ppo.reward == "gold":
        gold = gold_reward_fn(params)  # not None: the params refuse gold without a verifier
        return lambda prompts, responses: [gold(p, r) for p, r in zip(prompts, responses)]
    return rewards.load_function(params.ppo.reward_function, paths.root)


class PromptBatches:
    """Endless shuffled batches of prompts, a new permutation each pass; its position and
    generator state go into checkpoints, so a resumed run sees the same batches."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int):
        self.prompts, self.batch_size = prompts, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def __next__(self) -> list[str]:
        if self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            self.position = 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.prompts[i] for i in batch]

    def state_dict(self) -> dict:
        return {"generator": ckpt.generator_state(self.generator), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        ckpt.set_generator_state(self.generator, state["generator"])
        self.order, self.position = state["order"], state["position"]


def load_models(params: Params, paths: Paths):
    """(tokenizer, policy+value, reference, reward model, reference sha256). The reward
    model is None when `ppo.reward` is not the model: it is then loaded only as the value
    model's initialisation, or not at all by a critic-free estimator."""
    trust, cfg = params.model.trust_remote_code, params.model
    require_model(paths.sft, produced_by="sft")
    if uses_reward_model(params):
        reward_stage.verify(paths.reward)
    reference_hash = reference_stage.verify(paths.reference)
    tokenizer = load_tokenizer(paths.sft, trust)
    if cfg.lora:
        return (tokenizer, *load_lora_models(params, paths), reference_hash)
    policy = load_policy(params, paths)
    reference = load_causal_lm(paths.reference, trust).eval().requires_grad_(False)
    reward_model = (ScalarHeadModel.load(paths.reward, trust).eval().requires_grad_(False)
                    if params.ppo.reward == "model" else None)
    value_model = (ScalarHeadModel.load(paths.reward, trust)
                   if value_from_reward_model(params) else None)
    if value_model is not None:
        lora.prepare_for_training(value_model.trunk, cfg)
    for module in (reference, reward_model, value_model):
        if module is not None:
            lora.disable_dropout(module)
    return (tokenizer, PolicyAndValue(policy, value_model, params.ppo.critic), reference,
            reward_model, reference_hash)


def load_policy(params: Params, paths: Paths) -> nn.Module:
    """The policy as PPO starts it, dropout off: the SFT model, or with LoRA adapters on the
    reference's (sha256-verified) weights."""
    trust, cfg = params.model.trust_remote_code, params.model
    if cfg.lora:
        base = lora.prepare_for_training(load_causal_lm(paths.reference, trust), cfg)
        return lora.disable_dropout(lora.add_adapters(base, cfg, "CAUSAL_LM"))
    return lora.disable_dropout(lora.prepare_for_training(load_causal_lm(paths.sft, trust), cfg))


def shard_models(accelerator, model: PolicyAndValue, reference, reward_model) -> None:
    """Each model PPO calls directly sharded on its own (`Engine.shard`), or moved to the
    device: the policy (which also generates), the value model or head, the frozen reference
    (with LoRA: the policy itself) and the reward model."""
    accelerator.shard(model.policy, "generate")
    for part in (model.value_model, getattr(model, "value_head", None)):
        if part is not None:
            accelerator.shard(part)
    if not isinstance(reference, AdaptersDisabled):
        accelerator.shard(reference)
    if reward_model is not None:
        accelerator.shard(reward_model, "score")


def value_from_reward_model(params: Params) -> bool:
    return params.ppo.critic and params.ppo.value_model == "reward"


def uses_reward_model(params: Params) -> bool:
    """Whether PPO reads models/reward: for its scores or to initialise its value model."""
    return params.ppo.reward == "model" or value_from_reward_model(params)


def load_lora_models(params: Params, paths: Paths):
    """LoRA: the policy is adapters on the reference's (sha256-verified) weights, and the
    reference is the policy with its adapters off; a value model copied from the reward
    model is adapters on the reward model, whose score is its trunk with the adapters off."""
    trust, cfg = params.model.trust_remote_code, params.model
    policy = load_policy(params, paths)
    reference = AdaptersDisabled(policy)
    scored_by_model = params.ppo.reward == "model"
    if value_from_reward_model(params):
        value_model = ScalarHeadModel.load(paths.reward, trust)
        lora.prepare_for_training(value_model.trunk, cfg)
        value_model.trunk = lora.add_adapters(value_model.trunk, cfg)
        lora.disable_dropout(value_model)
        reward_model = value_model.base_scorer().eval() if scored_by_model else None
    else:
        value_model = None
        reward_model = (lora.disable_dropout(
            ScalarHeadModel.load(paths.reward, trust).eval().requires_grad_(False))
            if scored_by_model else None)
    return PolicyAndValue(policy, value_model, params.ppo.critic), reference, reward_model


def reward_inputs(params: Params, paths: Paths) -> list[Path]:
    """The files PPO's rewards come from: the reward model, and a reward function's module."""
    inputs = [paths.reward] if uses_reward_model(params) else []
    if params.ppo.reward_function:
        inputs.append(rewards.module_file(params.ppo.reward_function, paths.root))
    return inputs


FINGERPRINT_PARAMS = ("data.source", "model", "train", "ppo")
"""The params a PPO checkpoint must agree on to be resumed."""


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    cfg = params.ppo
    prompts = [row["prompt"] for row in read_jsonl(paths.prepared / "rl_prompts.jsonl",
                                                    produced_by="prepare")]
    prompts_per_batch = cfg.batch_size // cfg.num_generations
    if len(prompts) < prompts_per_batch:
        raise DataError(f"{len(prompts)} RL prompts are fewer than the {prompts_per_batch} of a "
                        "rollout (ppo.batch_size / ppo.num_generations); lower ppo.batch_size "
                        "or add prompts")
    accelerator = make_accelerator(params.train, seed_offset=2)
    dist.check_batches("ppo", params, accelerator.num_processes)
    device = accelerator.device
    tokenizer, model, reference, reward_model, reference_hash = load_models(params, paths)
    shard_models(accelerator, model, reference, reward_model)
    reward = RewardSource(cfg.reward, reward_model, text_scorer(params, paths))
    gold = gold_reward_fn(params)

    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5,
                      weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, cfg.steps)
    model, optimizer, scheduler = accelerator.prepare_training(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    kl_ctl = (rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else rl.FixedKLController(cfg.kl_coef))
    batches = PromptBatches(prompts, prompts_per_batch, params.train.seed)
    shuffle = torch.Generator().manual_seed(params.train.seed + 3)
    ptx_generator = torch.Generator().manual_seed(params.train.seed + 4)
    ptx_batches = (make_ptx_batches(params, paths, tokenizer, device, ptx_generator)
                   if cfg.ptx_coef > 0 else None)

    # Resume from the newest checkpoint of an interrupted run with the same params and inputs.
    checkpoints = ckpt.Checkpoints(
        paths.checkpoints / "ppo",
        ckpt.fingerprint(params.flat(), FINGERPRINT_PARAMS,
                         [paths.prepared / "rl_prompts.jsonl", paths.prepared / "sft.jsonl",
                          paths.sft, paths.reference, *reward_inputs(params, paths)], paths.root),
        params.train.checkpoint_keep, tracking_run_id=getattr(logger, "run_id", None))
    history: list[dict] = []
    first_step = 1
    resumed = checkpoints.resume(accelerator)
    if resumed is not None:
        kl_ctl.load_state_dict(resumed["kl_controller"])
        batches.load_state_dict(resumed["prompt_batches"])
        ckpt.set_generator_state(shuffle, resumed["minibatch_generator"])
        ckpt.set_generator_state(ptx_generator, resumed["ptx_generator"])
        history, first_step = resumed["history"], resumed["step"] + 1

    with progress_bar("ppo", cfg.steps, completed=first_step - 1) as bar:
        for step in range(first_step, cfg.steps + 1):
            group = [p for p in next(batches) for _ in range(cfg.num_generations)]
            batch, stats = ppo_iteration(
                model, reference, reward, tokenizer, optimizer, accelerator, cfg,
                group, kl_ctl=kl_ctl, minibatch_generator=shuffle,
                seed=derive_seed(params.train.seed, "ppo", step), scheduler=scheduler,
                ptx_batches=ptx_batches, grad_accum=params.train.grad_accum)
            row = {"step": step, **stats}
            if gold is not None and step % cfg.gold_every == 0:
                golds = [gold(p, t) for p, t in zip(batch.prompts, batch.texts)]
                row["objective/gold_reward"] = sum(golds) / len(golds)
                row["objective/gold_exact"] = sum(g == 1.0 for g in golds) / len(golds)
            history.append(row)
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            if step % cfg.log_completions_every == 0 or step == cfg.steps:
                logger.log_table("ppo_completions", completions_table(batch, gold), step=step)
            loss = row["loss/policy_avg"] + cfg.vf_coef * row.get("loss/value_avg", 0.0)
            bar.advance(f"score {row['objective/scores']:.2f} kl {row['objective/kl']:.2f} "
                        f"loss {loss:.3f}"
                        + (f" gold {row['objective/gold_reward']:.2f}"
                           if "objective/gold_reward" in row else ""))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoints.save(accelerator, step, {
                    "prompts_seen": step * cfg.batch_size, "history": history,
                    "kl_controller": kl_ctl.state_dict(),
                    "prompt_batches": batches.state_dict(),
                    "minibatch_generator": ckpt.generator_state(shuffle),
                    "ptx_generator": ckpt.generator_state(ptx_generator),
                    "reference_sha256": reference_hash})

    metrics = {**summarise(history), "ppo/world_size": float(accelerator.num_processes)}
    policy = accelerator.whole(unwrapped.policy, lambda: load_policy(params, paths))
    if accelerator.is_main_process:
        with atomic_dir(paths.policy) as out:
            lora.restore_config(lora.merged(policy)).save_pretrained(out)
            tokenizer.save_pretrained(out)
        write_history(paths.metrics / "ppo_history.csv", history)
        write_json(paths.metrics_file("ppo"), {**metrics, "ppo/sharding": accelerator.sharding})
    checkpoints.finish(accelerator)
    logger.log_metrics({f"ppo_final/{k.replace('/', '_')}": v for k, v in metrics.items()})
    return metrics


def make_ptx_batches(params: Params, paths: Paths, tokenizer, device,
                     generator: torch.Generator) -> Callable[[], dict]:
    """Endless minibatches of SFT demonstrations for the ptx term, drawn with `generator`."""
    rows = read_jsonl(paths.prepared / "sft.jsonl", produced_by="prepare")
    examples = [encode_sft(tokenizer, r["prompt"], r["completion"]) for r in rows]
    size = params.ppo.batch_size // params.ppo.num_minibatches

    def next_batch() -> dict:
        index = torch.randint(len(examples), (size,), generator=generator).tolist()
        batch = collate_sft([examples[i] for i in index], tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in batch.items()}

    return next_batch


def completions_table(batch: Rollout, gold, rows: int = 16) -> list[dict]:
    """A few of the rollout's samples with their scores: how people catch reward hacking."""
    table = []
    for prompt, text, score in list(zip(batch.prompts, batch.texts, batch.scores.tolist()))[:rows]:
        row = {"prompt": prompt, "response": text, "rm_score": round(score, 4)}
        if gold is not None:
            row["gold"] = gold(prompt, text)
        table.append(row)
    return table


def summarise(history: list[dict], window: int = 10) -> dict:
    """Final figures: means over the last `window` steps, and where the gold curve peaked."""
    tail = history[-window:]
    keys = [k for k in history[-1] if k != "step"]
    summary = {k: sum(row[k] for row in tail if k in row) / max(1, sum(k in row for row in tail))
               for k in keys}
    summary["steps"] = float(len(history))
    golds = [(row["objective/gold_reward"], row["step"]) for row in history
             if "objective/gold_reward" in row]
    if golds:
        summary["objective/gold_reward_first"] = golds[0][0]
        best = max(golds)
        summary["objective/gold_reward_best"], summary["objective/gold_reward_best_step"] = best
    return summary


def write_history(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)] + [",".join(f"{row[k]:.6g}" if k in row else "" for k in keys)
                                for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")
