"""rlhf.rl_math against numbers worked out by hand (the arithmetic is in the comments)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from rlhf import rl_math as rl

PAD = 0
EOS = 2


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual, expected)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # all valid: (1 + 2 + 3 + 4 + 6) / 5 = 16 / 5
    close(rl.masked_mean(x, mask), 3.2)
    # per row: (1 + 2 + 3) / 3 = 2, (4 + 6) / 2 = 5
    close(rl.masked_mean(x, mask, dim=1), [2.0, 5.0])
    # per column: (1+4)/2, (2+6)/2, 3/1, (nothing valid -> 0/0 = nan)
    per_col = rl.masked_mean(x, mask, dim=0)
    close(per_col[:3], [2.5, 4.0, 3.0])
    assert torch.isnan(per_col[3])
    # a 0/1 float mask works the same as a bool mask
    close(rl.masked_mean(x, mask.float()), 3.2)


def test_masked_var_with_and_without_bessel():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, squared deviations 1, 0, 1 -> sum 2; biased 2/3, unbiased 2/(3-1) = 1
    close(rl.masked_var(x, mask), 1.0)
    close(rl.masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    with pytest.raises(ValueError):
        rl.masked_var(x, torch.tensor([[True, False, False, False]]))


def test_masked_whiten_of_a_single_valid_entry_only_centres_it():
    x = torch.tensor([[3.0, 100.0]])
    mask = torch.tensor([[True, False]])
    close(rl.masked_whiten(x, mask), [[0.0, 97.0]])  # the pad through the same shift
    close(rl.masked_whiten(x, mask, shift_mean=False), [[3.0, 100.0]])


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8) = [-1, 0, 1] on valid tokens
    out = rl.masked_whiten(x, mask)
    close(out[0, :3], [-1.0, 0.0, 1.0])
    # documented: the pad goes through the same affine map, (100 - 2) / 1 = 98
    close(out[0, 3], 98.0, tol=1e-5)
    # shift_mean=False adds the mean back: [-1, 0, 1] + 2 = [1, 2, 3]
    close(rl.masked_whiten(x, mask, shift_mean=False)[0, :3], [1.0, 2.0, 3.0])

    y = torch.tensor([[2.0, 4.0], [6.0, 8.0]])
    # mean 5, deviations -3, -1, 1, 3, squares 9 + 1 + 1 + 9 = 20, unbiased var 20 / 3
    std = math.sqrt(20.0 / 3.0)
    close(rl.masked_whiten(y, torch.ones_like(y, dtype=torch.bool)),
          [[-3 / std, -1 / std], [1 / std, 3 / std]])


# --------------------------------------------------------------------------- logits


def test_logprobs_from_logits_by_hand():
    # row 0: logits [0, ln 3] -> softmax [1/4, 3/4]; row 1: uniform over 2 -> 1/2 each
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    close(rl.logprobs_from_logits(logits, tokens), [[math.log(0.75), math.log(0.5)]])
    close(rl.logprobs_from_logits(logits, torch.tensor([[0, 1]])),
          [[math.log(0.25), math.log(0.5)]])


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],
                            [0.0, math.log(3.0), -1e9, -1e9],
                            [0.0, 1000.0, 0.0, 0.0]]])  # (1, 3, 4)
    # uniform over 4: ln 4
    # p = [1/4, 3/4, 0, 0]: -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3 = 0.562335...
    # one logit 1000 above the rest: a point mass, entropy 0 (and no nan/inf)
    close(rl.entropy_from_logits(logits),
          [[math.log(4.0), math.log(4.0) - 0.75 * math.log(3.0), 0.0]], tol=1e-5)


# --------------------------------------------------------------------------- EOS and padding


def test_first_true_indices():
    bools = torch.tensor([[False, True, False, True],
                          [False, False, False, False],
                          [True, False, False, False]])
    # first True at 1; none -> T = 4; first True at 0
    assert rl.first_true_indices(bools).tolist() == [1, 4, 0]


def test_response_lengths_and_mask():
    responses = torch.tensor([[5, EOS, 7, 8],    # early EOS at index 1 -> 2 tokens
                              [5, 6, 7, 8],      # no EOS -> full width 4
                              [EOS, 0, 0, 0],    # EOS first -> 1 token
                              [5, 6, 7, EOS]])   # EOS last -> 4
    lengths = rl.response_lengths(responses, EOS)
    assert lengths.tolist() == [2, 4, 1, 4]
    mask = rl.mask_from_lengths(lengths, 4)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False, False],
                             [True, True, True, True],
                             [True, False, False, False],
                             [True, True, True, True]]
    assert rl.mask_from_lengths(torch.tensor([0, 3]), 3).tolist() == [[False] * 3, [True] * 3]


def test_truncate_after_eos():
    responses = torch.tensor([[5, EOS, 7, EOS],   # everything after the FIRST EOS -> pad
                              [5, 6, 7, 8],       # no EOS: unchanged
                              [EOS, 9, 9, 9],
                              [5, 6, 7, EOS]])
    out = rl.truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[5, EOS, PAD, PAD],
                            [5, 6, 7, 8],
                            [EOS, PAD, PAD, PAD],
                            [5, 6, 7, EOS]]
    assert responses[0].tolist() == [5, EOS, 7, EOS]  # input not modified


# --------------------------------------------------------------------------- rewards and GAE


def test_per_token_kl_is_zero_on_invalid_logprob_padding():
    inv = rl.INVALID_LOGPROB
    logprobs = torch.tensor([[-1.0, -2.0, inv]])
    ref = torch.tensor([[-1.5, -1.0, inv]])
    # -1 - (-1.5) = 0.5, -2 - (-1) = -1, 1 - 1 = 0
    close(rl.per_token_kl(logprobs, ref), [[0.5, -1.0, 0.0]])


def test_shape_rewards_by_hand():
    kl = torch.tensor([[0.5, -1.0, 0.2, 0.0],
                       [0.1, 0.3, 0.4, 0.2]])
    scores = torch.tensor([2.0, -1.0])
    lengths = torch.tensor([3, 4])
    rewards, non_score = rl.shape_rewards(kl, scores, lengths, kl_coef=0.1)
    # non_score = -0.1 * kl
    close(non_score, [[-0.05, 0.1, -0.02, 0.0],
                      [-0.01, -0.03, -0.04, -0.02]])
    # row 0: score 2 at index 3 - 1 = 2 -> -0.02 + 2 = 1.98
    # row 1: score -1 at index 4 - 1 = 3 -> -0.02 - 1 = -1.02
    close(rewards, [[-0.05, 0.1, 1.98, 0.0],
                    [-0.01, -0.03, -0.04, -1.02]])


def test_shape_rewards_score_lands_on_early_eos():
    raw = torch.tensor([[5, EOS, 7, 8],        # EOS at 1, then garbage
                        [5, 6, 7, 8]])         # no EOS
    responses = rl.truncate_after_eos(raw, EOS, PAD)
    lengths = rl.response_lengths(responses, EOS)  # [2, 4]
    mask = rl.mask_from_lengths(lengths, 4)
    inv = rl.INVALID_LOGPROB
    logprobs = torch.tensor([[-1.0, -0.5, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -0.5, 0.0, 0.0], [-1.0, -1.0, -1.0, -3.0]])
    logprobs = logprobs.masked_fill(~mask, inv)
    ref = ref.masked_fill(~mask, inv)
    kl = rl.per_token_kl(logprobs, ref)
    # row 0: [1, 0, pad 0, pad 0]; row 1: [0, 0, 0, 2]
    close(kl, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    rewards, _ = rl.shape_rewards(kl, torch.tensor([3.0, 1.0]), lengths, kl_coef=0.5)
    # row 0: -0.5 * [1, 0, 0, 0] and score 3 on the EOS at index 1 -> [-0.5, 3, 0, 0]
    # row 1: -0.5 * [0, 0, 0, 2] and score 1 on index 3 -> [0, 0, 0, -1 + 1 = 0]
    close(rewards, [[-0.5, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_gae_gamma_1_lam_half_with_padding():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])  # 9 and 7 are pad garbage
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # V after the last valid token is 0:
    # delta_2 = 2 + 1*0   - 1.5 = 0.5
    # delta_1 = 0 + 1*1.5 - 1.0 = 0.5
    # delta_0 = 1 + 1*1.0 - 0.5 = 1.5
    # A_2 = 0.5
    # A_1 = 0.5 + 0.5 * 0.5   = 0.75
    # A_0 = 1.5 + 0.5 * 0.75  = 1.875
    close(adv, [[1.875, 0.75, 0.5, 0.0]])
    # returns = A + V: 1.875 + 0.5, 0.75 + 1, 0.5 + 1.5, pad 0
    close(ret, [[2.375, 1.75, 2.0, 0.0]])


def test_gae_lam_one_is_discounted_return_and_lam_zero_is_td():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    # delta_1 = 1 + 0 - 0.4 = 0.6; delta_0 = 0 + 0.9*0.4 - 0.2 = 0.16
    # A_1 = 0.6; A_0 = 0.16 + 0.9*1*0.6 = 0.7
    close(adv, [[0.7, 0.6]])
    # returns: Monte-Carlo discounted returns 0 + 0.9*1 = 0.9 and 1
    close(ret, [[0.9, 1.0]])

    # lam = 0: A_t = delta_t (0 ** 0 = 1 on the diagonal, 0 elsewhere)
    adv0, _ = rl.gae(torch.tensor([[1.0, 0.0, 2.0, 9.0]]), torch.tensor([[0.5, 1.0, 1.5, 7.0]]),
                     torch.tensor([[True, True, True, False]]), gamma=1.0, lam=0.0)
    close(adv0, [[1.5, 0.5, 0.5, 0.0]])


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Plain reverse loop per sample, straight from the GAE definition."""
    batch, width = rewards.shape
    adv = torch.zeros(batch, width, dtype=torch.float64)
    for b in range(batch):
        last = 0.0
        for t in reversed(range(int(lengths[b]))):
            next_value = float(values[b, t + 1]) if t + 1 < lengths[b] else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = adv + values.double() * (torch.arange(width)[None, :] < lengths[:, None])
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_reverse_loop_on_random_padded_data(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    batch, width = 6, 9
    rewards = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    mask = rl.mask_from_lengths(lengths, width)
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, lengths, gamma, lam)
    close(adv, ref_adv, tol=1e-10)
    close(ret, ref_ret, tol=1e-10)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


