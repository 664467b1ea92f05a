"""The pipeline's stages: plain functions with explicit inputs and outputs on disk.

The CLI (`lens <stage>`), the DVC stages and the Prefect tasks all call these and nothing else, so the
three ways of running the pipeline cannot drift apart. Each returns a small JSON-able summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lens.params import Params

log = logging.getLogger(__name__)

ALGOS = ("grpo", "lens")


def _write_json(path: Path, obj) -> Path:
    from lens.evaluate import atomic_write_text

    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare(params: Params) -> dict:
    """Load, normalise and write the train/eval problems of the profile; report what was dropped."""
    from lens.data import load_problems_for, write_problems

    out = params.data_dir
    summary: dict = {"profile": params.profile, "splits": {}}
    for split in ("train", "eval"):
        problems, reports = load_problems_for(params, split)
        if not problems:
            raise ValueError(f"data.{split}_source: no {split} problems left after loading and filtering "
                             f"({'; '.join(r.summary() for r in reports)})")
        write_problems(out / f"{split}.jsonl", problems)
        levels: dict[str, int] = {}
        for p in problems:
            levels[str(p.level)] = levels.get(str(p.level), 0) + 1
        summary["splits"][split] = {"problems": len(problems), "levels": levels,
                                    "sources": [r.as_dict() for r in reports]}
        for r in reports:
            log.info("%s: %s", split, r.summary())
    _write_json(out / "report.json", summary)
    return summary


def warm_start(params: Params) -> dict:
    """Build and supervise the tiny model (profiles whose policy is `model.source: warm_start`)."""
    if params.model.source != "warm_start" or not params.warm_start.enabled:
        reason = (f"model.source={params.model.source}" if params.model.source != "warm_start"
                  else "warm_start.enabled=false")
        log.info("warm start not needed for profile %s (%s)", params.profile, reason)
        # An output even when skipped: DVC's warm_start stage declares the directory for every profile.
        summary = {"skipped": True, "reason": reason}
        _write_json(params.warm_start_dir / "warm_start.json", summary)
        return summary
    from lens.warm_start import warm_start as run_warm_start

    return run_warm_start(params)


def train(params: Params, resume: bool = False, max_steps: int | None = None, callbacks: list | None = None) -> dict:
    """RL-train the policy with `train.algo`; writes <algo>/final when train.steps is reached."""
    from lens.train import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(params, resume=resume, callbacks=callbacks)
    try:
        last = trainer.train(max_steps=max_steps)
        done = trainer.state.step >= params.train.steps
        summary = {"algo": params.train.algo, "step": trainer.state.step, "done": done,
                   "updates": trainer.state.updates, "skipped_updates": trainer.state.skipped_updates,
                   "seconds": time.perf_counter() - t0, "last_metrics": last,
                   "distributed": {"type": trainer.accelerator.distributed_type.value, "processes": trainer.world},
                   "verify": trainer.verifier.stats.as_dict()}
        if done:
            summary["final_model"] = str(trainer.save_final())
        if trainer.accelerator.is_main_process:
            _write_json(params.algo_dir() / "train_summary.json", summary)
        return summary
    finally:
        trainer.close()


def evaluate(params: Params, algo: str | None = None, model_path: str | Path | None = None,
             out_path: str | Path | None = None) -> dict:
    """Per-level accuracy and pass@k of <algo>/final (or `model_path`) on the eval split."""
    from lens.data import read_problems
    from lens.evaluate import evaluate_policy, write_eval

    algo = algo or params.train.algo
    model_path = Path(model_path) if model_path else params.algo_dir(algo) / "final"
    if not (model_path / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_path}: run `lens train --algo {algo}` first")
    eval_file = params.data_dir / "eval.jsonl"
    if not eval_file.exists():
        raise FileNotFoundError(f"{eval_file} not found: run `lens prepare --profile {params.profile}` first")
    summary = evaluate_policy(params, model_path, read_problems(eval_file))
    summary["model"] = str(model_path)
    summary["algo"] = algo
    write_eval(out_path or params.algo_dir(algo) / "eval.json", summary)
    return summary


def compare(params: Params, algos: tuple[str, str] = ALGOS) -> dict:
    """GRPO vs LENS per level with paired-bootstrap intervals; tables and plots under <root>/compare."""
    from lens.compare import compare as compare_summaries
    from lens.compare import plot_learning_curves, plot_levels, write_compare
    from lens.evaluate import read_eval

    evals = []
    for algo in algos:
        path = params.algo_dir(algo) / "eval.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `lens evaluate --algo {algo}` first")
        evals.append(read_eval(path))
    ev = params.eval
    cmp = compare_summaries(evals[0], evals[1], names=algos, bootstrap_samples=ev.bootstrap_samples,
                            confidence=ev.confidence, seed=params.run.seed)
    out_dir = params.root / "compare"
    paths = write_compare(out_dir, cmp)
    paths["levels_png"] = plot_levels(cmp, out_dir / "accuracy_by_level.png")
    curves = {}
    for algo in algos:
        metrics_file = params.algo_dir(algo) / "metrics.jsonl"
        if metrics_file.exists():
            curves[algo] = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    if curves:
        paths["curves_png"] = plot_learning_curves(curves, out_dir / "learning_curves.png")
    from lens.versioning import write_plot_data  # CSVs `dvc plots` reads, also for Prefect-made outputs

    write_plot_data(params.root)
    cmp["files"] = {k: str(v) for k, v in paths.items()}
    return cmp
