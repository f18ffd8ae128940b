"""The RL math of PPO-RLHF as small pure functions over tensors.

Conventions: B = batch, T = response length, V = vocabulary. `mask` is (B, T), True (or 1)
on valid (non-padding) response tokens, the EOS included when one was emitted; responses are
right-padded, so `mask` is a prefix mask per row. Every mean is taken over valid tokens only.
Names and formulas follow InstructGPT, "The N+ implementation details of RLHF with PPO" and
TRL; the critic-free estimators follow GRPO (DeepSeekMath), Dr. GRPO, RLOO (Ahmadian et al.
2024) and REINFORCE++ (Hu 2025), the KL estimators Schulman's "Approximating KL divergence".
Nothing here loops over tokens or samples in Python.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Filled into padded log-prob positions of both policy and reference, so their KL is 0 there.
INVALID_LOGPROB = 1.0


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is true; over everything (scalar) or along `dim`."""
    maskf = mask.to(x.dtype)
    if dim is None:
        return (x * maskf).sum() / maskf.sum()  # ()
    return (x * maskf).sum(dim) / maskf.sum(dim)  # x.shape without `dim`


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over valid entries (scalar); `unbiased` applies Bessel's correction n/(n-1)
    with n the number of valid entries, like N+/TRL. Raises ValueError if n < 2 (unbiased)."""
    mean = masked_mean(x, mask)  # ()
    variance = masked_mean((x - mean) ** 2, mask)  # ()
    if unbiased:
        count = mask.to(x.dtype).sum()
        if count < 2:
            raise ValueError("masked_var(unbiased=True) needs at least two valid entries")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with mean and (unbiased) var over valid entries only.

    With shift_mean=False the mean is added back (only the scale changes). Invalid positions
    go through the same affine map, so they hold garbage-but-finite values: callers mask them.
    With one valid entry there is no variance: it is only centred (to 0; unchanged with
    shift_mean=False), as a batch of one one-token response needs.
    """
    mean = masked_mean(x, mask)  # ()
    if mask.sum() < 2:
        return x - mean if shift_mean else x
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)  # x.shape
    return whitened if shift_mean else whitened + mean


# --------------------------------------------------------------------------- logits


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the categorical given by `logits`, in float32:
    logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's categorical, logsumexp(l) - sum softmax(l) * l:
    (B, T, V) -> (B, T), float32."""
    logits = logits.float()  # (B, T, V)
    probs = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)  # (B, T)


# --------------------------------------------------------------------------- EOS and padding


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row, or the row length T if there is none: (B, T) -> (B,)."""
    width = bools.shape[-1]
    positions = torch.arange(width, device=bools.device).expand_as(bools)  # (B, T)
    return torch.where(bools, positions, torch.full_like(positions, width)).min(-1).values  # (B,)


