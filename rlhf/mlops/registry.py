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

import importlib.metadata
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The policy is our own output (a plain transformers model): no remote code, safetensors only.
    model = AutoModelForCausalLM.from_pretrained(_local(model_dir), use_safetensors=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if sampling is not None:
        model.generation_config = evaluated_generation_config(model, tokenizer, sampling)
    signature = None
    if input_example is not None:
        from mlflow.models import infer_signature

        # Declared rather than inferred: inference would generate from the example.
        signature = infer_signature(input_example, "generated text")
    info = _log_transformers({"model": model, "tokenizer": tokenizer}, "policy",
                             "text-generation", registered_name, run_id,
                             input_example=input_example, signature=signature)
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {**flatten_metrics(eval_metrics), **redact(lineage_tags)}
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    client.set_registered_model_alias(registered_name, CANDIDATE, version)
    return int(version)


def register_reward_model(model_dir: Path, registered_name: str, sha256: str,
                          lineage_tags: Mapping[str, Any], run_id: str | None = None) -> int:
    """Log the reward model (a standard AutoModelForSequenceClassification, num_labels=1) as a
    version of `registered_name`, unless a version with the same `reward.sha256` exists: a
    cached reward stage keeps its version. Returns the version number."""
    client = MlflowClient()
    try:
        same = client.search_model_versions(
            f"name = '{registered_name}' and tags.`reward.sha256` = '{sha256}'")
    except MlflowException:  # a store without tag search: register again
        same = []
    if same:
        return int(same[0].version)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        _local(model_dir), use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    info = _log_transformers({"model": model, "tokenizer": tokenizer}, "reward_model",
                             "text-classification", registered_name, run_id)
    version = str(info.registered_model_version)
    for key, value in {**redact(lineage_tags), "reward.sha256": sha256}.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return int(version)


def _local(model_dir: Path) -> Path:
    """The model's folder as an absolute path, which becomes the model's `name_or_path`.
    MLflow's transformers flavor looks a relative one (`models/policy`) up on the Hugging
    Face hub for a model card and a license: 46 s of retries on a machine without the hub."""
    return Path(model_dir).resolve()


def _log_transformers(components: dict, name: str, task: str, registered_name: str,
                      run_id: str | None, input_example=None, signature=None):
    """Log transformers components under `run_id`, else this thread's active run, else a new
    run, registering them as a new version of `registered_name`."""
    active = mlflow.active_run()
    if run_id is None and active is None:
        with mlflow.start_run(run_name=f"register-{registered_name}") as run:
            return _log_model(components, name, task, registered_name, run.info.run_id, None,
                              input_example, signature)
    run_id = run_id or active.info.run_id
    model_id = None
    if active is None or active.info.run_id != run_id:
        # Not this thread's active run (e.g. a parent run opened in another thread): MLflow
        # would file the LoggedModel under the default experiment, so create it in the run's.
        model_id = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id,
            experiment_id=MlflowClient().get_run(run_id).info.experiment_id).model_id
    return _log_model(components, name, task, registered_name, run_id, model_id, input_example,
                      signature)