# --------------------------------------------------------------------------- KL estimators and
# --------------------------------------------------------------------------- critic-free advantages


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, rl.INVALID_LOGPROB]])
    ref = torch.tensor([[-1.5, -1.0, rl.INVALID_LOGPROB]])
    # log r = ref - logp = [-0.5, 1.0, 0 at padding]
    close(rl.kl_estimate(logprobs, ref, "k1"), [[0.5, -1.0, 0.0]])  # -log r
    close(rl.kl_estimate(logprobs, ref, "k2"), [[0.125, 0.5, 0.0]])  # (log r)^2 / 2
    # (r - 1) - log r: e^-0.5 - 1 + 0.5 = 0.1065306597; e - 1 - 1 = 0.7182818285
    close(rl.kl_estimate(logprobs, ref, "k3"), [[0.1065306597, 0.7182818285, 0.0]], tol=1e-7)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        rl.kl_estimate(logprobs, ref, "k4")


def _loop_group_advantages(rewards, n, scale, eps=1e-4):
    out = []
    for start in range(0, len(rewards), n):
        group = rewards[start:start + n]
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


def test_group_advantages_with_and_without_the_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    # groups [1, 2] and [3, 6]: means 1.5, 4.5; stds sqrt(0.5), sqrt(4.5)
    close(rl.group_advantages(rewards, 2, scale=False), [-0.5, 0.5, -1.5, 1.5])
    close(rl.group_advantages(rewards, 2), [-0.5 / (math.sqrt(0.5) + 1e-4),
                                            0.5 / (math.sqrt(0.5) + 1e-4),
                                            -1.5 / (math.sqrt(4.5) + 1e-4),
                                            1.5 / (math.sqrt(4.5) + 1e-4)])
    random = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (2, 3, 4):
        for scale in (True, False):
            close(rl.group_advantages(random, n, scale),
                  _loop_group_advantages(random.tolist(), n, scale), tol=1e-9)


