"""Evaluation: per-problem results -> accuracy, pass@k and bootstrap confidence intervals.

Model-free statistics (this section) turn per-problem sample counts into a JSON summary:

* ``acc``      mean over problems of c/n (the mean accuracy of the n samples drawn per problem);
* ``pass@k``   mean over problems of the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021,
               "Evaluating Large Language Models Trained on Code"), reported for the k <= n (the smallest
               n when problems have different n);
* ``*_ci``     percentile-bootstrap intervals over PROBLEMS: the problems are resampled with replacement
               (B resamples, one index matrix [B, P] drawn from ``numpy.random.default_rng``) and the
               metric is recomputed on each resample. They express how much the number would move with a
               different draw of problems of the same kind; they do not include the variance of training
               (seeds) - run several seeds for that.

Summary layout (``summarize``)::

    {"overall": {"n_problems", "samples_per_problem", "n_samples", "acc", "acc_ci": [lo, hi],
                 "pass@k": {"1": v, ...}, "pass@k_ci": {"1": [lo, hi], ...},
                 "greedy_acc", "greedy_acc_ci"   (only when greedy results exist)},
     "levels": {"1": {same fields}, ...},          (levels present, ascending)
     "scopes": {"levels_4_5": {same fields}},      (the paper's hard subset, when levels 4 and 5 are present)
     "metrics": {"eval/acc", "eval/acc_level_{L}", "eval/acc_levels_4_5", "eval/pass_at_{k}",
                 "eval/pass_at_{k}_levels_4_5", "eval/greedy_acc"},  (flat floats)
     "config": {"ks", "bootstrap_samples", "confidence", "seed"},
     "problems": [ProblemResult.to_dict(), ...]}

Metric names in ``metrics`` use ``pass_at_{k}`` rather than ``pass@{k}``: MLflow rejects ``@`` in metric
names. The nested ``overall``/``levels`` blocks keep the ``pass@k`` spelling.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lens.records import atomic_write_text

# Scopes beyond single levels: name -> (levels, bootstrap stream). The paper's Level 4-5 subset of MATH-500.
SCOPES = {"levels_4_5": ((4, 5), 45)}

# ---- statistics (model-free) -------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed in the numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Codex paper).
    Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    try:
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError as exc:
        raise ValueError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}") from exc
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must satisfy 0 <= c <= n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must satisfy 1 <= k <= n={n}, got {k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


@dataclass
class ProblemResult:
    """Outcome of evaluating one problem: ``correct`` of ``n`` samples were right.

    ``greedy_correct`` is 1/0 for the greedy (temperature 0) completion, None when not evaluated.
    """

    id: str
    level: int
    n: int
    correct: int
    greedy_correct: int | None = None

    def __post_init__(self) -> None:
        self.id = str(self.id)
        self.level = operator.index(self.level)
        self.n = operator.index(self.n)
        self.correct = operator.index(self.correct)
        if self.n < 1:
            raise ValueError(f"problem {self.id}: n must be >= 1, got {self.n}")
        if not 0 <= self.correct <= self.n:
            raise ValueError(f"problem {self.id}: correct must be in [0, n={self.n}], got {self.correct}")
        if self.greedy_correct is not None:
            self.greedy_correct = int(operator.index(self.greedy_correct))
            if self.greedy_correct not in (0, 1):
                raise ValueError(f"problem {self.id}: greedy_correct must be 0, 1 or None, "
                                 f"got {self.greedy_correct}")

    @property
    def acc(self) -> float:
        return self.correct / self.n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProblemResult:
        """Inverse of ``to_dict``; keys other than the fields (e.g. added later) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def bootstrap_means(values: np.ndarray, bootstrap_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``values`` [P, M] over B problem resamples -> [B, M].

    One index matrix [B, P] is drawn, so all M columns share the same resamples (pairing). The means
    are computed from per-resample counts (counts @ values / P), which needs B*P integers of memory
    rather than B*P*M floats.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    p = values.shape[0]
    if p == 0:
        raise ValueError("bootstrap over zero problems")
    b = int(bootstrap_samples)
    if b < 1:
        raise ValueError(f"bootstrap_samples must be >= 1, got {bootstrap_samples}")
    idx = rng.integers(0, p, size=(b, p))
    flat = (idx + (np.arange(b, dtype=np.int64) * p)[:, None]).ravel()
    counts = np.bincount(flat, minlength=b * p).reshape(b, p).astype(np.float64)
    return counts @ values / p


def percentile_ci(boot: np.ndarray, point: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap draws ``boot`` [B, M] at ``confidence``.

    The bounds are widened, if needed, to contain ``point`` (only matters for degenerate or rounding-level
    cases; a percentile interval of a mean practically always contains it).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    point = np.asarray(point, dtype=np.float64)
    return np.minimum(lo, point), np.maximum(hi, point)


def _scope_rng(seed: int, scope: int) -> np.random.Generator:
    """A generator per reported scope (0: overall, L: level L), so adding a level changes no other CI."""
    return np.random.default_rng([int(seed), int(scope)])


def _normalise_ks(ks: Iterable[int]) -> list[int]:
    out = sorted({operator.index(k) for k in ks})
    if any(k < 1 for k in out):
        raise ValueError(f"ks must be >= 1, got {out}")
    return out


def _scope_summary(results: Sequence[ProblemResult], ks: list[int], bootstrap_samples: int,
                   confidence: float, rng: np.random.Generator) -> dict[str, Any]:
    ns = [r.n for r in results]
    n_min = min(ns)
    ks_used = [k for k in ks if k <= n_min]
    # columns: acc, pass@k for each k in ks_used
    cols = [[r.acc for r in results]]
    cols += [[pass_at_k(r.n, r.correct, k) for r in results] for k in ks_used]
    values = np.asarray(cols, dtype=np.float64).T  # [P, M]
    point = values.mean(axis=0)
    boot = bootstrap_means(values, bootstrap_samples, rng)
    lo, hi = percentile_ci(boot, point, confidence)

    out: dict[str, Any] = {
        "n_problems": len(results),
        "samples_per_problem": n_min,
        "n_samples": int(sum(ns)),
        "acc": float(point[0]),
        "acc_ci": [float(lo[0]), float(hi[0])],
        "pass@k": {str(k): float(point[i + 1]) for i, k in enumerate(ks_used)},
        "pass@k_ci": {str(k): [float(lo[i + 1]), float(hi[i + 1])] for i, k in enumerate(ks_used)},
    }
    if max(ns) != n_min:
        out["samples_per_problem_max"] = max(ns)
    greedy = np.asarray([r.greedy_correct for r in results if r.greedy_correct is not None], dtype=np.float64)
    if greedy.size:
        g_point = greedy.mean(keepdims=True)
        g_lo, g_hi = percentile_ci(bootstrap_means(greedy, bootstrap_samples, rng), g_point, confidence)
        out["greedy_acc"] = float(g_point[0])
        out["greedy_acc_ci"] = [float(g_lo[0]), float(g_hi[0])]
        if greedy.size != len(results):
            out["greedy_n_problems"] = int(greedy.size)
    return out


def summarize(results: Sequence[ProblemResult], ks: Iterable[int] = (1, 2, 4, 8, 16),
              bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Accuracy, pass@k and bootstrap CIs, overall and per level (see the module docstring for the layout).

    Deterministic for a given ``seed``. Raises ValueError on an empty result list or duplicate ids.
    """
    results = [r if isinstance(r, ProblemResult) else ProblemResult.from_dict(r) for r in results]
    if not results:
        raise ValueError("summarize: no results")
    ids = [r.id for r in results]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"summarize: duplicate problem ids, e.g. {dupes}")
    ks_list = _normalise_ks(ks)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    overall = _scope_summary(results, ks_list, bootstrap_samples, confidence, _scope_rng(seed, 0))
    levels: dict[str, Any] = {}
    for level in sorted({r.level for r in results}):
        subset = [r for r in results if r.level == level]
        levels[str(level)] = _scope_summary(subset, ks_list, bootstrap_samples, confidence,
                                            _scope_rng(seed, level))

    scopes: dict[str, Any] = {}
    for name, (scope_levels, stream) in SCOPES.items():
        subset = [r for r in results if r.level in scope_levels]
        if {r.level for r in subset} == set(scope_levels):
            scopes[name] = _scope_summary(subset, ks_list, bootstrap_samples, confidence, _scope_rng(seed, stream))

    metrics: dict[str, float] = {"eval/acc": overall["acc"]}
    for level, block in levels.items():
        metrics[f"eval/acc_level_{level}"] = block["acc"]
    for k, v in overall["pass@k"].items():
        metrics[f"eval/pass_at_{k}"] = v
    for name, block in scopes.items():
        metrics[f"eval/acc_{name}"] = block["acc"]
        metrics |= {f"eval/pass_at_{k}_{name}": v for k, v in block["pass@k"].items()}
    if "greedy_acc" in overall:
        metrics["eval/greedy_acc"] = overall["greedy_acc"]

    return {
        "overall": overall,
        "levels": levels,
        "scopes": scopes,
        "metrics": metrics,
        "config": {"ks": ks_list, "bootstrap_samples": int(bootstrap_samples),
                   "confidence": float(confidence), "seed": int(seed)},
        "problems": [r.to_dict() for r in results],
    }


def problem_results(summary: dict[str, Any]) -> list[ProblemResult]:
    """The per-problem results stored in a summary (``summary["problems"]``)."""
    return [ProblemResult.from_dict(d) for d in summary.get("problems", [])]


def write_eval(path: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write a summary as JSON (atomically; NaN/inf raise ValueError). Returns the path."""
    return atomic_write_text(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")


def read_eval(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a summary written by ``write_eval``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---- evaluation of a policy (model-driven) -------------------------------------------------------


def evaluate_policy(params, model_path: str | Path, problems, extra_sets: dict[str, list] | None = None) -> dict:
    """Load the policy at `model_path` and evaluate it (`evaluate_engine`) on `problems`, and on each of
    `extra_sets` under "sets" (same sampling settings), with ONE engine (a vLLM start is costly)."""
    from lens.models import load_policy
    from lens.rollout import make_engine

    model, tokenizer = load_policy(params, model_path)
    engine = make_engine(params, model, tokenizer)
    try:
        summary = evaluate_engine(params, engine, tokenizer, problems)
        if extra_sets:  # the main set stays at the top level
            summary["sets"] = {name: evaluate_engine(params, engine, tokenizer, extra)
                               for name, extra in extra_sets.items()}
        return summary
    finally:
        engine.close()


def evaluate_engine(params, engine, tokenizer, problems) -> dict[str, Any]:
    """Sample `eval.samples_per_problem` completions per problem, verify them, and summarize per level.

    Uses a rollout engine (the same code path as training rollouts; during training, the trainer's own)
    with the eval section's temperature/top-p/max tokens and a fixed seed, so two policies see identical
    sampling noise streams. With `eval.greedy` it also records greedy (T=0) correctness per problem.
    """
    import time

    from lens.data import render_prompt
    from lens.rollout import SamplingConfig
    from lens.scoring import generate_verifying
    from lens.verify import Verifier

    ev = params.eval
    prompts = [render_prompt(p, tokenizer, params.model.prompt) for p in problems]
    golds = [p.answer for p in problems]
    t0 = time.perf_counter()
    with Verifier(timeout_s=params.verify.timeout_s, workers=params.verify.workers,
                  max_completion_chars=params.verify.max_completion_chars) as verifier:
        n = ev.samples_per_problem
        sampling = SamplingConfig(temperature=ev.temperature, top_p=ev.top_p,
                                  max_new_tokens=ev.max_new_tokens, seed=params.run.seed)
        overlap = params.verify.overlap
        rollouts, stream = generate_verifying(engine, verifier, prompts, golds, n, sampling, overlap)
        rewards = stream.result(rollouts).rewards
        correct = [0] * len(problems)
        for r, reward in zip(rollouts, rewards):
            correct[r.prompt_index] += int(reward)
        greedy = [None] * len(problems)
        if ev.greedy:
            greedy_rollouts, stream = generate_verifying(
                engine, verifier, prompts, golds, 1, SamplingConfig(max_new_tokens=ev.max_new_tokens, greedy=True),
                overlap)
            greedy_rewards = stream.result(greedy_rollouts).rewards
            for r, reward in zip(greedy_rollouts, greedy_rewards):
                greedy[r.prompt_index] = int(reward)
        verify_stats = verifier.stats.as_dict()
    results = [ProblemResult(id=p.id, level=p.level, n=n, correct=c, greedy_correct=g)
               for p, c, g in zip(problems, correct, greedy)]
    summary = summarize(results, ks=ev.ks, bootstrap_samples=ev.bootstrap_samples,
                        confidence=ev.confidence, seed=params.run.seed)
    summary["verify"] = verify_stats
    summary["seconds"] = time.perf_counter() - t0
    summary["sampling"] = {"temperature": ev.temperature, "top_p": ev.top_p, "max_new_tokens": ev.max_new_tokens,
                           "samples_per_problem": n}
    return summary


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat `eval/...` metrics of a summary: its "metrics" plus each scope's CI bounds
    (eval/acc_ci_low/_high, eval/acc_level_{L}_ci_low/_high), and per extra set (summary["sets"]) its
    eval/<set>/acc, eval/<set>/acc_ci_low/_high and eval/<set>/pass_at_{k}."""
    metrics = dict(summary.get("metrics", {}))
    scopes = [("", summary.get("overall"))] + [(f"_level_{lv}", b) for lv, b in (summary.get("levels") or {}).items()]
    scopes += [(f"_{name}", b) for name, b in (summary.get("scopes") or {}).items()]
    for name, block in scopes:
        if block and "acc_ci" in block:
            metrics[f"eval/acc{name}_ci_low"], metrics[f"eval/acc{name}_ci_high"] = block["acc_ci"]
    for name, extra in (summary.get("sets") or {}).items():
        overall = extra["overall"]
        metrics[f"eval/{name}/acc"] = overall["acc"]
        metrics[f"eval/{name}/acc_ci_low"], metrics[f"eval/{name}/acc_ci_high"] = overall["acc_ci"]
        metrics |= {f"eval/{name}/pass_at_{k}": v for k, v in overall["pass@k"].items()}
    return metrics


def evaluation_markdown(summary: dict[str, Any], arm: str, profile: str) -> str:
    """The per-level table of a summary: accuracy with its CI and pass@k per level and overall."""
    ks = list(summary["overall"].get("pass@k", {}))
    conf = f"{summary['config']['confidence'] * 100:g}%"
    lines = [f"# {arm.upper()} evaluation ({profile})", "",
             f"{summary['overall']['samples_per_problem']} samples per problem; model `{summary.get('model', '')}`.",
             "", f"| level | problems | acc [{conf} CI] | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---:|---:|" + "---:|" * len(ks)]
    scopes = [(name.replace("levels_", "").replace("_", "-"), b) for name, b in summary.get("scopes", {}).items()]
    for label, block in [*summary["levels"].items(), *scopes, ("**all**", summary["overall"])]:
        lo, hi = block["acc_ci"]
        passk = " | ".join(f"{block.get('pass@k', {}).get(k, float('nan')):.3f}" for k in ks)
        lines.append(f"| {label} | {block['n_problems']} | {block['acc']:.3f} [{lo:.3f}, {hi:.3f}] | {passk} |")
    return "\n".join(lines) + "\n"
