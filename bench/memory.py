#!/usr/bin/env python
"""Peak memory and time of one policy update: before (micro-batches of `train.micro_batch_size`, full
[B, T, V] logits) and after (`train.micro_batch_tokens` + `train.logprob_chunk_tokens`).

Each (model, mode) runs in a fresh process: a real `lens.train.Trainer` on its profile, fed synthetic
rollouts (the profile's rendered prompts, random completion tokens of random lengths in a range, random
advantages) so that the update sees the lengths under test without generating them; then one call of
`Trainer.update` (forward, backward and AdamW over every micro-batch of the step). Memory is the process's
resident high-water mark (VmHWM; torch's CPU allocator keeps no statistics), reset just before the update
(/proc/self/clear_refs): read as AdamW is about to step (the forward and backward passes, the gradients
included) and after the update (AdamW's state is created inside it: the same in both modes); and the
resident size just before the update (the weights). glibc's malloc keeps freed blocks below its dynamic
mmap threshold (up to 32 MiB) for reuse, so the high-water mark would also count its fragmentation: the
measuring processes run with MALLOC_MMAP_THRESHOLD_=65536 (every block of 64 KiB or more is its own
mapping, returned when freed), which makes the peak that of live tensors and costs some system time.

    .venv/bin/python bench/memory.py                    # every model, both modes: a markdown table
    .venv/bin/python bench/memory.py --models tiny      # the tiny profile only

Models: tiny (the tiny profile's model, random weights, its completions of up to 16 tokens); smollm2
(SmolLM2-135M-Instruct, vocabulary 49,152, from the smollm2 profile's cache; 8 completions of 256-512
tokens, micro-batches of 4, fp32); smollm2-gc (the same with gradient checkpointing, as the paper
profile). "after" uses a budget of micro_batch_size x the longest sequence (the padded size of the
default's largest micro-batch) and chunks of 1024 positions. Results: bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ["rollout.engine=hf", "train.prompts_per_step=1", "rollout.group_size=8", "train.mini_batch_size=8",
           "train.micro_batch_size=4"]
MODELS = {
    "tiny": dict(profile="tiny", completion=(4, 16), overrides=[]),
    "smollm2": dict(profile="smollm2", completion=(256, 512), overrides=SMOLLM2),
    # the paper's setting keeps activations small (gradient checkpointing): the logits are then the peak
    "smollm2-gc": dict(profile="smollm2", completion=(256, 512),
                       overrides=[*SMOLLM2, "model.gradient_checkpointing=true"]),
}
CHUNK = 1024


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(model: str, mode: str, chunk: int = CHUNK, seed: int = 0) -> dict:
    """One update of `model` in `mode` in this process; returns its row."""
    import torch

    from lens.data import render_prompt, synthetic_problems, write_problems
    from lens.params import load_params
    from lens.rollout import Rollout
    from lens.sampling import RolloutBatch, ScoredBatch
    from lens.tiny_model import build_char_tokenizer, build_tiny_model, save_model
    from lens.train import Trainer

    spec = MODELS[model]
    root = Path(tempfile.mkdtemp(prefix="lens-memory-"))
    overrides = [f"run.output_root={root}", "verify.workers=1", "tracking.enabled=false", *spec["overrides"]]
    params = load_params(spec["profile"], overrides)
    write_problems(params.data_dir / "train.jsonl", synthetic_problems("train", 50, 0, params.data.levels))
    if params.model.source == "warm_start":
        tok = build_char_tokenizer()
        t = params.model.tiny
        save_model(build_tiny_model(tok, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size),
                   tok, params.warm_start_dir / "model")
    trainer = Trainer(params)
    try:
        gen = torch.Generator().manual_seed(seed)
        group, vocab = params.rollout.group_size, trainer.unwrapped_model.config.vocab_size
        problems = trainer.step_problems(0)
        prompts = [render_prompt(p, trainer.tokenizer, params.model.prompt) for p in problems]
        lo, hi = spec["completion"]
        rollouts = []
        for k, prompt in enumerate(prompts):
            prompt_ids = trainer.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for _ in range(group):
                n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
                ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
                rollouts.append(Rollout(k, prompt_ids, ids, "", [-math.log(vocab)] * n, n == hi))
        lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
        if mode == "after":
            trainer.params.train.micro_batch_tokens = params.train.micro_batch_size * max(lengths)
            trainer.params.train.logprob_chunk_tokens = chunk
        shape = (len(problems), group)
        scored = ScoredBatch(RolloutBatch(0, problems, prompts, rollouts, 0.0), torch.zeros(shape),
                             torch.zeros(shape, dtype=torch.float64), torch.randn(shape, generator=gen), 0.0)
        peaks = {"forward_backward": 0, "update": 0}

        def before_step(*_):  # the forward and backward passes of every micro-batch of this update are done
            peaks["forward_backward"] = max(peaks["forward_backward"], _status_kib("VmHWM"))

        def after_step(*_):  # a step's AdamW peak must not count as the next update's forward/backward
            peaks["update"] = max(peaks["update"], _status_kib("VmHWM"))
            Path("/proc/self/clear_refs").write_text("5")

        trainer.optimizer.optimizer.register_step_pre_hook(before_step)
        trainer.optimizer.optimizer.register_step_post_hook(after_step)
        before_kib = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
        start = time.perf_counter()
        metrics = trainer.update(scored)
        seconds = time.perf_counter() - start
        peaks["update"] = max(peaks["update"], _status_kib("VmHWM"))
    finally:
        trainer.close()
    return {"model": model, "mode": mode, "vocab": vocab, "sequences": len(rollouts),
            "tokens": sum(lengths), "longest": max(lengths),
            "micro_batch_size": params.train.micro_batch_size,
            "micro_batch_tokens": trainer.params.train.micro_batch_tokens,
            "logprob_chunk_tokens": trainer.params.train.logprob_chunk_tokens,
            "rss_before_mib": before_kib / 1024, "peak_forward_backward_mib": peaks["forward_backward"] / 1024,
            "peak_rss_mib": peaks["update"] / 1024, "update_s": seconds,
            "loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"], "threads": torch.get_num_threads()}


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | sequences x longest | micro-batching | RSS before (MiB) | peak, forward+backward "
             "(MiB) | peak, update (MiB) | update (s) | loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = (f"{r['micro_batch_size']} sequences" if r["micro_batch_tokens"] is None else
                 f"<= {r['micro_batch_tokens']} tokens, chunks of {r['logprob_chunk_tokens']}")
        lines.append(f"| {r['model']} (V={r['vocab']}) | {r['mode']} | {r['sequences']} x {r['longest']} | {split} | "
                     f"{r['rss_before_mib']:.0f} | {r['peak_forward_backward_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['update_s']:.1f} | {r['loss']:.5f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each measurement")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="train.logprob_chunk_tokens of the 'after' mode")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)  # a worker process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, chunk=args.chunk)))
        return
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for model in args.models:
        for mode in ("before", "after"):
            proc = subprocess.run([sys.executable, __file__, "--one", model, mode, "--chunk", str(args.chunk)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{model} {mode} failed:\n{proc.stderr[-4000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{model} {mode}: peak {rows[-1]['peak_rss_mib']:.0f} MiB, {rows[-1]['update_s']:.1f} s",
                  file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
