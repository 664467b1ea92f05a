"""Prefect as the pipeline's runner: every phase a task, every round a retried task, results as artifacts.

lens.pipeline and lens.loop decide which phases run; this runner only decides how: a Prefect task per
phase (generate_rollouts-<arm>-step-<n>, verify_rollouts-..., update_policy-..., checkpoint-...), a task
per round retried ROUND_RETRIES times (a retry resumes from the latest checkpoint, lens.loop), the
run's logger, a heartbeat for long silent phases, and markdown / table / progress artifacts.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from lens import estimators
from lens.loop import Runner, fails_again_on_retry
from lens.params import Params, load_params, profile_names

ROUND_RETRIES = 2
ROUND_RETRY_DELAY_S = 2.0
HEARTBEAT_S = 30.0


# Typed flow parameters: Prefect turns the Literals into JSON-schema enums, and deployments enforce their
# parameter schema, so `-p algo=foo` or `-p profile=nope` is refused before a flow run is created.
Profile = Literal[profile_names()]  # type: ignore[valid-type]
Algo = Literal[estimators.names()]  # type: ignore[valid-type]


def resolve_params(profile: str, overrides: list[str], algo: str | None = None) -> Params:
    """params.yaml + profile + environment + overrides (+ train.algo), validated (ParamsError names the key).

    LENS_TRACKING_URI (set by infra/services.sh for the serving process, or a work pool's job variables)
    turns MLflow tracking on against that server, under whatever `overrides` a run is given."""
    uri = os.environ.get("LENS_TRACKING_URI")
    env = ["tracking.enabled=true", f"tracking.tracking_uri={uri}"] if uri else []
    return load_params(profile, [*env, *overrides, *([f"train.algo={algo}"] if algo else [])])


def flow_run_label(default: str) -> str:
    return str(flow_run.name or default)


def _call(fn):
    return fn()


@contextmanager
def heartbeat(logger, label: str, every_s: float = HEARTBEAT_S):
    """Log "<label>: still running (N s)" every `every_s` seconds while a long, silent call runs."""
    done, t0 = threading.Event(), time.perf_counter()

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


def _worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry condition: not for a stop that would happen again (lens.loop.fails_again_on_retry)."""
    try:
        state.result()
    except Exception as exc:
        return not fails_again_on_retry(exc)
    return True


def _key(name: str) -> str:
    """Artifact keys: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


class PrefectRunner(Runner):
    name = "prefect"

    def __init__(self):
        super().__init__(progress=False)
        self._progress: dict[str, object] = {}

    def phase(self, name, fn, *, arm, step=None):
        if arm is None:  # coarse pipeline phases: Prefect names the run "<name>-<random words>"
            return task(_call, name=name, cache_policy=NO_CACHE)(lambda: self._with_heartbeat(name, fn))
        label = f"{name}-{arm}" + (f"-step-{step}" if step is not None else "")
        if step is None:
            return task(_call, name=name, task_run_name=label, cache_policy=NO_CACHE)(
                lambda: self._with_heartbeat(label, fn))
        return task(_call, name=name, task_run_name=label, cache_policy=NO_CACHE)(fn)

    def _with_heartbeat(self, label, fn):
        with heartbeat(get_run_logger(), label):
            return fn()

    def round(self, fn, *, arm, index, total):
        return task(_call, name="train_round", task_run_name=f"train_round-{arm}-{index}", cache_policy=NO_CACHE,
                    retries=ROUND_RETRIES, retry_delay_seconds=ROUND_RETRY_DELAY_S,
                    retry_condition_fn=_worth_retrying)(fn)

    def logger(self):
        return get_run_logger()

    def step_done(self, arm, step, total, metrics):
        get_run_logger().info(
            "%s step %d/%d: acc %.3f | all-wrong groups %.2f | samples with signal %.2f | loss %+.4f | "
            "clip %.3f | %.1f s", arm, step, total, metrics["train/acc"], metrics["train/frac_groups_all_wrong"],
            metrics["train/frac_samples_with_signal"], metrics["train/loss"], metrics["train/clip_frac"],
            metrics["perf/step_s"])
        if arm not in self._progress:
            self._progress[arm] = create_progress_artifact(
                progress=0.0, description=f"{arm}: RL steps done, % of train.steps")
        update_progress_artifact(self._progress[arm], progress=100.0 * step / max(total, 1))

    def run_tags(self):
        tags = {"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}
        if flow_run.name:
            tags["prefect.flow_run_name"] = str(flow_run.name)
        if flow_run.flow_name:
            tags["prefect.flow_name"] = str(flow_run.flow_name)
        return tags

    def summary_fields(self):
        return {"prefect_flow_run_id": str(flow_run.id)}

    def published(self, kind, params, payload, arm=None):
        key = _key(params.profile)
        if kind == "evaluation":
            create_markdown_artifact(markdown=payload["markdown"], key=f"{key}-{_key(arm)}-eval",
                                     description=f"{arm} per-level accuracy and pass@k ({params.profile})")
        elif kind == "comparison":
            arms = " vs ".join(payload["comparison"]["arms"])
            create_markdown_artifact(markdown=payload["markdown"], key=f"{key}-compare",
                                     description=f"{arms} per level ({params.profile})")
            create_table_artifact(table=payload["table"], key=f"{key}-compare-levels",
                                  description=f"{arms}: accuracy per level with paired-bootstrap CIs ({params.profile})")
        elif kind == "study":
            arms = ", ".join(payload["study"]["arms"])
            create_markdown_artifact(markdown=payload["markdown"], key=f"{key}-study",
                                     description=f"study {arms} over seeds ({params.profile})")
            create_table_artifact(table=payload["table"], key=f"{key}-study-table",
                                  description=f"study {arms}: accuracy per arm with CIs over seeds ({params.profile})")
