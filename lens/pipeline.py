"""The pipeline's choreography, written once: inputs -> arms (train -> evaluate -> record) -> comparison.

`lens all`, the tracked single commands (`lens train|evaluate|compare`) and the Prefect flows
`lens-train` / `lens-compare` all call these functions; an orchestrator only passes its runner
(lens.loop.Runner: how a phase runs, its run tags, where results are published). What an arm records in
MLflow: the dataset (ONE digest: DVC's md5 of the prepared data directory, computed from disk), the
training metrics per step, the evaluation, and the final policy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from lens import stages, versioning
from lens.loop import Runner
from lens.params import PROJECT_ROOT, Params
from lens.records import RunFiles, atomic_write_json, sample_rollouts
from lens.tracking import DatasetRecord, Tracker


# ---- inputs: data and warm start -------------------------------------------------------------------


def prepare_inputs(params: Params, runner: Runner, *, record_dvc: bool = False) -> dict:
    """The prepared data (with its digest, committed to DVC and pushed when `record_dvc`) and the warm
    start (reused when it is current)."""
    dataset = runner.phase("version_dataset", lambda: _version_dataset(params, record_dvc), arm=None)
    runner.logger().info("dataset %s: %s, hash %s, DVC %s", dataset["dir"], dataset["splits"], dataset["hash"],
                         dataset["dvc"])
    runner.phase("warm_start", lambda: warm_start_if_needed(params, runner), arm=None)
    return dataset


def _version_dataset(params: Params, record_dvc: bool) -> dict:
    summary = stages.prepare(params)
    dataset = {"hash": versioning.data_hash(params.data_dir), "dir": str(params.data_dir),
               "splits": {s: v["problems"] for s, v in summary["splits"].items()}, "dvc": {"recorded": False}}
    if record_dvc:
        try:
            versioning.dvc_commit(["prepare"], PROJECT_ROOT, params=params)
            versioning.dvc_push(["prepare"], PROJECT_ROOT)
            dataset["dvc"] = {"recorded": True, "pushed": True}
        except Exception as exc:  # versioning is best-effort: the run goes on, the summary says why
            dataset["dvc"] = {"recorded": False, "error": str(exc)}
    return dataset


def _warm_start_fingerprint(params: Params) -> dict:
    """Everything the warm start's output depends on (lens.warm_start reads exactly these)."""
    return {"warm_start": params.warm_start.model_dump(), "tiny": params.model.tiny.model_dump(),
            "synthetic": params.data.synthetic.model_dump(), "levels": params.data.levels,
            "seed": params.run.seed, "max_new_tokens": params.rollout.max_new_tokens}


def _warm_start_record(params: Params):
    # Beside the warm_start/ output, not in it: the output stays byte-identical to `lens warm-start`'s.
    return params.root / ".pipeline" / "warm_start.json"


