"""Peak memory per rank of one PPO iteration: 1 process, 2-process DDP, 2-process FSDP.

Builds a project whose builtin model is an ~85M-parameter GPT-2 (12 blocks of width 768,
made locally: no download), trains sft and reward for a step each, then runs one PPO iteration
(`rlhf.stages.ppo.ppo_iteration`, the stage's own code: rollout, scoring, the PPO epochs) with
the policy, value model, reference and reward model placed as `ppo.run` places them, in three
ways, each in fresh processes:

- 1 process (every model whole);
- 2 processes, DDP (`train.num_processes=2`: every model whole on each rank);
- 2 processes, FSDP (`train.sharding=fsdp`: each model's weights, and the trained ones'
  gradients and optimizer state, split over the ranks).

Per rank it prints two figures:
- `state MB`: the bytes this rank holds after the iteration of weights (all four models) and
  AdamW state (the gradients are freed at each step), counted tensor by tensor (a sharded
  tensor counts its local shard);
- `peak MB`: the peak memory the rank reached, above what it held before loading the models:
  on a GPU torch's peak allocation, on CPU the peak RSS (VmHWM), both as the stages measure
  them (`rlhf.mlops.resources.measure`), less what the rank held before loading (with
  glibc's malloc set to return freed tensors to the system: `CHILD_ENV`).
  It includes activations, the KV cache of sampling, and, under FSDP, the units gathered
  whole for their forward and backward (and each model whole while it loads, before it is
  sharded).

The last line is the FSDP/DDP ratio of the peak per rank, printed, not asserted.

    python benchmarks/memory.py                     # CPU (gloo), ~2 minutes on 2 cores
    python benchmarks/memory.py --set model.n_layer=24 --set model.n_embd=1024 --set model.n_head=16   # ~350M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE_85M = ["model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.n_positions=64"]
"""GPT-2 small's blocks (85M parameters in them) over the builtin task's small vocabulary."""
SMALL_RUN = [
    "data.n_sft=64", "data.n_pairs=64", "data.n_pairs_eval=16", "data.n_rl_prompts=64",
    "data.n_eval_prompts=8",
    "sft.batch_size=16", "sft.epochs=0.25", "reward.batch_size=16", "reward.epochs=0.25",
    "reward.n_normalise_samples=8", "ppo.batch_size=8", "train.num_threads=1",
]
"""A step of sft and of reward: enough for PPO to start from."""
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
"""glibc's malloc raises its mmap threshold as large blocks are freed, then keeps freed memory
in its heaps (one per thread, gloo's included): the peak RSS would count memory freed long
before (measured: 4.1 GB instead of 1.8 GB for FSDP's rank). A fixed 64 KiB threshold hands
every tensor's memory back to the system when it is freed, so the RSS follows the live tensors."""
MODES = {"1 process": ["train.num_processes=1"],
         "2-process DDP": ["train.num_processes=2"],
         "2-process FSDP": ["train.num_processes=2", "train.sharding=fsdp"]}


def build_project(root: Path, overrides: list[str]) -> None:
    from rlhf import stages
    from rlhf.config import load_params, write_overrides
    from rlhf.paths import Paths

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_overrides(root / "params.yaml", overrides)
    params = load_params(root / "params.yaml")
    for name in ("prepare", "sft", "reward", "reference"):
        stages.get(name)(params, Paths(root))


def _local_mb(tensors) -> float:
    total = 0
    for tensor in tensors:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += tensor.numel() * tensor.element_size()
    return total / 2 ** 20


def worker(root: Path, overrides: list[str], out: Path) -> None:
    """One rank: load and place the models as `ppo.run` does, one PPO iteration, figures."""
    import torch

    from rlhf import rl_math as rl
    from rlhf.config import load_params
    from rlhf.engine import adamw, make_accelerator
    from rlhf.io import read_jsonl
    from rlhf.mlops.resources import measure
    from rlhf.paths import Paths
    from rlhf.stages import ppo

    params = load_params(root / "params.yaml", overrides)
    paths = Paths(root)
    accelerator = make_accelerator(params.train, seed_offset=2)
    with measure() as before:  # an empty block: its peak is what this rank holds now
        pass
    with measure() as during:
        tokenizer, model, reference, reward_model, _ = ppo.load_models(params, paths)
        ppo.shard_models(accelerator, model, reference, reward_model)
        optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=params.ppo.lr)
        model, optimizer, _ = accelerator.prepare_training(model, optimizer, None)
        prompts = [row["prompt"] for row in read_jsonl(paths.prepared / "rl_prompts.jsonl")]
        ppo.ppo_iteration(model, reference, ppo.RewardSource("model", reward_model), tokenizer,
                          optimizer, accelerator, params.ppo, prompts[:params.ppo.batch_size],
                          kl_ctl=rl.FixedKLController(params.ppo.kl_coef),
                          minibatch_generator=torch.Generator().manual_seed(0), seed=0)

    key = "peak_gpu_mb" if accelerator.device.type == "cuda" else "peak_rss_mb"
    peak = during[key] - before[key]
    modules = {id(m): m for m in (model, reference, reward_model) if isinstance(m, torch.nn.Module)}
    weights = {id(p): p for m in modules.values() for p in m.parameters()}
    grads = [p.grad for p in weights.values() if p.grad is not None]
    moments = [v for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0]
    figures = {"rank": accelerator.process_index, "peak_mb": peak,
               "state_mb": _local_mb(weights.values()) + _local_mb(grads) + _local_mb(moments),
               "device": str(accelerator.device)}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(figures))


def run_mode(root: Path, overrides: list[str], out: Path) -> list[dict]:
    out.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--worker", "--root", str(root), "--out", str(out),
          *[a for o in overrides for a in ("--set", o)]]
    if "train.num_processes=2" in overrides:
        from rlhf.mlops.launch import free_port

        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", str(free_port()), *me]
    else:
        command = [sys.executable, *me]
    subprocess.run(command, check=True, cwd=root, env={**os.environ, **CHILD_ENV})
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="params override for the project (e.g. a model size)")
    parser.add_argument("--root", type=Path, default=None, help="where to build the project")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.root, args.overrides, args.out)
        return

    root = args.root or Path(tempfile.mkdtemp(prefix="rlhf-memory-"))
    build_project(root, SMALL_RUN + SIZE_85M + args.overrides)
    from rlhf.models.loading import load_causal_lm

    size = load_causal_lm(root / "models" / "sft").num_parameters() / 1e6
    print(f"policy: {size:.1f}M parameters; policy, value (from the reward model), reference and "
          "reward model; one PPO iteration")
    results = {mode: run_mode(root, extra, root / "figures" / mode.replace(" ", "-"))
               for mode, extra in MODES.items()}
    print(f"{'mode':<16} {'rank':>4} {'state MB':>9} {'peak MB':>9}  device")
    for mode, ranks in results.items():
        for rank in ranks:
            print(f"{mode:<16} {rank['rank']:>4} {rank['state_mb']:>9.0f} {rank['peak_mb']:>9.0f}"
                  f"  {rank['device']}")
    peak = {mode: max(r["peak_mb"] for r in ranks) for mode, ranks in results.items()}
    state = {mode: max(r["state_mb"] for r in ranks) for mode, ranks in results.items()}
    print(f"fsdp/ddp state per rank: {state['2-process FSDP'] / state['2-process DDP']:.2f}x")
    print(f"fsdp/ddp peak per rank: {peak['2-process FSDP'] / peak['2-process DDP']:.2f}x")


if __name__ == "__main__":
    main()
