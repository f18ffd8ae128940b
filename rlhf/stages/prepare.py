"""Stage `prepare`: build the data splits and their manifest.

Writes `data/prepared/{sft,preference_train,preference_eval,rl_prompts,eval_prompts}.jsonl`
and `manifest.json` (row counts, content hashes and, for the builtin task, the label-noise
ceiling: the best accuracy any reward model can reach on the held-out pairs).

With `data.source` a local file or folder or a hub dataset, the rows are read, turned into
the same canonical rows by the adapter of `data.format` (detected when `auto`), validated
(a bad row stops the run or, with `data.on_bad_row=drop`, is dropped and counted by
reason), deduplicated, and cleaned of train/eval prompt overlap. The manifest accounts for
every row: per split and in total, rows in = rows kept + rows dropped (by reason).
"""

from __future__ import annotations

from typing import Callable

from rlhf.config import Params
from rlhf.data import builtin_sort, sources
from rlhf.data.formats import (
    PREFERENCE_ADAPTERS, REASONS, ChatRenderer, detect_format, detect_prompt_format,
    detect_sft_format, prompt_adapter, sft_adapter,
)
from rlhf.data.validate import Item, SplitReport, adapt, dedupe, hold_out, remove_prompts
from rlhf.errors import DataError, UserError
from rlhf.io import atomic_dir, sha256_file, write_json, write_jsonl
from rlhf.paths import Paths
from rlhf.tracking import MetricsLogger, NullLogger

SPLITS = ("sft", "preference_train", "preference_eval", "rl_prompts", "eval_prompts")
DETECT_SAMPLE = 100  # rows whose columns are pooled to detect a format


def run(params: Params, paths: Paths, logger: MetricsLogger = NullLogger()) -> dict:
    cfg = params.data
    if cfg.source != "builtin":
        return run_external(params, paths, logger)
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


# --- external data -----------------------------------------------------------------------

def load_data_tokenizer(params: Params, paths: Paths):
    """The base model's tokenizer: token counts for data.max_length, and chat templates."""
    if params.model.name_or_path == "builtin":
        raise DataError(
            f"data.source {params.data.source!r} needs a real base model, but the builtin "
            "model's tokenizer only knows the digits 0-9 and '='; set model.name_or_path to a "
            "Hugging Face model id or a local model folder"
        )
    from rlhf.models.base import resolve_base_model
    from rlhf.models.loading import load_tokenizer

    base = resolve_base_model(params.model, paths)
    try:
        return load_tokenizer(base, params.model.trust_remote_code, params.model.revision)
    except UserError:  # load_tokenizer's own line already names the model and the fix
        raise
    except Exception as exc:  # OSError, ValueError...: all mean the same fix
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load the tokenizer of model.name_or_path {base!r} ({detail}); prepare "
            "needs it to count tokens and render chat templates; check model.name_or_path"
        ) from None


def detect(loaded: sources.Loaded, detector: Callable[[dict, str], str], key: str,
           on_bad_row: str) -> str:
    """A format detected from the columns of the first rows (pooled, so one row missing a
    field does not mislead it; a list anywhere marks the column as messages)."""
    if not loaded.rows:
        raise DataError(f"{key} {loaded.description} has no rows; add data or fix {key}")
    pooled: dict = {}
    for raw in [r for r in loaded.rows if r.data is not None][:DETECT_SAMPLE]:
        for column, value in raw.data.items():
            if pooled.get(column) is None or isinstance(value, list):
                pooled[column] = value
    if not pooled:
        first = loaded.rows[0]
        if on_bad_row == "error":
            raise DataError(f"{first.where}: {first.error}; fix the row or set "
                            "data.on_bad_row=drop")
        raise DataError(f"{key} {loaded.description}: none of its first rows is a JSON object "
                        f"({first.where}: {first.error}); fix the file")
    return detector(pooled, loaded.description)


def _require(items: list, split: str, report: SplitReport) -> None:
    if not items:
        raise DataError(
            f"no usable rows left for {split} from {report.origin}: {report.rows_in} rows in, "
            f"dropped {dict(report.dropped) or 'none'}"
            + (f", {report.held_out} held out" if report.held_out else "")
            + "; fix the data at its source"
        )


class _Reader:
    """Reads, adapts, validates and deduplicates one source split, keeping its lineage."""

    def __init__(self, params: Params, paths: Paths, tokenizer):
        self.cfg, self.root = params.data, paths.root
        self.checks = dict(render=ChatRenderer(tokenizer, params.model.name_or_path),
                           tokenizer=tokenizer, max_length=self.cfg.max_length,
                           on_bad_row=self.cfg.on_bad_row)
        self.inputs: dict[str, list] = {}
        self.truncated: list[str] = []  # splits whose source held more than data.max_rows rows

    def __call__(self, name: str, key: str, source: str, split: str, kind: str,
                 detector: Callable[[dict, str], str], adapter_for: Callable,
                 fmt: str = "auto", subset=None, whole_file_split: bool = True
                 ) -> tuple[list[Item], SplitReport, str]:
        # data.revision pins data.source only: another dataset has commits of its own.
        revision = self.cfg.revision if key == "data.source" else None
        loaded = sources.load(source, split, subset, self.root, self.cfg.max_rows, key=key,
                              whole_file_split=whole_file_split, revision=revision)
        self.inputs[name] = loaded.inputs
        if loaded.truncated:
            self.truncated.append(name)
        if fmt == "auto":
            fmt = detect(loaded, detector, key, self.cfg.on_bad_row)
        report = SplitReport(loaded.description, fmt)
        items = adapt(loaded.rows, adapter_for(fmt), kind=kind, report=report, **self.checks)
        return dedupe(items, kind, report), report, fmt


