"""Stage `prepare`: build the data splits and their manifest.

Writes `data/prepared/{sft,preference_train,preference_eval,rl_prompts,eval_prompts}.jsonl`
and `manifest.json` (row counts, content hashes and, for the builtin task, the label-noise
ceiling: the best accuracy any reward model can reach on the held-out pairs).
"""

from __future__ import annotations

from rlhf.config import Params
from rlhf.data import builtin_sort
from rlhf.errors import DataError
from rlhf.io import atomic_dir, sha256_file, write_json, write_jsonl
from rlhf.paths import Paths
from rlhf.tracking import MetricsLogger, NullLogger

SPLITS = ("sft", "preference_train", "preference_eval", "rl_prompts", "eval_prompts")


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    cfg = params.data
    if cfg.source != "builtin":
        raise DataError(
            f"data.source {cfg.source!r} is not supported yet; use data.source=builtin"
        )
    try:
        splits = builtin_sort.generate_splits(
            seed=cfg.seed, min_digits=cfg.min_digits, max_digits=cfg.max_digits,
            n_sft=cfg.n_sft, n_pairs=cfg.n_pairs, n_pairs_eval=cfg.n_pairs_eval,
            n_rl_prompts=cfg.n_rl_prompts, n_eval_prompts=cfg.n_eval_prompts,
            demo_correct_prob=cfg.demo_correct_prob,
            candidate_correct_prob=cfg.candidate_correct_prob,
            label_temperature=cfg.label_temperature,
        )
    except ValueError as exc:
        raise DataError(str(exc)) from None

    demos = splits["sft"]
    manifest = {
        "source": "builtin",
        "task": "sort_digits",
        "gold_reward": "1.0 for the exact sort, else 0.5 * fraction of matching positions",
        "counts": {name: len(rows) for name, rows in splits.items()},
        "noise_ceiling": builtin_sort.noise_ceiling(splits["preference_eval"]),
        "noise_ceiling_train": builtin_sort.noise_ceiling(splits["preference_train"]),
        "sft_demo_exact_match": sum(
            builtin_sort.is_correct(r["prompt"], r["completion"]) for r in demos) / len(demos),
        "sft_demo_gold_reward": sum(
            builtin_sort.gold_score(r["prompt"], r["completion"]) for r in demos) / len(demos),
    }
    with atomic_dir(paths.prepared) as out:
        for name, rows in splits.items():
            write_jsonl(out / f"{name}.jsonl", rows)
        manifest["sha256"] = {name: sha256_file(out / f"{name}.jsonl") for name in splits}
        write_json(out / "manifest.json", manifest)

    metrics = {
        "data/noise_ceiling": manifest["noise_ceiling"],
        "data/sft_demo_exact_match": manifest["sft_demo_exact_match"],
        **{f"data/rows_{name}": float(n) for name, n in manifest["counts"].items()},
    }
    logger.log_metrics(metrics)
    return metrics
