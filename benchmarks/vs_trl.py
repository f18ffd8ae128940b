"""Our PPO iteration against TRL's `RLOOTrainer` on CPU, at matched shapes, side by side.

TRL 1.x has no PPO trainer; RLOO is the closest thing a user would pick instead. Both sides
start from the same checkpoints, built here by our own stages in a temp project (prepare, a
short sft, reward, reference on the builtin sorting task): TRL's policy and its reference are
loaded from our `models/sft/`, its reward model is our `models/reward/` (a standard
`AutoModelForSequenceClassification`, num_labels=1), its prompts are our RL prompts. So the
model size (the builtin GPT-2 of params.yaml `model.*`), the completions per step, the new
tokens per completion and even the response lengths (the same policy samples them) match.

Per step both sides do the same model work: generate `batch` completions with the KV cache
(pure sampling: temperature, top_k=0, top_p=1), one no-grad forward each of policy,
reference and reward model over them, then one forward+backward+AdamW step over all of
them (ours: `ppo_epochs=1 num_minibatches=1 value_model=policy_head`, the value being an
extra head on the policy trunk; TRL: `num_iterations=1`, one optimizer step per generation
batch, no value model). Ours samples one completion per prompt; TRL samples
`--generations` per prompt from `batch / generations` prompts.

Each side's time per step is the wall time between the ends of consecutive steps (ours:
`ppo.run`'s per-step metrics call; TRL: a `TrainerCallback.on_step_end`), the first step of
each run dropped as warm-up. The sides take turns, `--rounds` runs of `--steps` steps each,
so that a change in the load of a shared machine hits both; samples/s = batch / the median
step time over all rounds. Our own `eps` column of `metrics/ppo_history.csv` (rollout +
update only, no bookkeeping; time-weighted mean of the round) is printed too.

    pip install -e '.[bench]'
    python benchmarks/vs_trl.py [--steps 16] [--batch 64] [--new-tokens 10] [--rounds 4]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class StepClock:
    """Wall-clock time at the end of each step (a MetricsLogger for `ppo.run`)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def log_metrics(self, metrics, step=None) -> None:
        if step is not None:
            self.ends.append(time.perf_counter())

    def log_artifact(self, path) -> None:
        pass

    def log_table(self, name, rows, step=None) -> None:
        pass


def step_seconds(ends: list[float]) -> list[float]:
    """Seconds of each step after the first (warm-up): from the end of one to the next's."""
    return [b - a for a, b in zip(ends, ends[1:])]


def rate(runs: list[dict], batch: int) -> float:
    """Samples/s at the median step time over all rounds (robust to a busy machine's spikes)."""
    return batch / statistics.median(t for r in runs for t in r["steps"])


def build_upstream(root: Path, args) -> "tuple":
    """Our stages prepare, sft (short), reward, reference in `root`; returns (params, paths)."""
    from rlhf import stages
    from rlhf.config import load_params
    from rlhf.paths import Paths

    base = load_params(REPO / "params.yaml")
    positions = max(base.model.n_positions, base.data.max_digits + 1 + args.new_tokens)
    overrides = [
        "data.n_sft=1024", "data.n_pairs=256", "data.n_pairs_eval=64",
        f"data.n_rl_prompts={max(512, args.batch * (args.steps + 1))}", "data.n_eval_prompts=8",
        f"model.n_positions={positions}",
        "sft.epochs=1", "reward.epochs=1", "reward.n_normalise_samples=64",
        f"ppo.steps={args.steps}", f"ppo.batch_size={args.batch}",
        f"ppo.max_new_tokens={args.new_tokens}",
        "ppo.ppo_epochs=1", "ppo.num_minibatches=1", "ppo.value_model=policy_head",
        # No bookkeeping inside the timed steps: a checkpoint only after the last step's
        # metrics, no gold scoring (TRL has no gold reward), completions only at the end.
        f"ppo.checkpoint_every={args.steps}", f"ppo.gold_every={args.steps + 1000}",
        f"ppo.log_completions_every={args.steps + 1000}",
        *args.overrides,
    ]
    params = load_params(REPO / "params.yaml", overrides)
    paths = Paths(root)
    for name in ("prepare", "sft", "reward", "reference"):
        start = time.perf_counter()
        stages.get(name)(params, paths)
        print(f"  upstream stage {name:<9} {time.perf_counter() - start:6.1f} s", flush=True)
    return params, paths


