"""How the time per sample of one PPO iteration scales with response length, batch and model size.

One iteration is `rlhf.stages.ppo.ppo_iteration`, what `ppo.run` does per step: the rollout
(sampling with the KV cache, then the policy+value, reference and reward forwards), reward
shaping, GAE, whitening and the PPO updates. Three one-factor sweeps around a base point
(the builtin model of params.yaml `model.*`, batch 64, 32 new tokens), not the full cube:

- response length: 16, 32, 64, 128 new tokens;
- batch: 16, 64, 256 prompts;
- model size: 0.8M (builtin: 4 layers x 128), ~10M (6 x 384), 85M (GPT-2 small: 12 x 768,
  12 heads; at batch 16, as the table says, or it takes minutes per iteration on a CPU).

The models have random weights (GPT2LMHeadModel from a GPT2Config: policy, an identical
frozen reference, a reward model on its own random trunk) and the builtin task's prompts.
Every response runs the full length: the tokenizer's EOS id lies outside the models'
vocabulary, so it is never sampled, and no row stops early.

The PPO settings are params.yaml's `ppo.*` with one gradient pass per sample and the value
as a head on the policy trunk (`ppo_epochs=1 num_minibatches=1 value_model=policy_head`,
as in benchmarks/vs_trl.py); change them with `--set`, e.g. `--set ppo.ppo_epochs=4
--set ppo.num_minibatches=2 --set ppo.value_model=reward` for the pipeline's defaults.
Each point times `--iterations` iterations after one warm-up, in one process; the points take
turns (one iteration each per round) and each reports its median, so that a change in the
load of a shared machine hits every point alike.

    python benchmarks/scaling.py [--quick] [--iterations 3] [--set ppo.ppo_epochs=4 ...]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast

from rlhf import rl_math as rl
from rlhf.config import load_params
from rlhf.data import builtin_sort
from rlhf.engine import make_accelerator
from rlhf.models.builtin import EOS, PAD, UNK
from rlhf.models.loading import ScalarHeadModel
from rlhf.stages.ppo import PolicyAndValue, RewardSource, ppo_iteration, shard_models

REPO = Path(__file__).resolve().parent.parent
LEAN = ["ppo.ppo_epochs=1", "ppo.num_minibatches=1", "ppo.value_model=policy_head"]
SIZES = {"0.8M": (None, None, None), "10M": (6, 384, 6), "85M": (12, 768, 12)}
"""(n_layer, n_embd, n_head); None takes the builtin model's value from params.yaml."""


@dataclass(frozen=True)
class Point:
    size: str
    batch: int
    tokens: int


