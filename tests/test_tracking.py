"""MLflow tracking against a real SQLite store: what a user finds in the MLflow UI after a pipeline run.

One module-scoped scenario logs what `lens all` would (a parent run, a GRPO and a LENS child run with
per-step metrics, datasets, evaluation, a registered policy each, and the comparison on the parent); the
tests read it back with MlflowClient. Training itself is not run here (its verifier processes take tens
of seconds to start on 2 cores): the step callback is fed rows with the trainer's metric keys. The
tracker is a sink: the scenario hands it what the pipeline would (flat metrics, files, dataset records).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from lens import model_registry
from lens import pipeline
from lens.compare import compare_arms
from lens.compare_report import comparison_metrics
from lens.data import PLAIN_TEMPLATE
from lens.evaluate import ProblemResult, eval_metrics, summarize
from lens.params import PROJECT_ROOT
from lens.tracking import DatasetRecord, Tracker, TrackingError, metric_key, resolve_tracking_uri
from lens.tracking_store import param_dict
from lens.versioning import data_hash, file_sha256, locked_hash
from tests.helpers import random_policy, small_params, synthetic_data
from tests.mlflow_helpers import tracking_overrides

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.pipeline
ALGOS = ("grpo", "lens")
STEPS = 3
# The keys Trainer.train_step reports (lens/train.py), plus one that MLflow would reject as is.
TRAINER_KEYS = [
    "train/reward_mean", "train/acc", "train/frac_groups_all_correct", "train/frac_groups_all_wrong",
    "train/frac_groups_mixed", "train/frac_samples_with_signal", "train/response_len_mean",
    "train/truncated_frac", "train/negative_group_adv_abs_mean", "perf/rollout_tok_s", "verify/timeouts",
    "verify/errors", "verify/parse_failures", "perf/rollout_s", "perf/verify_s", "train/loss",
    "train/clip_frac", "train/kl", "train/entropy", "train/grad_norm", "perf/train_tok_s", "perf/update_s",
    "train/skipped_steps", "train/lr", "perf/step_s",
]
FLOW_RUN_ID = "11111111-2222-3333-4444-555555555555"


def step_row(algo: str, step: int) -> dict:
    shift = 0.1 if algo == "lens" else 0.0
    return {key: round(0.01 * i + 0.1 * step + shift, 6) for i, key in enumerate(TRAINER_KEYS)} | {
        "train/pass@1": 0.5, "note": "not a number"}


def eval_summary(algo: str) -> dict:
    bump = 1 if algo == "lens" else 0
    results = [ProblemResult(f"L{lv}-{i}", lv, 4, min(4, (i + lv + bump) % 5))
               for lv in (1, 2, 3) for i in range(6)]
    return summarize(results, ks=(1, 2, 4), bootstrap_samples=100) | {"algo": algo}


def rollouts_sample(path: Path) -> Path:
    """A rollouts sample as the pipeline hands it over: 5 rows per algorithm, with an `algo` column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"step": [STEPS] * 10, "problem_id": [f"p{i // 4}" for i in range(10)], "level": [1] * 10,
                  "prompt": ["Q: 1+1\nA: "] * 10, "completion": [f"\\boxed{{{i}}}" for i in range(10)],
                  "reward": [float(i == 2) for i in range(10)], "algo": ["grpo"] * 5 + ["lens"] * 5,
                  }).to_parquet(path)
    return path


