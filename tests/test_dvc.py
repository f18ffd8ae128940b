"""The pipeline in a real DVC repository (a temp git repo): what a user does after cloning.

`rlhf run` (the Prefect flow, through the CLI) leaves `dvc status` clean; `dvc repro` then has
nothing to do, and in a fresh clone produces the same bytes; a second `rlhf run` runs no stage;
an edit to a module marks exactly the stages that import it; `rlhf promote` refuses a version
that fails the gate; then DVC's own commands on that project:
`dvc exp run -S` reruns what a param changes, `dvc repro` killed mid-PPO resumes, `dvc exp run
--temp` keeps its MLflow runs. One module, so that the whole-pipeline run they share is made
once.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from rlhf.config import write_overrides
from rlhf.io import sha256_file

from rlhf import stages
from rlhf.mlops import dag

from .conftest import clone_project, sh
from .test_code_deps import import_closure

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """A clone-like copy of this repository (tracked files only) with the tiny profile."""
    root = tmp_path_factory.mktemp("clone")
    return root, clone_project(root)


@pytest.fixture(scope="module")
def after_run(repo):
    root, env = repo
    result = sh("rlhf", "run", cwd=root, env=env)
    return root, env, result


def test_rlhf_run_registers_and_leaves_dvc_clean(after_run):
    root, env, result = after_run
    assert "model version: rlhf-policy v1" in result.stdout
    assert json.loads((root / "metrics/register.json").read_text())["version"] == 1
    assert "pass_at_k" in json.loads((root / "metrics/eval.json").read_text())["policy"]
    status = sh("dvc", "status", cwd=root, env=env)
    assert "Data and pipelines are up to date" in status.stdout
    repro = sh("dvc", "repro", cwd=root, env=env)
    assert "Running stage" not in repro.stdout
    assert "Data and pipelines are up to date" in repro.stdout


def test_a_second_rlhf_run_runs_no_stage(after_run):
    root, env, _ = after_run
    before = {p: p.stat().st_mtime_ns for p in (root / "models").rglob("*")}
    result = sh("rlhf", "run", cwd=root, env=env)
    skipped = [line for line in result.stderr.splitlines() if "Skipped('DVC: unchanged'" in line]
    assert len(skipped) == len(stages.REGISTRY), result.stderr[-3000:]
    assert "Running stage" not in result.stdout + result.stderr
    assert {p: p.stat().st_mtime_ns for p in (root / "models").rglob("*")} == before


TIMING = ("seconds", "per_second", "throughput", "tokens_per")
"""Fields that measure time (`eps`: episodes per second, TRL's name), not what was computed."""


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items()
                if k != "eps" and not any(word in k for word in TIMING)}
    return value


def produced(root: Path) -> dict[str, object]:
    """What the pipeline's stages wrote, by path: sha256 of files, JSON and CSV without the
    timing fields. metrics/register.json is left out: its version and run id are the
    registry's, another per clone."""
    found: dict[str, object] = {}
    for stage in dag.read(root).values():
        for rel in stage.outputs:
            base = root / rel
            for path in sorted(base.rglob("*")) if base.is_dir() else [base]:
                name = path.relative_to(root).as_posix()
                if not path.is_file() or name == "metrics/register.json":
                    continue
                if path.suffix == ".json":
                    found[name] = _without_timing(json.loads(path.read_text()))
                elif path.suffix == ".csv":
                    rows = list(csv.DictReader(path.read_text().splitlines()))
                    found[name] = [_without_timing(row) for row in rows]
                else:
                    found[name] = sha256_file(path)
    return found


def test_dvc_repro_in_a_fresh_clone_gives_the_bytes_rlhf_run_gave(after_run, tmp_path_factory):
    root, _, _ = after_run
    other = tmp_path_factory.mktemp("repro-clone")
    env = clone_project(other)
    sh("dvc", "repro", cwd=other, env=env)
    ours, theirs = produced(root), produced(other)
    assert sorted(ours) == sorted(theirs)
    assert any(name.endswith("model.safetensors") for name in ours)
    different = [name for name in ours if ours[name] != theirs[name]]
    assert not different, different


def _changed_stages(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {name.split(":")[-1] for name in repo.status()}


def test_an_edit_to_a_module_changes_exactly_the_stages_that_import_it(after_run):
    """Every package module some stage imports, edited in turn: DVC names the stages whose
    import closure holds it and no other. `dvc status` itself for rlhf/distributed.py, which
    every training stage imports."""
    root, env, _ = after_run
    closures = {name: import_closure(info.module) for name, info in stages.REGISTRY.items()}
    for module in sorted(set().union(*closures.values())):
        path = root / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            expected = {name for name, files in closures.items() if module in files}
            assert _changed_stages(root) == expected, module
            if module == "rlhf/distributed.py":
                status = sh("dvc", "status", cwd=root, env=env).stdout
                for stage in ("sft", "reward", "ppo", "evaluate"):
                    assert f"{stage}:" in status, status
        finally:
            path.write_bytes(original)
    assert _changed_stages(root) == set()


def test_promote_refuses_a_version_below_the_gold_gate(after_run):
    """The gate on the gold reward, through the CLI: exit code 1 and the failing line. (A
    promotion that passes, through the CLI: tests/test_real_data.py; every criterion:
    tests/test_mlops_mlflow.py.)"""
    root, env, _ = after_run
    strict = root / "strict.yaml"
    shutil.copy(root / "params.yaml", strict)
    write_overrides(strict, ["promote.min_gold_reward=1.0", "promote.min_gold_ratio_vs_reference=0"])
    refused = sh("rlhf", "promote", "--version", "1", "--params", str(strict), cwd=root,
                 env=env, check=False)
    assert refused.returncode == 1
    assert "not promoted" in refused.stderr and "gold reward" in refused.stderr


def test_parent_run_and_model_version_carry_lineage(after_run):
    from mlflow import MlflowClient

    root, _, _ = after_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db",
                          registry_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("rlhf")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`prefect.flow_name` = 'rlhf-pipeline'")
    tags = parents[-1].data.tags
    for key in ("git.commit", "params.digest", "prefect.flow_run_id", "dvc.data/prepared",
                "dvc.models/policy"):
        assert tags.get(key), key
    version = client.get_model_version("rlhf-policy", "1")
    assert version.tags["dvc.models/policy"] == tags["dvc.models/policy"]
    assert "eval.policy.gold_reward" in version.tags and "git.commit" in version.tags
    assert {key: version.tags[key] for key in ("ppo.advantage", "ppo.kl_penalty",
                                               "ppo.kl_estimator", "ppo.reward")} == {
        "ppo.advantage": "gae", "ppo.kl_penalty": "reward", "ppo.kl_estimator": "k1",
        "ppo.reward": "model"}


# ---------------------------------------------------------------------------------------------
# DVC's experiments and a killed `dvc repro` on the same project (they change it: last)


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
