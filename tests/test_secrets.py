"""Secrets, for real: `rlhf run` in a subprocess with its temporary
Prefect server (database in a temporary PREFECT_HOME) and a local MLflow store; every byte
those leave on disk is searched for the credential.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, TINY_OVERRIDES, prefect_home

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from rlhf.redact import redact_override, redact_text  # noqa: E402

SECRET = "Sekr3t-pw-0451"


def run_cli(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_NO_PROGRESS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": prefect_home(project / "prefect-home"),
           # The result store this setting chose is gone: it once gave a 112-line traceback.
           "RLHF_RESULT_STORAGE": f"file://{project / 'no-such-store'}"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_file() and needle.encode() in path.read_bytes()]


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_redact_override_and_text():
    assert redact_override(f"data.source=https://u:{SECRET}@h/x.jsonl") == \
        "data.source=https://u:<redacted>@h/x.jsonl"
    assert redact_override(f"registry.api_token={SECRET}") == "registry.api_token=<redacted>"
    assert redact_override("ppo.kl_coef=0.1") == "ppo.kl_coef=0.1"
    text = f"cannot read s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@bucket/x (timeout)"
    assert SECRET not in redact_text(text) and "AKIA" not in redact_text(text)
    assert redact_text(text).endswith("(timeout)")


def test_a_credential_in_an_override_is_never_stored_in_clear(project):
    """A source URI with a password: the run fails at prepare (the builtin model cannot read
    it), and the password is nowhere: not on the console, not in Prefect's database (flow-run
    parameters, states, logs), not in MLflow's store, not in any file of the project."""
    params_before = (project / "params.yaml").read_bytes()
    source = f"https://rlhf:{SECRET}@127.0.0.1:9/prefs.jsonl"
    result = run_cli(project, "run", "--set", f"data.source={source}", "--set", "ppo.steps=1")
    assert result.returncode != 0
    assert SECRET not in result.stdout + result.stderr
    assert "https://rlhf:<redacted>@127.0.0.1:9/prefs.jsonl" in result.stderr
    assert files_holding(project, SECRET) == []
    assert (project / "params.yaml").read_bytes() == params_before

    database = project / "prefect-home" / "prefect.db"
    with sqlite3.connect(database) as db:
        (parameters, state), = db.execute(
            "select parameters, state_type from flow_run where name is not null").fetchall()
    overrides = json.loads(parameters)["overrides"]
    assert overrides == ["data.source=https://rlhf:<redacted>@127.0.0.1:9/prefs.jsonl",
                         "ppo.steps=1"]
    assert state == "FAILED"


def test_no_track_runs_every_stage_without_mlflow_and_pickles_nothing(project):
    """`rlhf run --no-track` in a directory that is no DVC repository, after a run there that
    failed (a failure once left a record that blocked every later run): every stage runs,
    nothing reaches MLflow, and Prefect persisted no result (the flow keeps none)."""
    sets = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]
    failed = run_cli(project, "run", "--no-track", *sets, "--set", "data.source=missing.jsonl")
    assert failed.returncode == 2 and "missing.jsonl" in failed.stderr
    # A user's mistake inside a stage is one line: no Prefect traceback or state lines.
    errors = [line for line in failed.stderr.splitlines() if "| INFO " not in line
              and "| WARNING " not in line]
    assert errors == [next(line for line in errors if line.startswith("error: "))], errors
    result = run_cli(project, "run", "--no-track", *sets)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert (project / "metrics" / "eval.json").exists()
    assert not (project / "metrics" / "register.json").exists()
    assert "not a DVC repository" in result.stderr
    assert "Error logging to API" not in result.stderr  # logs sent before the server stopped
    # Each progress line once on the console: the task's run logger prints it (and sends it
    # to the Prefect UI); the CLI's own handler and Prefect's root handler stay quiet.
    first_steps = [line for line in result.stderr.splitlines() if "sft step 1/" in line]
    assert len(first_steps) == 1 and "Task run 'sft' - sft step 1/" in first_steps[0], first_steps
    # Prefect writes only the failed run's exception to its result storage (it does so
    # whatever persist_result says), and as JSON.
    for record in (project / "prefect-home" / "storage").glob("*"):
        assert "__exc_type__" in json.loads(record.read_text())  # JSON: no pickle to load
    assert not (project / ".prefect-results").exists()
    assert not (project / "no-such-store").exists()  # RLHF_RESULT_STORAGE is read by nothing
