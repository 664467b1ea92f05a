"""The documented team setup (infra/team): Docker cannot run here, so check what can be checked."""

from importlib.metadata import version

import yaml

from tests.conftest import PROJECT_ROOT

TEAM = PROJECT_ROOT / "infra" / "team"


def compose():
    return yaml.safe_load((TEAM / "docker-compose.yml").read_text())


def test_services_are_all_there_and_wired_to_postgres_and_s3():
    services = compose()["services"]
    assert {"postgres", "minio", "create-buckets", "prefect-server", "mlflow", "worker"} <= set(services)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "--artifacts-destination s3://mlflow" in mlflow_cmd
    assert "--pool ${LENS_GPU_POOL:-lens-gpu}" in services["worker"]["command"]
    assert (TEAM / "postgres-init.sql").read_text().strip().startswith("--")
    assert "CREATE DATABASE mlflow" in (TEAM / "postgres-init.sql").read_text()


def test_published_ports_bind_to_loopback_only():
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_server_versions_match_the_project_pins():
    services = compose()["services"]
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{version('prefect')}-")
    assert f'"mlflow=={version("mlflow")}"' in (TEAM / "Dockerfile").read_text()


def test_no_secrets_inline():
    text = (TEAM / "docker-compose.yml").read_text()
    assert "change-me" not in text
    assert "${POSTGRES_PASSWORD:?" in text and "${MINIO_ROOT_PASSWORD:?" in text
