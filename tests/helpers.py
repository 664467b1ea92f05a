"""Shared builders for tests: small params and a small saved policy, all under a temporary root."""

from pathlib import Path

from lens.data import synthetic_problems, write_problems
from lens.params import load_params
from lens.tiny_model import build_char_tokenizer, build_tiny_model, save_model

SMALL = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "data.synthetic.train_per_level=50", "data.synthetic.eval_per_level=8",
    "rollout.group_size=4", "rollout.max_new_tokens=10",
    "train.prompts_per_step=4", "train.mini_batch_size=8", "train.micro_batch_size=4",
    "train.steps=3", "train.checkpoint_every=1",
    "eval.samples_per_problem=4", "eval.max_new_tokens=10", "eval.bootstrap_samples=100",
    "verify.workers=1",
]


def small_params(root: Path, *extra: str):
    return load_params("tiny", [f"run.output_root={root}", *SMALL, *extra])


def random_policy(params, seed: int = 0) -> Path:
    """A randomly initialised tiny policy where the warm start would put one."""
    tok = build_char_tokenizer()
    t = params.model.tiny
    model = build_tiny_model(tok, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, seed=seed)
    return save_model(model, tok, params.warm_start_dir / "model")


def synthetic_data(params) -> None:
    s = params.data.synthetic
    write_problems(params.data_dir / "train.jsonl", synthetic_problems("train", s.train_per_level, s.seed, params.data.levels))
    write_problems(params.data_dir / "eval.jsonl", synthetic_problems("eval", s.eval_per_level, s.seed, params.data.levels))


def trainer_scoring_with(params, scorer=None):
    """A Trainer on `params` whose verifier calls `scorer(completion, gold)` (the Verifier's test hook)."""
    from lens.train import Trainer
    from lens.verify import Verifier

    trainer = Trainer(params)
    if scorer is not None:
        trainer.verifier.close()
        trainer.verifier = Verifier(timeout_s=30, workers=1, scorer=scorer)
    return trainer


def model_weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def shared_data_overrides() -> list[str]:
    """`data.*_path` overrides that read MATH and GSM8K from ../shared/data instead of the hub."""
    from tests.conftest import SHARED_DATA

    files = {"math_train_path": "math/train_subset.jsonl", "math_eval_path": "math/math500.jsonl",
             "gsm8k_train_path": "gsm8k/train.jsonl", "gsm8k_eval_path": "gsm8k/test.jsonl"}
    return [f"data.{key}={SHARED_DATA / file}" for key, file in files.items()]


def offline_load_errors(tmp_path: Path, probe: str) -> dict:
    """Run `probe` (Python that prints a JSON dict as its last line) in a fresh process, offline, with an
    empty Hugging Face cache: how a user's machine without the datasets behaves. Returns that dict."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])
