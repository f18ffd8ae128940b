"""Exact resume: a training stage killed with SIGKILL between two checkpoints and rerun ends
byte-identical to a run that was never interrupted (fp32 on CPU, same seed).

Every run here is a real `rlhf stage NAME` subprocess, as a user or `dvc repro` starts it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf import checkpoints as ckpt
from rlhf.config import write_overrides
from rlhf.io import remove_orphans, tree_hashes

from .conftest import REPO, TINY_OVERRIDES

# Long enough that the kill lands between two checkpoints, short enough for CI.
RESUME_OVERRIDES = {
    "sft": ["sft.epochs=2", "sft.checkpoint_every=3"],  # 24 steps
    "reward": ["reward.epochs=3", "reward.checkpoint_every=3"],  # 18 steps
    "ppo": ["ppo.steps=8", "ppo.checkpoint_every=2"],
}
OUTPUT = {"sft": "models/sft", "reward": "models/reward", "ppo": "models/policy"}


def project(trained_upstream: Path, root: Path, stage: str, extra: list[str] = ()) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(trained_upstream / "data", root / "data")
    if stage != "sft":
        shutil.copytree(trained_upstream / "models", root / "models")
        shutil.rmtree(root / OUTPUT[stage], ignore_errors=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_overrides(root / "params.yaml", TINY_OVERRIDES + RESUME_OVERRIDES[stage] + list(extra))
    return root


def rlhf_stage(root: Path, stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "stage", stage, "--root", str(root),
            "--params", str(root / "params.yaml"), *args]


def own_env() -> dict:
    """This process's environment without the stores earlier tests pointed MLflow and Prefect
    at: each project here tracks to its own mlflow.db, as a user's would."""
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


