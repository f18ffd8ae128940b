"""Tracking faults for real: a `mlflow server` process that is killed (SIGKILL) in the middle
of PPO and started again, an unreachable or silent server at start, a web server that is not
MLflow, a stage killed with SIGKILL (and resumed). No mocks: `rlhf stage` runs in a
subprocess, as a user runs it. A server that hangs mid-PPO: test_tracking_stalls.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, TINY_OVERRIDES, prefect_home

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from rlhf.mlops.launch import free_port, wait_until_healthy  # noqa: E402

SECRET = "pw-Outage-7731"


def cli_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_NO_PROGRESS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        if key not in extra:
            env.pop(key, None)
    return env


def rlhf(*args: str, env: dict, cwd: Path, timeout: float = 300,
         **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


class MlflowServer:
    """`mlflow server` on a fixed port and a SQLite store in a directory; kill -9 and restart."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120) -> None:
        log = open(self.home / "server.log", "a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
             "--default-artifact-root", str(self.home / "artifacts"), "--no-serve-artifacts"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_healthy(f"{self.url}/health", self.process, timeout, "mlflow server",
                           self.home / "server.log")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    home = tmp_path / "mlflow-server"
    home.mkdir()
    server = MlflowServer(home, free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def tiny_upstream(trained_upstream, tmp_path) -> Path:
    """A project with the tiny params and trained prepare/sft/reward/reference outputs."""
    project = tmp_path / "project"
    project.mkdir()
    for folder in ("data", "models"):
        shutil.copytree(trained_upstream / folder, project / folder)
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    from rlhf.config import write_overrides

    write_overrides(project / "params.yaml", TINY_OVERRIDES)
    return project


def _ppo_run(client: MlflowClient, experiment: str = "rlhf"):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], "tags.stage = 'ppo'")
    return runs[0] if runs else None


def _every_step_once(client: MlflowClient, run_id: str, project: Path) -> tuple[int, int]:
    """(metric values expected, values missing) for the run against ppo_history.csv; fails if
    a key holds a step twice."""
    with open(project / "metrics" / "ppo_history.csv") as handle:
        history = list(csv.DictReader(handle))
    expected = {key: {int(row["step"]) for row in history if row.get(key) not in (None, "")}
                for key in history[0] if key != "step"}
    lost = 0
    for key, wanted in expected.items():
        got = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(got) == len(set(got)), f"{key} sent twice: {sorted(got)}"
        lost += len(wanted - set(got))
    return sum(map(len, expected.values())), lost


def _buffered_steps(project: Path) -> int:
    steps = set()
    for path in (project / ".rlhf" / "mlflow-buffer").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["op"] == "metrics":
                steps.update(m[3] for m in record["metrics"] if m[0] == "objective/kl")
    return len(steps)


# ---------------------------------------------------------------------------------------------


