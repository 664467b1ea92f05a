"""Prefect faults, for real: a flow-run process killed with SIGKILL, and the Prefect API killed mid-flow.

A real `prefect server start` (SQLite, 127.0.0.1, its own PREFECT_HOME) serves a lens-train flow that runs
in a process of its own (tests/run_train_flow.py). Either way the checkpoints survive, and running the
flow again (its default `resume=True`) continues from the last one: steps done before the fault are not
run again, and every step is in metrics.jsonl exactly once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lens.records import RunFiles, read_manifest
from tests.conftest import PROJECT_ROOT
from tests.test_flows import free_port

pytestmark = [pytest.mark.slow, pytest.mark.pipeline]

STEPS = ["train.steps=8", "train.steps_per_round=2", "train.checkpoint_every=2"]


class PrefectServer:
    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": self.url,
                                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(PROJECT_ROOT),
                                 # A dead API fails a client call at once instead of after 5 backed-off retries.
                                 "PREFECT_CLIENT_MAX_RETRIES": "0"}

    def start(self) -> None:
        import httpx

        self.proc = subprocess.Popen([Path(sys.executable).parent / "prefect", "server", "start", "--host",
                                      "127.0.0.1", "--port", str(self.port)], env=self.env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, "prefect server exited at start"
            time.sleep(0.5)
        raise AssertionError("prefect server did not come up in 120 s")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture()
def prefect_server(tmp_path):
    server = PrefectServer(tmp_path / "prefect-home")
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def _flow(server: PrefectServer, root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.run_train_flow", str(root), *STEPS, *extra],
                            env=server.env, cwd=PROJECT_ROOT, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_checkpoint(files: RunFiles, proc: subprocess.Popen, name: str) -> None:
    pointer, deadline = files.checkpoints / "latest", time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text() >= name):
        assert proc.poll() is None, f"the flow ended before {name}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {name} in 300 s"
        time.sleep(0.2)


def _run_is_free(files: RunFiles) -> bool:
    """True once no process holds the run directory's lock (the trainer closed or its process died)."""
    with open(files.dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _rows(files: RunFiles) -> list[str]:
    return files.metrics.read_text().splitlines()


def _rerun_to_completion(server: PrefectServer, root: Path, files: RunFiles, done_before: list[str]) -> str:
    rerun = _flow(server, root)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "STATE COMPLETED" in out, out[-4000:]
    rows = _rows(files)
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 9))
    assert rows[:len(done_before)] == done_before, "steps done before the fault ran again"
    assert json.loads(files.train_summary.read_text())["done"] is True
    return out


def test_a_killed_flow_run_process_resumes_when_the_flow_runs_again(prefect_server, tmp_path):
    files = RunFiles(tmp_path / "tiny" / "lens")
    proc = _flow(prefect_server, tmp_path, "--new-policy")
    _wait_for_checkpoint(files, proc, "step-000004")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not files.final.exists()
    kept = [r for r in _rows(files) if json.loads(r)["step"] <= 4]

    out = _rerun_to_completion(prefect_server, tmp_path, files, kept)
    assert "lens: resuming at step 5" in out


def test_the_prefect_api_going_away_keeps_the_checkpoints_and_the_flow_resumes(prefect_server, tmp_path):
    files = RunFiles(tmp_path / "tiny" / "lens")
    proc = _flow(prefect_server, tmp_path, "--new-policy")
    _wait_for_checkpoint(files, proc, "step-000004")
    prefect_server.kill()

    # Without its API the flow's rounds fail (a task cannot report its state) and the trainer lets go of the
    # run; the process itself may linger in Prefect's exit handlers, flushing events to nowhere.
    deadline = time.monotonic() + 300
    while not _run_is_free(files):
        assert time.monotonic() < deadline, "the run directory was still held 300 s after the API died"
        time.sleep(1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for step in ("step-000002", "step-000004"):
        read_manifest(files.checkpoints / step)  # complete and verified: nothing was lost
    kept = [r for r in _rows(files) if json.loads(r)["step"] <= 4]

    prefect_server.start()  # the same database and port: the API is back
    out = _rerun_to_completion(prefect_server, tmp_path, files, kept)
    assert "resuming at step" in out