def test_a_group_whose_rewards_are_equal_gets_zero_advantages():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.5])
    advantages = rl.group_advantages(rewards, 3)
    assert torch.isfinite(advantages).all()
    close(advantages[:3], [0.0, 0.0, 0.0])
    close(rl.leave_one_out_advantages(rewards, 3)[:3], [0.0, 0.0, 0.0])


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    # 1 - (2 + 3) / 2 = -1.5; 2 - (1 + 3) / 2 = 0; 3 - (1 + 2) / 2 = 1.5
    # 0 - (0 + 6) / 2 = -3;   0 - 3 = -3;         6 - 0 = 6
    close(rl.leave_one_out_advantages(rewards, 3), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    random = torch.rand(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = []
    for start in range(0, 8, 4):
        group = random[start:start + 4].tolist()
        expected += [r - (sum(group) - r) / 3 for r in group]
    close(rl.leave_one_out_advantages(random, 4), expected, tol=1e-12)


def test_reinforce_pp_whitens_returns_to_go_over_the_batch():
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [-0.3, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    gamma = 0.5
    returns = []  # G_t = r_t + gamma G_{t+1}, by a reverse loop over each row's valid tokens
    for row, valid in zip(rewards.tolist(), mask.tolist()):
        g, out = 0.0, [0.0] * len(row)
        for t in reversed(range(len(row))):
            if valid[t]:
                g = row[t] + gamma * g
                out[t] = g
        returns.append(out)
    # [[-0.1 + 0.5 * (-0.2 + 0.5), -0.2 + 0.5, 1.0], [-0.3 + 1.0, 2.0, -]]
    assert returns[0] == pytest.approx([0.05, 0.3, 1.0]) and returns[1][:2] == pytest.approx([0.7, 2.0])
    valid = [g for row, m in zip(returns, mask.tolist()) for g, v in zip(row, m) if v]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((g - mean) ** 2 for g in valid) / (len(valid) - 1) + 1e-8)
    expected = [[(g - mean) / std if v else 0.0 for g, v in zip(row, m)]
                for row, m in zip(returns, mask.tolist())]
    close(rl.reinforce_pp_advantages(rewards, mask, gamma), expected, tol=1e-7)


def test_sequence_advantages_go_on_every_valid_token():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    close(rl.sequence_advantages_to_tokens(torch.tensor([2.0, -1.0]), mask),
          [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_has_the_gradient_worked_out_by_hand(estimator):
    new = torch.tensor([[-1.0, -2.0, rl.INVALID_LOGPROB]], dtype=torch.float64,
                       requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, rl.INVALID_LOGPROB]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    rl.masked_mean(rl.kl_estimate(new, ref, estimator), mask).backward()
    # d/d new of: k1 = new - ref -> 1; k2 = (ref - new)^2 / 2 -> new - ref;
    # k3 = e^(ref - new) - 1 - (ref - new) -> 1 - e^(ref - new); each over 2 valid tokens.
    by_hand = []
    for n, r in ((-1.0, -1.5), (-2.0, -1.0)):
        by_hand.append({"k1": 1.0, "k2": n - r, "k3": 1.0 - math.exp(r - n)}[estimator] / 2)
    close(new.grad, [by_hand + [0.0]], tol=1e-12)


# --------------------------------------------------------------------------- PPO losses


def test_policy_loss_clipping_on_both_signs_of_advantage():
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, rl.INVALID_LOGPROB]])
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, math.exp(5.0)]])
    new = (old + torch.log(ratios)).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 100.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = rl.policy_loss(new, old, adv, mask, cliprange=0.2)
    # t0: r 1.5, A +1: -1.5 vs -1*1.2 = -1.2 -> -1.2 (clipped larger)
    # t1: r 0.5, A +1: -0.5 vs -1*0.8 = -0.8 -> -0.5
    # t2: r 0.5, A -2:  1.0 vs  2*0.8 =  1.6 ->  1.6 (clipped larger)
    # t3: r 1.5, A -2:  3.0 vs  2*1.2 =  2.4 ->  3.0
    # loss = (-1.2 - 0.5 + 1.6 + 3.0) / 4 = 2.9 / 4
    close(out.loss, 0.725)
    close(out.clipfrac, 0.5)  # 2 of 4
    # approxkl = 0.5 * mean(ln1.5^2, ln0.5^2, ln0.5^2, ln1.5^2) = (ln1.5^2 + ln2^2) / 4
    close(out.approxkl, (math.log(1.5) ** 2 + math.log(2.0) ** 2) / 4)
    # ratio mean (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1; unbiased var 4 * 0.25 / 3 = 1/3
    close(out.ratio_mean, 1.0)
    close(out.ratio_var, 1.0 / 3.0)
    out.loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens, 0 on clipped ones and padding, over 4 tokens:
    # t1: -1 * 0.5 / 4 = -0.125; t3: 2 * 1.5 / 4 = 0.75
    close(new.grad, [[0.0, -0.125, 0.0, 0.75, 0.0]])