def run_ok(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env or own_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_after_first_checkpoint(command: list[str], cwd: Path, stage: str,
                                env: dict | None = None, checkpoints: int = 1) -> int:
    """Start the command, SIGKILL its whole process group as soon as `stage` has written
    `checkpoints` checkpoints of this run (not a finished run's); return the newest one's step."""
    process = subprocess.Popen(command, cwd=cwd, env=env or own_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    directory = cwd / "checkpoints" / stage
    deadline = time.monotonic() + 300
    while ckpt.resumable(directory) is None or len(ckpt.checkpoint_dirs(directory)) < checkpoints:
        assert process.poll() is None, f"exited before a {stage} checkpoint: " + \
            process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return ckpt.resumable(directory)["step"]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith(("seconds", "eps"))}


def ppo_history(root: Path) -> list[dict]:
    with open(root / "metrics" / "ppo_history.csv") as handle:
        return [without_timing(row) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def uninterrupted(trained_upstream, tmp_path_factory):
    """stage -> a project in which `stage` ran to its end, untracked, never killed: what the
    resumed runs must equal. Each made once, on first use; read, never changed."""
    made: dict[str, Path] = {}

    def whole(stage: str) -> Path:
        if stage not in made:
            root = project(trained_upstream, tmp_path_factory.mktemp(f"whole-{stage}") / "p",
                           stage)
            run_ok(rlhf_stage(root, stage, "--no-track"), root)
            made[stage] = root
        return made[stage]

    return whole


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_kill_9_then_rerun_resumes_exactly(stage, uninterrupted, trained_upstream, tmp_path):
    whole = uninterrupted(stage)

    killed = project(trained_upstream, tmp_path / "killed", stage)
    # Tracked (an MLflow store in the project), so the resumed run must continue the same run.
    step = kill_after_first_checkpoint(rlhf_stage(killed, stage), killed, stage)
    total = int(ckpt.read_state(ckpt.checkpoint_dirs(whole / "checkpoints" / stage)[-1])["step"])
    assert 0 < step < total
    assert not (killed / "metrics" / f"{stage}.json").exists()  # nothing half-written
    run_id = ckpt.resumable(killed / "checkpoints" / stage)["tracking_run_id"]

    result = run_ok(rlhf_stage(killed, stage), killed)
    assert "resuming" in result.stderr
    final = ckpt.read_state(ckpt.checkpoint_dirs(killed / "checkpoints" / stage)[-1])
    assert final["complete"] and final["resumed_from"] is not None and final["step"] == total

    # The same weights and figures, byte for byte, as the run that was never killed.
    assert tree_hashes(killed / OUTPUT[stage]) == tree_hashes(whole / OUTPUT[stage])
    read = lambda root: json.loads((root / "metrics" / f"{stage}.json").read_text())  # noqa: E731
    assert without_timing(read(killed)) == without_timing(read(whole))
    if stage == "ppo":
        assert ppo_history(killed) == ppo_history(whole)

    # One MLflow run holds the stage from step 1 to the end.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("rlhf.resumed") == "true"
    if stage == "ppo":
        steps = {m.step for m in client.get_metric_history(run_id, "objective/kl")}
        assert steps == set(range(1, total + 1))


def test_checkpoint_of_other_params_is_refused_and_fresh_starts_over(trained_upstream, tmp_path):
    root = project(trained_upstream, tmp_path / "p", "ppo")
    kill_after_first_checkpoint(rlhf_stage(root, "ppo", "--no-track"), root, "ppo")

    refused = subprocess.run(rlhf_stage(root, "ppo", "--no-track", "--set", "ppo.lr=0.0005"),
                             cwd=root, env=own_env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    message = refused.stderr.strip()
    assert "ppo.lr was 0.0001, now 0.0005" in message and "--fresh" in message

    run_ok(rlhf_stage(root, "ppo", "--no-track", "--set", "ppo.lr=0.0005", "--fresh"), root)
    final = ckpt.read_state(ckpt.checkpoint_dirs(root / "checkpoints" / "ppo")[-1])
    assert final["complete"] and final["resumed_from"] is None
    # ppo.checkpoint_every=2 over 8 steps, train.checkpoint_keep=2: the newest two remain.
    assert [p.name for p in ckpt.checkpoint_dirs(root / "checkpoints" / "ppo")] == [
        "step-00000006", "step-00000008"]


def test_a_finished_stage_is_not_resumed(trained_upstream, tmp_path):
    """A complete checkpoint is history, not an interruption: other params start fresh."""
    root = project(trained_upstream, tmp_path / "p", "ppo", ["ppo.steps=2"])
    run_ok(rlhf_stage(root, "ppo", "--no-track"), root)
    assert ckpt.resumable(root / "checkpoints" / "ppo") is None
    result = run_ok(rlhf_stage(root, "ppo", "--no-track", "--set", "ppo.lr=0.0005"), root)
    assert "resuming" not in result.stderr


def test_orphans_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename.split(".")[0]
    orphan = tmp_path / f".tmp-policy.pid{dead.pid}@{host}.x1"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".tmp-sft.pid{os.getpid()}@{host}.x2"
    live.mkdir()
    other_host = tmp_path / f".tmp-sft.pid{dead.pid}@another-host.x3"
    other_host.mkdir()
    assert remove_orphans(tmp_path) == [orphan]
    assert live.exists() and other_host.exists() and not orphan.exists()


@pytest.fixture(scope="module")
def sft_runs(uninterrupted, trained_upstream, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted sft run, and one killed after its second checkpoint; see `killed_sft`."""
    base = tmp_path_factory.mktemp("sft-runs")
    whole = uninterrupted("sft")
    killed = project(trained_upstream, base / "killed", "sft")
    kill_after_first_checkpoint(rlhf_stage(killed, "sft", "--no-track"), killed, "sft",
                                checkpoints=2)
    shutil.copytree(killed, base / "as-killed")
    return whole, killed


def killed_sft(sft_runs) -> Path:
    """The killed sft project as its kill left it, in its own place (its checkpoints' paths)."""
    killed = sft_runs[1]
    shutil.rmtree(killed)
    shutil.copytree(killed.with_name("as-killed"), killed)
    return killed


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garble_pickle(path: Path) -> None:
    """Break the pickle inside a torch file, its zip directory intact: only unpickling shows
    it, after load_state has loaded the files before it (the model, the optimizer)."""
    data = path.read_bytes()
    start = data.index(b"\x80\x02", data.index(b"data.pkl"))  # pickle protocol 2
    path.write_bytes(data[:start] + b"XX" + data[start + 2:])


@pytest.mark.slow
@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", truncate), ("optimizer.bin", truncate), ("scheduler.bin", empty),
    ("scheduler.bin", garble_pickle)])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(name, damage, sft_runs):
    whole, root = sft_runs[0], killed_sft(sft_runs)
    *_, older, newest = ckpt.checkpoint_dirs(root / "checkpoints" / "sft")
    older_step = ckpt.read_state(older)["step"]
    damage(newest / name)

    result = run_ok(rlhf_stage(root, "sft", "--no-track"), root)
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines()
                if newest.name in line and name in line]) == 1
    assert f"resuming from {older}" in result.stderr
    final = ckpt.read_state(ckpt.checkpoint_dirs(root / "checkpoints" / "sft")[-1])
    assert final["complete"] and final["resumed_from"] == older_step
    # Whatever load_state took from the damaged checkpoint, the older one replaced it all.
    assert tree_hashes(root / "models" / "sft") == tree_hashes(whole / "models" / "sft")


@pytest.mark.slow
def test_no_whole_checkpoint_is_one_line_naming_fresh(sft_runs):
    root = killed_sft(sft_runs)
    found = ckpt.checkpoint_dirs(root / "checkpoints" / "sft")
    for checkpoint in found:
        truncate(checkpoint / "model.safetensors")

    result = subprocess.run(rlhf_stage(root, "sft", "--no-track"), cwd=root, env=own_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "--fresh" in line]
    assert line.startswith("error:") and line.count("model.safetensors is damaged") == len(found)


@pytest.mark.slow
def test_a_copied_project_resumes_its_interrupted_stage(sft_runs, tmp_path):
    """Checkpoints name their inputs relative to the project: a moved or copied project
    resumes where the original stopped, and ends where an uninterrupted run ends."""
    whole, killed = sft_runs[0], killed_sft(sft_runs)
    copy = tmp_path / "elsewhere" / "project"
    shutil.copytree(killed, copy)
    newest = ckpt.checkpoint_dirs(copy / "checkpoints" / "sft")[-1]

    result = run_ok(rlhf_stage(copy, "sft", "--no-track"), copy)
    assert f"resuming from {newest}" in result.stderr
    assert tree_hashes(copy / "models" / "sft") == tree_hashes(whole / "models" / "sft")
    inputs = ckpt.read_state(ckpt.checkpoint_dirs(copy / "checkpoints" / "sft")[-1])[
        "fingerprint"]["inputs"]
    assert sorted(inputs) == ["data/prepared/sft.jsonl", "models/base"]
