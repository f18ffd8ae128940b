"""The run report and the promotion table, as Markdown: one text for the terminal (`rlhf
run`, `rlhf status`, `rlhf promote`, rendered by rich) and for the Prefect artifacts.

Everything comes from the files the stages wrote (metrics/*.json) and the MLflow registry, so
a run whose stages DVC skipped reports the same figures as the run that computed them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from rlhf.redact import redact_value

SQLITE_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` serves a local (SQLite) store by default."""


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def mlflow_ui(tracking_uri: str) -> tuple[str, str]:
    """(base URL of the MLflow UI for this store, how to open it)."""
    shown = redact_value(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return shown.rstrip("/"), shown.rstrip("/")
    return SQLITE_UI, f"mlflow ui --backend-store-uri {shown}  ({SQLITE_UI})"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui(tracking_uri)[0]}/#/experiments/{experiment_id}/runs/{run_id}"


def prefect_ui() -> str:
    api = os.environ.get("PREFECT_API_URL")
    if api:
        return api.rstrip("/").removesuffix("/api")
    return "prefect server start  (http://127.0.0.1:4200)"


def headline(evaluation: dict) -> dict:
    """The evaluation's figures that matter, flat (the pipeline run's `eval/*` metrics)."""
    policy, reference = evaluation["policy"], evaluation["reference"]
    figures = {"gold_reward": policy.get("gold_reward"),
               "reference_gold_reward": reference.get("gold_reward"),
               **{key: evaluation.get(key) for key in (
                   "gold_ratio", "win_rate", "kl_budget", "kl_within_budget")},
               "rm_score": policy.get("rm_score"), "kl": policy.get("kl"),
               **{f"pass_at_{k}": v for k, v in policy.get("pass_at_k", {}).items()}}
    return {key: value for key, value in figures.items() if value is not None}


def pass_at_k_table(evaluation: dict) -> list[dict]:
    policy = evaluation["policy"].get("pass_at_k", {})
    reference = evaluation["reference"].get("pass_at_k", {})
    return [{"k": int(k), "policy": policy[k], "reference": reference.get(k)}
            for k in sorted(policy, key=int)]


def _registry_lines(model_name: str) -> list[str]:
    """The candidate and the champion in the active MLflow registry, one line each."""
    from mlflow import MlflowClient

    from rlhf.mlops import registry

    base = mlflow_ui(MlflowClient().tracking_uri)[0]
    lines = []
    for alias in (registry.CANDIDATE, registry.CHAMPION):
        version = registry.alias_version(model_name, alias)
        if version is None:
            lines.append(f"- {alias}: none yet" + ("; promote with `rlhf promote`"
                                                   if alias == registry.CHAMPION else ""))
            continue
        mv = MlflowClient().get_model_version(model_name, str(version))
        figures = ", ".join(f"{label} {float(mv.tags[key]):.3g}" for key, label in (
            ("eval.policy.gold_reward", "gold"), ("eval.gold_ratio", "gold ratio"),
            ("eval.rm_win_rate", "RM win rate"), ("eval.policy.kl", "KL")) if key in mv.tags)
        run = MlflowClient().get_run(mv.run_id) if mv.run_id else None
        link = mlflow_run_url(base, run.info.experiment_id, mv.run_id) if run else "no run"
        lines.append(f"- {alias}: **{model_name}** v{version}: {figures or 'no eval tags'}; "
                     f"git {mv.tags.get('git.commit', 'unknown')[:12]}; {link}")
    return lines


def run_report(root: Path, stage_states: Optional[dict] = None,
               resources: Optional[dict] = None, run_url: Optional[str] = None,
               tracking_uri: Optional[str] = None) -> str:
    """The held-out evaluation, the reward model, the registered versions, what each stage
    did and cost, and where to look."""
    metrics = Path(root) / "metrics"
    evaluation, reward, registered = (_read(metrics / f"{name}.json")
                                      for name in ("eval", "reward", "register"))
    policy, reference = evaluation["policy"], evaluation["reference"]
    lines = ["# rlhf: held-out evaluation", "", "| metric | policy | reference (SFT) |",
             "| --- | --- | --- |"]
    lines += [f"| {key} | {_fmt(policy[key])} | {_fmt(reference[key])} |" for key in (
        "gold_reward", "exact_match", "rm_score", "kl", "response_length", "eos_rate")
        if key in policy]
    lines += [f"| pass@{k} | {_fmt(policy['pass_at_k'][k])} | "
              f"{_fmt(reference['pass_at_k'][k])} |" for k in ("1", "8", "64")
              if k in policy.get("pass_at_k", {})]
    lines.append("")
    budget = (f"KL {_fmt(policy['kl'])} nats (budget {_fmt(evaluation['kl_budget'])}: "
              f"{'within' if evaluation['kl_within_budget'] else '**EXCEEDED**'})")
    if "gold_ratio" in evaluation:
        lines.append(f"- gold ratio policy/reference **{_fmt(evaluation['gold_ratio'])}x**, "
                     f"win rate {_fmt(evaluation['win_rate'])}, {budget}")
    elif "rm_win_rate" in evaluation:
        lines.append(f"- RM win rate over the reference {_fmt(evaluation['rm_win_rate'])}, "
                     f"{budget}")
    if reward:
        ceiling = (f" (noise ceiling {_fmt(reward['reward/noise_ceiling'])})"
                   if "reward/noise_ceiling" in reward else "")
        lines.append(f"- reward model accuracy {_fmt(reward['reward/accuracy'])}{ceiling}")
    if registered:
        lines.append(f"- model version: **{registered['model_name']}** v{registered['version']}"
                     f" (alias {registered['alias']}) registered by the last run")
        if tracking_uri:
            try:
                lines += _registry_lines(registered["model_name"])
            except Exception as exc:  # the figures above come from files: the store may be away
                lines.append(f"- registry at {redact_value(tracking_uri)} not readable "
                             f"({type(exc).__name__}); the figures above are from metrics/")
    if stage_states:
        lines += ["", "| stage | state | wall s | peak RSS MB |", "| --- | --- | --- | --- |"]
        for stage, state in stage_states.items():
            cost = (resources or {}).get(stage, {})
            lines.append(f"| {stage} | {state} | {_fmt(cost.get('wall_seconds', '-'))} | "
                         f"{_fmt(cost.get('peak_rss_mb', '-'))} |")
    ui = mlflow_ui(tracking_uri)[1] if tracking_uri else "not tracked (--no-track)"
    lines += ["", "Where to look:", "", f"- MLflow run: {run_url}" if run_url else "",
              f"- MLflow UI: {ui}", f"- Prefect UI: {prefect_ui()}",
              f"- metrics: {metrics}/*.json, plots in {Path(root) / 'plots'}; "
              "`dvc metrics show`; `dvc plots show`"]
    return "\n".join(line for line in lines if line is not None) + "\n"


def promotion_report(name: str, decision: dict) -> str:
    """The promotion gate's table (a `registry.Decision` as a dict): each criterion, its
    value, threshold and verdict."""
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    lines = [f"# {name} version {decision['version']}: {verdict}", "",
             f"Previous champion: {decision['previous_champion'] or 'none'}", "",
             "| criterion | value | threshold | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['criterion']} | {_fmt(c['value'])} | {c['threshold']} | "
              f"{'pass' if c['passed'] else '**FAIL**'} |" for c in decision["criteria"]]
    lines += ["", *[f"- passed: {line}" for line in decision["passed"]]]
    lines += [f"- **failed**: {line}" for line in decision["reasons"]]
    return "\n".join(lines) + "\n"
