"""Stage `evaluate`: the trained policy against the reference (SFT) on held-out prompts.

For each model, `eval.n_samples` samples per prompt give, on any data: the mean reward-model
score, the KL to the reference (summed over a response's tokens), the mean response length
and the EOS rate; on tasks with a gold answer (the builtin task) also the mean gold reward,
exact match and pass@k for k = 1, 2, 4, ... with the unbiased estimator. Win rates pair the
policy's i-th sample with the reference's i-th sample on the same prompt (ties count half):
`rm_win_rate` as the reward model judges, `win_rate` by the gold reward where there is one.
Where a gold reward exists it is the judgement, never the RM score, which PPO can exploit.

`eval.max_prompts` caps the number of prompts: a sample seeded by data.seed (the same prompts
for every run on the same data, so runs stay comparable), kept in file order.

With `train.num_processes` > 1 each rank samples and scores its share of the samples (each
seeded by its index among all of them, so the figures do not depend on the world size); the
main process gathers them and writes `metrics/eval.json`, `metrics/pass_at_k.csv` (its header
only without a gold answer) and PNG plots in `plots/`.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

from rlhf import distributed as dist
from rlhf import rl_math as rl
from rlhf.artifacts import require_model
from rlhf.config import Params
from rlhf.data.tokenize import encode
from rlhf.engine import make_accelerator
from rlhf.generation import decode_responses, derive_seed, generate
from rlhf.io import atomic_write_text, read_jsonl, write_json
from rlhf.models.loading import ScalarHeadModel, lm_logits, load_causal_lm, load_tokenizer
from rlhf.paths import Paths
from rlhf.progress import progress_bar
from rlhf.stages import reference as reference_stage
from rlhf.stages import reward as reward_stage
from rlhf.stages.ppo import gold_reward_fn, response_logprobs
from rlhf.tracking import MetricsLogger, NullLogger


def ks_up_to(max_k: int) -> list[int]:
    ks, k = [], 1
    while k <= max_k:
        ks.append(k)
        k *= 2
    return ks


@torch.no_grad()
def sample_and_score(model, reference, reward_model, tokenizer, prompts: list[str],
                     params: Params, device, label: str, accelerator=None) -> dict[str, list]:
    """Samples of `model` for every prompt (repeated n times), with RM scores and the
    summed KL of `model` to `reference` on each sample. With an `accelerator` of several
    processes, each samples its share and every rank gets all of them, in order."""
    cfg = params.eval
    repeated = [p for p in prompts for _ in range(cfg.n_samples)]
    share = (dist.uneven_slice(len(repeated), accelerator) if accelerator is not None
             else slice(0, len(repeated)))
    mine = repeated[share]
    seed = derive_seed(params.train.seed, "eval", label)
    out: dict[str, list] = {"prompt": [], "text": [], "score": [], "kl": [], "length": [],
                            "eos": []}
    # Sharded models run forward as a collective: every process runs as many batches as
    # the one with the most rows, a process out of rows repeating its last one, unrecorded.
    rows = (-(-len(repeated) // accelerator.num_processes)
            if accelerator is not None and accelerator.splits_weights else len(mine))
    starts = range(0, rows, cfg.batch_size)
    with progress_bar(f"eval {label}", len(starts)) as bar:
        for start in starts:
            chunk = mine[start:start + cfg.batch_size]
            filler = not chunk
            if filler:
                chunk = (mine or repeated)[-1:]
            query, query_mask, responses = generate(
                model, tokenizer, [encode(tokenizer, p) for p in chunk], cfg.max_new_tokens,
                cfg.temperature, device, seed=seed, first_row=share.start + start)
            responses = rl.truncate_after_eos(responses, tokenizer.eos_token_id,
                                              tokenizer.pad_token_id)
            lengths = rl.response_lengths(responses, tokenizer.eos_token_id)  # (B,)
            mask = rl.mask_from_lengths(lengths, responses.shape[1])
            query_responses = torch.cat([query, responses], 1)
            attention_mask = torch.cat([query_mask, mask.long()], 1)
            width = query.shape[1]
            if model is reference:  # KL of a model to itself is 0: skip two forwards
                kl = torch.zeros(len(chunk), device=responses.device)
            else:
                logprobs, _ = response_logprobs(
                    lm_logits(model, query_responses, attention_mask), responses, width,
                    cfg.temperature)
                ref_logprobs, _ = response_logprobs(
                    lm_logits(reference, query_responses, attention_mask), responses, width,
                    cfg.temperature)
                kl = rl.per_token_kl(logprobs, ref_logprobs).masked_fill(~mask, 0.0).sum(1)
            scores = reward_model.score(query_responses, attention_mask).float().tolist()
            bar.advance()
            if filler:
                continue
            out["prompt"] += chunk
            out["text"] += decode_responses(tokenizer, responses)
            out["score"] += scores
            out["kl"] += kl.float().tolist()
            out["length"] += lengths.tolist()
            out["eos"] += (responses == tokenizer.eos_token_id).any(1).tolist()
    if accelerator is not None:
        out = {key: dist.gather_list(accelerator, values) for key, values in out.items()}
    return out


def summarise(samples: dict[str, list], prompts: list[str], params: Params, gold) -> dict:
    n = params.eval.n_samples
    count = len(samples["score"])
    result = {
        "rm_score": sum(samples["score"]) / count,
        "kl": sum(samples["kl"]) / count,
        "response_length": sum(samples["length"]) / count,
        "eos_rate": sum(samples["eos"]) / count,
    }
    if gold is not None:
        golds = [gold(p, t) for p, t in zip(samples["prompt"], samples["text"])]
        samples["gold"] = golds
        correct = [g == 1.0 for g in golds]
        # Samples are grouped by prompt: n consecutive entries each.
        counts = [sum(correct[i * n:(i + 1) * n]) for i in range(len(prompts))]
        result["gold_reward"] = sum(golds) / len(golds)
        result["exact_match"] = sum(correct) / len(correct)
        result["pass_at_k"] = {str(k): rl.pass_at_k_array(n, counts, k)
                               for k in ks_up_to(params.eval.max_k)}
    return result


def completions_table(policy: dict[str, list], reference: dict[str, list], n_samples: int,
                      prompts: int = 32) -> list[dict]:
    """The first sample of each model on up to `prompts` eval prompts, side by side."""
    rows = []
    for i in range(0, min(len(policy["prompt"]), prompts * n_samples), n_samples):
        row = {"prompt": policy["prompt"][i], "policy": policy["text"][i],
               "policy_rm_score": round(policy["score"][i], 4),
               "reference": reference["text"][i],
               "reference_rm_score": round(reference["score"][i], 4)}
        if "gold" in policy:
            row.update(policy_gold=policy["gold"][i], reference_gold=reference["gold"][i])
        rows.append(row)
    return rows


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """How often sample i of ours beats sample i of theirs (same prompt); ties count half."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)]
    return sum(wins) / len(wins)


