"""Secrets never reach MLflow params, log lines or error messages: a password planted in the tracking URI."""

from __future__ import annotations

import logging
import socket

import pytest

from lens.params import load_params
from lens.tracking_store import TrackingError, check_server, param_dict, param_strings, redact_uri

SECRET = "s3cr3t-Pa55"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_a_uri_is_shown_without_its_credentials():
    assert redact_uri(f"http://alice:{SECRET}@mlflow.example:5000/api") == "http://***@mlflow.example:5000/api"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_an_unreachable_server_with_credentials_is_reported_without_the_password(caplog):
    uri = f"http://alice:{SECRET}@127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.DEBUG), pytest.raises(TrackingError) as err:
        check_server(uri, timeout_s=2)
    assert "unreachable" in str(err.value) and "***@127.0.0.1" in str(err.value)
    assert SECRET not in str(err.value) and err.value.__cause__ is None  # no chained exception quoting it
    assert SECRET not in caplog.text


def test_params_logged_to_mlflow_never_carry_the_password(tmp_path):
    params = load_params("tiny", [f"tracking.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000"])
    logged = param_dict(params)
    assert logged["tracking.tracking_uri"] == "http://***@127.0.0.1:5000"
    assert not any(SECRET in v for v in logged.values())
    assert SECRET not in "".join(param_strings({"any.key": f"https://bob:{SECRET}@host/x"}).values())


@pytest.mark.slow
def test_a_planted_secret_is_nowhere_a_tracked_run_writes_or_prints(tmp_path):
    """`lens train` + `lens evaluate` against a real MLflow server, with the password in the tracking URI and
    in MLflow's credential variables: then every byte the run wrote (outputs, the server's database and
    artifacts, its log), and everything it printed, is searched for the password."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT
    from tests.helpers import SMALL, random_policy, small_params, synthetic_data
    from tests.mlflow_helpers import MlflowServer

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = MlflowServer(server_dir).start()
    try:
        uri = server.uri.replace("http://", f"http://alice:{SECRET}@")
        overrides = [f"run.output_root={tmp_path / 'runs'}", *SMALL, "train.algo=lens", "tracking.enabled=true",
                     f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
        params = small_params(tmp_path / "runs", *overrides[1:])
        random_policy(params)
        synthetic_data(params)
        env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "MLFLOW_TRACKING_USERNAME": "alice",
                            "MLFLOW_TRACKING_PASSWORD": SECRET}
        printed = ""
        dead = f"tracking.tracking_uri=http://alice:{SECRET}@127.0.0.1:{_closed_port()}"
        for command, rc in ((["train", "-v"], 0), (["evaluate", "-v"], 0), (["train", dead], 1)):
            done = subprocess.run([sys.executable, "-m", "lens.cli", command[0], "--profile", "tiny", *overrides,
                                   *command[1:]], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                                  timeout=600)
            printed += done.stdout + done.stderr
            assert done.returncode == rc, done.stderr[-3000:]
    finally:
        server.kill()

    assert "***@127.0.0.1" in printed  # the URI was shown, redacted
    assert SECRET not in printed
    searched = 0
    for root in (tmp_path / "runs", server_dir):
        for path in root.rglob("*"):
            if path.is_file():
                searched += 1
                assert SECRET.encode() not in path.read_bytes(), f"the password is in {path}"
    assert searched > 20  # outputs, checkpoints, the database, logged artifacts
