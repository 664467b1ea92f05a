"""What the lens-train and lens-compare flows share: parameter types, the training session, the tasks.

The flows are recipes: every task calls `lens.stages` or public `lens.train.Trainer` methods, so the
CLI, DVC and Prefect run the same code. What lives here is orchestration only: which task runs when,
what is retried, what is logged and published.

Where the Trainer lives. A Trainer holds a model, an optimizer, a rollout engine and verifier worker
processes: nothing that can (or should) be serialised between tasks. Tasks run in the flow's process,
so the flow keeps one `TrainSession` per algorithm in the module-level registry `SESSIONS`, keyed by
(flow run id, algo); tasks receive only `algo` and the step number and look the session up. That keeps
task inputs small and readable in the Prefect UI ("generate_rollouts-lens-step-7"), and lets a retried
round find the trainer its failed attempt left behind.

Rounds and retries. A round is `train.steps_per_round` steps, run by the `train_round` task (Prefect
retries: ROUND_RETRIES). Inside it each step is three tasks, generate_rollouts -> verify_rollouts ->
update_policy, and the round ends with a `checkpoint` task (plus one every `train.checkpoint_every`
steps inside the round). If anything in a round raises, the session is marked dirty; the retry first
restores the trainer from its latest checkpoint (`Trainer.load_checkpoint`, which also drops the
metrics rows written after it), so the round resumes where the last checkpoint left it, not from
scratch, and every step appears exactly once in metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import OmegaConf
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from lens.params import DEFAULT_PARAMS_FILE, PROJECT_ROOT, Params, load_params

if TYPE_CHECKING:
    from lens.tracking import Tracker
    from lens.train import Trainer


def _profile_names() -> tuple[str, ...]:
    raw = OmegaConf.to_container(OmegaConf.load(DEFAULT_PARAMS_FILE)) if DEFAULT_PARAMS_FILE.exists() else {}
    return tuple((raw or {}).get("profiles") or {"tiny": {}})  # type: ignore[union-attr]


# Typed flow parameters: Prefect turns the Literals into JSON-schema enums, and deployments enforce their
# parameter schema, so `-p algo=foo` or `-p profile=nope` is refused before a flow run is created.
Profile = Literal[_profile_names()]  # type: ignore[valid-type]
Algo = Literal["grpo", "lens"]

ROUND_RETRIES = 2
ROUND_RETRY_DELAY_S = 2.0
HEARTBEAT_S = 30.0


def environment_overrides() -> list[str]:
    """Overrides the process environment supplies before the run's own: LENS_TRACKING_URI (set by
    infra/services.sh for the serving process, or a work pool's job variables) turns MLflow tracking on
    against that server, whatever `overrides` a run is given (they may still turn it off)."""
    uri = os.environ.get("LENS_TRACKING_URI")
    return ["tracking.enabled=true", f"tracking.tracking_uri={uri}"] if uri else []


def resolve_params(profile: str, overrides: list[str], algo: str | None = None) -> Params:
    """params.yaml + profile + environment + overrides (+ train.algo), validated; raises ParamsError
    naming the key."""
    return load_params(profile, [*environment_overrides(), *overrides, *([f"train.algo={algo}"] if algo else [])])


def dvc_ineligible(params: Params) -> str | None:
    """Why this run's outputs must not be recorded in dvc.lock (None: they may).

    dvc.lock says "these outputs follow from params.yaml": true only when the run used params.yaml's
    values, apart from keys that steer orchestration only (lens.versioning.ORCHESTRATION_ONLY_PARAMS:
    tracking.*, train.steps_per_round, ...).
    """
    from lens import versioning

    if not (PROJECT_ROOT / ".dvc").is_dir() or not versioning.dvc_available():
        return "the project is not a DVC repository (or DVC is not installed)"
    diff = versioning.params_mismatch(params, PROJECT_ROOT)
    if diff:
        shown = ", ".join(f"{k}={a!r} (params.yaml: {b!r})" for k, (a, b) in list(diff.items())[:5])
        return f"the run's parameters differ from params.yaml: {shown}{' ...' if len(diff) > 5 else ''}"
    return None


@contextmanager
def heartbeat(logger, label: str, every_s: float = HEARTBEAT_S):
    """Log "<label>: still running (N s)" every `every_s` seconds while a long, silent call runs."""
    done = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not done.wait(every_s):
            logger.info("%s: still running (%.0f s)", label, time.perf_counter() - t0)

    thread = threading.Thread(target=beat, name=f"heartbeat-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ---- the training session ------------------------------------------------------------------------


@dataclass
class TrainSession:
    params: Params
    callbacks: list
    trainer: Trainer
    needs_restore: bool = False        # an attempt failed: restore from the latest checkpoint first
    batch: Any = None                  # RolloutBatch of the step in flight
    scored: Any = None                 # ScoredBatch of the step in flight
    metrics: dict = field(default_factory=dict)
    step_started: float = 0.0
    progress_artifact: Any = None
    rounds: list[dict] = field(default_factory=list)

    def restore(self, logger) -> None:
        from lens.train import Trainer

        latest = self.trainer.latest_checkpoint()
        if latest is None:
            logger.warning("%s: no checkpoint yet: rebuilding the trainer from the starting policy",
                           self.params.train.algo)
            self.trainer.close()
            self.trainer = Trainer(self.params, resume=False, callbacks=self.callbacks)
        else:
            self.trainer.load_checkpoint(latest)  # also clears gradients a failed backward left behind
            logger.info("%s: resumed from checkpoint %s (step %d)", self.params.train.algo, latest.name,
                        self.trainer.state.step)
        self.batch = self.scored = None
        self.metrics = {}
        self.needs_restore = False


SESSIONS: dict[tuple[str, str], TrainSession] = {}


def _session_key(algo: str) -> tuple[str, str]:
    return (str(flow_run.id or "no-flow-run"), algo)


def session(algo: str) -> TrainSession:
    try:
        return SESSIONS[_session_key(algo)]
    except KeyError:
        raise RuntimeError(f"no training session for {algo!r} in this flow run: open_trainer first") from None


# ---- data and warm start -------------------------------------------------------------------------


@task(name="version_dataset", cache_policy=NO_CACHE)
def version_dataset(params: Params, dvc_record: bool) -> dict:
    """stages.prepare, the data directory's hash, and (in a DVC repo) `dvc commit` + `dvc push` of it."""
    from lens import stages, versioning

    logger = get_run_logger()
    summary = stages.prepare(params)
    digest = versioning.data_hash(params.data_dir)
    splits = {s: v["problems"] for s, v in summary["splits"].items()}
    logger.info("dataset %s: %s, hash %s", params.data_dir, splits, digest)
    dvc: dict[str, Any] = {"recorded": False}
    if dvc_record:
        try:
            versioning.dvc_commit(["prepare"], PROJECT_ROOT, params=params)
            versioning.dvc_push(["prepare"], PROJECT_ROOT)
            dvc = {"recorded": True, "pushed": True}
            logger.info("dataset committed to DVC and pushed to the default remote")
        except Exception as exc:  # versioning is best-effort: the run goes on, the log says why
            logger.warning("DVC commit/push of the dataset failed: %s", exc)
            dvc = {"recorded": False, "error": str(exc)}
    return {"hash": digest, "splits": splits, "dir": str(params.data_dir), "dvc": dvc}


