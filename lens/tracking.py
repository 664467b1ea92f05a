"""MLflow sink: one parent run per pipeline invocation, one child run per algorithm.

Callers hand it flat metrics, params, tags, artifacts and dataset records; it knows MLflow, not the
project's layout. Every call names its run (the client API, not `mlflow.start_run`): MLflow's active-run
stack is per thread and Prefect runs tasks in worker threads or other processes, so a task may log into
a run another thread opened, or a process may attach to a parent it did not create
(`Tracker(params, parent_run_id=...)`). With two algorithm runs open at once, pass `run_id=` explicitly.
While a run is open, what is logged into it goes through its background sender (lens.tracking_queue):
a store that dies mid-run costs training nothing, and what it missed is kept on disk and sent later.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lens.params import flatten
from lens.tracking_queue import Delivery, TrackingQueue, replay_directory
from lens.tracking_store import (BATCH_METRICS, MAX_DIGEST, MAX_TAG_VALUE, TrackingError, _numeric,
                                 account_delivery, check_server, deliver, finish_system_metrics, is_transient,
                                 limit_http_retries, metric_key, param_strings, redact_uri,
                                 redact_in_logs, resolve_tracking_uri, sqlite_path, start_system_metrics,
                                 without_secrets)
from lens.versioning import git_commit

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DatasetRecord:
    """One dataset a run used: `path` is a .jsonl file, `digest` its identity (cut to MLflow's 36
    characters); `tags` become the input's tags beside mlflow.data.context."""

    name: str
    path: Path
    context: Literal["training", "evaluation"]
    digest: str
    tags: Mapping[str, str] = field(default_factory=dict)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0



