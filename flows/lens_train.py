"""`lens-train`: one algorithm end to end, as Prefect tasks.

    version_dataset -> warm_start -> [train_round: (generate_rollouts -> verify_rollouts -> update_policy)
    x steps_per_round -> checkpoint] x rounds -> save_policy -> evaluate -> publish_evaluation -> record_in_dvc

Parameters are typed (profile and algo are enums in the deployment's enforced parameter schema) and the
whole configuration is validated by `lens.params.load_params` before the first task: an invalid
override fails the run with the key's name and no task runs. Everything the tasks do is `lens.stages` /
`lens.train.Trainer`; see flows/common.py for where the trainer lives and how a round is retried.

    prefect deployment run lens-train/tiny -p algo=grpo -p 'overrides=["train.steps=20"]' --watch
"""

from prefect import flow, get_run_logger

from flows.common import (
    Algo,
    Profile,
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


@flow(name="lens-train", flow_run_name="{profile}-{algo}",
      description="Train one algorithm (GRPO or LENS) in checkpointed, retried rounds; evaluate per level.")
def lens_train(profile: Profile = "tiny", algo: Algo = "lens", overrides: list[str] = []) -> dict:  # noqa: B006
    """Train `algo` on `profile` (params.yaml; `overrides` are `key.path=value` strings), then evaluate.

    Outputs: runs/<profile>/<algo>/{metrics.jsonl, rollouts/, checkpoints/, final/, eval.json}; a markdown
    artifact `<profile>-<algo>-eval`; with tracking.enabled, an MLflow parent run with a child run `algo`.
    """
    params = resolve_params(profile, overrides, algo)  # ParamsError: the run fails before any task
    logger = get_run_logger()
    dvc_reason = dvc_ineligible(params)
    logger.info("lens-train %s/%s: %d steps in rounds of %d, outputs in %s", profile, algo,
                params.train.steps, params.train.steps_per_round, params.algo_dir(algo))
    with tracker_for(params, run_name=f"train-{algo}-{flow_run_label(profile)}") as tracker:
        dataset = version_dataset(params, dvc_reason is None)
        warm_start(params)
        with tracker.algo_run(algo, params):
            tracker.log_dataset(params, params.data_dir, dvc_hash=dataset["hash"])
            training = train_algo(params, tracker)
            summary = evaluate(params, algo)
            publish_evaluation(params, algo, summary, tracker)
    dvc = record_in_dvc(params, dvc_stages(params, [algo], with_compare=False), dvc_reason)
    return {"algo": algo, "profile": profile, "steps": training["step"], "eval": summary["metrics"],
            "eval_file": str(params.algo_dir(algo) / "eval.json"), "dataset_hash": dataset["hash"],
            "mlflow_run_id": tracker.run_id, "dvc": dvc}