def _warm_start_fingerprint(params: Params) -> dict:
    """Everything the warm start's output depends on (lens.warm_start reads exactly these)."""
    return {"warm_start": params.warm_start.model_dump(), "tiny": params.model.tiny.model_dump(),
            "synthetic": params.data.synthetic.model_dump(), "levels": params.data.levels,
            "seed": params.run.seed, "max_new_tokens": params.rollout.max_new_tokens}


def _warm_start_record(params: Params) -> Path:
    # Beside the warm_start/ output, not in it: the output stays byte-identical to `lens warm-start`'s.
    return params.root / ".flows" / "warm_start.json"


def warm_start_is_current(params: Params) -> str | None:
    """Why warm_start/ can be reused as it is (None: it must be built).

    Reused when it holds a model and either this flow built it with the same parameters (the record
    beside it), or the run uses params.yaml's values and `dvc status warm_start` finds the stage up to
    date (built by `dvc repro` / `lens warm-start`).
    """
    model_dir = params.warm_start_dir / "model"
    report = params.warm_start_dir / "warm_start.json"
    if not ((model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")) and report.exists()):
        return None
    record = _warm_start_record(params)
    if record.exists():
        try:
            saved = json.loads(record.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("fingerprint") == _warm_start_fingerprint(params) and saved.get("report") == report.read_text():
            return "built by a flow run with these parameters"
    if dvc_ineligible(params) is None:
        from lens import versioning

        proc = versioning.run_dvc(["status", "warm_start", "--json"], PROJECT_ROOT, check=False)
        try:
            if proc.returncode == 0 and json.loads(proc.stdout or "null") == {}:
                return "dvc status: the warm_start stage is up to date"
        except json.JSONDecodeError:
            pass
    return None


@task(name="warm_start", cache_policy=NO_CACHE)
def warm_start(params: Params) -> dict:
    """stages.warm_start when the profile needs one and warm_start/ is missing or stale."""
    from lens import stages

    logger = get_run_logger()
    if params.model.source != "warm_start" or not params.warm_start.enabled:
        logger.info("warm start not needed (model.source=%s, warm_start.enabled=%s)",
                    params.model.source, params.warm_start.enabled)
        return {"skipped": True, "reason": "not needed"}
    reuse = warm_start_is_current(params)
    if reuse:
        logger.info("warm start: reusing %s (%s)", params.warm_start_dir, reuse)
        return {"skipped": True, "reason": reuse}
    logger.info("warm start: %d supervised steps of the tiny model", params.warm_start.steps)
    with heartbeat(logger, "warm start"):
        report = stages.warm_start(params)
    record = _warm_start_record(params)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"fingerprint": _warm_start_fingerprint(params),
                                  "report": (params.warm_start_dir / "warm_start.json").read_text()}))
    acc = report.get("accuracy_per_level", {})
    logger.info("warm start done in %.0f s: final loss %.3f, sampling accuracy by level %s",
                report.get("seconds", 0), report.get("final_loss") or float("nan"),
                {k: round(v, 3) for k, v in acc.items()})
    return report


