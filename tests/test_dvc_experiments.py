"""DVC's own commands on a project that `rlhf run` ran: `dvc exp run -S` reruns what a
param changes, `dvc repro` killed mid-PPO resumes, `dvc exp run --temp` keeps its MLflow runs.
(A file of its own so that it runs beside tests/test_dvc.py: each takes minutes.)
"""

from __future__ import annotations

import json

import pytest

from rlhf.config import write_overrides

from .conftest import sh
from .test_dvc import after_run, repo  # noqa: F401 (fixtures: this module's own instances)

pytestmark = pytest.mark.slow


def test_exp_run_reruns_only_what_depends_on_kl_coef(after_run):
    root, env, _ = after_run
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "first run", cwd=root, env=env)
    result = sh("dvc", "exp", "run", "-S", "ppo.kl_coef=0.3", cwd=root, env=env)
    ran = {line.split("'")[1] for line in result.stdout.splitlines()
           if line.startswith("Running stage")}
    skipped = {line.split("'")[1] for line in result.stdout.splitlines()
               if "didn't change, skipping" in line}
    assert ran == {"ppo", "evaluate", "register"}
    assert skipped == {"prepare", "sft", "reward", "reference"}
    assert json.loads((root / "metrics/register.json").read_text())["version"] == 2
    diff = sh("dvc", "metrics", "diff", "--json", cwd=root, env=env)
    assert "metrics/eval.json" in json.loads(diff.stdout)
    plots = sh("dvc", "plots", "show", "-o", str(root / "dvc_plots"), cwd=root, env=env)
    assert (root / "dvc_plots" / "index.html").exists(), plots.stdout


def test_dvc_repro_killed_in_ppo_resumes_from_its_checkpoint(after_run):
    """checkpoints/ppo is no output of the stage, so `dvc repro` leaves it, and a rerun
    resumes."""
    from rlhf import checkpoints as ckpt

    from .test_resume import kill_after_first_checkpoint

    root, env, _ = after_run
    write_overrides(root / "params.yaml", ["ppo.steps=6", "ppo.checkpoint_every=2"])
    step = kill_after_first_checkpoint(["dvc", "repro"], root, "ppo", env=env)
    assert 0 < step < 6
    result = sh("dvc", "repro", cwd=root, env=env)
    assert "Running stage 'ppo'" in result.stdout
    final = ckpt.read_state(ckpt.checkpoint_dirs(root / "checkpoints" / "ppo")[-1])
    assert final["complete"] and final["step"] == 6 and final["resumed_from"] is not None
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=root, env=env).stdout


def test_exp_run_temp_keeps_its_runs_in_the_projects_mlflow_store(after_run):
    """`dvc exp run --temp` (and `--queue`) runs the stages in a copy under .dvc/tmp/exps that
    DVC deletes afterwards; the experiment's runs and model version land in the project's
    own mlflow.db all the same."""
    from mlflow import MlflowClient

    root, env, _ = after_run
    store = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    before = {v.version for v in client.search_model_versions("name='rlhf-policy'")}
    sh("dvc", "exp", "run", "--temp", "-S", "ppo.kl_coef=0.25", cwd=root, env=env)
    versions = {v.version: v for v in client.search_model_versions("name='rlhf-policy'")}
    new = set(versions) - before
    assert len(new) == 1, (before, set(versions))
    client.get_run(versions[new.pop()].run_id)  # the version's run is in this store too
    experiment = client.get_experiment_by_name("rlhf")
    ppo_runs = client.search_runs([experiment.experiment_id],
                                  filter_string="params.`ppo.kl_coef` = '0.25'")
    assert {run.info.run_name for run in ppo_runs} >= {"stage-ppo", "stage-evaluate"}
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
