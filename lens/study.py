"""A study: every arm of `study.arms` x every seed of `study.seeds`, from one warm start, and one report.

Layout under <root>/<profile>/studies/<study.name>/: `start/eval.json` (the starting policy, evaluated
once), `<arm>/seed-<s>/<profile>/<estimator>/` (each a standard arm run directory, trained and evaluated
through lens.pipeline.run_arm; data/ and warm_start/ beside it link to the base run's), and `report/`
(lens.study_report).
Running a study again skips every run whose evaluation is written and resumes an interrupted one.
`study.jobs` > 1 trains that many runs at once in processes of their own (one thread each on CPU).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lens import pipeline
from lens.loop import Runner
from lens.params import Params, ParamsError, with_overrides
from lens.records import RunFiles
from lens.tracking import Tracker


@dataclass(frozen=True)
class StudyRun:
    arm: str
    seed: int
    params: Params                    # the base params with this run's seed, estimator and output root

    @property
    def label(self) -> str:
        return f"{self.arm}-seed{self.seed}"

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.params.algo_dir())

    @property
    def trained(self) -> bool:
        return self.files.trained()

    @property
    def finished(self) -> bool:
        """Trained and evaluated: a re-run skips it."""
        return self.trained and self.files.eval.exists()


def study_dir(params: Params) -> Path:
    return params.root / "studies" / params.study.name


def plan(base: Params) -> list[StudyRun]:
    """The runs of the study, seed by seed (each seed's arms side by side). An arm is an estimator, or a
    study.variants name with its overrides; each (arm, seed) writes under <study>/<arm>/seed-<s>/."""
    runs = []
    for seed in base.study.seeds:
        for arm in base.study.arms:
            own = base.study.variants.get(arm, [f"train.algo={arm}"])
            try:
                # A study's policies are results, not candidates for the registry's aliases.
                params = with_overrides(base, [*own, f"run.seed={seed}", "tracking.log_model=false",
                                               f"run.output_root={study_dir(base) / arm / f'seed-{seed}'}"])
            except ParamsError as exc:
                raise ParamsError(f"study.variants.{arm}: {exc}") from None
            runs.append(StudyRun(arm, seed, params))
    return runs


def link_inputs(base: Params, run: StudyRun) -> None:
    """The run's data/ and warm_start/ are the base run's: one prepared dataset, one starting policy."""
    for name in ("data", "warm_start"):
        link, target = run.params.root / name, base.root / name
        if target.exists() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target, target_is_directory=True)


def train_and_evaluate(run: StudyRun, dataset: dict, parent_run_id: str | None = None, runner: Runner | None = None,
                       tracker: Tracker | None = None, threads: int | None = None) -> dict:
    """One run of the study: train (resuming an interrupted one), evaluate, record under the study's MLflow
    run. In a process of its own (study.jobs > 1) it opens its own tracker on the parent run."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    runner = runner or Runner(progress=False)
    if tracker is None:
        with Tracker(run.params, parent_run_id=parent_run_id) as own:
            return train_and_evaluate(run, dataset, runner=runner, tracker=own)
    tags = {"lens.seed": run.seed, "lens.study": run.params.study.name}
    if run.trained:  # stopped between training and evaluation: evaluate only
        with tracker.algo_run(run.label, run.params, tags=runner.run_tags() | tags):
            result = {"evaluation": pipeline.evaluate_arm(run.params, tracker, runner)}
    else:
        result = pipeline.run_arm(run.params, tracker, runner, dataset, resume="auto", run_name=run.label, tags=tags)
    return {"arm": run.arm, "seed": run.seed, "dir": str(run.files.dir),
            "acc": result["evaluation"]["overall"]["acc"]}


def evaluate_start(base: Params, runner: Runner) -> Path | None:
    """The starting policy on the eval split, once per study (the zero of "accuracy gained")."""
    from lens import stages
    from lens.models import policy_source

    out = study_dir(base) / "start" / "eval.json"
    source = Path(policy_source(base))
    if not out.exists() and (source / "config.json").exists():
        runner.phase("evaluate_start", lambda: stages.evaluate(base, "start", model_path=source, out_path=out),
                     arm=None)
    return out if out.exists() else None


def run_study(base: Params, runner: Runner | None = None) -> dict:
    """Inputs once, then every (arm, seed) run not yet finished, then the report; all under one MLflow run."""
    runner = runner or Runner()
    logger = runner.logger()
    runs = plan(base)
    with Tracker(base, run_name=f"study-{base.study.name}-{base.profile}",
                 tags={"lens.study": base.study.name}) as tracker:
        dataset = pipeline.prepare_inputs(base, runner)
        start = evaluate_start(base, runner)
        todo = [r for r in runs if not r.finished]
        logger.info("study %s: %d runs (%s x seeds %s), %d finished, %d to run with %d job(s)", base.study.name,
                    len(runs), ", ".join(base.study.arms), base.study.seeds, len(runs) - len(todo), len(todo),
                    base.study.jobs)
        for run in runs:
            link_inputs(base, run)
        if base.study.jobs == 1:
            for run in todo:
                train_and_evaluate(run, dataset, runner=runner, tracker=tracker)
        else:
            _run_in_processes(todo, dataset, base.study.jobs, tracker.run_id, runner)
        from lens.study_report import StudyUnit, build_study_report, study_markdown, study_table, write_study_report

        units = [StudyUnit(r.arm, r.seed, r.files.dir) for r in runs]
        report = runner.phase("study_report", lambda: build_study_report(
            units, base.study.baseline, start, bootstrap_samples=base.eval.bootstrap_samples,
            confidence=base.eval.confidence, seed=base.run.seed), arm=None)
        files = write_study_report(report, study_dir(base) / "report")
        for path in files.values():
            tracker.log_artifact(path, "study", run_id=tracker.run_id)
        markdown = study_markdown(report)
        tracker.set_description(markdown, run_id=tracker.run_id)
        runner.published("study", base, {"study": report, "markdown": markdown, "table": study_table(report)})
    return {"study": base.study.name, "dir": str(study_dir(base)), "runs": len(runs), "trained": len(todo),
            "files": files, "dataset_hash": dataset["hash"], "mlflow_run_id": tracker.run_id}


def _run_in_processes(todo: list[StudyRun], dataset: dict, jobs: int, parent_run_id: str | None, runner: Runner) -> None:
    import multiprocessing

    threads = int(os.environ.get("LENS_STUDY_THREADS", "1"))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {run.label: pool.submit(train_and_evaluate, run, dataset, parent_run_id, threads=threads) for run in todo}
        for label, future in futures.items():
            runner.phase(f"study_run-{label}", future.result, arm=None)
