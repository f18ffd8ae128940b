"""The `register` step: the evaluated policy becomes a version of a registered MLflow model.

Glue, not a stage function: it is MLflow by nature. Both the Prefect flow and
`rlhf stage register` (what dvc.yaml's `register` stage runs) call `register`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import mlflow

from rlhf.config import Params
from rlhf.io import read_json, read_jsonl, require, sha256_file, write_json
from rlhf.mlops import dvc, registry
from rlhf.mlops.mlflow_tracking import configure, experiment_id, git_commit
from rlhf.paths import Paths
from rlhf.rewards import module_file
from rlhf.stages import reward as reward_stage


def lineage_tags(params: Params, paths: Paths, extra: Optional[Mapping[str, Any]] = None) -> dict:
    tags: dict[str, Any] = {"params.digest": params.digest(), **dvc.artifact_hashes(paths.root)}
    commit = git_commit(paths.root)
    if commit:
        tags["git.commit"] = commit
    reference = paths.reference / "reference.json"
    if reference.exists():
        tags["reference.sha256"] = read_json(reference)["sha256"]
    tags.update({f"{section}.revision": getattr(params, section).revision  # pinned hub revisions
                 for section in ("model", "data") if getattr(params, section).revision})
    # How the policy was trained: the estimator, the KL's place, and what rewarded it.
    tags.update({f"ppo.{key}": getattr(params.ppo, key)
                 for key in ("advantage", "kl_penalty", "kl_estimator", "reward")})
    if params.ppo.reward_function:
        tags["ppo.reward.sha256"] = sha256_file(module_file(params.ppo.reward_function,
                                                            paths.root))
    tags.update(extra or {})
    return tags


def run(params: Params, paths: Paths, logger=None) -> dict:
    """The stage: register under the stage's MLflow run (`logger.run_id`)."""
    return register(params, paths, parent_run_id=getattr(logger, "run_id", None))


def register(params: Params, paths: Paths, parent_run_id: Optional[str] = None,
             tags: Optional[Mapping[str, Any]] = None) -> dict:
    """Log models/policy as a new version of `registry.model_name` with alias `candidate`,
    tagged with its eval metrics, its lineage and the version of `<model_name>-reward` (the
    reward model it was trained against, registered too); write metrics/register.json."""
    require(paths.policy / "config.json", produced_by="ppo")
    eval_metrics = read_json(paths.metrics_file("eval"), produced_by="evaluate")
    configure(paths.root)
    run_id = parent_run_id
    if run_id is None:
        with mlflow.start_run(experiment_id=experiment_id(params.registry.experiment),
                              run_name="register",
                              tags={"stage": "register"}) as run:
            run_id = run.info.run_id
    lineage = lineage_tags(params, paths, tags)
    # The reward model the policy was trained against, as its own registered model.
    reward_name = f"{params.registry.model_name}-reward"
    reward_version = registry.register_reward_model(
        paths.reward, reward_name, reward_stage.verify(paths.reward), lineage, run_id=run_id)
    prompts = read_jsonl(paths.prepared / "eval_prompts.jsonl", produced_by="prepare")
    version = registry.register_policy(
        paths.policy, params.registry.model_name, eval_metrics,
        {**lineage, "reward_model.name": reward_name, "reward_model.version": reward_version},
        run_id=run_id, input_example=prompts[0]["prompt"] if prompts else None,
        sampling={"temperature": params.eval.temperature,
                  "max_new_tokens": params.eval.max_new_tokens})
    record = {"model_name": params.registry.model_name, "version": version, "run_id": run_id,
              "alias": registry.CANDIDATE, "reward_model_name": reward_name,
              "reward_model_version": reward_version}
    write_json(paths.metrics_file("register"), record)
    return record