def test_mlflow_server_killed_mid_ppo_loses_no_metric(mlflow_server, tiny_upstream):
    """Kill -9 the tracking server after a few PPO steps, start it again a few steps later:
    PPO goes on, the steps of the outage are buffered on disk and sent when the server is
    back, the run ends FINISHED, and MLflow holds every step's metrics (counted)."""
    project = tiny_upstream
    steps = 40
    uri = f"http://rlhf:{SECRET}@127.0.0.1:{mlflow_server.port}"
    env = cli_env(MLFLOW_TRACKING_URI=uri, RLHF_MLFLOW_RETRY_SECONDS="1")
    log = project / "stage.log"
    with open(log, "w") as out:
        stage = subprocess.Popen(
            [sys.executable, "-m", "rlhf.cli", "stage", "ppo", "--set", f"ppo.steps={steps}",
             "--set", "ppo.checkpoint_every=1000"],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    try:
        deadline = time.monotonic() + 240
        run = None
        while True:  # a few steps reach the server first
            run = run or _ppo_run(client)
            logged = len(client.get_metric_history(run.info.run_id, "objective/kl")) if run else 0
            if logged >= 3:
                break
            assert stage.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "PPO logged nothing"
            time.sleep(0.3)
        mlflow_server.kill()
        while _buffered_steps(project) < 3:  # training goes on during the outage
            assert stage.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "nothing buffered"
            time.sleep(0.3)
        during = _buffered_steps(project)
        mlflow_server.start()
        assert stage.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    output = log.read_text()
    assert "Traceback" not in output and SECRET not in output
    assert "is not answering" in output and "<redacted>" in output

    # Whatever the run could not send before it ended, the next command sends.
    synced = rlhf("sync", env=env, cwd=project)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert not list((project / ".rlhf" / "mlflow-buffer").glob("*.jsonl"))

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    total, lost = _every_step_once(client, run.info.run_id, project)
    print(f"\noutage mid-PPO: at least {during} steps buffered while the server was down; "
          f"{total} metric values over {steps} steps expected in MLflow, lost {lost}")
    assert lost == 0
    assert (project / "models" / "policy").is_dir()
    assert SECRET not in json.dumps([run.data.params, run.data.tags])


def test_unreachable_server_is_one_line(tiny_upstream):
    """Nothing listening, or a server that accepts and never answers: one line within 30 s
    naming the URI (password hidden) and the way out. Every command checks through
    `ensure_reachable`: the silent server, which costs its full wait, is tried on one."""
    port = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (backlog) but never answers
    try:
        for target, commands in ((port, (["stage", "reference"], ["run"], ["promote"])),
                                 (silent.getsockname()[1], (["run"],))):
            uri = f"http://rlhf:{SECRET}@127.0.0.1:{target}"
            env = cli_env(MLFLOW_TRACKING_URI=uri)
            for command in commands:
                started = time.monotonic()
                result = rlhf(*command, env=env, cwd=tiny_upstream, timeout=60)
                seconds = time.monotonic() - started
                lines = result.stderr.strip().splitlines()
                assert result.returncode == 2, result.stdout + result.stderr
                assert len(lines) == 1, result.stderr
                assert f"http://rlhf:<redacted>@127.0.0.1:{target}" in lines[0]
                assert "unreachable" in lines[0]
                # promote needs the registry: no --no-track to offer there
                assert ("--no-track" in lines[0]) == (command != ["promote"]), lines[0]
                assert SECRET not in result.stdout + result.stderr
                assert seconds < 30, (command, seconds)
    finally:
        silent.close()


def test_a_web_server_that_is_not_mlflow_is_one_line(tiny_upstream, tmp_path):
    """A plain HTTP server (answers /health like anything else) as MLFLOW_TRACKING_URI: one
    line naming the URI (password hidden) and the problem, not MLflow's 72-line exception."""
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                            "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.2)
        uri = f"http://rlhf:{SECRET}@127.0.0.1:{port}"
        env = cli_env(MLFLOW_TRACKING_URI=uri)
        for command in (["stage", "reference"], ["run"]):
            result = rlhf(*command, env=env, cwd=tiny_upstream, timeout=60)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stdout + result.stderr
            assert len(lines) == 1, result.stderr
            assert f"http://rlhf:<redacted>@127.0.0.1:{port}" in lines[0]
            assert "is not an MLflow tracking server" in lines[0] and "--no-track" in lines[0]
            assert SECRET not in result.stdout + result.stderr
    finally:
        os.killpg(web.pid, signal.SIGKILL)
        web.wait()


def _kill_ppo(client: MlflowClient, project: Path, env: dict, sets: list[str],
              logged_steps: int, poll: float = 0.5):
    """Start `rlhf stage ppo`, kill -9 it once its MLflow run holds `logged_steps` steps of
    objective/kl; (the run, the killed pid)."""
    # The store exists before the stage starts: two processes creating MLflow's tables in one
    # SQLite file at once can fail the stage (it did, once in CI).
    client.search_experiments()
    stderr = (project.parent / "stage.err").open("w+")
    stage = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "stage", "ppo", *sets],
                             cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            run = _ppo_run(client)
            logged = len(client.get_metric_history(run.info.run_id, "objective/kl")) if run else 0
            if logged >= logged_steps:
                break
            if stage.poll() is not None:
                stderr.seek(0)
                pytest.fail(f"rlhf stage ppo exited {stage.returncode}: {stderr.read()}")
            assert time.monotonic() < deadline
            time.sleep(poll)
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    return run, stage.pid


