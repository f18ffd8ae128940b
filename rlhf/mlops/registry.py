"""The model registry: register the trained policy, promote it through a gate, load it back.

A registered model (default name in the flow: `rlhf-policy`) gets one version per pipeline
run. Two aliases mark versions (aliases replace MLflow's old stages):

- `candidate`: the version registered last, waiting for the promotion gate;
- `champion`: the version that passed the gate last, the one to serve.

Each version carries its evaluation metrics as tags (`eval.policy.gold_reward`,
`eval.kl_within_budget`, ...), flattened from `metrics/eval.json`, plus lineage tags (git
commit, params digest, DVC hashes, Prefect flow run id). `promote` reads them back from the
tags, so a decision can be re-made later from the registry alone.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rlhf.config import PromoteConfig
from rlhf.mlops.mlflow_tracking import redact

CANDIDATE = "candidate"
CHAMPION = "champion"
EVAL_PREFIX = "eval."

# The flavor's own requirement inference imports extras and is slow: name what loading needs.
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers")


def pip_requirements() -> list[str]:
    """`pkg==version` for what loading the logged policy needs (local `+cpu` tags dropped)."""
    return [
        f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS
    ]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = EVAL_PREFIX) -> dict[str, str]:
    """{"policy": {"gold_reward": 0.8}} -> {"eval.policy.gold_reward": "0.8"}; bools as true/false."""
    flat: dict[str, str] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, bool):
            flat[name] = str(value).lower()
        else:
            flat[name] = str(value)
    return flat


def register_policy(
    model_dir: Path,
    registered_name: str,
    eval_metrics: Mapping[str, Any],
    lineage_tags: Mapping[str, Any],
    run_id: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    input_example: str | None = None,
) -> int:
    """Log the policy in `model_dir` as a new version of `registered_name`; returns its number.

    The model is logged (`name="policy"`, task text-generation) under `run_id`, else under this
    thread's active run, else under a new run. The version is tagged with the flattened eval
    metrics and the (redacted) lineage tags, and gets the alias `candidate`.

    `sampling` ({temperature, max_new_tokens}) becomes the model's generation config (pure
    ancestral sampling: do_sample, top_k=0, top_p=1), so the registered model generates the way
    it was evaluated; `input_example` (a prompt) gives the version an example and a signature.
    """
    from transformers import AutoModelForCausalLM

    def generating_as_evaluated(model, tokenizer) -> None:
        if sampling is not None:
            model.generation_config = evaluated_generation_config(model, tokenizer, sampling)

    signature = None
    if input_example is not None:
        from mlflow.models import infer_signature

        # Declared rather than inferred: inference would generate from the example.
        signature = infer_signature(input_example, "generated text")
    version = _register(AutoModelForCausalLM, model_dir, "policy", "text-generation",
                        registered_name, run_id, {**flatten_metrics(eval_metrics), **lineage_tags},
                        generating_as_evaluated, input_example=input_example, signature=signature)
    MlflowClient().set_registered_model_alias(registered_name, CANDIDATE, str(version))
    return version


def register_reward_model(model_dir: Path, registered_name: str, sha256: str,
                          lineage_tags: Mapping[str, Any], run_id: str | None = None) -> int:
    """Log the reward model (a standard AutoModelForSequenceClassification, num_labels=1) as a
    version of `registered_name`, unless a version with the same `reward.sha256` exists: a
    cached reward stage keeps its version. Returns the version number."""
    from transformers import AutoModelForSequenceClassification

    try:
        same = MlflowClient().search_model_versions(
            f"name = '{registered_name}' and tags.`reward.sha256` = '{sha256}'")
    except MlflowException:  # a store without tag search: register again
        same = []
    if same:
        return int(same[0].version)
    return _register(AutoModelForSequenceClassification, model_dir, "reward_model",
                     "text-classification", registered_name, run_id,
                     {**lineage_tags, "reward.sha256": sha256})


def _register(model_class, model_dir: Path, name: str, task: str, registered_name: str,
              run_id: str | None, tags: Mapping[str, Any], prepare=None, **log_options) -> int:
    """Log the transformers model in `model_dir` (and its tokenizer) under `run_id`, else this
    thread's active run, else a new run, as a new version of `registered_name`, tagged with
    `tags` (redacted); returns the version number."""
    from transformers import AutoTokenizer

    # Our own output (a plain transformers model): no remote code, safetensors only. From an
    # absolute path, which becomes `name_or_path`: MLflow's transformers flavor looks a
    # relative one (`models/policy`) up on the Hugging Face hub for a model card and a
    # license, 46 s of retries on a machine without the hub.
    model = model_class.from_pretrained(Path(model_dir).resolve(), use_safetensors=True,
                                        trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if prepare is not None:
        prepare(model, tokenizer)
    active = mlflow.active_run()
    with contextlib.ExitStack() as stack:
        if run_id is None and active is None:
            run_id = stack.enter_context(
                mlflow.start_run(run_name=f"register-{registered_name}")).info.run_id
            active = mlflow.active_run()
        run_id = run_id or active.info.run_id
        model_id = None
        if active is None or active.info.run_id != run_id:
            # Not this thread's active run (e.g. a parent run opened in another thread):
            # MLflow would file the LoggedModel under the default experiment, so create it in
            # the run's.
            model_id = mlflow.initialize_logged_model(
                name=name, source_run_id=run_id,
                experiment_id=MlflowClient().get_run(run_id).info.experiment_id).model_id
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name=name, task=task,
            pip_requirements=pip_requirements(), registered_model_name=registered_name,
            run_id=run_id, model_id=model_id, **log_options)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in redact(tags).items():
        client.set_model_version_tag(registered_name, version, key, value)
    return int(version)


def evaluated_generation_config(model, tokenizer, sampling: Mapping[str, Any]):
    """The generation config evaluate sampled with: every other sampling field at its neutral
    value, whatever the base model's own generation_config.json said."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=float(sampling["temperature"]), top_k=0, top_p=1.0,
        max_new_tokens=int(sampling["max_new_tokens"]), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=model.config.bos_token_id)


