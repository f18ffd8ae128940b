"""The parts of infra/ that cannot run here: the Docker Compose file's structure (no Docker on
these machines) and that the native and Docker stacks name the same services."""

from __future__ import annotations

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