def test_resumed_stage_logs_each_step_once(tiny_upstream):
    """kill -9 of `rlhf stage ppo` between two checkpoints, then `rlhf stage ppo` again: it
    resumes from the checkpoint and continues the same MLflow run, which holds every step
    once (the steps between the checkpoint and the kill are replayed, not logged twice)."""
    project = tiny_upstream
    env = cli_env()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    sets = ["--set", "ppo.steps=24", "--set", "ppo.checkpoint_every=8"]
    # killed a few steps after the first checkpoint (step 8)
    run, _ = _kill_ppo(client, project, env, sets, logged_steps=11, poll=0.1)
    logged = max(m.step for m in client.get_metric_history(run.info.run_id, "objective/kl"))
    saved = max(int(p.name.split("-")[1]) for p in (project / "checkpoints" / "ppo").glob("step-*"))
    assert saved < logged, (saved, logged)  # steps saved+1..logged are replayed

    result = rlhf("stage", "ppo", *sets, env=env, cwd=project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert _ppo_run(client).info.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    total, lost = _every_step_once(client, run.info.run_id, project)
    print(f"\nresumed PPO: killed at step {logged}, resumed from step {saved}; "
          f"{total} metric values, each step once, lost {lost}")
    assert lost == 0


def test_killed_stage_run_is_ended_killed_by_the_next_start(tiny_upstream):
    """kill -9 of `rlhf stage ppo` leaves its MLflow run RUNNING; the next `rlhf stage`
    ends it KILLED (its process is gone) and leaves live runs alone."""
    project = tiny_upstream
    env = cli_env()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run, pid = _kill_ppo(client, project, env, ["--set", "ppo.steps=500"], logged_steps=1)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).data.tags["rlhf.pid"] == str(pid)

    result = rlhf("stage", "reference", env=env, cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {run.info.run_id} was left RUNNING" in result.stderr
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    assert str(pid) in killed.data.tags["rlhf.ended_by"]
    reference = client.search_runs([killed.info.experiment_id], "tags.stage = 'reference'")
    assert [r.info.status for r in reference] == ["FINISHED"]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"  # a zombie waits for a reaper, but is dead


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_rlhf_run_leaves_no_half_state_and_the_next_resumes(tmp_path):
    """kill -9 of `rlhf run --set ...` in the middle of PPO: its temporary Prefect server dies
    with it and params.yaml keeps its old values. The next `rlhf run` with the same overrides
    ends the killed pipeline run KILLED in MLflow and its flow run Crashed in Prefect, resumes
    PPO from its checkpoint (continuing its MLflow run), then writes the overrides."""
    from rlhf import checkpoints as ckpt

    pytest.importorskip("prefect")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    params_before = (project / "params.yaml").read_bytes()
    env = cli_env(PREFECT_HOME=prefect_home(tmp_path / "prefect-home"))
    sets = [arg for override in [*TINY_OVERRIDES, "ppo.steps=8", "ppo.checkpoint_every=2"]
            for arg in ("--set", override)]
    checkpoints = project / "checkpoints" / "ppo"
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        killed = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "run", *sets], cwd=project,
                                  env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while ckpt.resumable(checkpoints) is None:
            assert killed.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        servers = [pid for pid, cmd in _children(killed.pid) if "create_app" in cmd]
        os.kill(killed.pid, signal.SIGKILL)  # rlhf run alone: the kernel takes the server
        killed.wait()
        assert len(servers) == 1, servers
        deadline = time.monotonic() + 30
        while not _gone(servers[0]):
            assert time.monotonic() < deadline, "the temporary Prefect server outlived rlhf run"
            time.sleep(0.2)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert not ckpt.resumable(checkpoints)["complete"]
    # The guard process puts params.yaml back once the killed run's pipe closes: soon, not at once.
    deadline = time.monotonic() + 30
    while (project / "params.yaml").read_bytes() != params_before:
        assert time.monotonic() < deadline, "params.yaml kept the killed run's overrides"
        time.sleep(0.2)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = _ppo_run(client)
    parent_id = run.data.tags["mlflow.parentRunId"]
    flow_run_id = client.get_run(parent_id).data.tags["prefect.flow_run_id"]
    assert client.get_run(parent_id).info.status == "RUNNING"

    again = rlhf("run", *sets, env=env, cwd=project, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "model version: rlhf-policy v1" in again.stdout
    final = ckpt.read_state(ckpt.checkpoint_dirs(checkpoints)[-1])
    assert final["complete"] and final["step"] == 8 and final["resumed_from"] is not None
    assert client.get_run(parent_id).info.status == "KILLED"
    resumed = client.get_run(run.info.run_id)  # the PPO stage run, continued
    assert resumed.info.status == "FINISHED" and resumed.data.tags["rlhf.resumed"] == "true"
    import sqlite3
    import yaml

    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        rows = dict(db.execute("select id, state_type from flow_run").fetchall())
    assert rows[flow_run_id] == "CRASHED", rows
    assert sorted(rows.values()) == ["COMPLETED", "CRASHED"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["ppo"]["steps"] == 8 and params["model"]["n_layer"] == 1
