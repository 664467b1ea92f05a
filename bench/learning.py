"""Does RL improve the tiny policy, and does LENS differ from GRPO? A sweep over algorithm x lr x seed.

Every run starts from the same warm-started policy and prepared data (those of `lens all`, by default
runs/tiny), trains `--steps` RL steps with the tiny profile's settings plus the given lr and seed, and is
evaluated on the eval split (eval.samples_per_problem samples per problem) at step 0 and every
`--eval-every` steps. GRPO and LENS runs with the same seed share the prompt order, the eval sampling seed
and hence the eval problems, so their difference is paired per seed.

    .venv/bin/python bench/learning.py --algos grpo lens --lrs 3e-5 1e-4 --seeds 0 1 2 --steps 300 --jobs 2

Writes <out>/results.json (every eval and the per-step train curves), <out>/summary.md (per algo x lr:
eval accuracy per level at the last step, mean over seeds, change from step 0, and the LENS - GRPO paired
difference per seed) and <out>/learning_curves.png. Numbers are measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def run_name(algo: str, lr: float, seed: int) -> str:
    return f"{algo}-lr{lr:g}-seed{seed}"


def run_params(out: Path, source_root: Path, algo: str, lr: float, seed: int, steps: int, eval_every: int,
               extra: list[str]):
    """The tiny profile, starting from `source_root`'s warm start, writing under <out>/runs/<name>.

    --steps and --eval-every come after the extra overrides: the loop stops (and saves <algo>/final) at
    train.steps, and a round of it is one eval segment, whose checkpoint ends where an eval starts.
    """
    from lens.params import load_params

    root = out / "runs" / run_name(algo, lr, seed)
    params = load_params("tiny", [
        f"run.output_root={root}", f"run.seed={seed}", f"train.algo={algo}", f"train.lr={lr}",
        f"train.checkpoint_every={steps}", "train.keep_checkpoints=1",
        "model.source=hub", f"model.name_or_path={source_root / 'tiny' / 'warm_start' / 'model'}",
        "tracking.enabled=false", *extra, f"train.steps={steps}", f"train.steps_per_round={eval_every}"])
    data = params.data_dir
    if not data.exists():  # the prepared data of the source run, shared by every run of the sweep
        data.parent.mkdir(parents=True, exist_ok=True)
        data.symlink_to(source_root / "tiny" / "data", target_is_directory=True)
    return params


def evaluate(params, model_dir: Path, problems) -> dict:
    from lens.evaluate import evaluate_policy

    summary = evaluate_policy(params, model_dir, problems)
    return {"acc": summary["overall"]["acc"],
            "levels": {level: block["acc"] for level, block in summary["levels"].items()},
            "correct": {p["id"]: p["correct"] for p in summary["problems"]}}


def one_run(out: Path, source_root: Path, algo: str, lr: float, seed: int, steps: int, eval_every: int,
            extra: list[str], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lens.data import read_problems
    from lens.loop import Runner, TrainingRun
    from lens.records import RunFiles, read_metrics

    params = run_params(out, source_root, algo, lr, seed, steps, eval_every, extra)
    files = RunFiles(params.algo_dir())
    problems = read_problems(params.data_dir / "eval.jsonl")
    t0 = time.perf_counter()
    evals = {0: evaluate(params, Path(params.model.name_or_path), problems)}
    run = TrainingRun(params, runner=Runner(progress=False))
    try:
        while run.trainer.state.step < steps:
            summary = run.run(max_steps=eval_every)  # at train.steps it saves <algo>/final itself
            policy = Path(summary["final_model"]) if summary["done"] else run.trainer.save_final(files.dir / "snapshot")
            step = run.trainer.state.step
            evals[step] = evaluate(params, policy, problems)
            print(f"{run_name(algo, lr, seed)} step {step}: eval acc {evals[step]['acc']:.3f} "
                  f"levels {evals[step]['levels']}", flush=True)
    finally:
        run.close()
    curve = [{k: r[k] for k in ("step", "train/acc", "train/frac_groups_all_wrong",
                                 "train/frac_samples_with_signal", "train/loss", "train/entropy",
                                 "perf/step_s") if k in r} for r in read_metrics(files.metrics)]
    return {"algo": algo, "lr": lr, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t0,
            "evals": {str(k): v for k, v in evals.items()}, "curve": curve}


def summarize(results: list[dict]) -> str:
    """Markdown: last-step eval per algo x lr (mean over seeds), change from step 0, paired LENS - GRPO."""
    lines = []
    levels = sorted({lvl for r in results for lvl in r["evals"]["0"]["levels"]}, key=int)
    head = "| algo | lr | seeds | step | all | " + " | ".join(f"L{lvl}" for lvl in levels) + " | all - step 0 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["algo"], r["lr"]), []).append(r)
    for (algo, lr), runs in sorted(groups.items()):
        last = [r["evals"][str(r["steps"])] for r in runs]
        first = [r["evals"]["0"] for r in runs]
        mean = lambda xs: statistics.fmean(xs)  # noqa: E731
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        cells = [f"{mean([e['levels'][lvl] for e in last]):.3f}" for lvl in levels]
        delta = [a["acc"] - b["acc"] for a, b in zip(last, first)]
        lines.append(f"| {algo} | {lr:g} | {len(runs)} | {runs[0]['steps']} | {mean([e['acc'] for e in last]):.3f} "
                     f"+- {sd([e['acc'] for e in last]):.3f} | " + " | ".join(cells) + f" | {mean(delta):+.3f} |")
    by_key = {(r["algo"], r["lr"], r["seed"]): r for r in results}
    paired = []
    for (algo, lr, seed), r in sorted(by_key.items()):
        other = by_key.get(("grpo", lr, seed))
        if algo != "lens" or other is None:
            continue
        a, b = other["evals"][str(other["steps"])], r["evals"][str(r["steps"])]
        paired.append(f"| {lr:g} | {seed} | {a['acc']:.3f} | {b['acc']:.3f} | {b['acc'] - a['acc']:+.3f} | "
                      + " | ".join(f"{b['levels'][lvl] - a['levels'][lvl]:+.3f}" for lvl in levels) + " |")
    if paired:
        head = "| lr | seed | GRPO | LENS | LENS - GRPO | " + " | ".join(f"L{lvl}" for lvl in levels) + " |"
        lines += ["", "Paired by seed (same prompts order, same eval sampling seed):", "", head,
                  "|" + "---|" * (head.count("|") - 1), *paired]
    return "\n".join(lines) + "\n"


def running_mean(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    # One colour per lr, solid LENS / dashed GRPO; thin lines are seeds, thick ones their mean.
    lrs = sorted({r["lr"] for r in results})
    window = 10  # rollout accuracy is noisy per step: a running mean over 10 steps
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["algo"], r["lr"]), []).append(r)
    for (algo, lr), runs in sorted(groups.items()):
        color, style = f"C{lrs.index(lr) % 10}", "-" if algo == "lens" else "--"
        steps = sorted(int(s) for s in runs[0]["evals"])
        for r in runs:
            ax1.plot(steps, [r["evals"][str(s)]["acc"] for s in steps], style, color=color, alpha=0.3, lw=0.8)
            ys = [c["train/acc"] for c in r["curve"]]
            ax2.plot([c["step"] for c in r["curve"]], running_mean(ys, window), style, color=color, alpha=0.3, lw=0.8)
        label = f"{algo} lr={lr:g} ({len(runs)} seeds)"
        ax1.plot(steps, [statistics.fmean(r["evals"][str(s)]["acc"] for r in runs) for s in steps], style,
                 color=color, marker="o", lw=2, label=label)
        length = min(len(r["curve"]) for r in runs)
        mean = [statistics.fmean(r["curve"][i]["train/acc"] for r in runs) for i in range(length)]
        ax2.plot([runs[0]["curve"][i]["step"] for i in range(length)], running_mean(mean, window), style, color=color, lw=2, label=label)
    ax1.set(xlabel="RL step", ylabel="eval accuracy (all levels)", title="eval")
    ax2.set(xlabel="RL step", ylabel="rollout accuracy (running mean, 10 steps)", title="train")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from lens import estimators

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algos", nargs="+", default=["grpo", "lens"], choices=estimators.names())
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4])  # the tiny profile's
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--source-root", type=Path, default=PROJECT_ROOT / "runs",
                    help="run.output_root of a `lens all` run: its tiny/data and tiny/warm_start are used")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "learning")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores / jobs threads)")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value", help="more tiny-profile overrides")
    args = ap.parse_args(argv)
    source = args.source_root.resolve()
    for need in (source / "tiny" / "data" / "eval.jsonl", source / "tiny" / "warm_start" / "model" / "config.json"):
        if not need.exists():
            ap.error(f"{need} not found: run `lens prepare` and `lens warm-start` (or `lens all`) with "
                     f"run.output_root={args.source_root} first")
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be >= 1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = [(a, lr, s) for lr in args.lrs for s in args.seeds for a in args.algos]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    job = dict(out=out, source_root=source, steps=args.steps, eval_every=args.eval_every,
               extra=args.overrides, threads=threads)
    if args.jobs == 1:
        results = [one_run(algo=a, lr=lr, seed=s, **job) for a, lr, s in configs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(one_run, algo=a, lr=lr, seed=s, **job) for a, lr, s in configs]
            results = [f.result() for f in futures]
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "seconds": time.perf_counter() - t0, "runs": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    table = summarize(results)
    (out / "summary.md").write_text(table)
    plot(results, out / "learning_curves.png")
    print(table)
    print(f"{len(results)} runs in {report['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