def response_lengths(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Number of tokens up to and including the first EOS; T when there is no EOS:
    (B, T) -> (B,)."""
    first_eos = first_true_indices(responses == eos_token_id)  # (B,), T if none
    return (first_eos + 1).clamp(max=responses.shape[-1])  # (B,)


def mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) lengths -> (B, width) bool mask, True on the first `length` positions of each row."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (B, width)


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int,
                       pad_token_id: int) -> torch.Tensor:
    """Every token after the first EOS becomes `pad_token_id`; the EOS itself is kept.
    (B, T) -> (B, T); rows without an EOS are unchanged."""
    lengths = response_lengths(responses, eos_token_id)  # (B,)
    keep = mask_from_lengths(lengths, responses.shape[-1])  # (B, T)
    return torch.where(keep, responses, torch.full_like(responses, pad_token_id))  # (B, T)


# --------------------------------------------------------------------------- rewards and GAE


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k1 estimator log pi(a_t|s_t) - log pi_ref(a_t|s_t) per sampled token: (B, T).
    0 at padding when both inputs hold INVALID_LOGPROB there."""
    return logprobs - ref_logprobs  # (B, T)


def shape_rewards(kl: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * KL_t, plus the RM score at t = lengths - 1.

    kl (B, T) must already be 0 at padding; scores (B,); lengths (B,) >= 1 (the last response
    token, the EOS when one was emitted). Returns (rewards, non_score_rewards), both (B, T).
    """
    non_score = -kl_coef * kl  # (B, T)
    last = (lengths.long() - 1).clamp(min=0)  # (B,)
    bonus = torch.zeros_like(non_score).scatter(
        1, last[:, None], scores.to(non_score.dtype)[:, None])  # (B, T), score at `last`
    return non_score + bonus, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over time with a discount matrix.

    rewards and values are zeroed at invalid positions; delta_t = r_t + gamma V_{t+1} - V_t
    with V = 0 after the last valid token (mask is a right-padded prefix mask);
    A_t = sum_l (gamma lam)^l delta_{t+l} = (delta @ M^T)_t with the upper-triangular
    M[t, s] = (gamma lam)^(s - t) for s >= t. Returns (advantages, returns = A + V), both
    (B, T) and 0 at invalid positions.
    """
    maskf = mask.to(rewards.dtype)  # (B, T)
    rewards, values = rewards * maskf, values.to(rewards.dtype) * maskf  # (B, T)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)
    deltas = (rewards + gamma * next_values - values) * maskf  # (B, T)
    steps = torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)  # (T,)
    offsets = steps[None, :] - steps[:, None]  # (T, T): s - t
    discount = torch.where(offsets >= 0, (gamma * lam) ** offsets.clamp(min=0),
                           torch.zeros_like(offsets))  # (T, T), M[t, s]
    advantages = (deltas @ discount.T) * maskf  # (B, T)
    return advantages, (advantages + values) * maskf


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """Schulman's per-token estimators of KL(pi || pi_ref) from tokens sampled from pi, with
    log r = log pi_ref - log pi: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
    k1 is unbiased but can be negative, k3 is unbiased and >= 0 (GRPO's), k2 is >= 0 with
    the KL's gradient. (B, T) -> (B, T); 0 at padding where both inputs hold INVALID_LOGPROB."""
    if estimator == "k1":
        return per_token_kl(logprobs, ref_logprobs)
    log_r = ref_logprobs - logprobs  # (B, T)
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's (unbiased)
    std + eps when `scale` (without: Dr. GRPO). Groups are `group_size` consecutive rows.
    (B,) -> (B,); a group whose rewards are all equal gets 0."""
    groups = rewards.reshape(-1, group_size)  # (B / n, n)
    centred = groups - groups.mean(1, keepdim=True)  # (B / n, n)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)  # (B,)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the other n - 1 rewards of its group
    (`group_size` consecutive rows, n >= 2). (B,) -> (B,)."""
    groups = rewards.reshape(-1, group_size)  # (B / n, n)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)  # (B / n, n)
    return (groups - others).reshape(-1)  # (B,)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: the discounted return-to-go G_t = sum_l gamma^l r_{t+l} of the per-token
    rewards (the KL penalty in them), whitened over every valid token of the whole batch.
    (B, T) -> (B, T), 0 at padding. The return is GAE with V = 0 and lambda = 1."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)  # (B, T)
    return masked_whiten(returns, mask).masked_fill(~mask.bool(), 0.0)


def sequence_advantages_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A critic-free estimator's one advantage per sample on each of its valid tokens:
    (B,), (B, T) -> (B, T), 0 at padding."""
    return advantages[:, None] * mask.to(advantages.dtype)  # (B, T)


# --------------------------------------------------------------------------- PPO losses


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # () differentiable
    clipfrac: torch.Tensor  # () detached
    approxkl: torch.Tensor  # () detached
    ratio_mean: torch.Tensor  # () detached
    ratio_var: torch.Tensor  # () detached, 0 with fewer than two valid tokens


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate, all (B, T) inputs: loss = masked mean of
    max(-A ratio, -A clamp(ratio, 1 - c, 1 + c)) with ratio = exp(new - old); clipfrac is the
    masked fraction where the clipped term is the larger; approxkl = 0.5 masked_mean((new-old)^2).
    """
    log_ratio = new_logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.max(unclipped, clipped), mask)  # ()
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_var = masked_var(ratio, mask) if mask.sum() > 1 else ratio.new_zeros(())
    return PolicyLoss(loss, clipfrac, approxkl, ratio_mean, ratio_var)


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # () differentiable
    clipfrac: torch.Tensor  # () detached


def value_loss(values_pred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float) -> ValueLoss:
    """Clipped value loss, all (B, T) inputs: 0.5 * masked mean of
    max((V - R)^2, (clamp(V, V_old - eps, V_old + eps) - R)^2); clipfrac is the masked
    fraction where the clipped term is the larger."""
    clipped_pred = torch.clamp(values_pred, old_values - cliprange_value,
                               old_values + cliprange_value)  # (B, T)
    unclipped = (values_pred - returns) ** 2  # (B, T)
    clipped = (clipped_pred - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)  # ()
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(unclipped.dtype), mask)
    return ValueLoss(loss, clipfrac)


# --------------------------------------------------------------------------- evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for n samples of which c are correct, in the
    stable product form of Chen et al. (2021): 1 if n - c < k else
    1 - prod_{i=n-c+1}^{n} (1 - k / i). Raises ValueError unless 1 <= k <= n and 0 <= c <= n."""
    return pass_at_k_array(n, [c], k)


def pass_at_k_array(n: int, correct_counts: Sequence[int] | np.ndarray, k: int) -> float:
    """Mean pass@k over problems, each with n samples of which correct_counts[j] are right."""
    n, k = int(n), int(k)
    if k > n:
        raise ValueError(f"pass@k needs k <= n (k={k}, n={n})")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1 (k={k})")
    counts = np.asarray(correct_counts, dtype=np.int64).reshape(-1)  # (P,)
    if counts.size == 0:
        raise ValueError("pass_at_k_array needs at least one problem")
    if (counts < 0).any() or (counts > n).any():
        raise ValueError(f"correct counts must lie in [0, {n}]")
    i = np.arange(1, n + 1, dtype=np.float64)  # (n,)
    in_product = i[None, :] > (n - counts)[:, None]  # (P, n): i in [n-c+1, n]
    fail = np.where(in_product, 1.0 - k / i[None, :], 1.0).prod(axis=1)  # (P,)
    per_problem = np.where(n - counts < k, 1.0, 1.0 - fail)  # (P,)
    return float(per_problem.mean())


# --------------------------------------------------------------------------- KL controllers


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the measured KL approaches `target`.

    update: e = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = float(np.clip(float(current_kl) / self.target - 1.0, -0.2, 0.2))
        self.value = float(self.value * (1.0 + proportional_error * n_steps / self.horizon))
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in fields(self):
            if field.name in state:
                setattr(self, field.name, state[field.name])


@dataclass
class FixedKLController:
    """A constant KL coefficient; update is a no-op that returns it."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