def never_ending_tokenizer() -> PreTrainedTokenizerFast:
    """The builtin character tokenizer with EOS as the *last* id: the models get one id
    fewer in their vocabulary, so EOS can never be sampled and every response is full length."""
    alphabet = [str(d) for d in range(10)] + [builtin_sort.PROMPT_SUFFIX]
    vocab = {token: i for i, token in enumerate([PAD, UNK, *alphabet, EOS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK, padding_side="left")


def build_point(point: Point, params_file: Path, overrides: list[str], accelerator,
                tokenizer, prompts: list[str]) -> dict:
    """Random-weight models for `point` and a function running one PPO iteration on them."""
    base = load_params(params_file)
    n_layer, n_embd, n_head = SIZES[point.size]
    longest_prompt = base.data.max_digits + 1
    params = load_params(params_file, [
        *LEAN, f"ppo.batch_size={point.batch}", f"ppo.max_new_tokens={point.tokens}",
        *overrides])
    cfg = params.ppo
    config = GPT2Config(
        vocab_size=len(tokenizer) - 1,  # no EOS row: see never_ending_tokenizer
        n_positions=max(base.model.n_positions, longest_prompt + point.tokens),
        n_layer=n_layer or base.model.n_layer, n_embd=n_embd or base.model.n_embd,
        n_head=n_head or base.model.n_head, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = ScalarHeadModel(GPT2Model(config)).eval().requires_grad_(False)
    value_model = (copy.deepcopy(reward_model).train().requires_grad_(True)
                   if cfg.value_model == "reward" else None)
    model = PolicyAndValue(policy, value_model)
    shard_models(accelerator, model, reference, reward_model)  # as ppo.run places them
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.lr, eps=1e-5, weight_decay=0.0)
    model, optimizer, _ = accelerator.prepare_training(model, optimizer, None)
    kl_ctl = rl.FixedKLController(cfg.kl_coef)
    shuffle = torch.Generator().manual_seed(0)
    lengths: list[float] = []

    def iteration(step: int) -> None:
        start = (step * cfg.batch_size) % (len(prompts) - cfg.batch_size + 1)
        _, stats = ppo_iteration(model, reference, RewardSource("model", reward_model),
                                 tokenizer, optimizer, accelerator,
                                 cfg, prompts[start:start + cfg.batch_size], kl_ctl=kl_ctl,
                                 minibatch_generator=shuffle, seed=step)
        lengths.append(stats["val/response_length"])

    return {"iteration": iteration, "params": sum(p.numel() for p in policy.parameters()),
            "lengths": lengths, "cfg": cfg, "times": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="A smaller sweep: 16/32/64 tokens, batch 16/64, 0.8M and 10M "
                             "models, 1 timed iteration per point.")
    parser.add_argument("--iterations", type=int, default=None,
                        help="Timed iterations per point after one warm-up "
                             "(default 3; 1 with --quick).")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    iterations = args.iterations or (1 if args.quick else 3)
    tokens = (16, 32, 64) if args.quick else (16, 32, 64, 128)
    batches = (16, 64) if args.quick else (16, 64, 256)
    sizes = ("0.8M", "10M") if args.quick else ("0.8M", "10M", "85M")
    big_batch = 16  # the batch of every model-size point above 10M
    load_params(args.params, args.overrides)  # a bad override stops before any work

    base = Point("0.8M", 64, 32)
    sweeps = {
        "response length": [Point("0.8M", 64, t) for t in tokens],
        "batch": [Point("0.8M", b, 32) for b in batches],
        "model size": [Point(s, big_batch if s == "85M" else 64, 32) for s in sizes],
    }
    accelerator = make_accelerator(load_params(args.params, args.overrides).train, seed_offset=2)
    tokenizer = never_ending_tokenizer()
    data = load_params(args.params).data
    rng = random.Random(0)
    prompts = [builtin_sort.random_prompt(rng, data.min_digits, data.max_digits)
               for _ in range(1024)]
    print(f"device {accelerator.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; per point: one warm-up iteration, then the median "
          f"of {iterations} timed iteration(s), the points taking turns", flush=True)

    # Every point's models live side by side; after one warm-up iteration each, the points
    # take turns (one iteration each per round), so a change in machine load hits them all.
    points = list(dict.fromkeys(p for ps in sweeps.values() for p in ps))
    results = {point: build_point(point, args.params, args.overrides, accelerator, tokenizer,
                                  prompts) for point in points}
    for point in points:
        results[point]["iteration"](0)
    for step in range(1, iterations + 1):
        for point in points:
            start = time.perf_counter()
            results[point]["iteration"](step)
            results[point]["times"].append(time.perf_counter() - start)
        print(f"  round {step}/{iterations}: " + ", ".join(
            f"{p.size}/{p.batch}/{p.tokens} {results[p]['times'][-1]:.1f}s" for p in points),
            flush=True)
    for r in results.values():
        r["seconds"] = statistics.median(r["times"])
        r["response"] = sum(r["lengths"]) / len(r["lengths"])
    cfg = results[base]["cfg"]

    def per_sample(point: Point) -> float:
        return results[point]["seconds"] / point.batch

    print()
    print(f"PPO iteration (rollout + update), CPU, {cfg.ppo_epochs} epoch(s) x "
          f"{cfg.num_minibatches} minibatch(es), value model `{cfg.value_model}`; base point "
          f"0.8M / batch 64 / 32 tokens; ratio = ms/sample over the base point's")
    print()
    print("| sweep | model (params) | batch | new tokens | ms/iteration | ms/sample "
          "| ratio to base |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, points in sweeps.items():
        for point in points:
            r = results[point]
            note = " (not 64: CPU time)" if name == "model size" and point.batch != 64 else ""
            print(f"| {name} | {point.size} ({r['params'] / 1e6:.2f}M) | {point.batch}{note} | "
                  f"{point.tokens} (mean {r['response']:.0f}) | {r['seconds'] * 1000:.0f} | "
                  f"{per_sample(point) * 1000:.2f} | {per_sample(point) / per_sample(base):.2f}x |")
    print()
    length_points = sweeps["response length"]
    first, last = length_points[0], length_points[-1]
    token_ratio = last.tokens / first.tokens
    cost_ratio = per_sample(last) / per_sample(first)
    slopes = [(per_sample(b) - per_sample(a)) / (b.tokens - a.tokens)
              for a, b in zip(length_points, length_points[1:])]
    shape = ("about linear" if 0.75 <= cost_ratio / token_ratio <= 1.25 else
             "sub-linear" if cost_ratio < token_ratio else "super-linear")
    marginal = (f"; the marginal cost per token rises with length, {slopes[0] * 1e6:.0f} -> "
                f"{slopes[-1] * 1e6:.0f} us per sample (attention over a longer context)"
                if slopes[-1] > 1.25 * slopes[0] else
                f"; marginal cost per token {slopes[0] * 1e6:.0f} -> {slopes[-1] * 1e6:.0f} us "
                "per sample")
    print(f"Cost per sample vs response length: {shape} ({token_ratio:.0f}x the tokens, "
          f"{first.tokens} -> {last.tokens}, costs {cost_ratio:.2f}x per sample){marginal}.")
    for point in sweeps["model size"]:
        same_batch = Point("0.8M", point.batch, 32)
        if point.batch != 64 and same_batch in results:
            print(f"The {point.size} point runs at batch {point.batch}: against the 0.8M model at "
                  f"the same batch it costs {per_sample(point) / per_sample(same_batch):.1f}x per "
                  "sample.")


if __name__ == "__main__":
    main()