# ---- training: session, steps, rounds ------------------------------------------------------------


@task(name="open_trainer", cache_policy=NO_CACHE, task_run_name="open_trainer-{algo}")
def open_trainer(params: Params, algo: str, tracker: Tracker | None = None) -> dict:
    """Build the Trainer (fresh run: it clears old checkpoints/metrics/rollouts) and register the session."""
    from lens.train import Trainer

    callbacks = [tracker.step_callback()] if tracker is not None else []
    trainer = Trainer(params, resume=False, callbacks=callbacks)
    s = TrainSession(params=params, callbacks=callbacks, trainer=trainer)
    s.progress_artifact = create_progress_artifact(
        progress=0.0, description=f"{params.profile}/{algo}: RL steps done, % of train.steps")
    SESSIONS[_session_key(algo)] = s
    get_run_logger().info(
        "%s: trainer ready: %d steps x %d prompts x G=%d, rounds of %d steps, outputs in %s",
        algo, params.train.steps, params.train.prompts_per_step, params.rollout.group_size,
        params.train.steps_per_round, params.algo_dir(algo))
    return {"algo": algo, "steps": params.train.steps, "out_dir": str(params.algo_dir(algo))}


def close_trainer(algo: str) -> None:
    s = SESSIONS.pop(_session_key(algo), None)
    if s is not None:
        s.trainer.close()


def _expect_step(s: TrainSession, step: int) -> None:
    if s.trainer.state.step + 1 != step:
        raise RuntimeError(f"asked for step {step} but the trainer has done {s.trainer.state.step} steps")


@task(name="generate_rollouts", cache_policy=NO_CACHE, task_run_name="generate_rollouts-{algo}-step-{step}")
def generate_rollouts(algo: str, step: int) -> dict:
    """Sample G completions for each of the step's prompts with the current policy."""
    s = session(algo)
    _expect_step(s, step)
    s.step_started = time.perf_counter()
    s.batch = s.trainer.rollout()
    return {"prompts": len(s.batch.problems), "samples": len(s.batch.rollouts),
            "tokens": s.batch.num_tokens, "seconds": round(s.batch.seconds, 3)}


@task(name="verify_rollouts", cache_policy=NO_CACHE, task_run_name="verify_rollouts-{algo}-step-{step}")
def verify_rollouts(algo: str, step: int) -> dict:
    """Verify every completion against its gold answer and compute the algorithm's advantages."""
    s = session(algo)
    _expect_step(s, step)
    if s.batch is None:
        raise RuntimeError(f"verify_rollouts: no rollouts for step {step}")
    s.scored = s.trainer.score(s.batch)
    s.metrics = s.trainer.step_metrics(s.scored)
    m = s.metrics
    return {"acc": m["train/acc"], "frac_groups_all_wrong": m["train/frac_groups_all_wrong"],
            "frac_samples_with_signal": m["train/frac_samples_with_signal"],
            "seconds": round(s.scored.verify_seconds, 3), "verify": s.scored.verify_stats}


