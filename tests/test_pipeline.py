"""lens.pipeline: the one choreography of `lens all` and the flows, with an estimator registered by a test.

Registering a toy estimator is all it takes to train, evaluate and compare it: the estimator registry
feeds params validation (train.algo, compare.arms), the loop and the N-arm comparison.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lens import estimators, pipeline
from lens.loop import Runner
from lens.params import load_params
from lens.records import RunFiles, read_metrics
from tests.helpers import SMALL, random_policy

TOY = "toy-centred"


@pytest.fixture
def toy_estimator():
    @estimators.register(TOY, summary="reward minus one half: a signal for every sample")
    def toy(correct, mean_logprob, section, eps):
        return (correct - 0.5).to(torch.float32)

    yield TOY
    estimators.unregister(TOY)


def test_a_registered_estimator_runs_through_train_evaluate_compare(tmp_path, toy_estimator):
    overrides = [f"run.output_root={tmp_path}", *SMALL, "train.steps=2", "train.steps_per_round=1",
                 "warm_start.enabled=false", "tracking.enabled=false",
                 f"compare.arms=[grpo,{TOY}]", "compare.baseline=grpo"]
    base = load_params("tiny", overrides)
    random_policy(base)  # where the warm start would put the policy

    result = pipeline.run_pipeline(base, lambda arm: load_params("tiny", [*overrides, f"train.algo={arm}"]),
                                   Runner(progress=False), arms=base.compare.arms, compare=True)

    toy = RunFiles(base.algo_dir(TOY))
    assert [r["step"] for r in read_metrics(toy.metrics)] == [1, 2]
    assert json.loads(toy.eval.read_text())["algo"] == TOY
    assert (toy.final / "config.json").exists()
    rollouts = pd.read_parquet(toy.rollout_file(0))
    assert ((rollouts["advantage"] - (rollouts["reward"] - 0.5)).abs() < 1e-6).all()  # the toy's advantages
    cmp = result["comparison"]
    assert cmp["arms"] == ["grpo", TOY] and set(cmp["pairs"]) == {TOY}
    md = (base.root / "compare" / "compare.md").read_text()
    assert TOY.upper() in md and "GRPO" in md
    assert (base.root / "compare" / "curves" / f"{TOY}.csv").exists()
    assert result["dataset"]["hash"].endswith(".dir")


def test_an_unregistered_arm_is_refused_before_anything_runs(tmp_path):
    from lens.params import ParamsError

    with pytest.raises(ParamsError, match="compare"):
        load_params("tiny", [f"run.output_root={tmp_path}", "compare.arms=[grpo,nope]"])
    assert not (tmp_path / "tiny").exists()


def test_compare_pools_the_evaluations_of_several_seeds_per_arm(tmp_path):
    from lens import stages
    from lens.evaluate import ProblemResult, summarize, write_eval

    def fake_eval(root, arm, bump):  # a stand-in for `lens evaluate` output: the compare stage reads files
        results = [ProblemResult(f"p{lv}-{i}", lv, 4, (i + lv + bump) % 5) for lv in (1, 2) for i in range(5)]
        write_eval(root / "tiny" / arm / "eval.json", summarize(results, ks=(1, 2), bootstrap_samples=100))

    for seed_root, bump in ((tmp_path / "seed0", 0), (tmp_path / "seed1", 1)):
        for arm in ("grpo", "lens"):
            fake_eval(seed_root, arm, bump + (arm == "lens"))
    params = load_params("tiny", [f"run.output_root={tmp_path / 'seed0'}", "eval.bootstrap_samples=100",
                                  f"compare.pool_output_roots=[{tmp_path / 'seed1'}]"])
    cmp = stages.compare(params)
    assert cmp["seeds"] == {"grpo": 2, "lens": 2}
    assert cmp["pairs"]["lens"]["overall"]["n_problems"] == 10
    assert "pooled over 2 seeds" in (params.root / "compare" / "compare.md").read_text()