def test_policy_loss_on_policy_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, rl.INVALID_LOGPROB]])
    out = rl.policy_loss(logp, logp, torch.tensor([[1.0, 3.0, 50.0]]),
                         torch.tensor([[True, True, False]]), cliprange=0.2)
    # ratio 1 everywhere: loss = -(1 + 3) / 2 = -2, nothing clipped, no KL, no variance
    close(out.loss, -2.0)
    close(out.clipfrac, 0.0)
    close(out.approxkl, 0.0)
    close(out.ratio_mean, 1.0)
    close(out.ratio_var, 0.0)
    # a single valid token: ratio_var is reported as 0 rather than raising
    one = rl.policy_loss(logp, logp, torch.ones(1, 3), torch.tensor([[True, False, False]]), 0.2)
    close(one.ratio_var, 0.0)


def test_value_loss_clipping_by_hand():
    vpred = torch.tensor([[1.0, 0.0, 2.0, 2.0, 50.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.1, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = rl.value_loss(vpred, old, returns, mask, cliprange_value=0.2)
    # t0: clamp(1, 0.3, 0.7) = 0.7: (1-1)^2 = 0    vs (0.7-1)^2 = 0.09 -> 0.09 (clipped larger)
    # t1: clamp(0, -0.1, 0.3) = 0: (0-1)^2 = 1     vs (0-1)^2   = 1    -> 1    (equal, not counted)
    # t2: clamp(2, 0.8, 1.2) = 1.2: (2-3)^2 = 1    vs (1.2-3)^2 = 3.24 -> 3.24 (clipped larger)
    # t3: clamp(2, 0.8, 1.2) = 1.2: (2-0)^2 = 4    vs (1.2-0)^2 = 1.44 -> 4
    # loss = 0.5 * (0.09 + 1 + 3.24 + 4) / 4 = 0.5 * 8.33 / 4 = 1.04125
    close(out.loss, 1.04125)
    close(out.clipfrac, 0.5)
    out.loss.backward()
    # gradient 0.5 * 2 (V - R) / 4 on unclipped winners; 0 where the clamped term wins:
    # t1: (0 - 1) / 4 = -0.25 (a tie, but the clamp is inactive so both terms agree)
    # t3: (2 - 0) / 4 = 0.5
    close(vpred.grad, [[0.0, -0.25, 0.0, 0.5, 0.0]])


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_by_hand():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert math.isclose(rl.pass_at_k(5, 2, 2), 0.7)
    # n=5, c=1, k=1: 1 - C(4,1)/C(5,1) = 1 - 4/5 = 0.2 (pass@1 = c/n)
    assert math.isclose(rl.pass_at_k(5, 1, 1), 0.2)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert math.isclose(rl.pass_at_k(10, 3, 5), 11 / 12)
    # n - c = 1 < k = 2: every 2-subset contains a correct sample
    assert rl.pass_at_k(5, 4, 2) == 1.0
    assert rl.pass_at_k(5, 0, 2) == 0.0
    # k = n: 1 as soon as one sample is correct
    assert rl.pass_at_k(4, 1, 4) == 1.0
    # large n stays finite: n=200, c=1, k=1 -> 1/200
    assert math.isclose(rl.pass_at_k(200, 1, 1), 0.005)
    with pytest.raises(ValueError):
        rl.pass_at_k(3, 1, 4)


def test_pass_at_k_array_mean_over_problems():
    # (0.7 + 0 + 1) / 3 for c = 2, 0, 5 at n=5, k=2
    assert math.isclose(rl.pass_at_k_array(5, [2, 0, 5], 2), 1.7 / 3)
    assert math.isclose(rl.pass_at_k_array(5, np.array([2, 4]), 2), (0.7 + 1.0) / 2)
    # k = 1: mean of c / n = (1/4 + 3/4) / 2 = 0.5
    assert isinstance(rl.pass_at_k_array(4, [1, 3], 1), float)
    assert math.isclose(rl.pass_at_k_array(4, [1, 3], 1), 0.5)
    with pytest.raises(ValueError):
        rl.pass_at_k_array(2, [1, 1], 3)


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_steps_by_hand():
    ctl = rl.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5 -> clipped to 0.2; 0.1 * (1 + 0.2 * 1000/10000) = 0.1 * 1.02 = 0.102
    assert math.isclose(ctl.update(9.0, 1000), 0.102)
    assert math.isclose(ctl.value, 0.102)
    # KL 5.4: 5.4/6 - 1 = -0.1 (inside the clip); 0.102 * (1 - 0.1 * 500/10000) = 0.102 * 0.995
    assert math.isclose(ctl.update(5.4, 500), 0.10149)
    # KL 0: -1 -> clipped to -0.2; 0.10149 * (1 - 0.2 * 10000/10000) = 0.10149 * 0.8 = 0.081192
    assert math.isclose(ctl.update(0.0, 10000), 0.081192)


def test_kl_controllers_serialise_round_trip():
    ctl = rl.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert state == dataclasses.asdict(ctl)
    assert state.keys() == {"value", "target", "horizon"}
    assert math.isclose(state["value"], 0.102) and state["target"] == 6.0
    assert state["horizon"] == 10000
    fresh = rl.AdaptiveKLController(value=1.0, target=1.0, horizon=1)
    fresh.load_state_dict(state)
    assert fresh == ctl

    fixed = rl.FixedKLController(value=0.05)
    # a no-op, whatever the KL
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05
    assert fixed.state_dict() == dataclasses.asdict(fixed) == {"value": 0.05}
    other = rl.FixedKLController(value=9.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other == fixed