def warm_start_is_current(params: Params) -> str | None:
    """Why warm_start/ can be reused as it is (None: it must be built): it holds a model and either the
    pipeline built it with these parameters, or params.yaml's values are in use and `dvc status` finds
    the warm_start stage up to date."""
    model_dir, report = params.warm_start_dir / "model", params.warm_start_dir / "warm_start.json"
    if not ((model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")) and report.exists()):
        return None
    record = _warm_start_record(params)
    if record.exists():
        try:
            saved = json.loads(record.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("fingerprint") == _warm_start_fingerprint(params) and saved.get("report") == report.read_text():
            return "built by the pipeline with these parameters"
    if dvc_reason_not(params) is None:
        proc = versioning.run_dvc(["status", "warm_start", "--json"], PROJECT_ROOT, check=False)
        try:
            if proc.returncode == 0 and json.loads(proc.stdout or "null") == {}:
                return "dvc status: the warm_start stage is up to date"
        except json.JSONDecodeError:
            pass
    return None


def warm_start_if_needed(params: Params, runner: Runner) -> dict:
    logger = runner.logger()
    if params.model.source != "warm_start" or not params.warm_start.enabled:
        return stages.warm_start(params)  # records why it was skipped
    reuse = warm_start_is_current(params)
    if reuse:
        logger.info("warm start: reusing %s (%s)", params.warm_start_dir, reuse)
        return {"skipped": True, "reason": reuse}
    logger.info("warm start: %d supervised steps of the tiny model", params.warm_start.steps)
    report = stages.warm_start(params)
    atomic_write_json(_warm_start_record(params), {"fingerprint": _warm_start_fingerprint(params),
                                                   "report": (params.warm_start_dir / "warm_start.json").read_text()})
    logger.info("warm start done in %.0f s: sampling accuracy by level %s", report.get("seconds", 0),
                {k: round(v, 3) for k, v in report.get("accuracy_per_level", {}).items()})
    return report


# ---- an arm -----------------------------------------------------------------------------------------


def record_dataset(tracker: Tracker, params: Params, digest: str) -> None:
    """The prepared splits as MLflow dataset inputs, all under the data directory's one digest (DVC's md5,
    `versioning.data_hash`), with each file's sha256 as a tag."""
    data, tags = [], {"lens.data.dvc_hash": digest}
    for split, context in (("train", "training"), ("eval", "evaluation")):
        path = params.data_dir / f"{split}.jsonl"
        if path.exists():
            sha = versioning.file_sha256(path)
            data.append(DatasetRecord(name=f"{params.profile}-{split}", path=path, context=context, digest=digest,
                                      tags={"lens.sha256": sha, "lens.dvc_hash": digest}))
            tags[f"lens.data.{split}.sha256"] = sha
    tracker.log_datasets(data)
    tracker.set_tags(tags)
    report = params.data_dir / "report.json"
    if report.exists():
        tracker.log_artifact(report, "data")


def train_arm(params: Params, tracker: Tracker, runner: Runner, *, resume: bool | Literal["auto"] = False,
              max_steps: int | None = None) -> dict:
    """stages.train with the tracker's step callback (resume: see lens.train.Trainer)."""
    return stages.train(params, resume=resume, max_steps=max_steps, runner=runner,
                        callbacks=[tracker.step_callback()])


def evaluate_arm(params: Params, tracker: Tracker, runner: Runner, **where: Any) -> dict:
    """Evaluate <arm>/final (or `model_path=`, `out_path=`) and record the evaluation."""
    arm = params.train.algo
    summary = runner.phase("evaluate", lambda: stages.evaluate(params, arm, **where), arm=arm)
    runner.phase("publish_evaluation", lambda: publish_evaluation(params, tracker, runner, summary), arm=arm)
    return summary


def publish_evaluation(params: Params, tracker: Tracker, runner: Runner, summary: dict) -> None:
    from lens.evaluate import eval_metrics, evaluation_markdown

    arm = params.train.algo
    tracker.log_metrics(eval_metrics(summary), step=params.train.steps)
    tracker.log_dict(summary, "eval/eval.json")
    runner.published("evaluation", params, {"summary": summary, "markdown": evaluation_markdown(
        summary, arm, params.profile)}, arm=arm)


def publish_policy(params: Params, tracker: Tracker, runner: Runner) -> str | None:
    """The final policy as an MLflow model, registered as tracking.registered_model_name@<arm>."""
    from lens.data import PLAIN_TEMPLATE, Problem, user_message
    from lens.model_registry import log_policy

    from lens.records import read_manifest

    arm = params.train.algo
    if not (tracker.enabled and params.tracking.log_model):
        return None
    final = RunFiles(params.algo_dir(arm)).final
    try:
        read_manifest(final)
    except ValueError as exc:  # a corrupted or incomplete policy is never registered
        raise RuntimeError(f"{final} is not the policy training saved ({exc}): not logged or registered") from None
    prompt = params.model.prompt  # MLflow's text-generation template, for a plain prompt
    template = None if prompt.template == "chat" else PLAIN_TEMPLATE.format(
        problem=user_message(Problem("", "{prompt}", "", 0, ""), prompt.instruction))
    version = log_policy(tracker, RunFiles(params.algo_dir(arm)).final, arm, prompt_template=template,
                         max_new_tokens=params.eval.max_new_tokens)
    if version:
        runner.logger().info("%s: policy registered as %s version %s", arm, params.tracking.registered_model_name,
                             version)
    return version


def run_arm(params: Params, tracker: Tracker, runner: Runner, dataset: dict,
            resume: bool | Literal["auto"] = False, run_name: str | None = None,
            tags: dict | None = None) -> dict:
    """One arm end to end, in its own tracked child run (`run_name`, default the arm): train -> evaluate ->
    record."""
    arm = params.train.algo
    with tracker.algo_run(run_name or arm, params, tags=runner.run_tags() | (tags or {})):
        record_dataset(tracker, params, dataset["hash"])
        training = train_arm(params, tracker, runner, resume=resume)
        evaluation = evaluate_arm(params, tracker, runner)
        version = publish_policy(params, tracker, runner)
    return {"training": training, "evaluation": evaluation, "model_version": version}


# ---- a comparison -----------------------------------------------------------------------------------


def run_comparison(params: Params, tracker: Tracker, runner: Runner) -> dict:
    """`stages.compare` of compare.arms, recorded on the tracker's (parent) run and published."""
    from lens.compare_report import comparison_metrics, comparison_table

    cmp = runner.phase("compare", lambda: stages.compare(params), arm=None)
    markdown = Path(cmp["files"]["md"]).read_text()  # the report as written, not rendered again
    tracker.log_metrics(comparison_metrics(cmp), run_id=tracker.run_id)
    for path in cmp["files"].values():
        tracker.log_artifact(path, "compare", run_id=tracker.run_id)
    tracker.set_description(markdown, run_id=tracker.run_id)
    dirs = {arm: RunFiles(params.algo_dir(arm)).rollouts for arm in params.compare.arms}
    sample = sample_rollouts(dirs, params.root / "compare" / "rollouts_sample.parquet",
                             params.tracking.rollout_sample_rows, seed=params.run.seed)
    if sample is not None:
        import pandas as pd

        tracker.log_artifact(sample, "rollouts", run_id=tracker.run_id)
        tracker.log_table(pd.read_parquet(sample), "rollouts/sample.json", run_id=tracker.run_id)
    runner.published("comparison", params, {"comparison": cmp, "markdown": markdown, "table": comparison_table(cmp)})
    return cmp


# ---- the whole pipeline -----------------------------------------------------------------------------


def run_pipeline(base: Params, arm_params: Callable[[str], Params], runner: Runner, *, arms: list[str],
                 compare: bool, record_dvc: bool = False, run_name: str | None = None,
                 resume: bool | Literal["auto"] = False) -> dict:
    """Inputs, then every arm, then (with `compare`) the comparison, under one tracked parent run;
    finally the outputs are recorded in dvc.lock when `record_dvc` and the run used params.yaml's values.
    `resume="auto"`: an arm a killed run left unfinished continues from its last checkpoint."""
    reason_not = dvc_reason_not(base) if record_dvc else "not asked to record in DVC"
    with Tracker(base, run_name=run_name, tags=runner.run_tags()) as tracker:
        dataset = prepare_inputs(base, runner, record_dvc=reason_not is None)
        results = {arm: run_arm(arm_params(arm), tracker, runner, dataset, resume) for arm in arms}
        cmp = run_comparison(base, tracker, runner) if compare else None
    dvc = {"recorded": False, "reason": reason_not}
    if record_dvc:
        dvc = runner.phase("record_in_dvc", lambda: record_in_dvc(base, dvc_stages(base, arms, compare), reason_not),
                           arm=None)
        runner.logger().info("DVC: %s", dvc)
    return {"dataset": dataset, "arms": results, "comparison": cmp, "mlflow_run_id": tracker.run_id,
            "mlflow_url": tracker.run_url(), "dvc": dvc}


# ---- DVC: recording outputs a pipeline run produced ----------------------------------------------------


def dvc_reason_not(params: Params) -> str | None:
    """Why this run's outputs must not be recorded in dvc.lock (None: they may): dvc.lock claims outputs
    follow from params.yaml, true only when the run used its values (orchestration-only keys aside)."""
    if not (PROJECT_ROOT / ".dvc").is_dir() or not versioning.dvc_available():
        return "the project is not a DVC repository (or DVC is not installed)"
    diff = versioning.params_mismatch(params, PROJECT_ROOT)
    if diff:
        shown = ", ".join(f"{k}={a!r} (params.yaml: {b!r})" for k, (a, b) in list(diff.items())[:5])
        return f"the run's parameters differ from params.yaml: {shown}{' ...' if len(diff) > 5 else ''}"
    return None


def dvc_stages(params: Params, arms: list[str], with_compare: bool) -> list[str]:
    """dvc.yaml's stages whose outputs a pipeline run produced (prepare is recorded with the dataset)."""
    names = ["warm_start"] if params.model.source == "warm_start" and params.warm_start.enabled else []
    names += [f"{stage}@{arm}" for arm in arms for stage in ("train", "evaluate")]
    return names + (["compare"] if with_compare else [])


def record_in_dvc(params: Params, stage_names: list[str], reason_not: str | None) -> dict:
    """`dvc commit` the stages whose outputs this run produced, so `dvc repro` agrees (best-effort)."""
    if reason_not:
        return {"recorded": False, "reason": reason_not}
    try:
        versioning.dvc_commit(stage_names, PROJECT_ROOT, params=params)
    except Exception as exc:
        return {"recorded": False, "reason": str(exc)}
    return {"recorded": True, "stages": stage_names}
