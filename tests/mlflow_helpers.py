"""Real MLflow SQLite stores for tests, without paying for a fresh one each time.

Creating an MLflow 3.17 SQLite database runs every Alembic migration: 8-17 s on these machines. A copy of
an already migrated database opens in about a second. So: `fresh_sqlite_uri(tmp_path)` copies a template
database, migrated once per MLflow version and kept (atomically written) under
.pytest_cache/mlflow-template/<version>/ (override with LENS_MLFLOW_TEMPLATE_DB), into tmp_path.

    from tests.mlflow_helpers import fresh_sqlite_uri, tracking_overrides
    params = small_params(tmp_path, *tracking_overrides(tmp_path))   # tracking on, store in tmp_path

The template holds only MLflow's "Default" experiment; lens.tracking always creates its own experiment
with an explicit artifact location, so nothing a test logs lands outside tmp_path.

`MlflowServer(directory)` is a real `mlflow server` subprocess on 127.0.0.1 over such a database, for the
faults a client-side store cannot have: killed (SIGKILL), hung (SIGSTOP), restarted on the same port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def template_db() -> Path:
    """A migrated, empty MLflow SQLite database (created on first use, then reused across sessions)."""
    override = os.environ.get("LENS_MLFLOW_TEMPLATE_DB")
    path = Path(override) if override else (
        PROJECT_ROOT / ".pytest_cache" / "mlflow-template" / _mlflow_version() / "mlflow.db")
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    # A separate process, so this one keeps no engine or connection open on the template.
    code = ("import sys; from mlflow import MlflowClient; "
            "MlflowClient(f'sqlite:///{sys.argv[1]}').search_experiments()")
    done = subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=path.parent, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"could not create the MLflow template database {tmp}:\n{done.stderr[-3000:]}")
    with sqlite3.connect(tmp) as con:  # a complete, migrated schema, not a half-written file
        assert con.execute("select count(*) from alembic_version").fetchone()[0] == 1
    os.replace(tmp, path)
    return path


def fresh_sqlite_uri(tmp_path: Path, name: str = "mlflow.db") -> str:
    """`sqlite:////<tmp_path>/<name>`: a private copy of the migrated template."""
    db = Path(tmp_path) / name
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_db(), db)
    return f"sqlite:///{db}"


def tracking_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """params overrides that turn tracking on against a fresh store in tmp_path (fast system metrics)."""
    return ["tracking.enabled=true", f"tracking.tracking_uri={fresh_sqlite_uri(tmp_path)}",
            "tracking.system_metrics_interval_s=0.5", *extra]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (a free port, kept across restarts) over a private SQLite database in
    `directory`, proxying artifacts to directory/artifacts. It runs in its own process group, so that
    kill/pause/resume reach its uvicorn worker too. Starting takes ~10 s on 2 cores."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.db = Path(fresh_sqlite_uri(self.directory).removeprefix("sqlite:///"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> MlflowServer:
        log = open(self.directory / "server.log", "a")  # noqa: SIM115 (the server writes it while it runs)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.directory)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.directory / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s} s")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, sig: int) -> None:
        if self.running:
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash or OOM kill would: no goodbye on open connections."""
        self._signal(signal.SIGCONT)  # a paused group would not die before it runs again
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel and never answered (a hung server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
