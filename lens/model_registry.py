"""The final policy as an MLflow model in its algorithm's run, registered with an alias per algorithm.

Flavor: `mlflow.transformers` from the saved model directory (task text-generation, explicit
pip_requirements, the caller's prompt template); if that flavor refuses the model, a `mlflow.pyfunc`
model carrying the directory as an artifact, whose predict generates with transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lens.tracking import Tracker, metric_key

log = logging.getLogger(__name__)


def log_policy(tracker: Tracker, model_dir: str | Path, algo: str, *, prompt_template: str | None,
               max_new_tokens: int, run_id: str | None = None) -> str | None:
    """Log `model_dir` as model `policy` in `run_id` (default: the tracker's active run) and register it.

    `prompt_template` (with a `{prompt}` placeholder; None when prompts use the chat template) is stored
    with the transformers flavor; `max_new_tokens` bounds the pyfunc fallback's generations. Registry: a
    new version of `tracking.registered_model_name` with aliases `<algo>` and `<profile>-<algo>` (aliases,
    not the deprecated stages). Returns the version; None when tracking is off or tracking.log_model is
    off, and no version is registered when tracking.register_model is off.
    """
    tp = tracker.params.tracking
    if not tracker.enabled or not tp.log_model:
        return None
    import mlflow

    target = tracker.resolve_run(run_id)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
    profile = tracker.params.profile
    tags = {"lens.algo": algo, "lens.profile": profile}
    try:
        info = _log_transformers(model_dir, target, tags, prompt_template)
        flavor = "transformers"
    except Exception as exc:
        log.warning("mlflow.transformers could not log %s (%s); logging a pyfunc model instead", model_dir, exc)
        info = _log_pyfunc(model_dir, target, tags, max_new_tokens)
        flavor = "pyfunc"
    tracker.set_tags({"lens.model_flavor": flavor, "lens.model_uri": info.model_uri}, target)
    if not tp.register_model:
        return None
    name = tp.registered_model_name
    version = mlflow.register_model(info.model_uri, name, await_registration_for=60,
                                    tags=tags | {"lens.run_id": target})
    for alias in (algo, f"{profile}-{algo}"):
        tracker.client.set_registered_model_alias(name, metric_key(alias).replace("/", "-"), version.version)
    tracker.set_tags({"lens.model_version": str(version.version)}, target)
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