class Tracker:
    """The parent run (a context manager) and its child runs (`algo_run`).

    Store: `tracking.tracking_uri` (a relative SQLite path is relative to the project root), experiment
    `tracking.experiment` or `lens-<profile>`; a new experiment on SQLite keeps its artifacts in
    `mlartifacts/` beside the database, so `mlflow ui` shows them from anywhere. The constructor sets
    MLflow's process-wide tracking/registry URI and active experiment (`Model.log` places a LoggedModel
    by the fluent experiment). `tags` land on the parent and every child run.

    When `tracking.enabled` is false (or on a non-zero distributed rank) every method is a cheap no-op
    and MLflow is not imported, so callers need no `if`s. Opening a run needs the store; what is logged
    into an open run goes through its sender: never raising or waiting on the store (a record it refuses
    is kept in <dir>/tracking_rejected.jsonl, tagged lens.tracking.undelivered). Closing waits at most
    tracking.flush_timeout_s; the rest stays in <dir>/tracking_buffer.jsonl (<dir>: the arm's outputs,
    or the profile's for the parent), the run RUNNING, until the next run there or `replay_buffer` sends
    it. Outside an open run, calls go to the store now and raise (the step callback warns instead).

    Attributes: `enabled`, `tracking_uri`, `experiment_name`, `experiment_id`, `client`, `run_id` (the
    parent, once entered), `active_run_id` (the innermost open child, shared by all threads),
    `deliveries` (run id -> lens.tracking_queue.Delivery of its closed sender).
    """

    def __init__(self, params, run_name: str | None = None, parent_run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None):
        tp = params.tracking
        self.params = params
        self.enabled = bool(tp.enabled) and _is_main_process()
        self.tracking_uri = resolve_tracking_uri(tp.tracking_uri)
        self.experiment_name = tp.experiment or f"lens-{params.profile}"
        self.experiment_id: str | None = None
        self.run_name = run_name or f"{params.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_id: str | None = parent_run_id
        self._owns_parent = parent_run_id is None
        self._extra_tags = _strings(tags)
        self._children: list[str] = []
        self._senders: dict[str, TrackingQueue] = {}
        self.deliveries: dict[str, Delivery] = {}
        self._failed_logs = 0
        self._git: tuple[str | None, bool | None] | None = None
        if not self.enabled:
            return

        limit_http_retries(tp)
        if "@" in self.tracking_uri.partition("://")[2].partition("/")[0]:  # MLflow prints run URLs unredacted
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            redact_in_logs(self.tracking_uri)  # and its loggers quote the URI it was given
        self._probe()
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        import mlflow
        from mlflow import MlflowClient

        try:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            self.client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
            self.experiment_id = self._experiment(db)
            # Model.log resolves the experiment of a LoggedModel from the *fluent* state, not from run_id.
            mlflow.set_experiment(experiment_id=self.experiment_id)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow tracking store {redact_uri(self.tracking_uri)} is unusable: "
                                f"{without_secrets(str(exc), self.tracking_uri)}") from None
        if parent_run_id is not None:
            try:
                self.client.get_run(parent_run_id)  # fail now, not mid-training, on a wrong id
            except Exception as exc:
                raise TrackingError(f"no MLflow run {parent_run_id} at {redact_uri(self.tracking_uri)}: "
                                    f"{without_secrets(str(exc), self.tracking_uri)}") from None

    def _experiment(self, db: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = self.params.tracking.artifact_location
            if location:
                location = str(self.params.resolve_path(location)) if "://" not in location else location
            elif db is not None:
                location = str(db.parent / "mlartifacts")
            try:
                return self.client.create_experiment(
                    self.experiment_name, artifact_location=location,
                    tags={"lens.profile": self.params.profile})
            except MlflowException:  # another process created it meanwhile
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment_name!r} at {redact_uri(self.tracking_uri)} is deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set tracking.experiment")
        return exp.experiment_id

    @property
    def active_run_id(self) -> str | None:
        """The innermost open child run, else the parent run (None when disabled or not entered)."""
        return self._children[-1] if self._children else self.run_id

    def resolve_run(self, run_id: str | None = None) -> str:
        """The run a call given `run_id` logs into: that one, else the active run."""
        target = run_id or self.active_run_id
        if target is None:
            raise RuntimeError("no MLflow run: enter the Tracker (`with Tracker(...)`) or open algo_run() first")
        return target

    def _run_tags(self) -> dict[str, str]:
        if self._git is None:
            self._git = git_commit()
        commit, dirty = self._git
        tags = {
            "lens.profile": self.params.profile,
            "mlflow.user": _user(),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "lens",
        }
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["lens.git_commit"] = commit
            tags["lens.git_dirty"] = str(dirty).lower()
        return tags | self._extra_tags

    def _create_run(self, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={k: v[:MAX_TAG_VALUE] for k, v in tags.items()})
        return run.info.run_id

    def _redact(self, text: str) -> str:
        return without_secrets(text, self.tracking_uri)

    def _probe(self) -> None:
        check_server(self.tracking_uri, self.params.tracking.connect_timeout_s)

    def _open_sender(self, run_id: str, directory: Path) -> None:
        tp = self.params.tracking
        if run_id not in self._senders:
            self._senders[run_id] = TrackingQueue(
                lambda record: deliver(self.client, record), directory, is_transient=is_transient,
                probe=self._probe, retry_interval_s=tp.retry_interval_s, batch_limit=BATCH_METRICS,
                name=f"mlflow-{run_id[:8]}", redact=self._redact)

    def _close_sender(self, run_id: str) -> None:
        sender = self._senders.pop(run_id, None)
        if sender is not None:
            self.deliveries[run_id] = report = sender.close(self.params.tracking.flush_timeout_s)
            account_delivery(self.client, report, self.tracking_uri, self.params.tracking.flush_timeout_s)

    def send(self, record: dict) -> None:
        """A tracking record (lens.tracking_store.deliver): through its run's sender while the run is open
        (never waits on the store), else to the store now (raises on failure)."""
        sender = self._senders.get(record["run_id"])
        if sender is not None:
            sender.put(record)
        else:
            deliver(self.client, record)

    def store_answers(self, run_id: str | None = None) -> bool:
        """Whether the store takes records now: the run's sender is not buffering and a probe answers."""
        sender = self._senders.get(self.resolve_run(run_id))
        if sender is not None and sender.down:
            return False
        try:
            self._probe()
            return True
        except TrackingError:
            return False

    def _end_run(self, run_id: str, exc: BaseException | None) -> None:
        status = "FINISHED" if exc is None else ("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        # Through the run's sender: after everything logged before it, and never raising or waiting longer
        # than tracking.flush_timeout_s (a body's exception is never masked).
        self.send({"op": "end", "run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})
        self._close_sender(run_id)

    def __enter__(self) -> Tracker:
        if self.enabled and self._owns_parent:
            self.run_id = self._create_run(self.run_name, self._run_tags())
            log.info("MLflow: parent run %s (%s) in experiment %r at %s", self.run_name, self.run_id,
                     self.experiment_name, redact_uri(self.tracking_uri))
        if self.enabled and self.run_id:
            self._open_sender(self.run_id, self.params.root)
        if self.enabled and self._owns_parent:
            self.log_params({k: v for k, v in flatten(self.params).items() if k != "train.algo"}, self.run_id)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled and self.run_id:
            if self._owns_parent:
                self._end_run(self.run_id, exc)
            else:
                self._close_sender(self.run_id)

    @contextlib.contextmanager
    def algo_run(self, name: str, params=None, run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None) -> Iterator[str | None]:
        """A child run `name` (tag lens.algo) under the parent (a top-level run if the tracker was not
        entered), yielding its id.

        Logs the flattened `params` (default: the tracker's), the default tags plus `tags`, and system
        metrics while open. `run_id` re-opens an existing run (e.g. `lens evaluate` adding to the run
        `lens train` created) instead of creating one. Ends FAILED if the body raises. Its sender buffers
        in the arm's outputs, `params.algo_dir()`.
        """
        if not self.enabled:
            yield None
            return
        params = params or self.params
        reopened = run_id is not None
        self._probe()  # a server that died since the tracker opened: a clear error, not minutes of retries
        if run_id is None:
            run_tags = self._run_tags() | {"lens.algo": name} | _strings(tags)
            if self.run_id:
                run_tags["mlflow.parentRunId"] = self.run_id
            run_id = self._create_run(name, run_tags)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self._open_sender(run_id, params.algo_dir())
        if not reopened:
            self.log_params(flatten(params), run_id)
        elif tags:
            self.set_tags(tags, run_id)
        # resume: continue its system/ steps; samples go through the run's sender like every metric
        monitor = start_system_metrics(self.params.tracking, run_id, self.tracking_uri, resume=reopened,
                                       log_metrics=lambda m, step: self.log_metrics(m, step, run_id))
        self._children.append(run_id)
        exc: BaseException | None = None
        try:
            yield run_id
        except BaseException as e:
            exc = e
            raise
        finally:
            self._children.remove(run_id)
            if monitor is not None:
                finish_system_metrics(monitor, min(5.0, self.params.tracking.flush_timeout_s))
            self._end_run(run_id, exc)

    def latest_algo_run(self, algo: str) -> str | None:
        """The newest run of `algo` (tag lens.algo) in this experiment: what a separate `lens evaluate`
        process re-opens with `algo_run(algo, run_id=...)` to add to the run `lens train` created."""
        if not self.enabled:
            return None
        runs = self.client.search_runs([self.experiment_id], f"tags.`lens.algo` = '{algo}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, run_id: str | None = None) -> None:
        """Numeric entries of `metrics` at `step` (names made MLflow-valid; non-numbers skipped)."""
        if not self.enabled:
            return
        ts = int(time.time() * 1000)  # stamped now: a late or repeated delivery stores the same point once
        rows = [[metric_key(k), v, ts, int(step)] for k, raw in metrics.items() if (v := _numeric(raw)) is not None]
        if rows:
            self.send({"op": "metrics", "run_id": self.resolve_run(run_id), "metrics": rows})

    def step_callback(self, run_id: str | None = None) -> Callable[[int, dict], None]:
        """`fn(step, metrics)` for `Trainer(callbacks=[...])`: logs into `run_id` (default: the run active
        now, normally the algo_run child) in microseconds while the run is open; outside it, a store error
        warns and training goes on."""
        if not self.enabled:
            return _noop_callback
        target = self.resolve_run(run_id)

        def log_step(step: int, metrics: dict) -> None:
            try:
                self.log_metrics(metrics, step, target)
            except Exception as exc:
                self._failed_logs += 1
                if self._failed_logs in (1, 10, 100) or self._failed_logs % 1000 == 0:
                    log.warning("MLflow: step %s metrics not logged to %s (%d failures so far): %s",
                                step, redact_uri(self.tracking_uri), self._failed_logs, self._redact(str(exc)))

        return log_step

    def log_params(self, values: Mapping[str, Any], run_id: str | None = None) -> None:
        """Flat `{key: value}` params (values as strings, lists/dicts as JSON)."""
        if self.enabled and values:
            self.send({"op": "params", "run_id": self.resolve_run(run_id), "params": param_strings(values)})

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        """Run tags (values as strings, cut to MLflow's length limit)."""
        if self.enabled and tags:
            self.send({"op": "tags", "run_id": self.resolve_run(run_id),
                       "tags": {k: v[:MAX_TAG_VALUE] for k, v in _strings(tags).items()}})

    def set_description(self, markdown: str, run_id: str | None = None) -> None:
        """The run's description in the MLflow UI (tag mlflow.note.content)."""
        self.set_tags({"mlflow.note.content": markdown}, run_id)

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None, run_id: str | None = None) -> None:
        """A local file (or directory) under `artifact_dir` of the run's artifacts."""
        if self.enabled:
            self.send({"op": "artifact", "run_id": self.resolve_run(run_id), "path": str(Path(path).resolve()),
                       "artifact_dir": artifact_dir})

    def log_dict(self, obj: Any, artifact_file: str, run_id: str | None = None) -> None:
        """A JSON (or YAML, by extension) artifact at `artifact_file`."""
        if self.enabled:  # a JSON copy: what the caller changes later is not what was logged now
            self.send({"op": "dict", "run_id": self.resolve_run(run_id), "artifact_file": artifact_file,
                       "obj": json.loads(json.dumps(obj, default=str))})

    def log_table(self, df, artifact_file: str, run_id: str | None = None) -> None:
        """A pandas DataFrame as an MLflow table (`artifact_file` ends in .json), browsable in the UI."""
        if self.enabled:
            self.send({"op": "table", "run_id": self.resolve_run(run_id), "artifact_file": artifact_file,
                       "data": df.to_json(orient="split", date_format="iso")})

    def log_datasets(self, datasets: Iterable[DatasetRecord], run_id: str | None = None) -> None:
        """`log_inputs` of each record's .jsonl file: MLflow's schema and profile come from reading it."""
        if not self.enabled:
            return
        rows = []
        for record in datasets:
            path = Path(record.path)
            if not path.is_file():
                raise FileNotFoundError(f"dataset {record.name!r}: no file {path}")
            rows.append({"name": record.name, "path": str(path.resolve()), "context": record.context,
                         "digest": record.digest[:MAX_DIGEST], "tags": _strings(record.tags)})
        if rows:
            self.send({"op": "datasets", "run_id": self.resolve_run(run_id), "datasets": rows})

    def run_url(self, ui: str | None = None) -> str | None:
        """Where to look: the parent run's page (`ui` defaults to the server URI, or a local `mlflow ui`)."""
        if not self.enabled or not self.run_id:
            return None
        if ui is None:
            ui = redact_uri(self.tracking_uri) if self.tracking_uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{ui.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def _strings(values: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (values or {}).items()}


def _noop_callback(step: int, metrics: dict) -> None:
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def replay_buffer(path: str | os.PathLike[str], params) -> Delivery:
    """Send the tracking buffers runs left behind in directory `path` (or the directory of buffer file
    `path`) to params' store, in order, and tag the runs they complete (lens.tracking.replayed); what the
    store does not take stays. Raises TrackingError when the store does not answer."""
    tracker = Tracker(params)
    if not tracker.enabled:
        raise TrackingError("tracking.enabled is false: no store to replay into")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tracking buffer {path}")
    report = replay_directory(path if path.is_dir() else path.parent, lambda record: deliver(tracker.client, record),
                              is_transient=is_transient, batch_limit=BATCH_METRICS, redact=tracker._redact)
    account_delivery(tracker.client, report, tracker.tracking_uri, params.tracking.flush_timeout_s)
    return report