def compare_files(out_dir: Path, cmp: dict) -> dict[str, Path]:
    """Stand-ins for the comparison report's files: the tracker only uploads what it is handed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"md": out_dir / "compare.md", "csv": out_dir / "compare.csv", "json": out_dir / "compare.json",
             "levels_png": out_dir / "accuracy_by_level.png"}
    files["md"].write_text("# LENS vs GRPO (tiny)\n\n| level | grpo | lens |\n")
    files["csv"].write_text("level,grpo,lens\n")
    files["json"].write_text(json.dumps(cmp))
    files["levels_png"].write_bytes(b"\x89PNG\r\n\x1a\n")
    return files


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    overrides = tracking_overrides(root)
    base = small_params(root, *overrides)
    synthetic_data(base)
    policy = random_policy(base)
    per_algo = {algo: small_params(root, *overrides, f"train.algo={algo}") for algo in ALGOS}
    summaries = {algo: eval_summary(algo) for algo in ALGOS}
    arms = compare_arms(summaries, "grpo", bootstrap_samples=100)
    cmp = arms["pairs"]["lens"]
    files = compare_files(base.root / "compare", cmp)
    for algo in ALGOS:
        shutil.copytree(policy, base.algo_dir(algo) / "final")
    sample = rollouts_sample(base.root / "compare" / "rollouts_sample.parquet")

    runs, versions = {}, {}
    run_tags = {"suite": "test_tracking", "prefect.flow_run_id": FLOW_RUN_ID}
    with Tracker(base, run_name="test-pipeline", tags=run_tags) as tracker:
        for algo in ALGOS:
            p = per_algo[algo]
            with tracker.algo_run(algo, p, tags={"prefect.task_run_name": f"train-{algo}"}) as run_id:
                runs[algo] = run_id
                pipeline.record_dataset(tracker, p, data_hash(p.data_dir))
                callback = tracker.step_callback()
                for step in range(1, STEPS + 1):
                    callback(step, step_row(algo, step))
                tracker.log_metrics(eval_metrics(summaries[algo]), step=p.train.steps)
                tracker.log_dict(summaries[algo], "eval/eval.json")
                versions[algo] = model_registry.log_policy(
                    tracker, p.algo_dir(algo) / "final", algo, max_new_tokens=p.eval.max_new_tokens,
                    prompt_template=PLAIN_TEMPLATE.replace("{problem}", "{prompt}"))
        # `lens compare` in another process attaches to the parent instead of opening its own
        with Tracker(base, parent_run_id=tracker.run_id) as attached:
            attached.log_metrics(comparison_metrics(arms))
            for path in files.values():
                attached.log_artifact(path, "compare")
            attached.set_description(files["md"].read_text())
            attached.log_artifact(sample, "rollouts")
            attached.log_table(pd.read_parquet(sample), "rollouts/sample.json")
        assert (attached.run_id, attached.experiment_id) == (tracker.run_id, tracker.experiment_id)
        assert attached.latest_algo_run("lens") == runs["lens"]
    return {"client": MlflowClient(tracker.tracking_uri), "tracker": tracker, "parent": tracker.run_id,
            "runs": runs, "versions": versions, "params": per_algo, "summaries": summaries, "cmp": cmp,
            "root": root}


def test_one_parent_run_with_a_finished_child_run_per_algorithm(scenario):
    client, parent_id = scenario["client"], scenario["parent"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "test-pipeline"
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == "lens-tiny"
    assert exp.artifact_location == str(scenario["root"] / "mlartifacts")  # beside the DB, not in the cwd
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["grpo", "lens"]
    for child in children:
        algo = child.info.run_name
        assert child.info.run_id == scenario["runs"][algo] and child.info.status == "FINISHED"
        tags = child.data.tags
        assert (tags["lens.algo"], tags["lens.profile"]) == (algo, "tiny")
        assert tags["prefect.flow_run_id"] == FLOW_RUN_ID and tags["suite"] == "test_tracking"  # the tracker's
        assert tags["prefect.task_run_name"] == f"train-{algo}"  # algo_run's own
    assert parent.data.tags["prefect.flow_run_id"] == FLOW_RUN_ID
    assert "prefect.task_run_name" not in parent.data.tags


def test_git_commit_is_a_tag_when_the_project_is_a_git_repo(scenario):
    def git(*args):
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True)

    tags = scenario["client"].get_run(scenario["runs"]["lens"]).data.tags
    if git("rev-parse", "HEAD").returncode != 0:
        assert "mlflow.source.git.commit" not in tags
        return
    commit = tags["mlflow.source.git.commit"]
    assert commit == tags["lens.git_commit"] and len(commit) == 40
    # HEAD itself when nobody committed meanwhile; an ancestor of HEAD in any case
    assert git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0
    assert tags["lens.git_dirty"] in ("true", "false")


def test_children_hold_the_flattened_params_of_their_algorithm(scenario):
    for algo in ALGOS:
        logged = scenario["client"].get_run(scenario["runs"][algo]).data.params
        assert logged == param_dict(scenario["params"][algo])
        assert logged["train.algo"] == algo and logged["train.lens.alpha"] == "0.25"
        assert json.loads(logged["data.levels"]) == [1, 2, 3, 4, 5]
    assert "train.algo" not in scenario["client"].get_run(scenario["parent"]).data.params


def test_per_step_metrics_have_identical_keys_across_algorithms(scenario):
    client = scenario["client"]
    keys = {}
    for algo in ALGOS:
        run_id = scenario["runs"][algo]
        metrics = client.get_run(run_id).data.metrics
        keys[algo] = {k for k in metrics if k.split("/")[0] in ("train", "perf", "verify")}
        history = client.get_metric_history(run_id, "train/acc")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (s, step_row(algo, s)["train/acc"]) for s in range(1, STEPS + 1)]
        assert "train/pass_at_1" in metrics  # '@' is not a valid MLflow name character
    assert keys["grpo"] == keys["lens"] == set(TRAINER_KEYS) | {"train/pass_at_1"}


def test_evaluation_metrics_and_json_land_in_the_algorithm_run(scenario):
    client = scenario["client"]
    for algo in ALGOS:
        run_id, summary = scenario["runs"][algo], scenario["summaries"][algo]
        metrics = client.get_run(run_id).data.metrics
        for key, value in summary["metrics"].items():
            assert metrics[key] == pytest.approx(value), key
        assert {"eval/acc_level_1", "eval/acc_level_3", "eval/pass_at_4"} <= set(metrics)
        low, high = summary["levels"]["2"]["acc_ci"]
        assert (metrics["eval/acc_level_2_ci_low"], metrics["eval/acc_level_2_ci_high"]) == (low, high)
        assert client.get_metric_history(run_id, "eval/acc")[0].step == scenario["params"][algo].train.steps
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/eval.json",
                                                   tracking_uri=scenario["tracker"].tracking_uri)
        assert json.loads(Path(path).read_text())["metrics"] == summary["metrics"]


def test_datasets_are_logged_as_inputs_with_their_hash(scenario):
    client = scenario["client"]
    data_dir = scenario["params"]["grpo"].data_dir
    for algo in ALGOS:
        run = client.get_run(scenario["runs"][algo])
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"tiny-train", "tiny-eval"}
        contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
        assert contexts == {"tiny-train": "training", "tiny-eval": "evaluation"}
        sha = hashlib.sha256((data_dir / "train.jsonl").read_bytes()).hexdigest()
        assert run.data.tags["lens.data.train.sha256"] == sha
        # One digest for every arm and split: DVC's md5 of the prepared data directory.
        digest = data_hash(data_dir)
        assert {d.dataset.digest for d in inputs.values()} == {digest}
        assert {t.key: t.value for t in inputs["tiny-train"].tags}["lens.sha256"] == sha
        assert json.loads(inputs["tiny-train"].dataset.profile)["num_rows"] == 5 * 50
        assert run.data.tags["lens.data.dvc_hash"] == digest


def test_policies_are_registered_with_an_alias_per_algorithm(scenario):
    client, versions = scenario["client"], scenario["versions"]
    assert versions["grpo"] != versions["lens"]
    for algo in ALGOS:
        for alias in (algo, f"tiny-{algo}"):
            mv = client.get_model_version_by_alias("lens-policy", alias)
            assert str(mv.version) == versions[algo] and mv.run_id == scenario["runs"][algo]
        assert mv.tags["lens.algo"] == algo
        assert client.get_run(scenario["runs"][algo]).data.tags["lens.model_flavor"] == "transformers"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/lens-policy@lens",
                                                     tracking_uri=scenario["tracker"].tracking_uri))
    mlmodel = (local / "MLmodel").read_text()
    assert "transformers:" in mlmodel and "text-generation" in mlmodel
    reqs = (local / "requirements.txt").read_text()
    assert "transformers==" in reqs and "torch==" in reqs and "mlflow==" in reqs


def test_system_metrics_are_sampled_in_algorithm_runs(scenario):
    for algo in ALGOS:
        metrics = scenario["client"].get_run(scenario["runs"][algo]).data.metrics
        assert any(k.startswith("system/") for k in metrics), sorted(metrics)


def test_comparison_artifacts_and_metrics_are_on_the_parent(scenario):
    client, parent, cmp = scenario["client"], scenario["parent"], scenario["cmp"]
    names = {Path(f.path).name for f in client.list_artifacts(parent, "compare")}
    assert {"compare.md", "compare.csv", "compare.json", "accuracy_by_level.png"} <= names
    assert {Path(f.path).name for f in client.list_artifacts(parent, "rollouts")} == {
        "rollouts_sample.parquet", "sample.json"}
    run = client.get_run(parent)
    for level, row in cmp["levels"].items():
        assert run.data.metrics[f"compare/diff_acc_level_{level}"] == pytest.approx(row["diff"])
        assert run.data.metrics[f"compare/lens_acc_level_{level}"] == pytest.approx(row["lens"])
    assert run.data.metrics["compare/diff_acc"] == pytest.approx(cmp["overall"]["diff"])
    assert "compare/diff_pass_at_2" in run.data.metrics
    assert run.data.tags["mlflow.note.content"].startswith("# LENS vs GRPO")
    sample = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="rollouts/rollouts_sample.parquet",
        tracking_uri=scenario["tracker"].tracking_uri))
    assert sorted(sample["algo"].unique()) == ["grpo", "lens"] and len(sample) == 10
    assert not any(k.startswith("compare/") for k in client.get_run(scenario["runs"]["lens"]).data.metrics)


def test_a_body_that_raises_leaves_parent_and_child_failed(tmp_path, caplog):
    params = small_params(tmp_path, *tracking_overrides(tmp_path, "tracking.system_metrics=false"))
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(params) as tracker:
            with tracker.algo_run("lens", params) as run_id:
                tracker.step_callback()(1, {"train/acc": 0.5})
                raise RuntimeError("boom")
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_metric_history(run_id, "train/acc")[0].value == 0.5
    # a later process (say `lens evaluate`) may re-open the run to add to it
    with tracker.algo_run("lens", params, run_id=run_id) as reopened:
        tracker.log_metrics({"eval/acc": 0.25})
    assert reopened == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.metrics["eval/acc"] == 0.25
    # outside an open run, a store that refuses a step's metrics costs a warning, not the training run
    callback = tracker.step_callback(run_id)
    client.delete_run(run_id)
    callback(2, {"train/acc": 0.75})
    assert "step 2 metrics not logged" in caplog.text


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path):
    params = small_params(tmp_path, "tracking.enabled=true", "tracking.tracking_uri=http://127.0.0.1:9",
                          "tracking.connect_timeout_s=2")
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=r"http://127\.0\.0\.1:9"):
        Tracker(params)
    assert time.perf_counter() - t0 < 5


def test_disabled_tracker_is_a_no_op_and_creates_no_store(tmp_path):
    db = tmp_path / "never.db"
    params = small_params(tmp_path, "tracking.enabled=false", f"tracking.tracking_uri=sqlite:///{db}")
    with Tracker(params, tags={"suite": "x"}) as tracker:
        with tracker.algo_run("grpo", params, tags={"a": "b"}) as run_id:
            tracker.step_callback()(1, {"train/acc": 1.0})
            tracker.log_datasets([DatasetRecord("tiny-train", tmp_path / "none.jsonl", "training", "0" * 32)])
            tracker.log_metrics({"eval/acc": 1.0}, step=3)
            tracker.log_params({"a": 1})
            tracker.set_tags({"a": "b"})
            tracker.log_dict({"metrics": {}}, "eval/eval.json")
            assert model_registry.log_policy(tracker, tmp_path / "nowhere", "grpo", prompt_template=None,
                                             max_new_tokens=4) is None
        tracker.log_artifact(tmp_path / "nowhere.md", "compare")
        tracker.log_table(pd.DataFrame({"a": [1]}), "rollouts/sample.json")
        tracker.set_description("# nothing")
        assert tracker.latest_algo_run("grpo") is None
    assert run_id is None and tracker.run_id is None and tracker.run_url() is None
    assert not db.exists() and not (tmp_path / "mlartifacts").exists()


def test_pyfunc_fallback_when_the_transformers_flavor_refuses_the_model(tmp_path, monkeypatch):
    params = small_params(tmp_path, *tracking_overrides(tmp_path, "tracking.system_metrics=false"))
    model_dir = random_policy(params)

    def refuse(*args, **kwargs):
        raise ValueError("unsupported model")

    monkeypatch.setattr(model_registry, "_log_transformers", refuse)
    with Tracker(params) as tracker, tracker.algo_run("grpo", params) as run_id:
        version = model_registry.log_policy(tracker, model_dir, "grpo", prompt_template=None,
                                            max_new_tokens=params.eval.max_new_tokens)
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(run_id).data.tags["lens.model_flavor"] == "pyfunc"
    assert str(client.get_model_version_by_alias("lens-policy", "grpo").version) == version
    model = mlflow.pyfunc.load_model("models:/lens-policy@grpo")
    for prompts in (["Q: 1+1\nA: ", "Q: 2+2\nA: "], pd.DataFrame({"prompt": ["Q: 1+1\nA: ", "Q: 2+2\nA: "]})):
        out = model.predict(prompts)
        assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_uri_and_name_helpers():
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    assert metric_key("eval/pass@8") == "eval/pass_at_8"
    assert metric_key("a b:c/d.e-f") == "a b:c/d.e-f" and metric_key("x(y)") == "x_y_"


def test_locked_hash_reads_the_recorded_output_hash(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: lens prepare\n    outs:\n"
        "    - path: runs/tiny/data\n      hash: md5\n      md5: 3f2a.dir\n      size: 10\n      nfiles: 3\n")
    assert locked_hash(tmp_path / "runs" / "tiny" / "data", tmp_path) == "3f2a.dir"
    assert locked_hash(tmp_path / "runs" / "tiny" / "other", tmp_path) is None
    assert locked_hash(tmp_path / "x", tmp_path / "no-lock-here") is None


def test_file_sha256_hashes_the_files_in_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert file_sha256(a) == hashlib.sha256(b"one").hexdigest()
    assert file_sha256(a, b) == hashlib.sha256(b"onetwo").hexdigest() != file_sha256(b, a)
