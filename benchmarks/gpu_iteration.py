"""One PPO iteration on a GPU, in figures: ms per iteration, generation tokens/s, MFU of the
update phase, peak GPU memory.

Builds a project whose builtin model is a GPT-2 of the given size (made locally, no download;
a step of sft and of reward, as `benchmarks/memory.py` does), then times
`rlhf.stages.ppo.ppo_iteration` (the stage's own code) in bf16, and its rollout
(`collect_rollout`: sampling with the KV cache plus the scoring forwards) alone on the same
prompts, the two taking turns (`ppo_iteration.timed_in_turns`: medians after a
warm-up call each). The update phase is the iteration less its rollout. Its MFU counts 6 FLOPs
per trained parameter per token (forward and backward) over `ppo_epochs` passes of the
rollout's tokens, for the policy and the value model, against the GPU's dense bf16 peak
(`--peak-tflops`, default the H100 SXM's 989).

    python benchmarks/gpu_iteration.py --size 85m --out figures.json
    python benchmarks/gpu_iteration.py --size 350m --out figures.json   # appends
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SIZES = {
    "85m": ["model.n_layer=12", "model.n_embd=768", "model.n_head=12"],
    "350m": ["model.n_layer=24", "model.n_embd=1024", "model.n_head=16"],
}
"""GPT-2 small's and medium's blocks over the builtin task's small vocabulary."""


def main() -> None:
    from memory import SMALL_RUN, build_project
    from ppo_iteration import timed_in_turns

    from rlhf import rl_math as rl
    from rlhf.config import load_params
    from rlhf.engine import adamw, make_accelerator
    from rlhf.io import read_jsonl
    from rlhf.paths import Paths
    from rlhf.stages import ppo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="85m")
    parser.add_argument("--batch-size", type=int, default=64, help="ppo.batch_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file the figures go to")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix=f"rlhf-gpu-{args.size}-"))
    overrides = SMALL_RUN + SIZES[args.size] + ["model.n_positions=128", "train.precision=bf16",
                                                f"ppo.batch_size={args.batch_size}"]
    build_project(root, overrides)
    params = load_params(root / "params.yaml")
    paths, cfg = Paths(root), params.ppo
    accelerator = make_accelerator(params.train, seed_offset=2)
    tokenizer, model, reference, reward_model, _ = ppo.load_models(params, paths)
    ppo.shard_models(accelerator, model, reference, reward_model)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer, _ = accelerator.prepare_training(model, optimizer, None)
    reward = ppo.RewardSource("model", reward_model)
    prompts = [r["prompt"] for r in read_jsonl(paths.prepared / "rl_prompts.jsonl")][:cfg.batch_size]
    kl_ctl = rl.FixedKLController(cfg.kl_coef)
    shuffle = torch.Generator().manual_seed(0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    gpu = accelerator.device.type == "cuda"  # on CPU: a dry run of this script
    last: dict = {}

    def iteration() -> None:
        last["batch"], _ = ppo.ppo_iteration(model, reference, reward, tokenizer, optimizer,
                                             accelerator, cfg, prompts, kl_ctl=kl_ctl,
                                             minibatch_generator=shuffle, seed=0)

    def rollout() -> None:
        ppo.collect_rollout(accelerator.unwrap_model(model), reference, reward, tokenizer,
                            prompts, cfg, accelerator.device, accelerator.autocast, seed=0)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_in_turns({"iteration": iteration, "rollout": rollout}, accelerator.device,
                             args.repeats)
    total, sampling = seconds["iteration"], seconds["rollout"]
    update = max(total - sampling, 1e-9)
    batch = last["batch"]
    tokens = int(batch.attention_mask.sum())  # query and response tokens the updates see
    generated = int(batch.mask.sum())
    figures = {
        "size": args.size, "device": torch.cuda.get_device_name() if gpu else "cpu",
        "trained_parameters_m": round(trained / 1e6, 1), "batch_size": cfg.batch_size,
        "ms_per_iteration": round(total * 1e3, 1),
        "rollout_ms": round(sampling * 1e3, 1),
        "generation_tokens_per_s": round(generated / sampling, 1),
        "update_mfu": round(6 * trained * tokens * cfg.ppo_epochs / update
                            / (args.peak_tflops * 1e12), 4),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if gpu else None,
    }
    print(json.dumps(figures))
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