def select_prompts(prompts: list[str], max_prompts, seed: int) -> list[str]:
    """At most `max_prompts` of `prompts`: a seeded sample in the original order (all of them
    when max_prompts is None or not smaller)."""
    if max_prompts is None or len(prompts) <= max_prompts:
        return prompts
    keep = sorted(random.Random(seed).sample(range(len(prompts)), max_prompts))
    return [prompts[i] for i in keep]


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    trust = params.model.trust_remote_code
    available = [r["prompt"] for r in read_jsonl(paths.prepared / "eval_prompts.jsonl",
                                                 produced_by="prepare")]
    prompts = select_prompts(available, params.eval.max_prompts, params.data.seed)
    require_model(paths.policy, produced_by="ppo")
    reward_stage.verify(paths.reward)
    reference_stage.verify(paths.reference)
    accelerator = make_accelerator(params.train, seed_offset=5)
    device = accelerator.device
    tokenizer = load_tokenizer(paths.policy, trust)
    policy = accelerator.shard(load_causal_lm(paths.policy, trust).eval(), "generate")
    reference = accelerator.shard(load_causal_lm(paths.reference, trust).eval(), "generate")
    reward_model = accelerator.shard(ScalarHeadModel.load(paths.reward, trust).eval(), "score")
    gold = gold_reward_fn(params)

    policy_samples = sample_and_score(policy, reference, reward_model, tokenizer, prompts,
                                      params, device, "policy", accelerator)
    reference_samples = sample_and_score(reference, reference, reward_model, tokenizer,
                                         prompts, params, device, "reference", accelerator)
    report = {
        "policy": summarise(policy_samples, prompts, params, gold),
        "reference": summarise(reference_samples, prompts, params, gold),
        "n_prompts": len(prompts),
        **({"n_prompts_available": len(available)} if len(prompts) < len(available) else {}),
        "n_samples": params.eval.n_samples,
        "kl_budget": params.eval.kl_budget,
        "world_size": accelerator.num_processes,
        "sharding": accelerator.sharding,
    }
    report["kl_within_budget"] = report["policy"]["kl"] <= params.eval.kl_budget
    # Judged by the reward model: the only judge there is on data without a gold reward.
    report["rm_win_rate"] = win_rate(policy_samples["score"], reference_samples["score"])
    if gold is not None:
        report["win_rate"] = win_rate(policy_samples["gold"], reference_samples["gold"])
        report["gold_ratio"] = (report["policy"]["gold_reward"]
                                / max(report["reference"]["gold_reward"], 1e-9))

    logger.log_table("eval_completions", completions_table(policy_samples, reference_samples,
                                                           params.eval.n_samples))
    if accelerator.is_main_process:
        write_json(paths.metrics_file("eval"), report, sort_keys=False)  # k in numeric order
        # Written on every task (header only without a gold answer): dvc.yaml declares it.
        write_pass_at_k(paths.metrics / "pass_at_k.csv", report)
        for plot in make_plots(report, paths):
            logger.log_artifact(plot)
    metrics = flatten(report)
    logger.log_metrics(metrics)
    return report


