#!/usr/bin/env python
"""What verification costs a step with and without `verify.overlap` (issue 10, item 6). Two scenarios.

`--scenario smollm2` (the real thing end to end): each mode runs in a fresh process: a real `lens.train.Trainer` on the smollm2 profile (SmolLM2-135M-Instruct,
MATH Level 1 + GSM8K + synthetic problems from ../shared/data, the paper's prompt) generates the rollouts of
`--steps` steps with the HF engine in batches of `--batch-size` sequences and verifies them with the real
verifier (math-verify in `verify.workers` processes). Phases 1-2 only: no update, so both modes sample the
same completions and must give the same rewards (checked). Per step: generation time (verification in the
background included), the time the step then waited for the verifier (`perf/verify_s`) and the verifier's
working time (`perf/verify_busy_s`).

    .venv/bin/python bench/verify_overlap.py --steps 2 --max-new-tokens 192   # ~8 min
    .venv/bin/python bench/verify_overlap.py --threads 2     # torch on both cores (the verifier competes)

`--scenario replay` (the paper's shape, where a GPU generates): what the step waits for the verifier when a
batch of 2048 completions (128 questions x 16) arrives over `--gen-seconds`, as a GPU engine would deliver it.
The GPU engine cannot run here, so a replay engine (a stand-in, named as such) hands over MATH-500 reference
solutions in `--chunks` equal parts at an even pace (sleeping in between, as the main thread waits on a GPU);
everything else is the real code path (`lens.scoring.generate_verifying`, the real verifier with
`--workers` processes). Per question: 6 solutions as written (correct), 6 with a wrong boxed answer, 4 cut off
before their box (math-verify's whole-text extraction, its slow path); each solution's reasoning is repeated
to about 2,000 characters, as long reasoning would be.

    .venv/bin/python bench/verify_overlap.py --scenario replay     # ~3 min
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
DEFAULT_OUT = ROOT / "bench" / "results" / "verify_overlap.json"
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


class ReplayEngine:
    """A stand-in for a GPU engine: hands over prepared completions in chunks, `seconds` in all."""

    def __init__(self, completions: list[list[str]], seconds: float, chunks: int):
        self.completions, self.seconds, self.chunks = completions, seconds, chunks

    def generate(self, prompts, n, sampling, on_groups=None):
        from lens.rollout import Rollout

        groups = [[Rollout(prompt_index=p, prompt_ids=[0], completion_ids=[0], text=t, logprobs=[0.0],
                           truncated=False) for t in self.completions[p]] for p in range(len(prompts))]
        size = -(-len(groups) // self.chunks)
        for start in range(0, len(groups), size):
            time.sleep(self.seconds / self.chunks)  # the GPU generating this chunk
            if on_groups is not None:
                on_groups([r for g in groups[start:start + size] for r in g])
        return [r for g in groups for r in g]


def replay_completions(problems: list[dict]) -> list[list[str]]:
    """16 completions per MATH-500 problem: 6 right, 6 with a wrong boxed answer, 4 cut before the box."""
    from lens.data import last_boxed

    out = []
    for row in problems:
        solution, answer = row["solution"], row["answer"]
        box = solution.rfind("\\boxed")
        reasoning = solution[:box] if box > 0 else solution
        long = (reasoning + "\n") * max(1, 2000 // max(len(reasoning), 1)) + solution[box:] if box > 0 else solution
        right = long
        wrong = long.replace(f"\\boxed{{{last_boxed(solution) or answer}}}", f"\\boxed{{{answer} + 1}}")
        cut = long[: long.rfind("\\boxed")] if "\\boxed" in long else long[: len(long) // 2]
        texts = [right] * 6 + [wrong] * 6 + [cut] * 4
        out.append([f"Attempt {k}.\n{t}" for k, t in enumerate(texts)])  # distinct, as samples are
    return out


def replay(overlap: bool, questions: int, gen_seconds: float, chunks: int, workers: int) -> dict:
    from lens.rollout import SamplingConfig
    from lens.scoring import generate_verifying
    from lens.verify import Verifier

    rows = [json.loads(line) for line in (SHARED / "math" / "math500.jsonl").read_text().splitlines()][:questions]
    engine = ReplayEngine(replay_completions(rows), gen_seconds, chunks)
    with Verifier(timeout_s=5.0, workers=workers) as verifier:
        t0 = time.perf_counter()
        rollouts, stream = generate_verifying(engine, verifier, [""] * len(rows), [r["answer"] for r in rows], 16,
                                              SamplingConfig(), overlap)
        generated = time.perf_counter()
        scores = stream.result(rollouts)
        done = time.perf_counter()
    return {"overlap": overlap, "samples": len(rollouts), "generate_s": generated - t0,
            "verify_wait_s": scores.wait_s, "verify_busy_s": scores.busy_s, "phases_s": done - t0,
            "streamed": scores.streamed_items, "reward_mean": sum(scores.rewards) / len(rollouts),
            "stats": scores.stats.as_dict(), "rewards": scores.rewards}


def main_replay(args) -> int:
    results = {mode: replay(mode == "on", args.questions, args.gen_seconds, args.chunks, args.workers)
               for mode in ("off", "on")}
    same = results["on"].pop("rewards") == results["off"].pop("rewards")
    report = {"command": " ".join(sys.argv), "scenario": "replay", "same_rewards": same} | results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("| verify.overlap | completions | generation (replayed, s) | then waited for the verifier (s) | "
          "verifier busy (s) | generate + verify (s) | reward mean |\n|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['samples']} | {r['generate_s']:.1f} | {r['verify_wait_s']:.2f} | {r['verify_busy_s']:.2f} "
              f"| {r['phases_s']:.1f} | {r['reward_mean']:.3f} |")
    print(f"\nsame rewards in both modes: {same}; verifier stats (off): {results['off']['stats']}")
    return 0 if same else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["smollm2", "replay"], default="smollm2")
    ap.add_argument("--questions", type=int, default=128, help="replay: questions per step (16 completions each)")
    ap.add_argument("--gen-seconds", type=float, default=60.0, help="replay: the generation time emulated")
    ap.add_argument("--chunks", type=int, default=16, help="replay: parts the batch arrives in")
    ap.add_argument("--workers", type=int, default=2, help="replay: verifier processes")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="questions per step (8 samples each)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per generate call (one group: 8)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer process")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a measuring child process
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = (args.steps, args.batch_size, args.prompts, args.max_new_tokens)
    if args.scenario == "replay":
        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_OUT.with_name("verify_overlap_replay.json")
        return main_replay(args)
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