def _derived(items: list[Item], make: Callable[[dict], dict], kind: str, origin: str,
             fmt: str) -> tuple[list[Item], SplitReport]:
    """A split made from another split's kept rows (deduplicated, counted)."""
    report = SplitReport(origin, fmt, rows_in=len(items))
    return dedupe([Item(make(i.row), i.where, {}) for i in items], kind, report), report


def run_external(params: Params, paths: Paths, logger: MetricsLogger) -> dict:
    cfg = params.data
    read = _Reader(params, paths, load_data_tokenizer(params, paths))
    reports: dict[str, SplitReport] = {}
    primary = ["preference_train", "preference_eval"]  # splits whose rows are read from a source

    # Preference pairs: the training split, and an eval split read or held out.
    train, reports["preference_train"], fmt = read(
        "preference_train", "data.source", cfg.source, cfg.split, "pair", detect_format,
        PREFERENCE_ADAPTERS.__getitem__, cfg.format, cfg.subset)
    if cfg.eval_split is not None:
        evals, reports["preference_eval"], _ = read(
            "preference_eval", "data.source", cfg.source, cfg.eval_split, "pair", detect_format,
            PREFERENCE_ADAPTERS.__getitem__, fmt, cfg.subset, whole_file_split=False)
        _require(evals, "preference_eval", reports["preference_eval"])
        train = remove_prompts(train, {item.row["prompt"] for item in evals},
                               reports["preference_train"])
    else:
        _require(train, "preference_train", reports["preference_train"])
        train, evals = hold_out(train, cfg.eval_fraction, cfg.seed, reports["preference_train"],
                                reports["preference_train"].origin)
        reports["preference_eval"] = SplitReport(
            f"held out from preference_train ({cfg.eval_fraction:g} of its prompts, "
            f"seed {cfg.seed})", fmt, rows_in=len(evals))
    _require(train, "preference_train", reports["preference_train"])
    eval_prompt_set = {item.row["prompt"] for item in evals}

    # SFT demonstrations: a separate source, or prompt + chosen of the training pairs.
    if cfg.sft_source is not None:
        sft, reports["sft"], _ = read("sft", "data.sft_source", cfg.sft_source, cfg.split, "sft",
                                      detect_sft_format, sft_adapter)
        sft = remove_prompts(sft, eval_prompt_set, reports["sft"])
        primary.append("sft")
    else:
        sft, reports["sft"] = _derived(
            train, lambda r: {"prompt": r["prompt"], "completion": r["chosen"]}, "sft",
            "preference_train (prompt + chosen)", fmt)
    _require(sft, "sft", reports["sft"])

    # RL prompts: a separate source, or the training pairs' prompts.
    if cfg.prompts_source is not None:
        rl, reports["rl_prompts"], _ = read(
            "rl_prompts", "data.prompts_source", cfg.prompts_source, cfg.split, "prompt",
            detect_prompt_format, prompt_adapter)
        rl = remove_prompts(rl, eval_prompt_set, reports["rl_prompts"])
        primary.append("rl_prompts")
    else:
        rl, reports["rl_prompts"] = _derived(train, lambda r: {"prompt": r["prompt"]}, "prompt",
                                             "preference_train prompts", fmt)
    _require(rl, "rl_prompts", reports["rl_prompts"])
    eval_rows, reports["eval_prompts"] = _derived(evals, lambda r: {"prompt": r["prompt"]},
                                                  "prompt", "preference_eval prompts", fmt)

    splits = {"sft": sft, "preference_train": train, "preference_eval": evals,
              "rl_prompts": rl, "eval_prompts": eval_rows}
    for name, items in splits.items():
        reports[name].finish(len(items))

    # Totals over the rows read from sources (a held-out eval split's rows are counted once,
    # as held out of the training split and then as the eval split's own).
    rows_in = sum(reports[n].rows_in for n in primary
                  if not (n == "preference_eval" and cfg.eval_split is None))
    rows_kept = sum(reports[n].rows_kept for n in primary)
    dropped: dict[str, int] = {}
    for name in primary:
        for reason, count in reports[name].dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    if rows_in != rows_kept + sum(dropped.values()):
        raise AssertionError(f"row accounting: {rows_in} in, {rows_kept} kept, {dropped} dropped")

    manifest = {
        "source": cfg.source,
        "revision": cfg.revision,
        "format": fmt,
        "tokenizer": params.model.name_or_path,
        "tokenizer_revision": params.model.revision,
        "max_length": cfg.max_length,
        "on_bad_row": cfg.on_bad_row,
        "counts": {name: len(items) for name, items in splits.items()},
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "dropped": dict(sorted(dropped.items())),
        "leakage": {
            "duplicates_removed": dropped.get("duplicate", 0),
            "train_eval_overlap_removed": dropped.get("train_eval_overlap", 0),
        },
        "splits": {name: reports[name].as_dict() for name in splits},
        "inputs": read.inputs,
    }
    if cfg.max_rows is not None:
        manifest["max_rows"] = {"limit": cfg.max_rows, "truncated": read.truncated}
    with atomic_dir(paths.prepared) as out:
        for name, items in splits.items():
            write_jsonl(out / f"{name}.jsonl", [item.row for item in items])
        manifest["sha256"] = {name: sha256_file(out / f"{name}.jsonl") for name in splits}
        write_json(out / "manifest.json", manifest)

    metrics = {
        "data/rows_in": float(rows_in),
        "data/rows_kept": float(rows_kept),
        **{f"data/dropped/{reason}": float(dropped.get(reason, 0)) for reason in REASONS},
        **{f"data/leakage/{k}": float(v) for k, v in manifest["leakage"].items()},
        **{f"data/rows_{name}": float(n) for name, n in manifest["counts"].items()},
    }
    logger.log_metrics(metrics)
    return metrics
