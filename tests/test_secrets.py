"""Secrets and the result cache, for real: `rlhf run` in a subprocess with its temporary
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

from .conftest import REPO, TINY_OVERRIDES

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from rlhf.mlops.safe_results import problem  # noqa: E402
from rlhf.redact import redact_override, redact_text  # noqa: E402

SECRET = "Sekr3t-pw-0451"


def run_cli(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_NO_PROGRESS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(project / "prefect-home")}
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


EVIL = '''
import os, pathlib, sys
class Evil:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(sys.argv[1]),))
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import Serializer
record = ResultRecord(metadata=ResultRecordMetadata(serializer=Serializer(type="pickle")),
                      result=Evil())
pathlib.Path(sys.argv[2]).write_bytes(record.serialize())
'''


def test_a_hand_edited_pickle_record_is_refused_never_loaded(project, tmp_path):
    """A record in the result cache whose serializer was changed to pickle, with a payload
    that creates a file when unpickled: `rlhf run` stops with one line, the file is not
    created. (Prefect itself would run it: checked first in a separate process.) Once the
    record is deleted, `rlhf run --no-track` runs the pipeline without MLflow."""
    results = project / ".prefect-results"
    results.mkdir()
    record = results / "prepare-0123456789abcdef"
    marker = tmp_path / "pwned"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "scratch-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run([sys.executable, "-c", EVIL, str(marker), str(record)], check=True, env=env)
    assert "pickle" in problem(record.read_bytes())

    proof = tmp_path / "proof"  # the payload is live: Prefect's own reader runs it
    subprocess.run([sys.executable, "-c", "import sys, pathlib\n"
                    "from prefect._internal.result_records import ResultRecord\n"
                    "ResultRecord.deserialize(pathlib.Path(sys.argv[1]).read_bytes())",
                    str(record)], check=True, env=env)
    assert marker.exists()
    marker.rename(proof)

    result = run_cli(project, "run", "--no-track")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert lines[-1].startswith("error: result record") and "'pickle'" in lines[-1]
    assert ".prefect-results/prepare-0123456789abcdef" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not marker.exists()

    # Deleted as the line says, the cache rebuilds; --no-track runs every stage without MLflow.
    record.unlink()
    sets = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]
    result = run_cli(project, "run", "--no-track", *sets)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert (project / "metrics" / "eval.json").exists()
    assert not (project / "metrics" / "register.json").exists()
    assert "Error logging to API" not in result.stderr  # logs sent before the server stopped
    assert not marker.exists()


def test_json_records_that_import_classes_are_refused():
    good = {"metadata": {"serializer": {"type": "json"}, "storage_key": "k"},
            "result": json.dumps({"stage": "prepare", "hash": "ab"})}
    assert problem(json.dumps(good).encode()) is None
    decoder = json.loads(json.dumps(good))
    decoder["metadata"]["serializer"]["object_decoder"] = "builtins.eval"
    assert problem(json.dumps(decoder).encode()) == "its JSON serializer was changed"
    marked = {**good, "result": json.dumps({"x": {"__class__": "os.system", "data": "id"}})}
    assert problem(json.dumps(marked).encode()) == "its result names Python classes to import"
    assert problem(b"\x80\x04not json") == "it is not JSON"


def test_check_record_refuses_only_the_bad_record(tmp_path):
    """The per-task check (any result storage): a missing record is fine, a JSON one passes,
    one whose serializer says pickle is refused without being loaded."""
    from rlhf.mlops.safe_results import UnsafeResultError, check_record

    good = {"metadata": {"serializer": {"type": "json"}}, "result": json.dumps({"a": 1})}
    (tmp_path / "good").write_text(json.dumps(good))
    bad = {"metadata": {"serializer": {"type": "pickle", "picklelib": "cloudpickle"}},
           "result": "gAWVCgAAAAAAAAB9lIwBYZRLAXMu\n"}
    (tmp_path / "bad").write_text(json.dumps(bad))
    check_record(tmp_path, "missing", "cache")
    check_record(tmp_path, "good", "cache")
    with pytest.raises(UnsafeResultError, match=r"cache/bad .*'pickle'"):
        check_record(tmp_path, "bad", "cache")