@dataclass
class PromotionDecision:
    """What `promote` decided, and why."""

    version: int
    """The version that was judged."""
    promoted: bool
    """True when every check passed and `champion` now points at `version`."""
    previous_champion: int | None
    """The champion before the decision (None when there was none)."""
    reasons: list[str] = field(default_factory=list)
    """One line per failed check, with the numbers; empty when promoted."""
    passed: list[str] = field(default_factory=list)
    """One line per passed check."""
    criteria: list[dict] = field(default_factory=list)
    """Every criterion judged: {criterion, value, threshold, passed}."""


def alias_version(registered_name: str, alias: str) -> int | None:
    """The version an alias points at, or None when the alias is not set."""
    try:
        return int(MlflowClient().get_model_version_by_alias(registered_name, alias).version)
    except MlflowException as exc:
        # A missing alias is INVALID_PARAMETER_VALUE "Registered model alias X not found." in
        # 3.17 (a missing model is RESOURCE_DOES_NOT_EXIST, and is re-raised).
        message = str(exc).lower()
        if "alias" in message and "not found" in message:
            return None
        raise


def _number(tags: Mapping[str, str], key: str) -> float | None:
    try:
        value = float(tags[key])
    except (KeyError, ValueError):
        return None
    return None if math.isnan(value) else value


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def _at_least(criterion: str, label: str, value: float | None, needed: float,
              shown: str | None = None) -> tuple | None:
    """A check that `value` >= `needed` (shown in the line as `shown`); None without a value."""
    if value is None:
        return None
    passed = value >= needed
    return (criterion, value, f">= {_fmt(needed)}", passed,
            f"{label} {_fmt(value)} {'>=' if passed else '<'} {shown or _fmt(needed)}")


