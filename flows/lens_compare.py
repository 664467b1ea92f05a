"""`lens-compare`: every arm of compare.arms on the same data, seed and budget, then the per-level comparison.

    version_dataset -> warm_start -> for each arm: [open_trainer -> rounds ... -> save_policy -> evaluate ->
    publish_evaluation] -> compare (markdown + table artifacts, MLflow parent run) -> record_in_dvc

    prefect deployment run lens-compare/tiny --watch
"""

from prefect import flow

from flows.runner import PrefectRunner, Profile, flow_run_label, resolve_params
from lens.pipeline import run_pipeline


@flow(name="lens-compare", flow_run_name="{profile}-compare",
      description="Every arm of compare.arms on the same data, seed and budget; per-level comparison as artifacts.")
def lens_compare(profile: Profile = "tiny", overrides: list[str] = [], resume: bool = True) -> dict:  # noqa: B006
    """Train and evaluate each arm, compare each with compare.baseline per level (paired bootstrap).
    `resume`: arms a killed flow left unfinished continue from their last checkpoint (false: afresh).

    Outputs: runs/<profile>/<arm>/..., runs/<profile>/compare/compare.{md,csv,json} and plots; artifacts
    `<profile>-compare` (markdown) and `<profile>-compare-levels` (table); with tracking.enabled, an
    MLflow parent run (comparison artifacts) with a child run per arm.
    """
    base = resolve_params(profile, overrides)  # ParamsError: the run fails before any task
    arms = {arm: resolve_params(profile, overrides, arm) for arm in base.compare.arms}
    result = run_pipeline(base, arms.__getitem__, PrefectRunner(), arms=list(arms), compare=True, record_dvc=True,
                          run_name=f"compare-{flow_run_label(profile)}", resume="auto" if resume else False)
    cmp = result["comparison"]
    return {"profile": profile, "compare_md": cmp["files"]["md"], "files": cmp["files"],
            "accuracy": cmp["accuracy"], "eval": {a: r["evaluation"]["metrics"] for a, r in result["arms"].items()},
            "dataset_hash": result["dataset"]["hash"], "mlflow_run_id": result["mlflow_run_id"], "dvc": result["dvc"]}
