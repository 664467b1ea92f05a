"""The `lens` command line: the seven commands in sequence, overrides, and errors that name the key."""

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT
from tests.helpers import SMALL
from tests.mlflow_helpers import fresh_sqlite_uri

QUICK = [*SMALL, "warm_start.steps=30", "train.steps=2", "train.mini_batch_size=16", "train.micro_batch_size=16"]


def lens(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lens.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"} | _env())
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k in ("HOME", "TMPDIR", "PYTHONPATH")}


@pytest.mark.slow
def test_the_seven_commands_run_in_sequence_and_log_to_mlflow(tmp_path):
    uri = fresh_sqlite_uri(tmp_path)
    common = ["--profile", "tiny", f"run.output_root={tmp_path}", f"tracking.tracking_uri={uri}", *QUICK]
    lens("prepare", *common)
    lens("warm-start", *common)
    for algo in ("grpo", "lens"):
        lens("train", "--algo", algo, *common)
        out = json.loads(lens("evaluate", "--algo", algo, *common).stdout)
        assert set(out["metrics"]) >= {"eval/acc", *(f"eval/acc_level_{lv}" for lv in range(1, 6)), "eval/pass_at_1"}
    proc = lens("compare", *common)
    assert "| **all** |" in proc.stdout and "LENS - GRPO" in proc.stdout
    root = tmp_path / "tiny"
    for path in ["data/train.jsonl", "data/report.json", "warm_start/model/model.safetensors",
                 "grpo/final/model.safetensors", "lens/eval.json", "compare/compare.md",
                 "compare/accuracy_by_level.png", "compare/learning_curves.png"]:
        assert (root / path).exists(), path
    cmp = json.loads((root / "compare" / "compare.json").read_text())
    assert cmp["baseline"] == "grpo" and cmp["arms"] == ["grpo", "lens"]
    assert set(cmp["pairs"]["lens"]["levels"]) == set(cmp["accuracy"]["levels"]) == {"1", "2", "3", "4", "5"}

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("lens-tiny")
    runs = client.search_runs([exp.experiment_id])
    by_algo = {r.data.tags.get("lens.algo"): r for r in runs if r.data.tags.get("lens.algo")}
    assert {"grpo", "lens"} <= set(by_algo)
    assert "eval/acc" in by_algo["lens"].data.metrics and "train/acc" in by_algo["grpo"].data.metrics


def test_bad_override_is_rejected_with_the_key_name(tmp_path):
    proc = lens("train", f"run.output_root={tmp_path}", "train.lens.alpha=-1", check=False)
    assert proc.returncode == 2 and "train.lens.alpha" in proc.stderr
    proc = lens("prepare", f"run.output_root={tmp_path}", "data.levelz=[1]", check=False)
    assert proc.returncode == 2 and "data.levelz" in proc.stderr
    proc = lens("prepare", "--profile", "nope", check=False)
    assert proc.returncode == 2 and "profile" in proc.stderr


def test_missing_inputs_say_which_command_to_run(tmp_path):
    common = [f"run.output_root={tmp_path}", "tracking.enabled=false"]
    proc = lens("train", *common, check=False)
    assert proc.returncode == 1 and "lens prepare" in proc.stderr and "Traceback" not in proc.stderr
    lens("prepare", *common, "data.synthetic.train_per_level=5", "data.synthetic.eval_per_level=2")
    proc = lens("train", *common, check=False)
    assert proc.returncode == 1 and "lens warm-start" in proc.stderr and "Traceback" not in proc.stderr


def test_paper_dry_run_prints_the_batch_arithmetic_without_loading_anything(tmp_path):
    plan = json.loads(lens("train", "--profile", "paper", "--dry-run", f"run.output_root={tmp_path}",
                           "model.name_or_path=lens-tests/not-downloaded").stdout)
    assert plan["prompts_per_step"] == 128 and plan["samples_per_update"] == 512
    assert plan["updates_per_rollout_batch"] == 4 and plan["group_size"] == 16
    # The chat template needs the tokenizer, and a dry run downloads nothing: the plan says so.
    prompt = plan["prompt"]
    assert prompt["template"] == "chat" and prompt["rendered"] is None and "downloads nothing" in prompt["note"]
    assert prompt["instruction"] == "Let's think step by step and output the final answer within \\boxed{}."
    assert prompt["max_prompt_tokens"] == 1024


def test_dry_run_prints_one_rendered_prompt(tmp_path):
    from tests.test_prompt import chatml_tokenizer

    plan = json.loads(lens("train", "--dry-run", f"run.output_root={tmp_path}").stdout)
    assert plan["prompt"]["rendered"] == "Q: What is $1 + 2 \\cdot 3$?\nA: "  # plain: no tokenizer needed
    lens("prepare", f"run.output_root={tmp_path}", "data.synthetic.train_per_level=2", "data.synthetic.eval_per_level=2")
    plan = json.loads(lens("train", "--dry-run", f"run.output_root={tmp_path}").stdout)
    first = json.loads((tmp_path / "tiny" / "data" / "train.jsonl").read_text().splitlines()[0])["problem"]
    assert plan["prompt"]["rendered"] == f"Q: {first}\nA: "
    # A chat template with the tokenizer on disk (a directory with no weights: only the tokenizer is read).
    chatml_tokenizer().save_pretrained(tmp_path / "tokenizer-only")
    plan = json.loads(lens("train", "--profile", "paper", "--dry-run", f"run.output_root={tmp_path}",
                           f"model.name_or_path={tmp_path / 'tokenizer-only'}").stdout)
    assert plan["prompt"]["rendered"].endswith(
        "<|im_start|>user\nWhat is $1 + 2 \\cdot 3$? Let's think step by step and output the final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_overrides_may_come_before_between_and_after_the_flags():
    plan = json.loads(lens("train", "train.steps=5", "--dry-run", "train.lr=0.01", "--algo", "lens",
                           "rollout.group_size=4").stdout)
    assert (plan["steps"], plan["lr"], plan["algo"], plan["group_size"]) == (5, 0.01, "lens", 4)
    proc = lens("train", "--dry-run", "--bogus", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
