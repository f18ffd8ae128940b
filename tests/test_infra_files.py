"""The parts of infra/ that cannot run here: the Docker Compose file's structure (no Docker on
these machines) and that the native and Docker stacks name the same services."""

from __future__ import annotations

import pytest
import yaml

from .conftest import REPO

INFRA = REPO / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_mirrors_the_native_stack_service_for_service():
    import sys

    sys.path.insert(0, str(INFRA))
    import stack

    services = compose()["services"]
    assert set(services) == set(stack.SERVICES)
    assert services["worker"]["image"] == services["mlflow"]["image"] == "rlhf:latest"
    assert services["mlflow"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert (INFRA / "Dockerfile").exists()
    mlflow_cmd = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow_cmd and "s3://mlflow/artifacts" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith(
        "postgresql+psycopg2://")
    assert services["prefect"]["environment"][
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "--pool" in services["worker"]["command"] and "local" in services["worker"]["command"]


def test_compose_publishes_on_loopback_and_holds_no_secret():
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), (name, mapping)
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert str(value).startswith("${"), (name, key)  # from infra/.env
    assert "/infra/.env" in (REPO / ".gitignore").read_text()


def test_shared_result_storage_without_s3_credentials_says_what_to_do(monkeypatch, tmp_path):
    from flows.results import results_location
    from rlhf.errors import UserError

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("RLHF_RESULT_STORAGE", "s3://prefect/results")
    with pytest.raises(UserError) as error:
        results_location(tmp_path)
    assert "source infra/env.sh" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.delenv("RLHF_RESULT_STORAGE")
    assert results_location(tmp_path) == tmp_path / ".prefect-results"
