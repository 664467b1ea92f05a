"""The one RL loop: steps in rounds, checkpoints, the final save and the run summary.

The CLI, DVC and the Prefect flows all train through `train(params, runner=...)`. The runner changes how
a phase runs, never which phases run: `Runner` calls each phase directly and draws a progress bar; the
flows' runner wraps every phase in a Prefect task (generate_rollouts / verify_rollouts / update_policy
per step, checkpoint, a retried task per round). A round that raises marks the run for restoring: the
next attempt rebuilds the trainer with `resume=True`, the same code path as `lens train --resume`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal, TypeVar

from lens.records import atomic_write_json, read_rollouts
from lens.train import Trainer

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runner:
    """How the loop and the pipeline run their phases: directly, with a progress bar (CLI, DVC)."""

    name = "cli"

    def __init__(self, progress: bool = True):
        self.progress = progress
        self._bar = None

    def phase(self, name: str, fn: Callable[[], T], *, arm: str, step: int | None = None) -> T:
        return fn()

    def round(self, fn: Callable[[], T], *, arm: str, index: int, total: int) -> T:
        return fn()

    def logger(self) -> logging.Logger | logging.LoggerAdapter:
        return log

    def step_done(self, arm: str, step: int, total: int, metrics: dict) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=step - 1, desc=f"{arm} train", unit="step")
        self._bar.update(1)
        self._bar.set_postfix(acc=f"{metrics['train/acc']:.3f}", all_wrong=f"{metrics['train/frac_groups_all_wrong']:.2f}")
        if step >= total:
            self._bar.close()
            self._bar = None

    def run_tags(self) -> dict[str, str]:
        """Tags naming the orchestrator's run, for the tracker (e.g. the Prefect flow-run id)."""
        return {}

    def summary_fields(self) -> dict[str, Any]:
        """What the orchestrator adds to train_summary.json (e.g. its run id)."""
        return {}

    def published(self, kind: str, params, payload: dict, arm: str | None = None) -> None:
        """A result the pipeline produced, with its renderings: kind "evaluation" ({"summary", "markdown"})
        or "comparison" ({"comparison", "markdown", "table"}); flows publish them as artifacts."""


def fails_again_on_retry(exc: BaseException) -> bool:
    """A failure a retried round would meet again: the data or the configuration, not a passing fault."""
    from lens.checkpoint import CheckpointError
    from lens.params import ParamsError
    from lens.records import RunInUseError
    from lens.reward_health import RewardHealthError
    from lens.train import NonFiniteLossError

    return isinstance(exc, (RewardHealthError, NonFiniteLossError, ParamsError, CheckpointError, RunInUseError))


def round_ends(steps: int, steps_per_round: int) -> list[int]:
    """Last step of each round: [10, 20, 30, 40] for 40 steps in rounds of 10 (the last may be short)."""
    return [min(end, steps) for end in range(steps_per_round, steps + steps_per_round, steps_per_round)] if steps else []


def plan_rounds(done: int, target: int, steps: int, steps_per_round: int) -> list[tuple[int, int, int]]:
    """(round index, first step, last step) of the rounds still to run to reach `target` steps from `done`."""
    ends = round_ends(steps, steps_per_round)
    plan = []
    for index, end in enumerate(ends, start=1):
        first = ends[index - 2] + 1 if index > 1 else 1
        lo, hi = max(first, done + 1), min(end, target)
        if lo <= hi:
            plan.append((index, lo, hi))
    return plan


