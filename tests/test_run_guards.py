"""What guards a stage before and while it runs, tried as a user meets it: a mistyped --root,
a second run of a stage that is running, a read-only or too small disk before any training,
and a disk that fills up mid-run. Real processes and real (tmpfs) file systems."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf import stages
from rlhf.config import load_params
from rlhf.paths import Paths

from .conftest import REPO, prefect_home
from .test_inputs import one_line


def rlhf(*args: str, cwd: Path, **popen):
    command = [sys.executable, "-m", "rlhf.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_NO_PROGRESS": "1"}
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def prepared(tiny_project: Path) -> Path:
    """A tiny project with its data prepared: sft can start."""
    stages.get("prepare")(load_params(tiny_project / "params.yaml"), Paths(tiny_project))
    return tiny_project


@pytest.fixture
def mount_tmpfs():
    """mount(folder, size, read_only): a tmpfs over `folder`, unmounted afterwards."""
    mounted = []

    def mount(folder: Path, size: str = "16m", read_only: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_mistyped_root_is_one_line_and_creates_nothing(tmp_path):
    line = one_line(rlhf("run", "--no-track", "--root", "projcet", cwd=tmp_path))
    assert line.startswith("error: --root projcet: no such folder")
    assert not (tmp_path / "projcet").exists()


def test_a_prefect_server_that_cannot_start_is_one_line(tiny_project, monkeypatch):
    """`rlhf run`'s temporary Prefect server dying at start (here: its database cannot be
    created) is one line naming its log and the way out, not a wait or a traceback."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                       "sqlite+aiosqlite:////proc/no-such-dir/prefect.db")
    line = one_line(rlhf("run", "--no-track", cwd=tiny_project))
    assert line.startswith("error: the temporary Prefect server exited with code "), line
    assert ".rlhf/prefect-server.log, or set PREFECT_API_URL to a running server" in line
    assert not (tiny_project / "data").exists()  # no stage ran


def _wait_for(condition, process, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"exited {process.returncode}"
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_second_run_of_a_running_stage_stops_naming_the_first(prepared):
    first = rlhf("stage", "sft", "--no-track", "--set", "sft.epochs=100000", cwd=prepared,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = prepared / ".rlhf" / "locks" / "sft.lock"
    try:
        _wait_for(lambda: lock.exists() and f"process {first.pid} " in lock.read_text(), first)
        # Stopped, it still holds the lock and is still running, without taking a core from
        # the other tests.
        os.killpg(first.pid, signal.SIGSTOP)
        line = one_line(rlhf("stage", "sft", "--no-track", cwd=prepared))
        assert f"stage sft is already running in {prepared}" in line
        assert f"process {first.pid} on" in line
        # Another stage is not held up by it.
        assert rlhf("stage", "reference", "--no-track", cwd=prepared).returncode != 0  # no sft
        assert first.poll() is None, "the first sft ended: the test proved nothing"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed holder's lock: the next run goes ahead.
    result = rlhf("stage", "sft", "--no-track", "--fresh", cwd=prepared)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_read_only_checkpoint_folder_stops_before_training(prepared, mount_tmpfs):
    mount_tmpfs(prepared / "checkpoints", read_only=True)
    line = one_line(rlhf("stage", "sft", "--no-track", cwd=prepared))
    assert f"stage sft cannot write in {prepared / 'checkpoints'} (Read-only file system)" \
        in line
    assert not (prepared / "models" / "sft").exists()


def test_too_little_room_for_checkpoints_stops_before_training(prepared, mount_tmpfs):
    mount_tmpfs(prepared / "checkpoints", size="64k")
    line = one_line(rlhf("stage", "sft", "--no-track", cwd=prepared))
    assert f"stage sft needs about" in line and f"free in {prepared / 'checkpoints'}" in line
    assert "lower train.checkpoint_keep" in line
    assert not (prepared / "models" / "sft").exists()


def test_a_disk_that_fills_up_mid_run_is_one_line_and_keeps_the_checkpoint(prepared,
                                                                            mount_tmpfs):
    mount_tmpfs(prepared / "checkpoints", size="64m")
    stage = rlhf("stage", "sft", "--no-track", "--set", "sft.epochs=200", "--set",
                 "sft.checkpoint_every=1", "--set", "train.checkpoint_keep=1", cwd=prepared,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = prepared / "checkpoints" / "sft"
    try:
        _wait_for(lambda: any(folder.glob("step-*/trainer_state.json")), stage)
        with open(prepared / "checkpoints" / "filler", "wb") as filler:
            chunk = b"\0" * 2**20
            try:
                while True:
                    filler.write(chunk)
                    filler.flush()
            except OSError:
                pass
        _, stderr = stage.communicate(timeout=240)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert stage.returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: stage sft could not write") and "No space left" in lines[0]
    kept = [p for p in folder.glob("step-*") if (p / "trainer_state.json").exists()]
    assert kept, "the previous checkpoint is gone"


def test_an_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    """A hub model id while the hub cannot be reached (a closed port stands in for no network):
    the stage goes offline at once and fails on the uncached model in one error line, instead
    of a minute of retry lines."""
    from rlhf.mlops.launch import free_port

    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_NO_PROGRESS": "1",
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "stage", "prepare", "--no-track", "--set",
         "model.name_or_path=someone/no-such-model", "--set", "data.source=someone/prefs"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "cannot be reached" in lines[0] and "Retrying" not in result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(lines) == 2 and len(errors) == 1, result.stderr
    assert "someone/no-such-model" in errors[0] and "check model.name_or_path" in errors[0]


def test_a_deployed_flow_run_shows_a_user_error_in_one_line(tmp_path):
    """A deployment's flow run, as Prefect's engine runs it on a worker (`run_flow` under
    `handle_engine_signals`, which logs what escapes with its traceback): a user's mistake is
    Prefect's one state line on the console, with no traceback."""
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    script = ("from prefect.engine import handle_engine_signals\n"
              "from flows.pipeline import rlhf_pipeline\n"
              "with handle_engine_signals():\n"
              "    rlhf_pipeline(overrides=['data.source=missing.jsonl'], track=False)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_NO_PROGRESS": "1",
           "PREFECT_HOME": prefect_home(tmp_path / "prefect-home"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    # (the exit code is the engine's: the failed state is reported to Prefect, so 0)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    naming = [line for line in result.stderr.splitlines() if "missing.jsonl" in line]
    assert len(naming) == 1 and "Finished in state Failed" in naming[0], result.stderr[-3000:]
