"""PPO, GRPO, RLOO and REINFORCE++ with a reward model or the gold verifier, side by side on
the builtin task, from one SFT model and one reward model: the README's algorithm table.

The upstream stages (prepare, sft, reward, reference) run once in `--root` (kept, so a rerun
reuses them); then, for each row of ALGORITHMS, the `ppo` stage (timed, with its peak RSS)
and the `evaluate` stage, each as `rlhf stage` in its own process, with the params of
params.yaml plus the row's overrides (and `--set`). Printed: one markdown
table (gold reward, its ratio to SFT, KL, pass@1/8/64 of policy and base, the k at which
the base catches up, wall time and peak memory of the PPO stage), written with the pass@k
plot to `--out`, and logged with the plot as one MLflow run (experiment `rlhf-algorithms`).

This asks the lecture's closing question (Yue et al. 2025) of each algorithm: does RL beat
the base at large k, or only sharpen what the base could already sample?

    python benchmarks/algorithms.py [--root DIR] [--out DIR] [--set key=value ...]
                                    [--only NAME ...] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

GROUP = ["ppo.num_generations=8"]
ALGORITHMS = {
    "PPO + RM": [],
    "GRPO + RM": ["ppo.advantage=grpo", *GROUP, "ppo.kl_penalty=loss", "ppo.kl_estimator=k3"],
    "GRPO + gold (RLVR)": ["ppo.advantage=grpo", *GROUP, "ppo.kl_penalty=loss",
                           "ppo.kl_estimator=k3", "ppo.reward=gold"],
    "RLOO + gold": ["ppo.advantage=rloo", *GROUP, "ppo.reward=gold"],
    "REINFORCE++ + RM": ["ppo.advantage=reinforce_pp"],
}
"""Each row's overrides of params.yaml: GRPO as its paper (KL in the loss, k3), RLOO and
REINFORCE++ as theirs (KL in the reward); every other param, the KL control included, is
the default PPO's."""
UPSTREAM = ("prepare", "sft", "reward", "reference")
KS = ("1", "8", "64")


def catch_up_k(policy: dict, base: dict) -> str:
    """The smallest k at which the base's pass@k reaches the policy's, or `> max k`."""
    for k in sorted(policy, key=int):
        if base[k] >= policy[k]:
            return k
    return f"> {max(policy, key=int)}"


def run_stage(stage: str, root: Path, overrides: list[str]) -> dict:
    """`rlhf stage <stage>` in a child process, as a user runs it: its wall time and its
    own peak RSS (`wait4`'s, so one row's peak is not another's)."""
    command = [sys.executable, "-m", "rlhf.cli", "stage", stage, "--no-track", "--root",
               str(root), "--params", str(root / "params.yaml"),
               *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "RLHF_NO_PROGRESS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"rlhf stage {stage} failed with {' '.join(overrides)}")
    return {"seconds": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024}


def run_algorithm(root: Path, overrides: list[str]) -> dict:
    """One row: the ppo stage measured, then evaluate; the figures of the table."""
    shutil.rmtree(root / "checkpoints" / "ppo", ignore_errors=True)  # afresh, never resumed
    cost = run_stage("ppo", root, overrides)
    run_stage("evaluate", root, overrides)
    report = json.loads((root / "metrics" / "eval.json").read_text())
    policy, base = report["policy"], report["reference"]
    return {"gold": policy.get("gold_reward"), "gold_sft": base.get("gold_reward"),
            "ratio": report.get("gold_ratio"), "kl": policy["kl"],
            "pass_policy": policy.get("pass_at_k", {}), "pass_base": base.get("pass_at_k", {}),
            "ppo_seconds": cost["seconds"], "ppo_peak_mb": cost["peak_mb"]}


def table(rows: dict) -> str:
    head = ("| algorithm | gold | x SFT | KL | pass@1 | pass@8 | pass@64 | base pass@1/8/64 "
            "| base catches up at k | PPO stage s | peak MB |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, row in rows.items():
        pol, base = row["pass_policy"], row["pass_base"]
        lines.append(
            f"| {name} | {row['gold']:.3f} | {row['ratio']:.2f}x | {row['kl']:.2f} | "
            + " | ".join(f"{pol[k]:.2f}" if k in pol else "-" for k in KS)
            + " | " + "/".join(f"{base[k]:.2f}" if k in base else "-" for k in KS)
            + f" | {catch_up_k(pol, base) if pol else '-'} | {row['ppo_seconds']:.0f} "
            f"| {row['ppo_peak_mb']:.0f} |")
    first = next(iter(rows.values()))
    lines.append(f"\nSFT (base) gold reward: {first['gold_sft']:.3f}")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    first = next(iter(rows.values()))
    ks = sorted(first["pass_base"], key=int)
    ax.plot([int(k) for k in ks], [first["pass_base"][k] for k in ks], "k--", label="base (SFT)")
    for name, row in rows.items():
        ax.plot([int(k) for k in ks], [row["pass_policy"][k] for k in ks], marker="o",
                label=name)
    ax.set(xscale="log", xlabel="k", ylabel="pass@k", ylim=(0, 1.02),
           title="pass@k on held-out prompts")
    ax.set_xticks([int(k) for k in ks], ks)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_mlflow(rows: dict, markdown: Path, figure: Path, tracking_uri: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("rlhf-algorithms")
    with mlflow.start_run(run_name="algorithms") as run:
        for name, row in rows.items():
            key = name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
            mlflow.log_metrics({f"{key}/gold": row["gold"], f"{key}/kl": row["kl"],
                                f"{key}/ppo_seconds": row["ppo_seconds"],
                                **{f"{key}/pass_at_{k}": v
                                   for k, v in row["pass_policy"].items()}})
        mlflow.log_artifact(str(markdown))
        mlflow.log_artifact(str(figure))
        return run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="project folder (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/algorithms"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a params override for every row, e.g. ppo.steps=50")
    parser.add_argument("--only", action="append", choices=list(ALGORITHMS),
                        help="run only these rows")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in --root)")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="rlhf-algorithms-"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for name in UPSTREAM:
        if not (root / "metrics" / f"{name}.json").exists():  # a rerun reuses them
            print(f"[algorithms] {name}", flush=True)
            run_stage(name, root, args.overrides)
    rows = {}
    for name in args.only or ALGORITHMS:
        print(f"[algorithms] {name}", flush=True)
        rows[name] = run_algorithm(root, args.overrides + ALGORITHMS[name])
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = args.out / "algorithms.md"
    text = table(rows)
    markdown.write_text(text + "\n")
    (args.out / "algorithms.json").write_text(json.dumps(rows, indent=1))
    figure = plot(rows, args.out / "pass_at_k_algorithms.png")
    run_id = log_to_mlflow(rows, markdown, figure,
                           args.tracking_uri or f"sqlite:///{root.resolve()}/mlflow.db")
    print(text)
    print(f"\nwritten: {markdown}, {figure}; MLflow run {run_id}")


if __name__ == "__main__":
    main()
