"""How long one PPO iteration takes, against the raw model work it needs, side by side.

A PPO iteration must at least: generate the responses (KV cache), run one forward pass each
of policy+value, reference and reward model over the rollout, and do `ppo_epochs x
num_minibatches` forward+backward+optimizer steps. This script times those pieces alone
("raw model work") and the real iteration (`collect_rollout` + reward shaping + GAE +
`ppo_update`), in one process on the same batch sizes, and prints the ratio.

    python benchmarks/ppo_iteration.py --root /path/to/project [--set ppo.batch_size=128 ...]

The project must have run `rlhf stage prepare/sft/reward/reference` (or `rlhf run`). With no
--root, a small project is built in a temp dir first (tiny settings; expect seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rlhf import rl_math as rl
from rlhf import stages
from rlhf.config import load_params
from rlhf.data.tokenize import encode
from rlhf.engine import make_accelerator
from rlhf.generation import generate
from rlhf.io import read_jsonl
from rlhf.models.loading import lm_logits
from rlhf.paths import Paths
from rlhf.stages.ppo import collect_rollout, load_models, ppo_update, prompt_batches


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronise(device)
    return (time.perf_counter() - start) / repeats


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    reference.to(device)
    reward_model.to(device)
    prompts = [r["prompt"] for r in read_jsonl(paths.prepared / "rl_prompts.jsonl")]
    batch_prompts = next(prompt_batches(prompts, cfg.batch_size, 0))
    shuffle = torch.Generator().manual_seed(0)
    kl_ctl = rl.FixedKLController(cfg.kl_coef)

    def iteration() -> None:
        batch = collect_rollout(unwrapped, reference, reward_model, tokenizer, batch_prompts,
                                cfg, device)
        kl = rl.per_token_kl(batch.logprobs, batch.ref_logprobs)
        rewards, _ = rl.shape_rewards(kl, batch.scores, batch.mask.sum(1), kl_ctl.value)
        advantages, returns = rl.gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        advantages = rl.masked_whiten(advantages, batch.mask).masked_fill(~batch.mask, 0.0)
        ppo_update(model, optimizer, accelerator, batch, advantages, returns, cfg, None, shuffle)

    # The raw model work, piece by piece, on a rollout of the same shape.
    encoded = [encode(tokenizer, p) for p in batch_prompts]
    sample = collect_rollout(unwrapped, reference, reward_model, tokenizer, batch_prompts, cfg,
                             device)
    qr, mask = sample.query_responses, sample.attention_mask

    def raw_generate() -> None:
        generate(unwrapped.policy, tokenizer, encoded, cfg.max_new_tokens, cfg.temperature,
                 device)

    @torch.no_grad()
    def raw_forwards() -> None:
        model(qr, mask)
        lm_logits(reference, qr, mask)
        reward_model.score(qr, mask)

    def raw_updates() -> None:
        model.train()
        for _ in range(cfg.ppo_epochs):
            for index in torch.arange(qr.shape[0], device=device).chunk(cfg.num_minibatches):
                logits, values = model(qr[index], mask[index])
                loss = logits.float().logsumexp(-1).mean() + values.float().pow(2).mean()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()

    pieces = {name: timed(fn, device, args.repeats) for name, fn in
              (("generate", raw_generate), ("scoring forwards", raw_forwards),
               ("update fwd+bwd+step", raw_updates))}
    raw = sum(pieces.values())
    full = timed(iteration, device, args.repeats)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {cfg.batch_size} prompts x {cfg.max_new_tokens} new tokens, "
          f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches, model "
          f"{sum(p.numel() for p in unwrapped.policy.parameters()) / 1e6:.2f}M params")
    for name, seconds in pieces.items():
        print(f"  raw {name:<22} {seconds * 1000:9.1f} ms")
    print(f"  raw model work total      {raw * 1000:9.1f} ms")
    print(f"  full PPO iteration        {full * 1000:9.1f} ms   "
          f"({cfg.batch_size / full:.0f} episodes/s)")
    print(f"  overhead ratio full / raw {full / raw:9.2f}x")


if __name__ == "__main__":
    main()
