"""The final policy as an MLflow model in its algorithm's run, registered with an alias per algorithm.

Flavor: `mlflow.transformers` from the saved model directory (task text-generation, explicit
pip_requirements, the caller's prompt template); if that flavor refuses the model, a `mlflow.pyfunc`
model carrying the directory as an artifact, whose predict generates with transformers. A store that
does not answer defers it (a `policy` tracking record) instead of failing a run whose model is saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lens.tracking import Tracker, metric_key
from lens.tracking_store import is_transient

log = logging.getLogger(__name__)


def log_policy(tracker: Tracker, model_dir: str | Path, algo: str, *, prompt_template: str | None,
               max_new_tokens: int, run_id: str | None = None) -> str | None:
    """Log `model_dir` as model `policy` in `run_id` (default: the tracker's active run) and register it.

    `prompt_template` (with a `{prompt}` placeholder; None when prompts use the chat template) is stored
    with the transformers flavor; `max_new_tokens` bounds the pyfunc fallback's generations. Registry: a
    new version of `tracking.registered_model_name` with aliases `<algo>` and `<profile>-<algo>` (aliases,
    not the deprecated stages). Returns the version; None when tracking is off or tracking.log_model is
    off, and no version is registered when tracking.register_model is off.

    When the store does not answer, the policy is not logged now: a `policy` record goes to the run's
    sender (its disk buffer while the store is down) and the next run on the arm's outputs, or
    lens.tracking.replay_buffer, logs and registers it; returns None then.
    """
    tp = tracker.params.tracking
    if not tracker.enabled or not tp.log_model:
        return None
    target = tracker.resolve_run(run_id)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
    record = {"op": "policy", "run_id": target, "model_dir": str(model_dir.resolve()), "algo": algo,
              "profile": tracker.params.profile, "prompt_template": prompt_template,
              "max_new_tokens": max_new_tokens,
              "registered_model_name": tp.registered_model_name if tp.register_model else None}
    if tracker.store_answers(target):
        try:
            return deliver_policy(tracker.client, record)
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = tracker._redact(str(exc))[:300]
    else:
        reason = "the store does not answer"
    log.warning("policy %s not logged to MLflow now (%s): kept for the next run on these outputs", model_dir,
                reason)
    tracker.send(record)
    return None


def deliver_policy(client, record: dict) -> str | None:
    """Log and register the policy a `policy` record describes (see log_policy); returns the version."""
    import mlflow

    target, model_dir, algo = record["run_id"], Path(record["model_dir"]), record["algo"]
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
    tags = {"lens.algo": algo, "lens.profile": record["profile"]}
    # A record sent again (its first delivery outlived a bounded close) must not log or register twice:
    # each stage leaves a tag on the run, and a stage already tagged is not repeated.
    done = client.get_run(target).data.tags
    if "lens.model_version" in done:
        return done["lens.model_version"]
    model_uri = done.get("lens.model_uri")
    if model_uri is None:
        try:
            model_uri, flavor = _log_transformers(model_dir, target, tags, record["prompt_template"]).model_uri, "transformers"
        except Exception as exc:
            if is_transient(exc):  # the store, not the flavor: a pyfunc model would fail the same way
                raise
            log.warning("mlflow.transformers could not log %s (%s); logging a pyfunc model instead", model_dir, exc)
            model_uri, flavor = _log_pyfunc(model_dir, target, tags, record["max_new_tokens"]).model_uri, "pyfunc"
        client.set_tag(target, "lens.model_flavor", flavor)
        client.set_tag(target, "lens.model_uri", model_uri)
    name = record["registered_model_name"]
    if not name:
        return None
    version = mlflow.register_model(model_uri, name, await_registration_for=60,
                                    tags=tags | {"lens.run_id": target})
    for alias in (algo, f"{record['profile']}-{algo}"):
        client.set_registered_model_alias(name, metric_key(alias).replace("/", "-"), version.version)
    client.set_tag(target, "lens.model_version", str(version.version))
    return str(version.version)


def _pip_requirements() -> list[str]:
    import mlflow
    import safetensors
    import tokenizers
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"tokenizers=={tokenizers.__version__}",
            f"safetensors=={safetensors.__version__}"]


def _log_transformers(model_dir: Path, run_id: str, tags: dict, prompt_template: str | None):
    import mlflow.transformers

    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "model card not on the hub" / "no license": true of every local model
    try:
        return mlflow.transformers.log_model(
            str(model_dir), name="policy", task="text-generation", run_id=run_id,
            pip_requirements=_pip_requirements(), prompt_template=prompt_template, tags=tags)
    finally:
        quiet.setLevel(level)


def _log_pyfunc(model_dir: Path, run_id: str, tags: dict, max_new_tokens: int):
    import mlflow.pyfunc
    from mlflow.models import Model

    # Model.log, not mlflow.pyfunc.log_model: only the former takes run_id (no fluent active run).
    return Model.log(
        artifact_path=None, name="policy", flavor=mlflow.pyfunc, flavor_name="pyfunc.CustomPythonModel",
        python_model=_policy_pyfunc(max_new_tokens), artifacts={"model_dir": str(model_dir)},
        pip_requirements=_pip_requirements(), run_id=run_id, tags=tags)


def _policy_pyfunc(max_new_tokens: int):
    """A pyfunc wrapper around a saved policy directory (the fallback flavor). Defined in a function so
    cloudpickle stores the class by value: loading needs mlflow + transformers, not this package."""
    import mlflow.pyfunc

    class LensPolicy(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = context.artifacts["model_dir"]
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path).eval()
            self.max_new_tokens = max_new_tokens

        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            import torch

            prompts = list(model_input)
            outs = []
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt")
                with torch.no_grad():
                    gen = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
                outs.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
            return outs

    return LensPolicy()
