"""`lens-compare`: GRPO and LENS on the same data, seed and budget, then the per-level comparison.

    version_dataset -> warm_start -> for algo in (grpo, lens): [rounds ... -> evaluate -> publish_evaluation]
    -> compare (markdown + table artifacts, MLflow parent run) -> record_in_dvc

Both algorithms are trained in this flow run, with the same tasks as `lens-train` (flows/common.py), so
`prefect deployment run lens-compare/tiny --watch` streams every step's log line. The two configurations
differ only in train.algo; both are validated before the first task runs.

    prefect deployment run lens-compare/tiny --watch
"""

from prefect import flow, get_run_logger

from flows.common import (
    Profile,
    compare,
    dvc_ineligible,
    dvc_stages,
    evaluate,
    flow_run_label,
    publish_evaluation,
    record_in_dvc,
    resolve_params,
    tracker_for,
    train_algo,
    version_dataset,
    warm_start,
)

ALGOS = ("grpo", "lens")


@flow(name="lens-compare", flow_run_name="{profile}-grpo-vs-lens",
      description="GRPO vs LENS on the same data, seed and budget; per-level comparison as artifacts.")
def lens_compare(profile: Profile = "tiny", overrides: list[str] = []) -> dict:  # noqa: B006
    """Train and evaluate GRPO then LENS, compare them per level (paired bootstrap over problems).

    Outputs: runs/<profile>/{grpo,lens}/..., runs/<profile>/compare/compare.{md,csv,json} and plots;
    artifacts `<profile>-compare` (markdown) and `<profile>-compare-levels` (table); with
    tracking.enabled, an MLflow parent run (comparison artifacts) with child runs `grpo` and `lens`.
    """
    base = resolve_params(profile, overrides)  # ParamsError: the run fails before any task
    arms = {algo: resolve_params(profile, overrides, algo) for algo in ALGOS}
    logger = get_run_logger()
    dvc_reason = dvc_ineligible(base)
    logger.info("lens-compare %s: %s, %d steps each (seed %d), eval on %s", profile, " vs ".join(ALGOS),
                base.train.steps, base.run.seed, base.data.eval_source)
    evals = {}
    with tracker_for(base, run_name=f"compare-{flow_run_label(profile)}") as tracker:
        dataset = version_dataset(base, dvc_reason is None)
        warm_start(base)
        for algo, params in arms.items():
            with tracker.algo_run(algo, params):
                tracker.log_dataset(params, params.data_dir, dvc_hash=dataset["hash"])
                train_algo(params, tracker)
                evals[algo] = evaluate(params, algo)
                publish_evaluation(params, algo, evals[algo], tracker)
        cmp = compare(base, tracker)
    dvc = record_in_dvc(base, dvc_stages(base, ALGOS, with_compare=True), dvc_reason)
    return {"profile": profile, "compare_md": cmp["files"]["md"], "files": cmp["files"],
            "overall": cmp["overall"], "eval": {a: e["metrics"] for a, e in evals.items()},
            "dataset_hash": dataset["hash"], "mlflow_run_id": tracker.run_id, "dvc": dvc}
