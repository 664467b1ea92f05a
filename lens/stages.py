"""The pipeline's stages: plain functions with explicit inputs and outputs on disk.

Each is one `lens <stage>` command and one DVC stage; lens.pipeline strings them together for `lens all`
and the Prefect flows. Each returns a small JSON-able summary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from lens.params import Params
from lens.records import RunFiles, atomic_write_json, read_metrics

log = logging.getLogger(__name__)


def extra_eval_file(params: Params, name: str) -> Path:
    """Where prepare writes the eval.extra_sets entry `name`."""
    return params.data_dir / f"eval_{name}.jsonl"


def prepare(params: Params) -> dict:
    """Load, normalise and write the train/eval problems of the profile, and each of eval.extra_sets as
    data/eval_<name>.jsonl (a split of its own in report.json); report what was dropped. Problems whose gold
    answer the verifier cannot parse are dropped (lens.data.gold_check) and listed in report.json."""
    from lens.data import load_problems_for, write_problems
    from lens.data.gold_check import GoldCheck

    out = params.data_dir
    summary: dict = {"profile": params.profile, "splits": {}}
    # (report.json split name, the loader's split, the source (None: the profile's), file, key to blame)
    outputs = [(split, split, None, out / f"{split}.jsonl", f"data.{split}_source") for split in ("train", "eval")]
    outputs += [(f"eval_{name}", "eval", name, extra_eval_file(params, name), "eval.extra_sets")
                for name in params.eval.extra_sets]
    with GoldCheck(params.verify.timeout_s, params.verify.workers) as golds:
        for split, loader_split, source, path, key in outputs:
            already_dropped = len(golds.dropped)
            problems, reports = load_problems_for(params, loader_split, source, golds)
            if not problems:
                raise ValueError(f"{key}: no {split} problems left after loading and filtering "
                                 f"({'; '.join(r.summary() for r in reports)})")
            write_problems(path, problems)
            levels: dict[str, int] = {}
            for p in problems:
                levels[str(p.level)] = levels.get(str(p.level), 0) + 1
            summary["splits"][split] = {"problems": len(problems), "levels": levels,
                                        "sources": [r.as_dict() for r in reports],
                                        "unparseable_golds": golds.dropped[already_dropped:]}
            for r in reports:
                log.info("%s: %s", split, r.summary())
    atomic_write_json(out / "report.json", summary, sort_keys=True)
    return summary


def warm_start(params: Params) -> dict:
    """Build and supervise the tiny model (profiles whose policy is `model.source: warm_start`)."""
    if params.model.source != "warm_start" or not params.warm_start.enabled:
        reason = (f"model.source={params.model.source}" if params.model.source != "warm_start"
                  else "warm_start.enabled=false")
        log.info("warm start not needed for profile %s (%s)", params.profile, reason)
        # An output even when skipped: DVC's warm_start stage declares the directory for every profile.
        summary = {"skipped": True, "reason": reason}
        atomic_write_json(params.warm_start_dir / "warm_start.json", summary, sort_keys=True)
        return summary
    from lens.warm_start import warm_start as run_warm_start

    return run_warm_start(params)


def train(params: Params, resume: bool | Literal["auto"] = False, max_steps: int | None = None, callbacks: list | None = None,
          runner=None) -> dict:
    """RL-train the policy with `train.algo` (lens.loop); writes <algo>/final when train.steps is reached."""
    from lens.loop import train as run_training

    return run_training(params, resume=resume, max_steps=max_steps, runner=runner, callbacks=callbacks or ())


def evaluate(params: Params, algo: str | None = None, model_path: str | Path | None = None,
             out_path: str | Path | None = None) -> dict:
    """Per-level accuracy and pass@k of <algo>/final (or `model_path`) on the eval split, and on each of
    eval.extra_sets under "sets" (each a `lens.evaluate.summarize` summary)."""
    from lens.data import read_problems
    from lens.evaluate import evaluate_policy, write_eval

    algo = algo or params.train.algo
    files = RunFiles(params.algo_dir(algo))
    model_path = Path(model_path) if model_path else files.final
    if not (model_path / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_path}: run `lens train --algo {algo}` first")
    eval_file = params.data_dir / "eval.jsonl"
    extra_files = {name: extra_eval_file(params, name) for name in params.eval.extra_sets}
    for path in [eval_file, *extra_files.values()]:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `lens prepare --profile {params.profile}` first")
    summary = evaluate_policy(params, model_path, read_problems(eval_file),
                              {name: read_problems(path) for name, path in extra_files.items()})
    summary["model"] = str(model_path)
    summary["algo"] = algo
    if model_path == files.final:  # which policy the tables describe: the final one, after this many steps
        trained = json.loads(files.train_summary.read_text()) if files.train_summary.exists() else {}
        summary |= {"checkpoint": "final", "step": trained.get("step")}
    write_eval(out_path or files.eval, summary)
    return summary


def compare(params: Params) -> dict:
    """Every arm of `compare.arms` against `compare.baseline`, per level, with paired-bootstrap intervals;
    tables, plots and `dvc plots` data under <root>/compare."""
    from lens.compare import compare_arms
    from lens.compare_plots import plot_learning_curves, plot_levels
    from lens.compare_report import write_comparison, write_plot_data
    from lens.evaluate import read_eval

    evals, curves = {}, {}
    # Each seed's run lives under its own output root (`lens all run.seed=1 run.output_root=runs/seed1`);
    # compare.pool_output_roots pools their evaluations per arm (the learning curves are this root's).
    roots = [params.root] + [params.resolve_path(r) / params.profile for r in params.compare.pool_output_roots]
    for arm in params.compare.arms:
        files = RunFiles(params.algo_dir(arm))
        seeds = []
        for root in roots:
            path = RunFiles(root / arm).eval
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: run `lens evaluate --algo {arm}` for that run first")
            seeds.append(read_eval(path))
        evals[arm] = seeds if len(seeds) > 1 else seeds[0]
        if files.metrics.exists():
            curves[arm] = read_metrics(files.metrics)
    ev = params.eval
    cmp = compare_arms(evals, params.compare.baseline, bootstrap_samples=ev.bootstrap_samples,
                       confidence=ev.confidence, seed=params.run.seed)
    out_dir = params.root / "compare"
    paths = write_comparison(out_dir, cmp)
    paths["levels_png"] = plot_levels(cmp, out_dir / "accuracy_by_level.png")
    if curves:
        paths["curves_png"] = plot_learning_curves(curves, out_dir / "learning_curves.png")
    paths |= write_plot_data(out_dir, cmp, curves)
    cmp["files"] = {k: str(v) for k, v in paths.items()}
    return cmp
