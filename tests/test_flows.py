"""The Prefect flows and the local services, against real things: a real Prefect API (the test harness's
server on 127.0.0.1, SQLite), a real MLflow SQLite store, the real infra/services.sh.

One lens-compare flow run on a minuscule configuration carries most assertions: its task runs (every
step as generate_rollouts -> verify_rollouts -> update_policy, rounds, checkpoints), its artifacts, its
outputs, its MLflow runs, and a round that fails once. The failure is injected by monkeypatching
`Trainer.rollout` to raise the first time LENS starts step 4 (after the step-2 checkpoint and step 3):
the round must be retried by Prefect and resume from the step-2 checkpoint, so steps 1-2 run once, step
3 twice, and metrics.jsonl ends with exactly steps 1..4.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Before Prefect is imported: its home (profiles, local result storage) stays out of ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lens-test-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tests.helpers import SMALL, random_policy, small_params  # noqa: E402
from tests.mlflow_helpers import tracking_overrides  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.pipeline]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STEPS, PER_ROUND, FAIL_AT = 4, 2, 3  # LENS fails once when it starts step FAIL_AT + 1
FLOW_OVERRIDES = ["train.steps=4", "train.steps_per_round=2", "train.checkpoint_every=2",
                  "data.synthetic.eval_per_level=4", "warm_start.enabled=false"]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs_of(flow_run_id, expected: int, timeout_s: float = 60.0) -> list:
    """Task runs reach the API as events: wait until at least `expected` are there and the set settles."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline, last = time.monotonic() + timeout_s, None
    with client() as c:
        while True:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            settled = all(r.state is not None and r.state.is_final() for r in runs)
            if len(runs) >= expected and settled and last == len(runs):
                return runs
            if time.monotonic() > deadline:
                return runs
            last = len(runs)
            time.sleep(1.0)