def run_ours(params, paths) -> dict:
    from rlhf.stages import ppo

    clock = StepClock()
    ppo.run(params, paths, clock)
    with open(paths.metrics / "ppo_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    eps = [float(r["eps"]) for r in rows[1:]]
    batch = params.ppo.batch_size
    return {
        "steps": step_seconds(clock.ends),
        # time-weighted: batch x steps / sum of each step's rollout+update seconds
        "eps_csv": batch * len(eps) / sum(batch / e for e in eps),
        "response_length": sum(float(r["val/response_length"]) for r in rows[1:]) / len(eps),
    }


def run_trl(params, paths, args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from rlhf.io import read_jsonl
    from rlhf.models.loading import load_tokenizer

    cfg = params.ppo
    tokenizer = load_tokenizer(paths.sft)  # left padding, as generation wants
    prompts = [r["prompt"] for r in read_jsonl(paths.prepared / "rl_prompts.jsonl")]
    dataset = Dataset.from_dict({"prompt": prompts})

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

            self.logs: dict = {}

        def on_step_end(self, args_, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args_, state, control, logs=None, **kwargs):
            self.logs.update(logs or {})  # with logging off: the summary after the last step

    clock = Clock()
    warnings.filterwarnings("ignore")
    config = RLOOConfig(
        output_dir=str(work / "trl-out"),
        use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, use_vllm=False,
        max_steps=args.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=args.generations, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=0, top_p=1.0,
        learning_rate=cfg.lr, max_grad_norm=cfg.max_grad_norm, beta=cfg.kl_coef,
        disable_dropout=True, seed=params.train.seed, dataloader_num_workers=0,
    )
    trainer = RLOOTrainer(model=str(paths.sft), reward_funcs=str(paths.reward), args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # it would print the summary dict
    trainer.train()
    return {"steps": step_seconds(clock.ends),
            # the mean over all steps, warm-up included
            "response_length": float(clock.logs.get("completions/mean_length", float("nan")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16,
                        help="Steps per round on each side; the first is warm-up (default 16).")
    parser.add_argument("--batch", type=int, default=64, help="Completions per step (default 64).")
    parser.add_argument("--new-tokens", type=int, default=10,
                        help="Most new tokens per completion (default 10, as params.yaml's "
                             "ppo.max_new_tokens).")
    parser.add_argument("--rounds", type=int, default=4,
                        help="Alternating rounds of ours then TRL (default 4).")
    parser.add_argument("--generations", type=int, default=4,
                        help="TRL's completions per prompt (num_generations; batch must be a "
                             "multiple).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Extra params override for our side, e.g. model.n_layer=8.")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if args.batch % args.generations:
        parser.error(f"--batch {args.batch} must be a multiple of --generations "
                     f"{args.generations}")
    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed: run `pip install -e '.[bench]'` (the benchmark extra) first")
    os.environ.setdefault("RLHF_NO_PROGRESS", "1")
    import torch

    from rlhf.models.loading import load_causal_lm

    work = Path(tempfile.mkdtemp(prefix="rlhf-vs-trl-"))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"trl {trl.__version__}, work dir {work}", flush=True)
    params, paths = build_upstream(work / "project", args)
    m = params.model
    n_params = sum(p.numel() for p in load_causal_lm(paths.sft).parameters())
    print(f"shapes: GPT-2 n_layer={m.n_layer} n_embd={m.n_embd} n_head={m.n_head} "
          f"({n_params / 1e6:.2f}M params), {args.batch} completions/step, "
          f"<= {args.new_tokens} new tokens, 1 gradient pass per sample, "
          f"{args.rounds} rounds x {args.steps} steps per side (first = warm-up)", flush=True)
    ours, theirs = [], []
    for index in range(args.rounds):  # alternating, so a change in machine load hits both
        shutil.rmtree(paths.checkpoints / "ppo", ignore_errors=True)  # else ppo.run resumes
        ours.append(run_ours(params, paths))
        theirs.append(run_trl(params, paths, args, work))
        print(f"  round {index + 1}: ours {rate(ours[-1:], args.batch):7.1f} samples/s "
              f"(csv eps, rollout+update only: {ours[-1]['eps_csv']:.1f}; mean response "
              f"{ours[-1]['response_length']:.1f} tokens), TRL "
              f"{rate(theirs[-1:], args.batch):7.1f} samples/s (mean response "
              f"{theirs[-1]['response_length']:.1f} tokens)", flush=True)
    ours_rate = rate(ours, args.batch)
    trl_rate = rate(theirs, args.batch)
    trl_name = f"TRL {trl.__version__} (RLOOTrainer, k={args.generations})"
    print(f"{'ours (rlhf.stages.ppo.run, PPO)':<36} {ours_rate:8.1f} samples/s")
    print(f"{trl_name:<36} {trl_rate:8.1f} samples/s")
    print(f"{'ratio ours / TRL':<36} {ours_rate / trl_rate:8.2f}x   (median step times)")


if __name__ == "__main__":
    main()