def flatten(report: dict, prefix: str = "eval") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float, bool)):
            flat[name] = float(value)
    return flat


def write_pass_at_k(path: Path, report: dict) -> None:
    lines = ["k,policy,reference"] + [
        f"{k},{report['policy']['pass_at_k'][k]:.6g},{report['reference']['pass_at_k'][k]:.6g}"
        for k in report["policy"].get("pass_at_k", {})]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def make_plots(report: dict, paths: Paths) -> list[Path]:
    """pass@k curves; gold reward and KL over PPO steps; reward against KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths.plots.mkdir(parents=True, exist_ok=True)
    written = []
    if "pass_at_k" in report["policy"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name in ("policy", "reference"):
            curve = report[name]["pass_at_k"]
            ax.plot([int(k) for k in curve], list(curve.values()), marker="o",
                    label=name if name == "policy" else "reference (SFT)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k", ylabel="pass@k", title="pass@k on held-out prompts", ylim=(0, 1.02))
        ax.legend()
        written.append(_save(fig, paths.plots / "pass_at_k.png"))

    history = read_history(paths.metrics / "ppo_history.csv")
    if history:
        steps = [row["step"] for row in history]
        fig, left = plt.subplots(figsize=(6, 3.5))
        if "objective/gold_reward" in history[0]:
            left.plot(steps, [r.get("objective/gold_reward") for r in history], color="C0",
                      label="gold reward (rollouts)")
        left.plot(steps, [r["objective/scores"] for r in history], color="C2", alpha=0.6,
                  label="RM score (rollouts)")
        left.set(xlabel="PPO step", ylabel="reward")
        right = left.twinx()
        right.plot(steps, [r["objective/kl"] for r in history], color="C3", label="KL")
        right.set_ylabel("KL to reference (nats)")
        fig.legend(loc="lower right", fontsize=8)
        left.set_title("PPO: reward and KL over steps")
        written.append(_save(fig, paths.plots / "ppo_reward_kl.png"))

        fig, ax = plt.subplots(figsize=(5, 3.5))
        kls = [r["objective/kl"] for r in history]
        ax.scatter(kls, [r["objective/scores"] for r in history], s=8, label="RM score", c="C2")
        if "objective/gold_reward" in history[0]:
            ax.scatter(kls, [r.get("objective/gold_reward") for r in history], s=8,
                       label="gold reward", c="C0")
        ax.set(xlabel="KL to reference (nats)", ylabel="reward", title="reward against KL")
        ax.legend()
        written.append(_save(fig, paths.plots / "reward_vs_kl.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