class TrainingRun:
    """One arm's training run: owns the Trainer, runs rounds through the runner, writes the summary."""

    def __init__(self, params, *, resume: bool | Literal["auto"] = False, runner: Runner | None = None, callbacks: Iterable = ()):
        self.params, self.runner, self.callbacks = params, runner or Runner(), list(callbacks)
        self.arm = params.train.algo
        self.started = time.perf_counter()
        self.rounds: list[dict] = []
        self.last_metrics: dict = {}
        self.needs_restore = False
        self.trainer = self.runner.phase("open_trainer", partial(self._new_trainer, resume), arm=self.arm)
        if self.trainer.state.step:
            self.runner.logger().info("%s: resuming at step %d from %s", self.arm, self.trainer.state.step + 1,
                                      self.trainer.latest_checkpoint())

    def _new_trainer(self, resume: bool | Literal["auto"]) -> Trainer:
        return Trainer(self.params, resume=resume, callbacks=self.callbacks)

    def run(self, max_steps: int | None = None) -> dict:
        """Run until train.steps (or `max_steps` more), then save the final policy and the summary."""
        tp = self.params.train
        target = tp.steps if max_steps is None else min(tp.steps, self.trainer.state.step + max_steps)
        total = len(round_ends(tp.steps, tp.steps_per_round))
        for index, first, last in plan_rounds(self.trainer.state.step, target, tp.steps, tp.steps_per_round):
            body = partial(self._round, index, total, first, last)
            self.rounds.append(self.runner.round(body, arm=self.arm, index=index, total=total))
        return self.finish()

    def _round(self, index: int, total: int, first: int, last: int) -> dict:
        logger = self.runner.logger()
        if self.needs_restore:
            self._restore(logger)
        t, every = self.trainer, self.params.train.checkpoint_every
        start = t.state.step + 1
        logger.info("%s round %d/%d: steps %d-%d%s", self.arm, index, total, first, last,
                    f" (resuming at step {start})" if start != first else "")
        try:
            while t.state.step < last:
                step = t.state.step + 1
                self.last_metrics = t.train_step(partial(self.runner.phase, arm=self.arm, step=step))
                if t.accelerator.is_main_process:
                    self.runner.step_done(self.arm, t.state.step, self.params.train.steps, self.last_metrics)
                if step % every == 0 and step < last:
                    self._checkpoint(step)
                if self._evaluate_at(step):
                    self.runner.phase("evaluate_policy", self._evaluate_now, arm=self.arm, step=step)
            checkpoint = self._checkpoint(last)
            by_level = self._round_manifest(index, first, last) if t.accelerator.is_main_process else {}
        except BaseException:
            self.needs_restore = True
            raise
        reward = {lv: round(v["reward_mean"], 3) for lv, v in by_level.items()}
        logger.info("%s round %d/%d done: reward by level %s; %s", self.arm, index, total, reward, checkpoint.name)
        return {"round": index, "last_step": last, "checkpoint": str(checkpoint),
                "rollouts": str(t.files.round_manifest(index)), "reward_by_level": reward}

    def _evaluate_at(self, step: int) -> bool:
        """eval.every_steps: the paper's curves; the final policy is the evaluate stage's."""
        every = self.params.eval.every_steps
        return bool(every) and step % every == 0 and step < self.params.train.steps

    def _evaluate_now(self) -> dict | None:
        """The live policy on the eval split with the trainer's own engine (main process; the others wait):
        <arm>/evals/step-NNNNNN.json, and its eval/... metrics to the callbacks at this step."""
        from lens.data import read_problems
        from lens.evaluate import eval_metrics, evaluate_engine, write_eval

        t, summary = self.trainer, None
        if t.accelerator.is_main_process:
            problems = read_problems(self.params.data_dir / "eval.jsonl")
            summary = evaluate_engine(self.params, t.engine, t.tokenizer, problems)
            summary |= {"step": t.state.step, "checkpoint": f"step-{t.state.step:06d}"}
            write_eval(t.files.eval_at(t.state.step), summary)
            for cb in self.callbacks:
                cb(t.state.step, eval_metrics(summary))
        t.accelerator.wait_for_everyone()
        return summary

    def _checkpoint(self, step: int):
        latest = self.trainer.latest_checkpoint()
        if latest is not None and latest.name == f"step-{step:06d}":  # a retried round already saved it
            return latest
        return self.runner.phase("checkpoint", self.trainer.save_checkpoint, arm=self.arm, step=step)

    def _restore(self, logger) -> None:
        """After a failed attempt: a new Trainer with resume=True, exactly what `lens train --resume` does."""
        self.trainer.close()
        self.trainer = self._new_trainer(resume=True)
        self.needs_restore = False
        logger.info("%s: restored at step %d (%s)", self.arm, self.trainer.state.step,
                    self.trainer.latest_checkpoint() or "no checkpoint yet: from the starting policy")

    def _round_manifest(self, index: int, first: int, last: int) -> dict:
        """rollouts/round-NNNN.json: the round's rollout files with per-level reward and signal."""
        files = self.trainer.files
        # File step-N holds the rollouts of the step that started at N completed steps (metrics row N + 1).
        paths = [p for p in (files.rollout_file(i) for i in range(first - 1, last)) if p.exists()]
        df = read_rollouts(paths, ["level", "reward", "advantage"])
        by_level = {str(level): {"samples": len(g), "reward_mean": float(g["reward"].mean()),
                                 "frac_with_signal": float((g["advantage"] != 0).mean())}
                    for level, g in sorted(df.groupby("level"), key=lambda kv: str(kv[0]))}
        atomic_write_json(files.round_manifest(index), {
            "algo": self.arm, "round": index, "steps": [first, last], "rows": len(df),
            "files": [p.name for p in paths], "by_level": by_level})
        return by_level

    def finish(self) -> dict:
        t = self.trainer
        done = t.state.step >= self.params.train.steps
        summary = {"algo": self.arm, "step": t.state.step, "done": done, "updates": t.state.updates,
                   "skipped_updates": t.state.skipped_updates, "seconds": time.perf_counter() - self.started,
                   "pid": os.getpid(),
                   "last_metrics": self.last_metrics, "rounds": self.rounds, "orchestrator": self.runner.name,
                   "distributed": {"type": t.accelerator.distributed_type.value, "processes": t.world},
                   "verify": t.verifier.stats.as_dict()} | self.runner.summary_fields()
        if done:
            summary["final_model"] = str(self.runner.phase("save_policy", t.save_final, arm=self.arm))
            self.runner.logger().info("%s: final policy saved to %s", self.arm, summary["final_model"])
        if t.accelerator.is_main_process:
            atomic_write_json(t.files.train_summary, summary, sort_keys=True, default=str)
        return summary

    def close(self) -> None:
        self.trainer.close()


def train(params, *, resume: bool | Literal["auto"] = False, max_steps: int | None = None, runner: Runner | None = None,
          callbacks: Iterable = ()) -> dict:
    """RL-train `train.algo` to train.steps (or `max_steps` more); returns the run summary."""
    run = TrainingRun(params, resume=resume, runner=runner, callbacks=callbacks)
    try:
        return run.run(max_steps)
    finally:
        run.close()
