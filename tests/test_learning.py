"""Integration: a short RL run on a small warm-started model raises the reward, under GRPO and LENS.

The task is deliberately small so that the signal beats the noise in a few steps: eight level-1
problems, all of them every step, 16 samples each. The warm start makes the policy right on some
samples (about a quarter) so both algorithms have mixed groups to learn from.
"""

import json

import pytest

from lens import stages
from lens.data import read_problems, write_problems
from lens.params import load_params

SETUP = [
    "tracking.enabled=false", "data.levels=[1,2]",
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.intermediate_size=128",
    "warm_start.steps=300", "warm_start.batch_size=32",
    "data.synthetic.train_per_level=200", "data.synthetic.eval_per_level=16",
    "rollout.group_size=16", "rollout.max_new_tokens=12",
    "train.prompts_per_step=8", "train.mini_batch_size=128", "train.micro_batch_size=64",
    "train.steps=20", "train.lr=3e-4", "train.checkpoint_every=100", "verify.workers=1",
]


@pytest.fixture(scope="module")
def warm_started(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    params = load_params("tiny", [f"run.output_root={root}", *SETUP])
    stages.prepare(params)
    level1 = [p for p in read_problems(params.data_dir / "train.jsonl") if p.level == 1]
    eight = list({p.problem: p for p in level1}.values())[:8]
    write_problems(params.data_dir / "train.jsonl", eight)
    stages.warm_start(params)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "lens"])
def test_reward_rises_during_rl(warm_started, algo):
    params = load_params("tiny", [f"run.output_root={warm_started}", *SETUP, f"train.algo={algo}"])
    stages.train(params)
    rows = [json.loads(line) for line in (params.algo_dir(algo) / "metrics.jsonl").read_text().splitlines()]
    acc = [r["train/acc"] for r in rows]
    first, last = sum(acc[:4]) / 4, sum(acc[-4:]) / 4
    assert 0.05 < first < 0.6, f"the start must have mixed groups to learn from: {acc}"
    assert last > first + 0.08, f"{algo}: reward did not rise: {acc}"
