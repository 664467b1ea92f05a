#!/usr/bin/env python
"""What verification costs a step with and without `verify.overlap` (issue 10, item 6).

Each mode runs in a fresh process: a real `lens.train.Trainer` on the smollm2 profile (SmolLM2-135M-Instruct,
MATH Level 1 + GSM8K + synthetic problems from ../shared/data, the paper's prompt) generates the rollouts of
`--steps` steps with the HF engine in batches of `--batch-size` sequences and verifies them with the real
verifier (math-verify in `verify.workers` processes). Phases 1-2 only: no update, so both modes sample the
same completions and must give the same rewards (checked). Per step: generation time (verification in the
background included), the time the step then waited for the verifier (`perf/verify_s`) and the verifier's
working time (`perf/verify_busy_s`).

    .venv/bin/python bench/verify_overlap.py                 # ~4 min; bench/results/verify_overlap.json
    .venv/bin/python bench/verify_overlap.py --threads 2     # torch on both cores (the verifier competes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = {"math_train_path": "math/train_subset.jsonl", "math_eval_path": "math/math500.jsonl",
        "gsm8k_train_path": "gsm8k/train.jsonl", "gsm8k_eval_path": "gsm8k/test.jsonl"}


def measure(overlap: bool, steps: int, batch_size: int, prompts: int, max_new_tokens: int, root: Path) -> dict:
    """Generate and verify `steps` steps in this process; returns per-step timings and the rewards."""
    from lens.params import load_params
    from lens.stages import prepare
    from lens.train import Trainer

    params = load_params("smollm2", [
        f"run.output_root={root}", "tracking.enabled=false", "rollout.engine=hf",
        f"rollout.batch_size={batch_size}", f"train.prompts_per_step={prompts}", f"train.mini_batch_size={prompts * 8}",
        f"rollout.max_new_tokens={max_new_tokens}", f"verify.overlap={str(overlap).lower()}",
        *(f"data.{key}={SHARED / file}" for key, file in DATA.items())])
    if not (params.data_dir / "train.jsonl").exists():
        prepare(params)
    trainer = Trainer(params)
    rows, rewards = [], []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            batch = trainer.rollout(step)
            generated = time.perf_counter()
            scored = trainer.score(batch)
            rows.append({"generate_s": generated - t0, "verify_wait_s": scored.verify_seconds,
                         "verify_busy_s": scored.verify_busy_seconds, "phases_s": time.perf_counter() - t0,
                         "samples": len(batch.rollouts), "streamed": scored.verify_streamed,
                         "completion_tokens": batch.num_tokens})
            rewards.append(scored.correct.flatten().tolist())
    finally:
        trainer.close()
    return {"overlap": overlap, "steps": rows, "rewards": rewards}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="questions per step (8 samples each)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per generate call (one group: 8)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer process")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify_overlap.json")
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a measuring child process
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = (args.steps, args.batch_size, args.prompts, args.max_new_tokens)
    if args.one:
        print(json.dumps(measure(args.one == "on", *sizes, args.root)))
        return 0

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                        "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="lens-overlap-") as tmp:
        for mode in ("off", "on"):  # the same root: the second run reuses the prepared data
            cmd = [sys.executable, __file__, "--one", mode, "--root", tmp, "--steps", str(args.steps),
                   "--prompts", str(args.prompts), "--batch-size", str(args.batch_size),
                   "--max-new-tokens", str(args.max_new_tokens)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            results[mode] = json.loads(proc.stdout.splitlines()[-1])
    same = results["on"]["rewards"] == results["off"]["rewards"]
    report = {"command": " ".join(sys.argv), "threads": args.threads, "same_rewards": same} | results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print("| verify.overlap | step | samples | tokens | generate (s) | then waited for the verifier (s) | "
          "verifier busy (s) | generate + verify (s) |\n|---|---|---|---|---|---|---|---|")
    for mode in ("off", "on"):
        for i, row in enumerate(results[mode]["steps"], start=1):
            print(f"| {mode} | {i} | {row['samples']} | {row['completion_tokens']} | {row['generate_s']:.2f} | "
                  f"{row['verify_wait_s']:.3f} | {row['verify_busy_s']:.3f} | {row['phases_s']:.2f} |")
    total = {m: sum(r["phases_s"] for r in results[m]["steps"]) for m in results}
    wait = {m: sum(r["verify_wait_s"] for r in results[m]["steps"]) for m in results}
    print(f"\nsame rewards in both modes: {same}; generate + verify: off {total['off']:.2f} s, on {total['on']:.2f} s;"
          f" waited for the verifier: off {wait['off']:.3f} s, on {wait['on']:.3f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
