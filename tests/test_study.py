"""`lens study` end to end on a minuscule configuration: arms x seeds from one warm start, one report, one
MLflow parent with a child per run, and a re-run that skips what is finished and resumes what is not."""

import json
import os

import pytest

from lens import stages
from lens.cli import main
from lens.params import ParamsError, load_params
from lens.study import link_inputs, plan, study_dir
from tests.helpers import SMALL, random_policy, small_params
from tests.mlflow_helpers import tracking_overrides

pytestmark = pytest.mark.slow

STUDY = [*SMALL, "train.steps=2", "warm_start.enabled=false", "study.arms=[grpo,lens_neg]", "study.baseline=grpo",
         "study.variants={lens_neg: [train.algo=lens, train.lens.mixed_groups=false]}",
         "tracking.system_metrics=false"]


def _study(root, *extra):
    return [f"run.output_root={root}", *STUDY, *extra]


def test_variants_and_seeds_plan_one_directory_per_run(tmp_path):
    params = load_params("tiny", _study(tmp_path, "study.seeds=[3,4]"))
    runs = plan(params)
    assert [(r.arm, r.seed, r.params.train.algo, r.params.run.seed) for r in runs] == [
        ("grpo", 3, "grpo", 3), ("lens_neg", 3, "lens", 3), ("grpo", 4, "grpo", 4), ("lens_neg", 4, "lens", 4)]
    assert not runs[1].params.train.lens.mixed_groups and runs[0].params.train.lens.mixed_groups
    assert len({r.files.dir for r in runs}) == 4 and all(study_dir(params) in r.files.dir.parents for r in runs)
    with pytest.raises(ParamsError, match="study.variants.lens_neg"):
        plan(load_params("tiny", _study(tmp_path, "study.variants={lens_neg: [train.lens.alpha=-1]}")))
    with pytest.raises(ParamsError, match="neither registered estimators"):
        load_params("tiny", _study(tmp_path, "study.arms=[grpo,nope]"))


def test_study_through_the_cli_reports_over_seeds_and_skips_finished_runs(tmp_path, caplog):
    from mlflow import MlflowClient

    tracking = tracking_overrides(tmp_path)
    base = small_params(tmp_path, *_study(tmp_path)[1:], *tracking)
    random_policy(base)

    assert main(["study", "--profile", "tiny", *_study(tmp_path, "study.seeds=[0]"), *tracking]) == 0
    # Seed 1 added later, and one of its runs interrupted after a step: the re-run trains seed 1 only,
    # resuming the interrupted run from its checkpoint.
    params = load_params("tiny", _study(tmp_path, "study.seeds=[0,1]", *tracking))
    runs = {r.label: r for r in plan(params)}
    seed0_evals = {label: r.files.eval.read_bytes() for label, r in runs.items() if r.seed == 0}
    interrupted = runs["lens_neg-seed1"]
    link_inputs(params, interrupted)
    stages.train(interrupted.params, max_steps=1)
    assert interrupted.files.interrupted()
    caplog.clear()

    with caplog.at_level("INFO"):
        assert main(["study", "--profile", "tiny", "--jobs", "1", *_study(tmp_path, "study.seeds=[0,1]"), *tracking]) == 0
    assert "2 finished, 2 to run" in caplog.text
    assert {label: r.files.eval.read_bytes() for label, r in runs.items() if r.seed == 0} == seed0_evals
    rows = [json.loads(line) for line in interrupted.files.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    report_dir = study_dir(params) / "report"
    report = json.loads((report_dir / "study.json").read_text())
    assert set(report["arms"]) == {"grpo", "lens_neg"}
    assert "LENS_NEG x 2 seeds" in (report_dir / "study.md").read_text()
    assert (report_dir / "accuracy_by_level.png").stat().st_size > 0

    client = MlflowClient(tracking[1].split("=", 1)[1])
    exp = client.get_experiment_by_name("lens-tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`lens.study` = 'study' and attributes.run_name LIKE 'study-%'")
    children = client.search_runs([exp.experiment_id], "tags.`lens.seed` = '1'")
    assert parents and {c.info.run_name for c in children} == {"grpo-seed1", "lens_neg-seed1"}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert any(a.path == "study" for a in client.list_artifacts(parents[0].info.run_id))


def test_study_jobs_train_runs_in_processes_of_their_own_under_one_parent(tmp_path):
    from mlflow import MlflowClient

    tracking = tracking_overrides(tmp_path)
    random_policy(small_params(tmp_path, *_study(tmp_path)[1:], *tracking))
    assert main(["study", "--profile", "tiny", *_study(tmp_path, "study.seeds=[5]"), *tracking, "--jobs", "2"]) == 0
    params = load_params("tiny", _study(tmp_path, "study.seeds=[5]", *tracking))
    pids = {json.loads(r.files.train_summary.read_text())["pid"] for r in plan(params)}
    assert len(pids) == 2 and os.getpid() not in pids  # each run in a process of its own
    client = MlflowClient(tracking[1].split("=", 1)[1])
    exp = client.get_experiment_by_name("lens-tiny")
    children = client.search_runs([exp.experiment_id], "tags.`lens.seed` = '5'")
    assert {c.info.run_name for c in children} == {"grpo-seed5", "lens_neg-seed5"}
    assert len({c.data.tags["mlflow.parentRunId"] for c in children}) == 1
