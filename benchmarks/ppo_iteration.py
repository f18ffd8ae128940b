"""How long one PPO iteration takes, against the raw model work it needs, side by side.

A PPO iteration must at least: generate the responses (KV cache), run one forward pass each
of policy+value, reference and reward model over the rollout, and do `ppo_epochs x
num_minibatches` forward+backward+optimizer steps. This script times those pieces alone
("raw model work", the bound) and the real iteration (`rlhf.stages.ppo.ppo_iteration`, as
`ppo.run` calls it each step), in one process on the same models, prompts and batch sizes, the
pieces and the iteration taking turns so that a change in machine load hits both, and prints
the ratio (the goal: iteration <= 1.1x the bound).

The bound does not use our own code: generation is transformers' own `model.generate`
(do_sample=True, the params' temperature, top_k=0, top_p=1.0, `ppo.max_new_tokens`, stopping
at EOS), the forwards and the update are plain transformers/torch calls on the same modules
(the policy's causal LM, the value head or value trunk+head, the reference, the reward
trunk+head), the update's loss a stand-in of the same shapes (logsumexp of the logits plus
the squared values), with gradient clipping and a plain `torch.optim.AdamW` step.

    python benchmarks/ppo_iteration.py --root /path/to/project [--set ppo.batch_size=128 ...]

The project must have run `rlhf stage prepare/sft/reward/reference` (or `rlhf run`). With no
--root, a small project is built in a temp dir first (tiny settings; expect seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from rlhf import rl_math as rl
from rlhf import stages
from rlhf.config import load_params
from rlhf.engine import make_accelerator
from rlhf.io import read_jsonl
from rlhf.models.loading import AdaptersDisabled, BaseScorer
from rlhf.paths import Paths
from rlhf.stages.ppo import RewardSource, load_models, ppo_iteration, shard_models


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_in_turns(fns: dict, device, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up call each; the functions
    take turns (one call of each per round), so a change in machine load hits them all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronise(device)
            start = time.perf_counter()
            fn()
            synchronise(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def positions(model: torch.nn.Module, attention_mask: torch.Tensor) -> dict:
    """position_ids that skip left padding, for architectures whose forward takes them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(type(base).forward).parameters:
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    params = load_params(args.params, args.overrides)
    if args.root is None:
        args.root = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
        small = ["data.n_sft=256", "data.n_pairs=128", "data.n_pairs_eval=64", "sft.epochs=1",
                 "reward.epochs=1", "reward.n_normalise_samples=64"]
        params = load_params(args.params, small + args.overrides)
        for name in ("prepare", "sft", "reward", "reference"):
            stages.get(name)(params, Paths(args.root))
    paths = Paths(args.root)
    cfg = params.ppo
    accelerator = make_accelerator(params.train, seed_offset=2)
    device = accelerator.device
    tokenizer, model, reference, reward_model, _ = load_models(params, paths)
    shard_models(accelerator, model, reference, reward_model)  # as ppo.run places them
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=1e-5)
    model, optimizer, _ = accelerator.prepare_training(model, optimizer, None)
    unwrapped = accelerator.unwrap_model(model)
    prompts = [r["prompt"] for r in read_jsonl(paths.prepared / "rl_prompts.jsonl")]
    batch_prompts = prompts[:cfg.batch_size]
    shuffle = torch.Generator().manual_seed(0)
    kl_ctl = rl.FixedKLController(cfg.kl_coef)

    def iteration() -> None:
        ppo_iteration(model, reference, RewardSource("model", reward_model), tokenizer,
                      optimizer, accelerator, cfg,
                      batch_prompts, kl_ctl=kl_ctl, minibatch_generator=shuffle, seed=0)

    # The raw model work, piece by piece, with plain transformers/torch calls.
    policy = unwrapped.policy
    config = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=None,
        repetition_penalty=1.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    encoded = tokenizer(batch_prompts, add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt").to(device)
    width = encoded["input_ids"].shape[1]

    @torch.no_grad()
    def raw_generate() -> torch.Tensor:
        policy.eval()
        return policy.generate(**encoded, generation_config=config)

    # One rollout's shape for the forwards and updates: the query, then the response up to
    # and including its first EOS (padding after it), max_new_tokens wide.
    out = raw_generate()
    short = width + cfg.max_new_tokens - out.shape[1]  # generate stops when every row has EOS
    responses = torch.nn.functional.pad(out[:, width:], (0, short), value=tokenizer.pad_token_id)
    is_eos = responses == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    responses = responses.masked_fill(after_eos, tokenizer.pad_token_id)
    qr = torch.cat([encoded["input_ids"], responses], 1)
    mask = torch.cat([encoded["attention_mask"], (~after_eos).long()], 1)

    value_model = unwrapped.value_model
    if isinstance(reward_model, BaseScorer):  # LoRA: the value trunk with its adapters off
        reward_trunk = reward_model._source[0].trunk
        reward_context = reward_trunk.disable_adapter
    else:
        reward_trunk, reward_context = reward_model.trunk, contextlib.nullcontext

    def policy_and_values(ids: torch.Tensor, attention: torch.Tensor):
        out = policy(input_ids=ids, attention_mask=attention, **positions(policy, attention),
                     output_hidden_states=value_model is None, use_cache=False)
        if value_model is None:
            return out.logits, unwrapped.value_head(out.hidden_states[-1]).squeeze(-1)
        hidden = value_model.trunk(input_ids=ids, attention_mask=attention, use_cache=False,
                                   **positions(value_model.trunk, attention)).last_hidden_state
        return out.logits, value_model.head(hidden).squeeze(-1)

    last = (torch.arange(mask.shape[1], device=device) * mask).argmax(1)

    @torch.no_grad()
    def raw_forwards() -> None:
        policy_and_values(qr, mask)
        ref = reference.peft_model if isinstance(reference, AdaptersDisabled) else reference
        with (ref.disable_adapter() if isinstance(reference, AdaptersDisabled)
              else contextlib.nullcontext()):
            ref(input_ids=qr, attention_mask=mask, **positions(ref, mask), use_cache=False)
        with reward_context():
            hidden = reward_trunk(input_ids=qr, attention_mask=mask, use_cache=False,
                                  **positions(reward_trunk, mask)).last_hidden_state
        reward_model.head(hidden).squeeze(-1).gather(1, last[:, None])

    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    raw_optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5)

    def raw_updates() -> None:
        unwrapped.train()
        for _ in range(cfg.ppo_epochs):
            for index in torch.randperm(qr.shape[0], device=device).chunk(cfg.num_minibatches):
                logits, values = policy_and_values(qr[index], mask[index])
                loss = logits.float().logsumexp(-1).mean() + values.float().pow(2).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                raw_optimizer.step()
                raw_optimizer.zero_grad()

    times = timed_in_turns({"generate": raw_generate, "scoring forwards": raw_forwards,
                            "update fwd+bwd+step": raw_updates, "full": iteration},
                           device, args.repeats)
    full = times.pop("full")
    pieces = times
    raw = sum(pieces.values())
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {cfg.batch_size} prompts x {cfg.max_new_tokens} new tokens, "
          f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches, model "
          f"{sum(p.numel() for p in unwrapped.policy.parameters()) / 1e6:.2f}M params")
    for name, seconds in pieces.items():
        print(f"  raw {name:<22} {seconds * 1000:9.1f} ms")
    print(f"  raw model work total      {raw * 1000:9.1f} ms   (the bound)")
    print(f"  full PPO iteration        {full * 1000:9.1f} ms   "
          f"({cfg.batch_size / full:.0f} episodes/s)")
    print(f"  overhead ratio full / raw {full / raw:9.2f}x   (goal <= 1.10x)")
    print(f"  (medians of {args.repeats} turns after a warm-up; mean response "
          f"{(mask[:, width:].sum(1).float().mean()):.1f} of {cfg.max_new_tokens} tokens)")


if __name__ == "__main__":
    main()
