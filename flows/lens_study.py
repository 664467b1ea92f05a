"""`lens-study`: every arm of study.arms x every seed of study.seeds from one warm start, then one report.

    version_dataset -> warm_start -> evaluate_start -> for each (arm, seed) not yet finished: [open_trainer ->
    rounds ... -> save_policy -> evaluate] -> study_report (markdown + table artifacts, MLflow parent run)

    prefect deployment run lens-study/tiny -p 'overrides=["study.seeds=[0,1,2,3,4]"]' --watch
"""

from prefect import flow

from flows.runner import PrefectRunner, Profile, resolve_params
from lens.study import run_study


@flow(name="lens-study", flow_run_name="{profile}-study",
      description="N estimators x S seeds from one warm start; means and paired differences with CIs over seeds.")
def lens_study(profile: Profile = "tiny", overrides: list[str] = []) -> dict:  # noqa: B006
    """Train and evaluate every (arm, seed) of the study (`study.*` params; `overrides` are `key.path=value`
    strings); a re-run skips finished runs and resumes interrupted ones.

    Outputs: runs/<profile>/studies/<study.name>/{start, seed-<s>/<profile>/<arm>, report/}; artifacts
    `<profile>-study` (markdown) and `<profile>-study-table`; with tracking.enabled, an MLflow parent run
    with a child run per arm x seed.
    """
    params = resolve_params(profile, overrides)  # ParamsError: the run fails before any task
    return run_study(params, PrefectRunner())
