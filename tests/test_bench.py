"""bench/learning.py on a minuscule sweep: it runs, evaluates where it says, and pairs GRPO with LENS.

The numbers it measures are reported in notes, not asserted; this checks the script's plumbing only.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import PROJECT_ROOT
from tests.helpers import SMALL, random_policy, small_params, synthetic_data


def load_learning_bench():
    spec = importlib.util.spec_from_file_location("lens_bench_learning", PROJECT_ROOT / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_learning_sweep_evaluates_each_run_and_pairs_the_algorithms_by_seed(tmp_path):
    source = tmp_path / "source"
    params = small_params(source)
    random_policy(params)   # stands where `lens warm-start` puts the policy
    synthetic_data(params)  # and where `lens prepare` puts the data
    bench = load_learning_bench()
    out = tmp_path / "out"
    assert bench.main(["--algos", "grpo", "lens", "--lrs", "1e-3", "--seeds", "0", "1", "--steps", "2",
                       "--eval-every", "1", "--source-root", str(source), "--out", str(out), *SMALL]) == 0

    report = json.loads((out / "results.json").read_text())
    runs = {(r["algo"], r["seed"]): r for r in report["runs"]}
    assert sorted(runs) == [("grpo", 0), ("grpo", 1), ("lens", 0), ("lens", 1)]
    n_eval = len((params.data_dir / "eval.jsonl").read_text().splitlines())
    for r in runs.values():
        assert sorted(r["evals"], key=int) == ["0", "1", "2"]  # step 0 and every --eval-every steps
        assert [c["step"] for c in r["curve"]] == [1, 2]
        for ev in r["evals"].values():
            assert len(ev["correct"]) == n_eval and 0.0 <= ev["acc"] <= 1.0
    # Step 0 is the shared starting policy, evaluated with the run's seed: same seed, same numbers.
    for seed in (0, 1):
        assert runs[("grpo", seed)]["evals"]["0"] == runs[("lens", seed)]["evals"]["0"]
    # The runs trained their own copies; the source policy is untouched.
    assert (out / "runs" / "lens-lr0.001-seed1" / "tiny" / "lens" / "final" / "model.safetensors").exists()
    summary = (out / "summary.md").read_text()
    assert "| grpo | 0.001 | 2 | 2 |" in summary and "| lens | 0.001 | 2 | 2 |" in summary
    paired = [line for line in summary.splitlines() if line.startswith("| 0.001 | ")]
    assert [line.split(" | ")[1] for line in paired] == ["0", "1"]  # one paired LENS - GRPO row per seed
    assert (out / "learning_curves.png").stat().st_size > 0