@task(name="update_policy", cache_policy=NO_CACHE, task_run_name="update_policy-{algo}-step-{step}")
def update_policy(algo: str, step: int) -> dict:
    """Clipped policy-gradient updates on the scored batch; then record the step (metrics, rollouts)."""
    s = session(algo)
    _expect_step(s, step)
    if s.scored is None:
        raise RuntimeError(f"update_policy: step {step} was not verified")
    t = s.trainer
    metrics = t.complete_step(s.scored, s.metrics, s.step_started)
    s.batch = s.scored = None
    total = s.params.train.steps
    get_run_logger().info(
        "%s step %d/%d: acc %.3f | all-wrong groups %.2f | samples with signal %.2f | loss %+.4f | "
        "clip %.3f | %.1f s", algo, t.state.step, total, metrics["train/acc"],
        metrics["train/frac_groups_all_wrong"], metrics["train/frac_samples_with_signal"],
        metrics["train/loss"], metrics["train/clip_frac"], metrics["perf/step_s"])
    if s.progress_artifact is not None:
        update_progress_artifact(s.progress_artifact, progress=100.0 * t.state.step / max(total, 1))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


@task(name="checkpoint", cache_policy=NO_CACHE, task_run_name="checkpoint-{algo}-step-{step}")
def checkpoint(algo: str, step: int) -> str:
    """Save weights, optimizer, scheduler and RNG states atomically (the point a retried round resumes from)."""
    s = session(algo)
    if s.trainer.state.step != step:
        raise RuntimeError(f"checkpoint for step {step} but the trainer is at step {s.trainer.state.step}")
    latest = s.trainer.latest_checkpoint()
    path = latest if latest is not None and latest.name == f"step-{step:06d}" else s.trainer.save_checkpoint()
    get_run_logger().info("%s: checkpoint %s", algo, path)
    return str(path)


