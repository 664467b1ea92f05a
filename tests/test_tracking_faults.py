"""MLflow tracking when the store fails mid-run: training never waits on it, and nothing is lost.

A real `mlflow server` (SQLite backend, one per module) is killed with SIGKILL, hung with SIGSTOP and
restarted on its port while a run logs into it; the step callback is what the Trainer calls each step.
The 1 s bound on a step is a fault-behaviour bound (MLflow's own retries took minutes), not a benchmark.
The store's answers are read back with MlflowClient once it is up again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from lens import model_registry
from lens.tracking import Tracker, replay_buffer
from lens.tracking_queue import BUFFER_NAME, REJECTED_NAME, TrackingQueue, read_records, replay_directory
from lens.tracking_store import deliver, is_transient
from tests.helpers import random_policy, small_params
from tests.mlflow_helpers import MlflowServer, tracking_overrides

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

STEP_BOUND_S = 1.0
FLUSH_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.kill()


def up(server: MlflowServer) -> MlflowServer:
    if not server.running:
        server.start()
    return server


def server_params(tmp_path: Path, server: MlflowServer, *extra: str, uri: str | None = None):
    return small_params(tmp_path, "tracking.enabled=true", f"tracking.tracking_uri={uri or server.uri}",
                        "tracking.connect_timeout_s=1", "tracking.retry_interval_s=0.5",
                        f"tracking.flush_timeout_s={FLUSH_S}", "tracking.system_metrics=false", *extra)


def timed_step(callback, step: int) -> float:
    t0 = time.perf_counter()
    callback(step, {"train/acc": step / 100, "note": "not a number"})
    return time.perf_counter() - t0


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def buffered_steps(path: Path) -> set[int]:
    if not path.exists():
        return set()
    return {row[3] for r in read_records(path) if r["op"] == "metrics" for row in r["metrics"]}


def acc_history(client, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/acc"))


@pytest.mark.slow
def test_a_killed_server_costs_a_step_under_a_second_and_gets_every_step_once_it_is_back(
        tmp_path, server, caplog, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    secret = "s3cr3t-Pa55"  # a password in the URI (the test server ignores it) is never logged or kept
    params = server_params(tmp_path, up(server), uri=server.uri.replace("://", f"://alice:{secret}@"))
    buffer = params.algo_dir("grpo") / BUFFER_NAME
    tracker = Tracker(params)
    with tracker.algo_run("grpo", params) as run_id:
        callback = tracker.step_callback()
        for step in (1, 2, 3):
            callback(step, {"train/acc": step / 100})
        server.kill()
        dead = [timed_step(callback, step) for step in range(4, 9)]
        assert max(dead) <= STEP_BOUND_S, dead
        wait_until(lambda: {4, 5, 6, 7, 8} <= buffered_steps(buffer))  # on disk, not only in memory
        assert secret not in buffer.read_text()
        server.start()
        assert max(timed_step(callback, step) for step in (9, 10)) <= STEP_BOUND_S
    client = MlflowClient(server.uri)
    assert acc_history(client, run_id) == [(s, s / 100) for s in range(1, 11)]  # each step exactly once
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["lens.tracking.replayed"]) >= 5
    assert run.data.tags["lens.tracking.buffer"] == str(buffer)
    assert "lens.tracking.undelivered" not in run.data.tags
    assert not buffer.exists() and tracker.deliveries[run_id].pending == 0
    assert "did not take a record" in caplog.text and secret not in caplog.text
    assert secret not in capsys.readouterr().out  # MLflow's own "View run at <url>" line


@pytest.mark.slow
def test_a_server_dead_at_the_end_costs_the_flush_timeout_and_the_next_run_sends_what_it_missed(
        tmp_path, server, caplog):
    params = server_params(tmp_path, up(server), "tracking.system_metrics=true",
                           "tracking.system_metrics_interval_s=0.5")
    model_dir = random_policy(params)
    buffer = params.algo_dir("grpo") / BUFFER_NAME
    tracker = Tracker(params)
    with caplog.at_level(logging.INFO, logger="lens"):
        with tracker.algo_run("grpo", params) as run_id:
            callback = tracker.step_callback()
            for step in (1, 2, 3):
                callback(step, {"train/acc": step / 100})
            tracker.log_params({"train.lens.alpha": 0.5})  # refused (a changed param) before the store dies
            wait_until(lambda: (params.algo_dir("grpo") / REJECTED_NAME).exists())
            time.sleep(1.0)  # a system-metrics sample or two
            server.kill()
            assert max(timed_step(callback, step) for step in (4, 5)) <= STEP_BOUND_S
            # `lens train` after the model is saved: the policy waits for the store, the command does not
            t0 = time.perf_counter()
            assert model_registry.log_policy(tracker, model_dir, "grpo", prompt_template=None,
                                             max_new_tokens=4) is None
            assert time.perf_counter() - t0 <= 2.0  # one refused probe (connect_timeout_s=1)
            t0 = time.perf_counter()
        closed_s = time.perf_counter() - t0
    assert closed_s <= 2 * FLUSH_S + 2  # the system-metrics monitor (min(5, flush)) + the sender's flush
    report = tracker.deliveries[run_id]
    assert report.pending > 0 and report.buffer == buffer and buffer.exists()
    assert f"{report.pending} tracking records not delivered" in caplog.text and str(buffer) in caplog.text
    ops = [r["op"] for r in read_records(buffer)]
    assert "policy" in ops and ops[-2:] == ["end", "tags"] and {4, 5} <= buffered_steps(buffer)  # tags: the refusal

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # never told it finished: not FINISHED
    # the next run on the arm's outputs (`lens train --resume`, `lens evaluate`) sends it first
    later = Tracker(params)
    with later.algo_run("grpo", params):  # while it trains, its sender delivers the first run's records
        wait_until(lambda: client.get_run(run_id).info.status == "FINISHED")
    assert not buffer.exists()
    run = client.get_run(run_id)
    assert acc_history(client, run_id) == [(s, s / 100) for s in range(1, 6)]
    assert int(run.data.tags["lens.tracking.replayed"]) == len(ops)
    assert run.data.tags["lens.tracking.undelivered"] == "1"  # the refusal, told once the store is back
    assert any(k.startswith("system/") for k in run.data.metrics)
    version = client.get_model_version_by_alias("lens-policy", "grpo")
    assert version.run_id == run_id and run.data.tags["lens.model_version"] == str(version.version)


@pytest.mark.slow
def test_a_hung_server_costs_a_step_under_a_second_and_close_no_more_than_the_flush_timeout(tmp_path, server):
    params = server_params(tmp_path, up(server), "train.algo=lens")
    buffer = params.algo_dir() / BUFFER_NAME
    tracker = Tracker(params)
    try:
        with tracker.algo_run("lens", params) as run_id:
            callback = tracker.step_callback()
            callback(1, {"train/acc": 0.01})
            server.pause()
            hung = [timed_step(callback, step) for step in range(2, 6)]
            assert max(hung) <= STEP_BOUND_S, hung
            t0 = time.perf_counter()
        assert time.perf_counter() - t0 <= FLUSH_S + 2
    finally:
        server.resume()
    report = tracker.deliveries[run_id]
    assert report.pending > 0 and buffer.exists()  # the record in flight too: nothing only in memory
    assert read_records(buffer)[-1]["op"] == "end"
    replayed = replay_buffer(buffer, params)  # what a `lens replay-tracking` command would run
    assert replayed.pending == 0 and not buffer.exists()
    client = MlflowClient(server.uri)
    assert acc_history(client, run_id) == [(s, s / 100) for s in range(1, 6)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_record_the_store_refuses_is_kept_and_tagged_without_blocking_the_rest(tmp_path):
    params = small_params(tmp_path, *tracking_overrides(tmp_path, "tracking.system_metrics=false"), "train.algo=lens")
    tracker = Tracker(params)
    with tracker.algo_run("lens", params) as run_id:
        tracker.log_params({"train.lens.alpha": 0.5})  # logged as 0.25: MLflow refuses a changed param
        tracker.step_callback()(1, {"train/acc": 0.5})
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/acc"] == 0.5
    assert run.data.params["train.lens.alpha"] == "0.25"
    rejected = params.algo_dir() / REJECTED_NAME
    assert run.data.tags["lens.tracking.undelivered"] == "1"
    assert run.data.tags["lens.tracking.rejected_file"] == str(rejected)
    (kept,) = read_records(rejected)
    assert kept["params"] == {"train.lens.alpha": "0.5"} and "alpha" in kept["error"]


def test_a_full_queue_before_a_hung_store_spills_to_disk_and_a_replay_delivers_everything(tmp_path, monkeypatch):
    """A listening socket that never answers is a hung store; a SQLite store then takes the replay."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = small_params(tmp_path, *tracking_overrides(tmp_path, "tracking.system_metrics=false"))
    with Tracker(params) as tracker:
        run_id = tracker.run_id
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        client = MlflowClient(f"http://127.0.0.1:{hung.getsockname()[1]}")
        sender = TrackingQueue(lambda r: deliver(client, r), tmp_path / "arm", is_transient=is_transient,
                               max_queued=4)
        puts = []
        for step in range(20):
            t0 = time.perf_counter()
            sender.put({"op": "metrics", "run_id": run_id, "metrics": [["train/acc", step / 100, 1000 + step, step]]})
            puts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report = sender.close(timeout_s=0.5)
        assert time.perf_counter() - t0 <= 1.5 and max(puts) <= STEP_BOUND_S
    assert report.pending == 20 and buffered_steps(report.buffer) == set(range(20))
    replayed = replay_directory(report.buffer.parent, lambda r: deliver(tracker.client, r), is_transient=is_transient)
    assert (replayed.sent, replayed.pending) == (20, 0) and not report.buffer.exists()
    assert acc_history(tracker.client, run_id) == [(s, s / 100) for s in range(20)]


def test_mlflow_http_retries_are_bounded_from_params_unless_the_user_exported_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    params = small_params(tmp_path, *tracking_overrides(tmp_path, "tracking.http_max_retries=1"))
    Tracker(params)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 1  # the name MLflow reads


def test_a_truncated_buffer_line_is_skipped_naming_the_file_and_line(tmp_path, caplog):
    path = tmp_path / BUFFER_NAME
    path.write_text(json.dumps({"op": "tags", "run_id": "r", "tags": {}}) + "\n" + '{"op": "metr')
    assert [r["op"] for r in read_records(path)] == ["tags"]
    assert f"{path}:2" in caplog.text