def promote(
    registered_name: str, version: int | None = None, gate: PromoteConfig = PromoteConfig(),
    champion_win_rate: Callable[[int, int], float] | None = None,
) -> PromotionDecision:
    """Judge `version` (None: the `candidate` alias) with `gate` (params `promote`); move
    `champion` to it if it passes.

    Each criterion applies where its figure exists: the gold-reward ones only on tasks with a
    gold answer, the champion ones only when there is a champion. The figures come from the
    version's `eval.*` tags, except the RM win rate against the champion, which
    `champion_win_rate(version, champion)` measures (None: not judged). On a refusal the
    `champion` alias is left where it was. The decision is written on the version as
    `promotion.*` tags: the verdict, and each criterion with its value and threshold.
    """
    client = MlflowClient()
    if version is None:
        version = alias_version(registered_name, CANDIDATE)
        if version is None:
            raise ValueError(f"registered model {registered_name!r} has no {CANDIDATE!r} alias")
    tags = client.get_model_version(registered_name, str(version)).tags
    champion = alias_version(registered_name, CHAMPION)
    decision = PromotionDecision(version=version, promoted=False, previous_champion=champion)
    rival = champion if champion is not None and champion != version else None
    rival_tags = client.get_model_version(registered_name, str(rival)).tags if rival else {}
    gold, champion_gold = (_number(t, "eval.policy.gold_reward") for t in (tags, rival_tags))
    ratio = _number(tags, "eval.gold_ratio")
    kl, budget = _number(tags, "eval.policy.kl"), _number(tags, "eval.kl_budget")
    times = ("" if gate.min_gold_ratio_vs_champion == 1.0
             else f"{_fmt(gate.min_gold_ratio_vs_champion)} x ")
    within = tags.get("eval.kl_within_budget")
    kl_line = f"KL {_fmt(kl)} vs budget {_fmt(budget)}: " + (
        "within budget" if within == "true" else
        f"not within budget (eval.kl_within_budget={within})")
    checks = [  # each (criterion, value, threshold, passed, line), None where it does not apply
        _at_least("rm_win_rate_vs_reference", "RM win rate vs reference",
                  _number(tags, "eval.rm_win_rate"), gate.min_rm_win_rate_vs_reference),
        _at_least("rm_win_rate_vs_champion", f"RM win rate vs champion (version {rival})",
                  champion_win_rate(version, rival) if rival and champion_win_rate else None,
                  gate.min_rm_win_rate_vs_champion),
        ("kl_within_budget", kl, f"<= {_fmt(budget)}", within == "true", kl_line)
        if gate.require_kl_within_budget else None,
        _at_least("gold_reward", "gold reward", gold, gate.min_gold_reward,
                  f"minimum {_fmt(gate.min_gold_reward)}"),
        _at_least("gold_reward_vs_champion", "gold reward",
                  gold if rival and champion_gold is not None else None,
                  gate.min_gold_ratio_vs_champion * (champion_gold or 0.0),
                  f"champion's {times}{_fmt(champion_gold)} (version {rival})"),
        _at_least("gold_ratio_vs_reference", "gold ratio vs reference",
                  ratio if gold is not None else None, gate.min_gold_ratio_vs_reference),
    ]
    for criterion, value, threshold, passed, line in filter(None, checks):
        decision.criteria.append({"criterion": criterion, "value": value,
                                  "threshold": threshold, "passed": passed})
        (decision.passed if passed else decision.reasons).append(line)

    if not decision.criteria:
        decision.reasons.append(f"version {version} has no eval figures to judge (no eval.* "
                                "tags): register it through the pipeline")
    decision.promoted = not decision.reasons
    if decision.promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, str(version))
    verdict = {"promotion.decision": "promoted" if decision.promoted else "refused",
               "promotion.previous_champion": str(champion) if champion is not None else "none"}
    for item in decision.criteria:
        verdict[f"promotion.{item['criterion']}"] = (
            f"{_fmt(item['value'])} (needs {item['threshold']}): "
            f"{'pass' if item['passed'] else 'FAIL'}")
    if decision.reasons:
        verdict["promotion.reasons"] = "; ".join(decision.reasons)
    for key, value in verdict.items():
        client.set_model_version_tag(registered_name, str(version), key, value)
    return decision
