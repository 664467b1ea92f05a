"""`lens-train`: one arm end to end, as Prefect tasks (lens.pipeline with flows.runner.PrefectRunner).

    version_dataset -> warm_start -> open_trainer -> [train_round: (generate_rollouts -> verify_rollouts ->
    update_policy) x steps_per_round -> checkpoint] x rounds -> save_policy -> evaluate -> publish_evaluation
    -> record_in_dvc

    prefect deployment run lens-train/tiny -p algo=grpo -p 'overrides=["train.steps=20"]' --watch
"""

from prefect import flow

from flows.runner import Algo, PrefectRunner, Profile, flow_run_label, resolve_params
from lens.pipeline import run_pipeline


@flow(name="lens-train", flow_run_name="{profile}-{algo}",
      description="Train one estimator in checkpointed, retried rounds; evaluate it per level.")
def lens_train(profile: Profile = "tiny", algo: Algo = "lens", overrides: list[str] = [],  # noqa: B006
               resume: bool = True) -> dict:
    """Train `algo` on `profile` (params.yaml; `overrides` are `key.path=value` strings), then evaluate.
    `resume`: a run a killed flow left unfinished continues from its last checkpoint (false: afresh).

    Outputs: runs/<profile>/<algo>/{metrics.jsonl, rollouts/, checkpoints/, final/, eval.json}; a markdown
    artifact `<profile>-<algo>-eval`; with tracking.enabled, an MLflow parent run with a child run `algo`.
    """
    params = resolve_params(profile, overrides, algo)  # ParamsError: the run fails before any task
    result = run_pipeline(params, lambda arm: params, PrefectRunner(), arms=[algo], compare=False, record_dvc=True,
                          run_name=f"train-{algo}-{flow_run_label(profile)}", resume="auto" if resume else False)
    arm = result["arms"][algo]
    return {"algo": algo, "profile": profile, "steps": arm["training"]["step"], "eval": arm["evaluation"]["metrics"],
            "eval_file": str(params.algo_dir(algo) / "eval.json"), "dataset_hash": result["dataset"]["hash"],
            "mlflow_run_id": result["mlflow_run_id"], "dvc": result["dvc"]}