def evaluated_generation_config(model, tokenizer, sampling: Mapping[str, Any]):
    """The generation config evaluate sampled with: every other sampling field at its neutral
    value, whatever the base model's own generation_config.json said."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=float(sampling["temperature"]), top_k=0, top_p=1.0,
        max_new_tokens=int(sampling["max_new_tokens"]), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=model.config.bos_token_id)


def _log_model(components: dict, name: str, task: str, registered_name: str, run_id: str,
               model_id: str | None, input_example=None, signature=None):
    return mlflow.transformers.log_model(
        components,
        name=name,
        task=task,
        input_example=input_example,
        signature=signature,
        pip_requirements=pip_requirements(),
        registered_model_name=registered_name,
        run_id=run_id,  # forwarded to mlflow.models.Model.log
        model_id=model_id,
    )


@dataclass(frozen=True)
class PromotionGate:
    """What a candidate must show before it becomes the champion.

    Each criterion applies where its figure exists: the gold-reward ones only on tasks with a
    gold answer, the champion ones only when there is a champion. RM win rates work on any data.
    """

    min_rm_win_rate_vs_reference: float = 0.5
    """The candidate must beat its reference (SFT) on at least this share of eval samples, as the reward model judges (eval.rm_win_rate)."""
    min_rm_win_rate_vs_champion: float = 0.5
    """The candidate must beat the current champion on at least this share of samples, as the candidate's reward model judges (sampled at promotion)."""
    head_to_head_samples: int = 8
    """Samples per eval prompt and model for the candidate-vs-champion comparison."""
    require_kl_within_budget: bool = True
    """The policy's KL to the reference must be within `eval.kl_budget` (`kl_within_budget`)."""
    min_gold_ratio_vs_champion: float = 1.0
    """The candidate's policy gold reward must be >= this times the champion's (no champion: pass)."""
    min_gold_ratio_vs_reference: float = 1.0
    """`gold_ratio` (policy / reference gold reward on the eval prompts) must be >= this."""
    min_gold_reward: float = 0.0
    """The candidate's policy gold reward must be >= this."""


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


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def promote(
    registered_name: str, version: int | None = None, gate: PromotionGate = PromotionGate(),
    champion_win_rate: Callable[[int, int], float] | None = None,
) -> PromotionDecision:
    """Judge `version` (None: the `candidate` alias) with `gate`; move `champion` to it if it passes.

    The figures come from the version's `eval.*` tags, except the RM win rate against the
    champion, which `champion_win_rate(version, champion)` measures (None: not judged). On a
    refusal the `champion` alias is left where it was. The decision is written on the version
    as `promotion.*` tags: the verdict, and each criterion with its value and threshold.
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

    def judge(criterion: str, value, threshold: str, passed: bool, line: str) -> None:
        decision.criteria.append({"criterion": criterion, "value": value,
                                  "threshold": threshold, "passed": passed})
        (decision.passed if passed else decision.reasons).append(line)

    # On any data: the reward model's verdict against the reference, and against the champion.
    rm_win = _number(tags, "eval.rm_win_rate")
    if rm_win is not None:
        needed = gate.min_rm_win_rate_vs_reference
        judge("rm_win_rate_vs_reference", rm_win, f">= {_fmt(needed)}", rm_win >= needed,
              f"RM win rate vs reference {_fmt(rm_win)} {'>=' if rm_win >= needed else '<'} "
              f"{_fmt(needed)}")
    if rival is not None and champion_win_rate is not None:
        rate, needed = champion_win_rate(version, rival), gate.min_rm_win_rate_vs_champion
        judge("rm_win_rate_vs_champion", rate, f">= {_fmt(needed)}", rate >= needed,
              f"RM win rate vs champion (version {rival}) {_fmt(rate)} "
              f"{'>=' if rate >= needed else '<'} {_fmt(needed)}")

    if gate.require_kl_within_budget:
        within = tags.get("eval.kl_within_budget")
        kl, budget = _number(tags, "eval.policy.kl"), _number(tags, "eval.kl_budget")
        numbers = f"KL {_fmt(kl) if kl is not None else '?'} vs budget " + (
            _fmt(budget) if budget is not None else "?"
        )
        judge("kl_within_budget", kl, f"<= {_fmt(budget) if budget is not None else '?'}",
              within == "true", f"{numbers}: within budget" if within == "true" else
              f"{numbers}: not within budget (eval.kl_within_budget={within})")

    # Where the task has a gold answer: the gold reward decides too.
    gold = _number(tags, "eval.policy.gold_reward")
    if gold is not None:
        judge("gold_reward", gold, f">= {_fmt(gate.min_gold_reward)}",
              gold >= gate.min_gold_reward,
              f"gold reward {_fmt(gold)} {'>=' if gold >= gate.min_gold_reward else '<'} "
              f"minimum {_fmt(gate.min_gold_reward)}")
        champion_gold = _number(rival_tags, "eval.policy.gold_reward")
        if rival is not None and champion_gold is not None:
            needed = gate.min_gold_ratio_vs_champion * champion_gold
            times = ("" if gate.min_gold_ratio_vs_champion == 1.0
                     else f"{_fmt(gate.min_gold_ratio_vs_champion)} x ")
            line = f"champion's {times}{_fmt(champion_gold)} (version {rival})"
            judge("gold_reward_vs_champion", gold, f">= {_fmt(needed)}", gold >= needed,
                  f"gold reward {_fmt(gold)} {'>=' if gold >= needed else '<'} {line}")
        ratio = _number(tags, "eval.gold_ratio")
        if ratio is not None:
            needed = gate.min_gold_ratio_vs_reference
            judge("gold_ratio_vs_reference", ratio, f">= {_fmt(needed)}", ratio >= needed,
                  f"gold ratio vs reference {_fmt(ratio)} {'>=' if ratio >= needed else '<'} "
                  f"{_fmt(needed)}")

    if not decision.criteria:
        decision.reasons.append(f"version {version} has no eval figures to judge (no eval.* "
                                "tags): register it through the pipeline")
    decision.promoted = not decision.reasons
    if decision.promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, str(version))
    verdict = {"promotion.decision": "promoted" if decision.promoted else "refused",
               "promotion.previous_champion": str(champion) if champion is not None else "none"}
    for item in decision.criteria:
        value = _fmt(item["value"]) if isinstance(item["value"], float) else str(item["value"])
        verdict[f"promotion.{item['criterion']}"] = (
            f"{value} (needs {item['threshold']}): {'pass' if item['passed'] else 'FAIL'}")
    if decision.reasons:
        verdict["promotion.reasons"] = "; ".join(decision.reasons)
    for key, value in verdict.items():
        client.set_model_version_tag(registered_name, str(version), key, value)
    return decision


def load_candidate(registered_name: str, alias: str = CANDIDATE):
    """The version under `alias` as a transformers text-generation pipeline."""
    return mlflow.transformers.load_model(f"models:/{registered_name}@{alias}")
