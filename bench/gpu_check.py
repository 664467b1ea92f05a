#!/usr/bin/env python
"""GPU check: a few RL steps of the paper profile's code path, bf16 on CUDA, on a random Qwen2.5-0.5B-shaped model.

The paper profile's training path: fp32 master weights with bf16 autocast, gradient checkpointing, pi_old
recomputed by the trainer (`train.recompute_old_logprobs`), the paper's prompt through a chat template,
token-budget micro-batches with completion-only chunked log-probs (`train.micro_batch_tokens`,
`train.logprob_chunk_tokens`), verification overlapped with generation (`verify.overlap`). The rollout
engine is transformers' (the device image has no vLLM).

Nothing is downloaded: the model is a `Qwen2Config` with Qwen2.5-0.5B's dimensions and random weights, the
tokenizer is the tiny profile's character tokenizer (the model's vocabulary stays at 151,936, so the
LM head costs what it costs in the real model; sampled ids beyond the tokenizer decode to nothing), and
the questions are synthetic (the char tokenizer gets a ChatML-like template whose turns end with its EOS,
so the paper's prompt renders through `template: chat`). A random model almost never emits EOS, so every completion runs to
max_new_tokens: the worst case, and a steady one to time. For each rollout engine configuration
(transformers `generate` with the dynamic KV cache, then with `cache_implementation="static"`, which
transformers compiles on CUDA) it builds a fresh `lens.train.Trainer`, runs warm-up steps (compilation
lands there), then timed steps, and reports per configuration:

  rollout_tok_s   completion tokens / rollout seconds (the trainer's perf/rollout_tok_s)
  train_tok_s     prompt+completion tokens / update seconds (fwd+bwd+AdamW; perf/train_tok_s)
  step_s          wall time of one RL step (rollout + verify + update)
  phases          per phase (generate_rollouts; verify_rollouts = the verifier's tail + pi_old recompute +
                  advantages; update_policy = update + weight sync + record): seconds and peak GiB
  train_tflops    6 * parameters * train_tok_s (a lower bound: padding and attention are not counted,
                  nor checkpointing's second forward)
  train_mfu       train_tflops / the GPU's dense bf16 peak (PEAK_TFLOPS by device name, or --peak-tflops)
  peak_mem_gib    torch.cuda.max_memory_allocated over the configuration

as JSON on stdout (once, at the end) and in --out (default $OUT/gpu_check.json when $OUT is set), rewritten after each
configuration so a run cut short still reports what it measured.

On a lent GPU (repo root; the device image has torch, transformers, accelerate, pyarrow; carry
pydantic, pydantic-core, annotated-types, typing-inspection, omegaconf, antlr4-python3-runtime==4.9.3
as cp312 wheels, see the device README; math-verify is optional, an exact-match reward replaces it):
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json
CPU smoke test (tests/test_multiprocess.py runs it):
    python bench/gpu_check.py --cpu --tiny
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing lens

# Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B), written out so that nothing is fetched.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, rope_theta=1e4,
            rms_norm_eps=1e-6, tie_word_embeddings=True)
# Workload per preset: prompts x group per step, new tokens, sequences per generate call, micro batch.
# micro_batch_tokens: the token budget of a micro-batch (about micro_batch sequences of prompt + completion).
WORKLOADS = {
    "qwen2.5-0.5b": dict(prompts=32, group=8, max_new_tokens=256, rollout_batch=64, micro_batch=16,
                         micro_batch_tokens=6144, warmup_steps=1, steps=2),
    "tiny": dict(prompts=4, group=4, max_new_tokens=16, rollout_batch=8, micro_batch=8,
                 micro_batch_tokens=1024, warmup_steps=1, steps=2),
}
# Dense bf16 peak TFLOP/s by device name (the first substring that matches), for the MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}
PAPER_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ENGINES = {"dynamic": False, "static": True}  # name -> rollout.static_cache
REQUIRED = ("torch", "transformers", "accelerate", "pydantic", "omegaconf", "numpy", "pyarrow", "safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload instead of Qwen2.5-0.5B's")
    p.add_argument("--engines", default="dynamic,static", help="comma list of: dynamic, static")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="compute dtype (autocast over fp32 master weights); default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for the MFU")
    for key in ("prompts", "group", "max_new_tokens", "rollout_batch", "micro_batch", "micro_batch_tokens",
                "warmup_steps", "steps"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override the preset's {key}")
    p.add_argument("--max-seconds", type=float, default=420.0,
                   help="skip configurations that would start after this much wall time")
    p.add_argument("--out", default=None, help="JSON report path (default: $OUT/gpu_check.json if $OUT is set)")
    p.add_argument("--workdir", default=None, help="where the model and data are written (default: a temp dir)")
    return p.parse_args(argv)


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


class ExactMatchVerifier:
    """Stand-in reward where math-verify is not installed (device images): boxed answer == gold, as strings."""

    def score_with_stats(self, completions, golds):
        from lens.verify import VerifyStats

        out = [float(f"\\boxed{{{g}}}" in c) for c, g in zip(completions, golds)]
        return out, VerifyStats(calls=len(out), correct=int(sum(out)))

    def close(self):
        pass


def build_policy(preset: dict, directory: Path, dtype, device) -> int:
    """A random Qwen2 of `preset`'s shape saved (safetensors + tokenizer) where the trainer looks; returns #params."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lens.tiny_model import _generation_config, build_char_tokenizer, save_model

    tok = build_char_tokenizer()
    tok.model_max_length = preset["max_position_embeddings"]
    tok.chat_template = CHAT_TEMPLATE
    cfg = dict(preset)
    cfg["vocab_size"] = -(-max(cfg["vocab_size"], len(tok)) // 64) * 64
    config = Qwen2Config(**cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.eos_token_id, use_cache=True)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run: 0.5B on a CPU takes a while
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config = _generation_config(tok)
    n_params = sum(p.numel() for p in model.parameters())
    save_model(model.to("cpu"), tok, directory)
    del model
    return n_params


def run_config(engine: str, args, work: dict, workdir: Path, n_params: int, device: str) -> dict:
    import torch
    from accelerate import Accelerator

    from lens.params import load_params
    from lens.train import Trainer

    samples = work["prompts"] * work["group"]
    overrides = [
        f"run.output_root={workdir}", "model.source=warm_start", "model.dtype=float32",
        f"model.compute_dtype={args.dtype}",
        "model.gradient_checkpointing=true", "model.prompt.template=chat",
        f"model.prompt.instruction={PAPER_INSTRUCTION}",
        "rollout.engine=hf", f"rollout.static_cache={str(ENGINES[engine]).lower()}",
        f"rollout.group_size={work['group']}", f"rollout.max_new_tokens={work['max_new_tokens']}",
        f"rollout.batch_size={work['rollout_batch']}",
        "train.algo=lens", f"train.prompts_per_step={work['prompts']}", f"train.mini_batch_size={samples}",
        f"train.micro_batch_size={min(work['micro_batch'], samples)}", "train.lr=1e-6",
        f"train.micro_batch_tokens={work['micro_batch_tokens']}", "train.logprob_chunk_tokens=1024",
        "train.recompute_old_logprobs=true",
        f"train.steps={work['warmup_steps'] + work['steps']}", "train.checkpoint_every=1000000",
        "verify.workers=2",
    ]
    params = load_params("tiny", overrides)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(params, accelerator=Accelerator(cpu=device == "cpu"))
    try:
        if importlib.util.find_spec("math_verify") is None:
            trainer.verifier.close()
            trainer.verifier = ExactMatchVerifier()
        setup_s = time.perf_counter() - t0
        # Trainer.train_step, not lens.loop.TrainingRun: no checkpoint writes or round manifests inside the timing.
        phases: list[dict] = []
        run_phase = _timed_phases(phases, device)
        warm = [trainer.train_step(run_phase) for _ in range(work["warmup_steps"])]
        timed = [trainer.train_step(run_phase) for _ in range(work["steps"])]
    finally:
        trainer.close()
        trainer.accelerator.free_memory()  # the Accelerator keeps references to the prepared model/optimizer
        del trainer
        gc.collect()

    def med(rows, key):
        return statistics.median(r[key] for r in rows) if rows else None

    train_tok_s = med(timed, "perf/train_tok_s")
    result = {
        "engine": f"hf-{engine}", "ok": True, "setup_s": setup_s,
        "rollout_tok_s": med(timed, "perf/rollout_tok_s"), "train_tok_s": train_tok_s,
        "step_s": med(timed, "perf/step_s"), "rollout_s": med(timed, "perf/rollout_s"),
        "update_s": med(timed, "perf/update_s"), "verify_s": med(timed, "perf/verify_s"),
        "warmup_step_s": [r["perf/step_s"] for r in warm],
        "warmup_rollout_tok_s": [r["perf/rollout_tok_s"] for r in warm],
        "response_len_mean": med(timed, "train/response_len_mean"),
        "train_tflops": 6 * n_params * train_tok_s / 1e12 if train_tok_s else None,
        "phases": {name: {"s": statistics.median(p["s"] for p in timed_phases),
                          "peak_gib": max(p.get("peak_gib", 0.0) for p in timed_phases)}
                   for name in dict.fromkeys(p["phase"] for p in phases)
                   if (timed_phases := [p for p in phases if p["phase"] == name and p["step"] > work["warmup_steps"]])},
        "steps": [{k: v for k, v in r.items() if k.startswith(("perf/", "verify/streamed"))} for r in warm + timed],
    }
    peak = args.peak_tflops or peak_tflops(device)
    result["train_mfu"] = result["train_tflops"] / peak if peak and result["train_tflops"] else None
    if device == "cuda":  # the phases reset the peak: the configuration's is the largest of theirs
        result["peak_mem_gib"] = max(p["peak_gib"] for p in phases)
    return result


def _timed_phases(rows: list[dict], device: str):
    """A phase runner for Trainer.train_step that records each phase's seconds and peak GPU memory."""
    import torch

    step = {"n": 0}

    def run_phase(name, fn):
        if name == "generate_rollouts":
            step["n"] += 1
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            row = {"step": step["n"], "phase": name}
            if device == "cuda":
                torch.cuda.synchronize()
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row | {"s": time.perf_counter() - t0})

    return run_phase


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        env |= {"gpu": prop.name, "gpu_mem_gib": prop.total_memory / 2**30, "sm_count": prop.multi_processor_count,
                "capability": f"{prop.major}.{prop.minor}"}
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path = Path(args.out) if args.out else None
    if out_path is None and os.environ.get("OUT"):  # the device runner's folder of files to bring back
        out_path = Path(os.environ["OUT"]) / "gpu_check.json"
    report: dict = {"ok": False, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def emit():
        text = json.dumps(report, indent=2, default=str)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, out_path)
        return text

    missing = missing_packages()
    if missing:
        report["error"] = f"missing Python packages: {missing} (carry them as wheels; see this file's docstring)"
        print(emit())
        return 3

    import torch

    if not args.cpu and not torch.cuda.is_available():
        report["error"] = "no CUDA device: pass --cpu for the CPU smoke run"
        print(emit())
        return 2
    device = "cpu" if args.cpu else "cuda"
    args.dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    preset_name = "tiny" if args.tiny else "qwen2.5-0.5b"
    preset = TINY if args.tiny else QWEN25_05B
    work = dict(WORKLOADS[preset_name])
    for key in work:
        if getattr(args, key) is not None:
            work[key] = getattr(args, key)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; choose from {sorted(ENGINES)}")

    t_start = time.perf_counter()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="lens-gpu-check-")
    workdir = Path(args.workdir or tmp.name)
    report |= {"device": device, "env": environment(device), "dtype": args.dtype, "workload": work,
               "model": {"preset": preset_name, **preset}, "runs": []}
    try:
        from lens.data import synthetic_problems, write_problems
        from lens.params import load_params

        params = load_params("tiny", [f"run.output_root={workdir}"])
        write_problems(params.data_dir / "train.jsonl", synthetic_problems("train", 200, 1234))
        t0 = time.perf_counter()
        # fp32 master weights (the trainer refuses half-precision masters); args.dtype is the compute dtype
        n_params = build_policy(preset, params.warm_start_dir / "model", torch.float32, device)
        report["model"] |= {"parameters": n_params, "build_s": time.perf_counter() - t0}
        emit()
        for engine in engines:
            if time.perf_counter() - t_start > args.max_seconds:
                report["runs"].append({"engine": f"hf-{engine}", "ok": False, "skipped": "--max-seconds reached"})
                continue
            try:
                report["runs"].append(run_config(engine, args, work, workdir, n_params, device))
            except Exception as exc:  # noqa: BLE001 - one failing configuration must not lose the others
                report["runs"].append({"engine": f"hf-{engine}", "ok": False, "error": repr(exc),
                                       "traceback": traceback.format_exc()[-4000:]})
                if device == "cuda":
                    torch.cuda.empty_cache()
            emit()
            last = report["runs"][-1]
            print(f"[gpu_check] {last['engine']}: rollout {last.get('rollout_tok_s')} tok/s, train "
                  f"{last.get('train_tok_s')} tok/s, step {last.get('step_s')} s", file=sys.stderr, flush=True)
        report["ok"] = all(r.get("ok") for r in report["runs"])
    finally:
        report["seconds"] = time.perf_counter() - t_start
        print(emit(), flush=True)
        if tmp is not None:
            tmp.cleanup()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