def round_rollouts(params: Params, algo: str, round_index: int, first_step: int, last_step: int) -> dict:
    """Reference the round's per-step rollout parquet files in rollouts/round-XXXX.json with per-level
    statistics (the files themselves are the trainer's; a round is read with
    `pandas.read_parquet([...files])`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rollouts_dir = params.algo_dir(algo) / "rollouts"
    # File step-N holds the rollouts of the step that started at N completed steps (metrics row N + 1).
    files = [rollouts_dir / f"step-{i:06d}.parquet" for i in range(first_step - 1, last_step)]
    files = [f for f in files if f.exists()]
    levels: dict[str, dict] = {}
    rows = 0
    for f in files:
        table = pq.read_table(f, columns=["level", "reward", "advantage"])
        rows += table.num_rows
        for level in pc.unique(table["level"]).to_pylist():
            sub = table.filter(pc.equal(table["level"], level))
            agg = levels.setdefault(str(level), {"samples": 0, "correct": 0.0, "with_signal": 0})
            agg["samples"] += sub.num_rows
            agg["correct"] += pc.sum(sub["reward"]).as_py() or 0.0
            agg["with_signal"] += pc.sum(pc.not_equal(sub["advantage"], 0.0).cast("int64")).as_py() or 0
    by_level = {lv: {"samples": a["samples"], "reward_mean": a["correct"] / a["samples"],
                     "frac_with_signal": a["with_signal"] / a["samples"]} for lv, a in sorted(levels.items())}
    manifest = {"algo": algo, "round": round_index, "steps": [first_step, last_step], "rows": rows,
                "files": [f.name for f in files], "by_level": by_level}
    path = rollouts_dir / f"round-{round_index:04d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest | {"manifest": str(path)}


@task(name="train_round", cache_policy=NO_CACHE, retries=ROUND_RETRIES, retry_delay_seconds=ROUND_RETRY_DELAY_S,
      task_run_name="train_round-{algo}-{round_index}")
def train_round(algo: str, round_index: int, num_rounds: int, first_step: int, last_step: int) -> dict:
    """Steps up to `last_step` as generate_rollouts -> verify_rollouts -> update_policy tasks, then a
    checkpoint. Retried by Prefect; a retry resumes from the latest checkpoint (see the module doc)."""
    logger = get_run_logger()
    s = session(algo)
    if s.needs_restore:
        s.restore(logger)
    try:
        t = s.trainer
        start = t.state.step + 1
        every = s.params.train.checkpoint_every
        logger.info("%s round %d/%d: steps %d-%d%s", algo, round_index, num_rounds, first_step, last_step,
                    f" (resuming at step {start})" if start != first_step else "")
        while t.state.step < last_step:
            step = t.state.step + 1
            generate_rollouts(algo, step)
            verify_rollouts(algo, step)
            update_policy(algo, step)
            if step % every == 0 and step < last_step:
                checkpoint(algo, step)
        ckpt = checkpoint(algo, last_step)
        summary = round_rollouts(s.params, algo, round_index, first_step, last_step)
    except BaseException:
        s.needs_restore = True
        raise
    acc = {lv: round(v["reward_mean"], 3) for lv, v in summary["by_level"].items()}
    logger.info("%s round %d/%d done: reward by level %s; %s", algo, round_index, num_rounds, acc, Path(ckpt).name)
    record = {"round": round_index, "last_step": last_step, "checkpoint": ckpt, "rollouts": summary["manifest"],
              "reward_by_level": acc}
    s.rounds.append(record)
    return record


def round_ends(steps: int, steps_per_round: int) -> list[int]:
    """Last step of each round: [10, 20, 30, 40] for 40 steps in rounds of 10 (the last may be short)."""
    return [min(end, steps) for end in range(steps_per_round, steps + steps_per_round, steps_per_round)] if steps else []


@task(name="save_policy", cache_policy=NO_CACHE, task_run_name="save_policy-{algo}")
def save_policy(algo: str) -> dict:
    """<algo>/final (the evaluated policy) and <algo>/train_summary.json, as `stages.train` writes them."""
    from lens.evaluate import atomic_write_text

    s = session(algo)
    t = s.trainer
    final = t.save_final()
    summary = {"algo": algo, "step": t.state.step, "done": t.state.step >= s.params.train.steps,
               "updates": t.state.updates, "skipped_updates": t.state.skipped_updates,
               "verify": t.verifier.stats.as_dict(), "final_model": str(final), "rounds": s.rounds,
               "orchestrator": "prefect", "prefect_flow_run_id": str(flow_run.id)}
    atomic_write_text(s.params.algo_dir(algo) / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    get_run_logger().info("%s: final policy saved to %s", algo, final)
    return summary


def train_algo(params: Params, tracker: Tracker | None) -> dict:
    """Open a session, run every round, save the final policy; always closes the trainer."""
    algo = params.train.algo
    open_trainer(params, algo, tracker)
    try:
        ends = round_ends(params.train.steps, params.train.steps_per_round)
        starts = [1, *(end + 1 for end in ends[:-1])]
        rounds = [train_round(algo, i, len(ends), first, last)
                  for i, (first, last) in enumerate(zip(starts, ends), start=1)]
        summary = save_policy(algo)
    finally:
        close_trainer(algo)
    return summary | {"rounds": rounds}


# ---- evaluation and publishing -------------------------------------------------------------------


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{algo}")
def evaluate(params: Params, algo: str) -> dict:
    """stages.evaluate: per-level accuracy and pass@k of <algo>/final on the eval split."""
    from lens import stages

    logger = get_run_logger()
    with heartbeat(logger, f"evaluate {algo}"):
        summary = stages.evaluate(params, algo)
    logger.info("%s eval: acc %.3f overall; by level %s", algo, summary["overall"]["acc"],
                {lv: round(b["acc"], 3) for lv, b in summary["levels"].items()})
    return summary


def eval_markdown(summary: dict, algo: str, profile: str) -> str:
    ks = [k for k in summary["overall"].get("pass@k", {})]
    conf = f"{summary['config']['confidence'] * 100:g}%"
    head = f"| level | problems | acc [{conf} CI] | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = [f"# {algo.upper()} evaluation ({profile})", "",
             f"{summary['overall']['samples_per_problem']} samples per problem; "
             f"model `{summary.get('model', '')}`.", "", head,
             "|---|---:|---:|" + "---:|" * len(ks)]
    for label, block in [*summary["levels"].items(), ("**all**", summary["overall"])]:
        lo, hi = block["acc_ci"]
        passk = " | ".join(f"{block.get('pass@k', {}).get(k, float('nan')):.3f}" for k in ks)
        lines.append(f"| {label} | {block['n_problems']} | {block['acc']:.3f} [{lo:.3f}, {hi:.3f}] | {passk} |")
    return "\n".join(lines) + "\n"


@task(name="publish_evaluation", cache_policy=NO_CACHE, task_run_name="publish_evaluation-{algo}")
def publish_evaluation(params: Params, algo: str, summary: dict, tracker: Tracker | None) -> dict:
    """The per-level table as a Prefect markdown artifact; eval metrics and the policy to MLflow."""
    md = eval_markdown(summary, algo, params.profile)
    create_markdown_artifact(markdown=md, key=f"{_key(params.profile)}-{algo}-eval",
                             description=f"{algo} per-level accuracy and pass@k ({params.profile})")
    version = None
    if tracker is not None:
        tracker.log_eval(summary)
        version = tracker.log_policy(params.algo_dir(algo) / "final", algo)
        if version:
            get_run_logger().info("%s: policy registered as %s version %s (alias %s)", algo,
                                  params.tracking.registered_model_name, version, algo)
    return {"markdown": md, "model_version": version}


def compare_table(cmp: dict) -> list[dict]:
    a, b = cmp["names"]
    rows = []
    for level, row in [*cmp["levels"].items(), ("all", cmp["overall"])]:
        rows.append({"level": level, "problems": row["n_problems"],
                     f"{a}_acc": round(row[a], 4), f"{a}_ci": [round(x, 4) for x in row[f"{a}_ci"]],
                     f"{b}_acc": round(row[b], 4), f"{b}_ci": [round(x, 4) for x in row[f"{b}_ci"]],
                     "diff": round(row["diff"], 4), "diff_ci": [round(x, 4) for x in row["diff_ci"]],
                     "p_boot": row["p_boot"], "wins": row["wins"], "ties": row["ties"], "losses": row["losses"]})
    return rows


@task(name="compare", cache_policy=NO_CACHE)
def compare(params: Params, tracker: Tracker | None) -> dict:
    """stages.compare, published as Prefect markdown + table artifacts and logged on the MLflow parent run."""
    from lens import stages
    from lens.compare import compare_markdown

    logger = get_run_logger()
    cmp = stages.compare(params)
    md = compare_markdown(cmp)
    key = _key(params.profile)
    create_markdown_artifact(markdown=md, key=f"{key}-compare", description=f"LENS vs GRPO per level ({params.profile})")
    create_table_artifact(table=compare_table(cmp), key=f"{key}-compare-levels",
                          description=f"LENS vs GRPO accuracy per level with paired-bootstrap CIs ({params.profile})")
    if tracker is not None and tracker.enabled:
        from lens.tracking import sample_rollouts

        sample = sample_rollouts(params, params.root / "compare" / "rollouts_sample.parquet")
        tracker.log_comparison(cmp, cmp["files"], sample)
    o = cmp["overall"]
    a, b = cmp["names"]
    logger.info("compare: %s %.3f vs %s %.3f, diff %+.3f [%+.3f, %+.3f]; table in %s", a, o[a], b, o[b],
                o["diff"], *o["diff_ci"], cmp["files"].get("md"))
    return cmp


def dvc_stages(params: Params, algos: tuple[str, ...] | list[str], with_compare: bool) -> list[str]:
    """dvc.yaml's stages whose outputs a flow run produced (prepare is recorded by version_dataset)."""
    stages = ["warm_start"] if params.model.source == "warm_start" and params.warm_start.enabled else []
    stages += [f"{stage}@{algo}" for algo in algos for stage in ("train", "evaluate")]
    return stages + (["compare"] if with_compare else [])


@task(name="record_in_dvc", cache_policy=NO_CACHE)
def record_in_dvc(params: Params, stage_names: list[str], reason_not: str | None) -> dict:
    """`dvc commit` the stages whose outputs this run produced, so `dvc repro` agrees (best-effort)."""
    from lens import versioning

    logger = get_run_logger()
    if reason_not:
        logger.info("outputs not recorded in DVC: %s", reason_not)
        return {"recorded": False, "reason": reason_not}
    try:
        versioning.dvc_commit(stage_names, PROJECT_ROOT, params=params)
    except Exception as exc:
        logger.warning("dvc commit %s failed: %s", " ".join(stage_names), exc)
        return {"recorded": False, "reason": str(exc)}
    logger.info("recorded in DVC (dvc commit): %s", ", ".join(stage_names))
    return {"recorded": True, "stages": stage_names}


def _key(name: str) -> str:
    """Artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def tracker_for(params: Params, run_name: str) -> Tracker:
    """The MLflow parent run of this flow run (a no-op when tracking.enabled is false); fails fast when the
    tracking server is unreachable."""
    from lens.tracking import Tracker

    return Tracker(params, run_name=run_name)


def flow_run_label(default: str) -> str:
    return str(flow_run.name or default)