def load_deployments_module():
    spec = importlib.util.spec_from_file_location("lens_infra_deployments", PROJECT_ROOT / "infra" / "deployments.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- the compare flow, with a round that fails once ----------------------------------------------


@pytest.fixture(scope="module")
def compare_run(prefect_api, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    overrides = [f"run.output_root={tmp}", *SMALL, *FLOW_OVERRIDES, *tracking_overrides(tmp)]
    params = small_params(tmp, *FLOW_OVERRIDES)
    random_policy(params)  # where the warm start would put the policy (warm_start.enabled=false)

    from lens.train import Trainer

    original, fired = Trainer.rollout, []

    def flaky_rollout(self, step=None):
        if self.params.train.algo == "lens" and self.state.step == FAIL_AT and not fired:
            fired.append(self.state.step)
            raise RuntimeError("injected rollout failure")
        return original(self, step)

    from flows.lens_compare import lens_compare

    Trainer.rollout = flaky_rollout
    try:
        t0 = time.perf_counter()
        state = lens_compare(profile="tiny", overrides=overrides, return_state=True)
        seconds = time.perf_counter() - t0
    finally:
        Trainer.rollout = original
    assert fired == [FAIL_AT]
    return {"state": state, "params": params, "root": params.root, "seconds": seconds,
            "mlflow_uri": next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.tracking_uri="))}


def test_compare_flow_completes_with_every_step_as_tasks(compare_run):
    state = compare_run["state"]
    assert state.is_completed(), state.message
    per_algo = STEPS * 3 + 2 + 2 + 4  # step tasks + rounds + checkpoints + open/save/evaluate/publish
    runs = task_runs_of(state.state_details.flow_run_id, expected=2 * per_algo + 4 + 4)
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    for algo in ("grpo", "lens"):
        for step in range(1, STEPS + 1):
            for kind in ("generate_rollouts", "verify_rollouts", "update_policy"):
                name = f"{kind}-{algo}-step-{step}"
                assert name in by_name, f"missing task run {name}; have {sorted(by_name)}"
                assert by_name[name][-1].state.is_completed() or any(
                    r.state.is_completed() for r in by_name[name]), name
        for i in (1, 2):
            assert [r.state.type.value for r in by_name[f"train_round-{algo}-{i}"]] == ["COMPLETED"]
        for name in (f"checkpoint-{algo}-step-2", f"checkpoint-{algo}-step-4", f"evaluate-{algo}",
                     f"publish_evaluation-{algo}", f"save_policy-{algo}", f"open_trainer-{algo}"):
            assert any(r.state.is_completed() for r in by_name.get(name, [])), name
    for prefix in ("version_dataset", "warm_start", "compare", "record_in_dvc"):
        assert any(n.startswith(prefix + "-") and all(r.state.is_completed() for r in rs)
                   for n, rs in by_name.items()), prefix
    # The only failed task run is the injected one; everything else completed.
    failed = sorted(r.name for r in runs if not r.state.is_completed())
    assert failed == [f"generate_rollouts-lens-step-{FAIL_AT + 1}"]


def test_failed_round_is_retried_and_resumes_from_the_checkpoint(compare_run):
    runs = task_runs_of(compare_run["state"].state_details.flow_run_id, expected=1)
    count = {}
    for r in runs:
        count[r.name] = count.get(r.name, 0) + 1
    lens_round_2 = next(r for r in runs if r.name == "train_round-lens-2")
    assert lens_round_2.run_count == 2 and lens_round_2.state.is_completed()
    # Resumed at the step-2 checkpoint: steps 1-2 ran once, step 3 again, step 4 failed then ran.
    assert [count[f"update_policy-lens-step-{s}"] for s in (1, 2, 3, 4)] == [1, 1, 2, 1]
    assert [count[f"generate_rollouts-lens-step-{s}"] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [count[f"update_policy-grpo-step-{s}"] for s in (1, 2, 3, 4)] == [1, 1, 1, 1]
    for algo in ("grpo", "lens"):
        algo_dir = compare_run["params"].algo_dir(algo)
        steps = [json.loads(line)["step"] for line in (algo_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4], (algo, steps)  # exact: no step lost, none duplicated
        summary = json.loads((algo_dir / "train_summary.json").read_text())
        assert summary["step"] == STEPS and summary["done"]


def test_compare_flow_publishes_artifacts_and_outputs(compare_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = compare_run["state"].state_details.flow_run_id
    with client() as c:
        artifacts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts if a.key}
    md = by_key["tiny-compare"]
    assert md.type == "markdown" and "| level |" in md.data and "LENS vs GRPO" in md.data
    table = by_key["tiny-compare-levels"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["level"] for r in rows] == ["1", "2", "3", "4", "5", "4-5", "all"]  # 4-5: the paper's hard subset
    assert {"grpo_acc", "lens_acc", "diff", "diff_ci", "p_boot"} <= set(rows[0])
    for algo in ("grpo", "lens"):
        assert "| level | problems | acc" in by_key[f"tiny-{algo}-eval"].data
    assert any(a.type == "progress" for a in artifacts)

    root = compare_run["root"]
    assert (root / "compare" / "compare.md").read_text() == md.data
    for algo in ("grpo", "lens"):
        assert (root / algo / "final" / "config.json").exists()
        assert json.loads((root / algo / "eval.json").read_text())["algo"] == algo
        manifests = sorted((root / algo / "rollouts").glob("round-*.json"))
        assert [m.name for m in manifests] == ["round-0001.json", "round-0002.json"]
        second = json.loads(manifests[1].read_text())
        assert second["steps"] == [3, 4] and second["files"] == ["step-000002.parquet", "step-000003.parquet"]
        assert second["rows"] == 2 * 4 * 4  # 2 steps x 4 prompts x G=4


def test_compare_flow_logs_parent_and_child_runs_to_mlflow(compare_run):
    from mlflow import MlflowClient

    c = MlflowClient(compare_run["mlflow_uri"])
    exp = c.get_experiment_by_name("lens-tiny")
    runs = c.search_runs([exp.experiment_id])
    flow_run_id = str(compare_run["state"].state_details.flow_run_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"grpo", "lens"}
    for r in [parent, *children.values()]:
        assert r.info.status == "FINISHED"
        assert r.data.tags["prefect.flow_run_id"] == flow_run_id
    keys = {algo: {k for k in r.data.metrics if k.startswith(("train/", "eval/"))} for algo, r in children.items()}
    assert keys["grpo"] == keys["lens"] and "eval/acc_level_1" in keys["lens"] and "train/acc" in keys["lens"]
    history = c.get_metric_history(children["grpo"].info.run_id, "train/acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert "compare/diff_acc" in parent.data.metrics
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "compare")}
    assert "compare/compare.md" in artifacts


def test_train_flow_trains_one_algorithm_in_rounds(prefect_api, tmp_path):
    from flows.lens_train import lens_train

    overrides = [f"run.output_root={tmp_path}", *SMALL, "train.steps=2", "train.steps_per_round=1",
                 "data.synthetic.eval_per_level=2", "warm_start.enabled=false", "tracking.enabled=false"]
    random_policy(small_params(tmp_path, *overrides[1:]))
    state = lens_train(profile="tiny", algo="grpo", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["steps"] == 2 and "eval/acc_level_1" in result["eval"] and result["mlflow_run_id"] is None
    names = {r.name for r in task_runs_of(state.state_details.flow_run_id, expected=16)}
    assert {"train_round-grpo-1", "train_round-grpo-2", "checkpoint-grpo-step-1", "checkpoint-grpo-step-2",
            "update_policy-grpo-step-2", "evaluate-grpo"} <= names
    assert json.loads((tmp_path / "tiny" / "grpo" / "eval.json").read_text())["algo"] == "grpo"


def test_study_flow_runs_arms_by_seeds_and_publishes_the_report(prefect_api, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.lens_study import lens_study

    overrides = [f"run.output_root={tmp_path}", *SMALL, "train.steps=1", "data.synthetic.eval_per_level=2",
                 "warm_start.enabled=false", "tracking.enabled=false", "study.seeds=[0,1]"]
    random_policy(small_params(tmp_path, *overrides[1:]))
    state = lens_study(profile="tiny", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["runs"] == 4 and result["trained"] == 4
    flow_run_id = state.state_details.flow_run_id
    names = {r.name for r in task_runs_of(flow_run_id, expected=30)}
    assert {"evaluate-grpo", "evaluate-lens", "update_policy-lens-step-1"} <= names
    assert {"evaluate_start", "study_report"} <= {n.rsplit("-", 2)[0] for n in names}  # "<task>-<random words>"
    with client() as c:
        artifacts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts if a.key}
    assert by_key["tiny-study"].data == Path(result["files"]["markdown"]).read_text()
    assert by_key["tiny-study-table"].type == "table"


# ---- parameters fail before anything runs ---------------------------------------------------------


def test_invalid_override_fails_before_any_task_naming_the_key(prefect_api, tmp_path):
    from flows.lens_train import lens_train

    state = lens_train(profile="tiny", algo="grpo",
                       overrides=[f"run.output_root={tmp_path}", "tracking.enabled=false", "train.steps=-1"],
                       return_state=True)
    assert state.is_failed()
    assert "train.steps" in state.message
    assert task_runs_of(state.state_details.flow_run_id, expected=0, timeout_s=3) == []
    assert not (tmp_path / "tiny").exists()


def test_deployments_enforce_the_parameter_schema_and_declare_the_gpu_pool(prefect_api):
    from prefect.exceptions import PrefectHTTPStatusError

    infra = load_deployments_module()
    declared = {d.full_name: d for d in infra.declared()}
    assert set(declared) == {"lens-train/tiny", "lens-compare/tiny", "lens-study/tiny", "lens-train/paper"}
    ids = {name: infra.runner_deployment(d).apply() for name, d in declared.items() if not d.work_pool}
    assert infra.register_remote(list(declared.values())) == ["lens-train/paper"]
    with client() as c:
        paper = c.read_deployment_by_name("lens-train/paper")
        assert paper.work_pool_name == infra.GPU_POOL and paper.parameters["profile"] == "paper"
        assert paper.entrypoint == "flows.lens_train.lens_train"
        before = len(c.read_flow_runs())
        for bad in ({"algo": "ppo"}, {"profile": "huge"}):
            with pytest.raises(PrefectHTTPStatusError) as err:
                c.create_flow_run_from_deployment(ids["lens-train/tiny"], parameters=bad)
            assert err.value.response.status_code in (409, 422)
        assert len(c.read_flow_runs()) == before  # refused: no run was created
        ok = c.create_flow_run_from_deployment(ids["lens-compare/tiny"], parameters={"overrides": ["train.steps=1"]})
        assert ok.parameters["profile"] == "tiny"
        c.delete_flow_run(ok.id)


# ---- infra/services.sh ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_services_start_status_stop(tmp_path):
    from tests.mlflow_helpers import fresh_sqlite_uri

    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"LENS_SERVICES_DIR": str(tmp_path / "services"), "LENS_PREFECT_PORT": str(prefect_port),
            "LENS_MLFLOW_PORT": str(mlflow_port), "LENS_MLFLOW_BACKEND_URI": fresh_sqlite_uri(tmp_path),
            "LENS_MLFLOW_ARTIFACTS": str(tmp_path / "mlartifacts"), "LENS_GPU_POOL": "test-gpu",
            "LENS_START_TIMEOUT": "180"}
    script = str(PROJECT_ROOT / "infra" / "services.sh")

    def services(*args, timeout=420):
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        started = services("start")
        assert started.returncode == 0, started.stdout + started.stderr
        status = services("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == 3
        import urllib.request

        for url in (f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health",
                    f"http://127.0.0.1:{prefect_port}/api/deployments/name/lens-compare/tiny",
                    f"http://127.0.0.1:{prefect_port}/api/deployments/name/lens-train/paper"):
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200, url
        logs = tmp_path / "services" / "logs"
        # The serving process's flow runs log to the MLflow server it was started beside.
        assert f"MLflow tracking: http://127.0.0.1:{mlflow_port}" in (logs / "deployments.log").read_text()
        assert {p.name for p in logs.glob("*.log")} == {"prefect.log", "mlflow.log", "deployments.log"}
        env_out = services("env").stdout
        assert f"PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in env_out
    finally:
        stopped = services("stop", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert services("status").returncode == 3
    for port in (prefect_port, mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after stop"
    assert not list((tmp_path / "services" / "run").glob("*.pid"))
