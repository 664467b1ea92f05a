"""kill -9 at every point of a run, then `lens train --resume`: the same weights as a run never stopped,
each step once in metrics.jsonl, each step's prompts exactly the uninterrupted run's.

The kill is real (SIGKILL, from inside the process at an exact point: tests/kill_at.py). 20 training
problems at 4 prompts per step make a pass over the data 5 steps long, so a 6-step run crosses one.
"""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from lens.records import RunFiles
from tests.conftest import PROJECT_ROOT
from tests.helpers import SMALL, random_policy, small_params, synthetic_data

pytestmark = pytest.mark.slow

STEPS = 6
RUN = [*SMALL, "train.algo=lens", f"train.steps={STEPS}", "train.checkpoint_every=2",
       "data.synthetic.train_per_level=4"]  # 5 levels x 4 = 20 problems: a pass is 5 steps
ENV = os.environ | {"PYTHONPATH": str(PROJECT_ROOT)}

# (kill point, wrapped function, its nth call, before/after it, extra overrides). Checkpoints are written
# at steps 2, 4, 6 (and the manifest of final/ after them); each step runs 2 mini-batch updates.
KILLS = {
    "mid-rollout": ("lens.train:Trainer.rollout", 4, "after", []),
    "mid-update": ("lens.train:Trainer._minibatch_update", 7, "after", []),  # 1st of step 4's 2 updates
    "metrics-row-written": ("lens.train:append_metrics", 3, "after", []),  # row 3 has no checkpoint yet
    "checkpoint-half-written": ("lens.checkpoint:write_manifest", 2, "before", []),  # step-4: no manifest
    "checkpoint-before-pointer": ("lens.checkpoint:atomic_write_text", 2, "before", []),  # step-4 whole, latest=2
    "final-save": ("lens.checkpoint:write_manifest", 4, "before", []),  # final/ being written
    # verl #7401: a checkpoint exactly at the end of a pass, killed as the next pass starts.
    "pass-boundary": ("lens.train:Trainer.rollout", 6, "before", ["train.checkpoint_every=5"]),
}


def _setup(root):
    params = small_params(root, *RUN)
    random_policy(params)
    synthetic_data(params)
    return params


def _train(root, *extra, kill=None):
    cmd = [sys.executable, *(["-m", "tests.kill_at", *map(str, kill), "--"] if kill else ["-m", "lens.cli"]),
           "train", "--profile", "tiny", f"run.output_root={root}", *RUN, *extra]
    return subprocess.run(cmd, env=ENV, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


def _prompts_by_step(files: RunFiles) -> dict[int, list[str]]:
    return {step: pq.read_table(files.rollout_file(step), columns=["problem_id"]).column(0).to_pylist()
            for step in range(STEPS)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    params = _setup(root)
    done = _train(root)
    assert done.returncode == 0, done.stderr[-3000:]
    files = RunFiles(params.algo_dir("lens"))
    return load_file(files.final / "model.safetensors"), _prompts_by_step(files)


@pytest.mark.parametrize("point", list(KILLS))
def test_killed_anywhere_resumes_to_the_uninterrupted_run(point, reference, tmp_path):
    target, nth, when, extra = KILLS[point]
    params = _setup(tmp_path)
    files = RunFiles(params.algo_dir("lens"))
    killed = _train(tmp_path, *extra, kill=(target, nth, when))
    assert killed.returncode == -9, f"not killed at {point}: rc {killed.returncode}\n{killed.stderr[-2000:]}"
    if point != "final-save":
        assert not (files.final / "model.safetensors").exists()

    resumed = _train(tmp_path, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["step"] == STEPS

    weights, prompts = reference
    final = load_file(files.final / "model.safetensors")
    assert final.keys() == weights.keys()
    for k in weights:
        assert torch.equal(final[k], weights[k]), f"{k} differs after a kill at {point}"
    rows = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert _prompts_by_step(files) == prompts  # no step re-drew, skipped or repeated a prompt
    assert json.loads(files.train_summary.read_text())["done"] is True
    assert not list(files.dir.rglob(".tmp-*")), "a half-written directory was left behind"
