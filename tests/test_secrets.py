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
