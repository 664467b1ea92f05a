"""MLflow tracking: one parent run per pipeline invocation, one child run per algorithm.

    with Tracker(params, run_name="compare-tiny") as tracker:            # parent run
        for algo in ("grpo", "lens"):
            p = load_params(..., [f"train.algo={algo}"])
            with tracker.algo_run(algo, p):                                # child run named `algo`
                tracker.log_dataset(p, p.data_dir)                          # dataset lineage
                stages.train(p, callbacks=[tracker.step_callback()])        # per-step train/... perf/...
                tracker.log_eval(stages.evaluate(p, algo))                  # eval/acc_level_{L} + eval.json
                tracker.log_policy(p.algo_dir(algo) / "final", algo)        # lens-policy@<algo>
        tracker.log_comparison(cmp, files, rollouts_sample)                 # on the parent

Both child runs log the same metric keys (the trainer's and the evaluator's), so MLflow's compare view
lines GRPO and LENS up key by key.

Why the client API with explicit run ids rather than `mlflow.start_run`: MLflow's active-run stack is
per thread, and Prefect runs tasks in worker threads (or other processes). Every call here names its run,
so a task can log into a run another thread opened, or a process can attach to a parent it did not
create (`Tracker(params, parent_run_id=...)`). The open child (`active_run_id`) is shared by all threads,
not thread-local, for the same reason; with two algorithm runs open at once, pass `run_id=` explicitly
(every logging method takes it). Side effect: the constructor sets MLflow's process-wide tracking and
registry URI and active experiment (`Model.log` places a LoggedModel by the fluent experiment).

When `tracking.enabled` is false (or on a non-zero distributed rank) every method is a cheap no-op and
MLflow is not even imported, so callers need no `if`s. Logging calls made during training (the step
callback) warn and carry on if the store hiccups: losing a metric point is better than losing a run.
Everything else raises.

The store: `tracking.tracking_uri` (default `sqlite:///mlflow.db`; a relative SQLite path is relative to
the project root), experiment `tracking.experiment` or `lens-<profile>`. New experiments on a SQLite
store keep their artifacts in `mlartifacts/` next to the database (not in the current directory, which
is where MLflow would put them), so `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows them from
anywhere. An http(s) server is probed with a short timeout before anything else happens.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lens.params import PROJECT_ROOT, flatten

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000      # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (MLflow 3)
MAX_TAG_VALUE = 8000        # MAX_TAG_VAL_LENGTH
MAX_KEY = 250               # MAX_ENTITY_KEY_LENGTH
MAX_DIGEST = 36             # MAX_DATASET_DIGEST_SIZE: a DVC directory hash "<md5>.dir" fits exactly
BATCH_PARAMS = 100          # MAX_PARAMS_TAGS_PER_BATCH
BATCH_METRICS = 1000        # MAX_METRICS_PER_BATCH
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unusable URI, deleted experiment)."""


# ---- small pure helpers -------------------------------------------------------------------------


def resolve_tracking_uri(uri: str) -> str:
    """`sqlite:///relative.db` -> `sqlite:////<project root>/relative.db`; anything else unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        rest = uri[len(prefix):]
        path, sep, query = rest.partition("?")
        if path and not path.startswith("/") and path != ":memory:":
            return f"{prefix}{(PROJECT_ROOT / path).resolve()}{sep}{query}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an (absolute) SQLite URI, else None."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):].partition("?")[0]
        if path and path != ":memory:":
            return Path(path)
    return None


def check_server(uri: str, timeout_s: float) -> None:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer.

    Any HTTP answer (even 401/404) counts as reachable; only a refused/timed-out connection fails. MLflow's
    own REST client would retry with back-off for minutes instead.
    """
    if not uri.startswith(("http://", "https://")):
        return
    context = None
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        import ssl

        context = ssl._create_unverified_context()  # the user asked MLflow to skip verification too
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s, context=context):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, point "
            f"tracking.tracking_uri elsewhere, or set tracking.enabled=false") from exc


def metric_key(name: str) -> str:
    """An MLflow-valid metric name: '@' -> '_at_', other characters MLflow rejects -> '_'."""
    return _INVALID_NAME_CHARS.sub("_", str(name).replace("@", "_at_"))[:MAX_KEY]


def param_dict(params) -> dict[str, str]:
    """Flattened params as MLflow param strings (values truncated to MLflow's length limit)."""
    out = {}
    for key, value in flatten(params).items():
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        out[metric_key(key)] = text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."
    return out


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it), or (None, None) outside a git repo."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def prefect_flow_run() -> dict[str, str]:
    """Tags naming the Prefect flow run this code runs in ({} outside one).

    What `prefect.runtime.flow_run.id` answers, read from the run contexts directly so that nothing calls
    the Prefect API; imports nothing new (inside a flow Prefect is already imported); a deployment's
    process also has PREFECT__FLOW_RUN_ID.
    """
    tags: dict[str, str] = {}
    if "prefect" in sys.modules:
        try:
            from prefect.context import FlowRunContext, TaskRunContext

            flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
            if flow_ctx is not None and flow_ctx.flow_run is not None:
                tags["prefect.flow_run_id"] = str(flow_ctx.flow_run.id)
                tags["prefect.flow_run_name"] = str(flow_ctx.flow_run.name)
                if flow_ctx.flow is not None:
                    tags["prefect.flow_name"] = str(flow_ctx.flow.name)
            elif task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
                tags["prefect.flow_run_id"] = str(task_ctx.task_run.flow_run_id)
        except Exception as exc:  # Prefect internals moved: the tag is not worth failing a run for
            log.debug("no Prefect flow-run context: %s", exc)
    if "prefect.flow_run_id" not in tags and os.environ.get("PREFECT__FLOW_RUN_ID"):
        tags["prefect.flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    return tags


def file_sha256(*paths: Path) -> str:
    """sha256 over the files' bytes, in the given order (the dataset digest without DVC)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def dvc_out_hash(path: str | Path, lock_file: str | Path | None = None) -> str | None:
    """The hash dvc.lock records for the output `path` (e.g. "<md5>.dir" for data/), or None.

    dvc.lock says what `dvc repro`/`dvc commit` last recorded: pass this to `log_dataset` right after
    the stage that wrote `path` ran (or was committed), not after editing the files by hand.
    """
    import yaml

    lock_file = Path(lock_file) if lock_file else PROJECT_ROOT / "dvc.lock"
    if not lock_file.exists():
        return None
    target = Path(path).resolve()
    lock = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            out_path = Path(out.get("path", ""))
            if not out_path.is_absolute():
                out_path = lock_file.parent / out_path
            if out_path.resolve() == target:
                # DVC 3 writes `hash: md5` (the algorithm) beside `md5: <value>`
                return out.get("md5") or out.get("etag") or out.get("checksum")
    return None


def sample_rollouts(params, out_path: str | Path, algos=("grpo", "lens"), rows_per_algo: int | None = None,
                    last_steps: int = 3) -> Path | None:
    """A parquet sample of what each algorithm's policy wrote in its last `last_steps` steps.

    Reads <algo>/rollouts/step-*.parquet (the trainer's), keeps up to `rows_per_algo`
    (default tracking.rollout_sample_rows) rows per algorithm, adds an `algo` column. None if no rollouts.
    """
    import pandas as pd

    rows_per_algo = rows_per_algo or params.tracking.rollout_sample_rows
    frames = []
    for algo in algos:
        files = sorted((params.algo_dir(algo) / "rollouts").glob("step-*.parquet"))[-last_steps:]
        if not files:
            continue
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        if len(df) > rows_per_algo:
            df = df.sample(n=rows_per_algo, random_state=params.run.seed).sort_index()
        frames.append(df.assign(algo=algo))
    if not frames:
        return None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
    os.replace(tmp, out_path)
    return out_path


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


# ---- the tracker --------------------------------------------------------------------------------


class Tracker:
    """See the module docstring. Attributes: `enabled`, `tracking_uri`, `experiment_name`,
    `experiment_id`, `run_id` (the parent, once entered), `active_run_id` (innermost open child)."""

    def __init__(self, params, run_name: str | None = None, parent_run_id: str | None = None,
                 tags: dict | None = None):
        tp = params.tracking
        self.params = params
        self.enabled = bool(tp.enabled) and _is_main_process()
        self.tracking_uri = resolve_tracking_uri(tp.tracking_uri)
        self.experiment_name = tp.experiment or f"lens-{params.profile}"
        self.experiment_id: str | None = None
        self.run_name = run_name or f"{params.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_id: str | None = parent_run_id
        self._owns_parent = parent_run_id is None
        self._extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._children: list[str] = []
        self._failed_logs = 0
        self._git: tuple[str | None, bool | None] | None = None
        if not self.enabled:
            return

        check_server(self.tracking_uri, tp.connect_timeout_s)
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
            raise TrackingError(f"MLflow tracking store {self.tracking_uri} is unusable: {exc}") from exc
        if parent_run_id is not None:
            try:
                self.client.get_run(parent_run_id)  # fail now, not mid-training, on a wrong id
            except Exception as exc:
                raise TrackingError(f"no MLflow run {parent_run_id} at {self.tracking_uri}: {exc}") from exc

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
                f"MLflow experiment {self.experiment_name!r} at {self.tracking_uri} is deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set tracking.experiment")
        return exp.experiment_id

    # ---- runs -----------------------------------------------------------------------------------
    @property
    def active_run_id(self) -> str | None:
        """The innermost open child run, else the parent run (None when disabled or not entered)."""
        return self._children[-1] if self._children else self.run_id

    def _run_tags(self, algo: str | None = None) -> dict[str, str]:
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
        tags |= prefect_flow_run()
        if algo:
            tags["lens.algo"] = algo
        return tags | self._extra_tags

    def _create_run(self, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={k: v[:MAX_TAG_VALUE] for k, v in tags.items()})
        return run.info.run_id

    def _end_run(self, run_id: str, exc: BaseException | None) -> None:
        status = "FINISHED" if exc is None else ("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        try:
            self.client.set_terminated(run_id, status)
        except Exception as end_exc:  # never mask the body's exception
            if exc is None:
                raise
            log.error("could not mark MLflow run %s %s: %s", run_id, status, end_exc)

    def __enter__(self) -> Tracker:
        if self.enabled and self._owns_parent:
            self.run_id = self._create_run(self.run_name, self._run_tags())
            self._log_params(self.run_id, {k: v for k, v in param_dict(self.params).items() if k != "train.algo"})
            log.info("MLflow: parent run %s (%s) in experiment %r at %s", self.run_name, self.run_id,
                     self.experiment_name, self.tracking_uri)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled and self._owns_parent and self.run_id:
            self._end_run(self.run_id, exc)

    @contextlib.contextmanager
    def algo_run(self, algo: str, params=None, run_id: str | None = None) -> Iterator[str | None]:
        """A child run named `algo` under the parent (a top-level run if the tracker was not entered).

        Logs the flattened `params` (default: the tracker's), tags (profile, algo, git commit, Prefect flow
        run) and system metrics while open. `run_id` re-opens an existing run (e.g. `lens evaluate` adding
        to the run `lens train` created) instead of creating one. Ends FAILED if the body raises.
        """
        if not self.enabled:
            yield None
            return
        params = params or self.params
        reopened = run_id is not None
        if run_id is None:
            tags = self._run_tags(algo)
            if self.run_id:
                tags["mlflow.parentRunId"] = self.run_id
            run_id = self._create_run(algo, tags)
            self._log_params(run_id, param_dict(params))
        else:
            self.client.update_run(run_id, status="RUNNING")
        monitor = self._start_system_metrics(run_id, resume=reopened)  # resume: continue its system/ steps
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
                _finish_system_metrics(monitor)
            self._end_run(run_id, exc)

    def latest_algo_run(self, algo: str) -> str | None:
        """The newest run of `algo` (tag lens.algo) in this experiment: what a separate `lens evaluate`
        process re-opens with `algo_run(algo, run_id=...)` to add to the run `lens train` created."""
        if not self.enabled:
            return None
        runs = self.client.search_runs([self.experiment_id], f"tags.`lens.algo` = '{algo}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _start_system_metrics(self, run_id: str, resume: bool = False):
        tp = self.params.tracking
        if not tp.system_metrics:
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=tp.system_metrics_interval_s,
                                           resume_logging=resume, tracking_uri=self.tracking_uri)
            monitor.start()
            return monitor
        except Exception as exc:  # psutil missing, etc.: metrics are a nice-to-have
            log.warning("system metrics not logged: %s", exc)
            return None

    # ---- logging primitives ---------------------------------------------------------------------
    def _target(self, run_id: str | None) -> str:
        target = run_id or self.active_run_id
        if target is None:
            raise RuntimeError("no MLflow run: enter the Tracker (`with Tracker(...)`) or open algo_run() first")
        return target

    def _log_params(self, run_id: str, values: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + BATCH_PARAMS])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> int:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(metric_key(k), v, ts, int(step))
                 for k, raw in metrics.items() if (v := _numeric(raw)) is not None]
        for i in range(0, len(items), BATCH_METRICS):
            self.client.log_batch(run_id, metrics=items[i:i + BATCH_METRICS])
        return len(items)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, run_id: str | None = None) -> None:
        """Numeric entries of `metrics` at `step` (names made MLflow-valid; non-numbers skipped)."""
        if self.enabled:
            self._log_metrics(self._target(run_id), metrics, step)

    def step_callback(self, run_id: str | None = None) -> Callable[[int, dict], None]:
        """`fn(step, metrics)` for `Trainer(callbacks=[...])`: logs into `run_id` (default: the run active
        now, normally the algo_run child). A store error warns and training goes on."""
        if not self.enabled:
            return _noop_callback
        target = self._target(run_id)

        def log_step(step: int, metrics: dict) -> None:
            try:
                self._log_metrics(target, metrics, step)
            except Exception as exc:
                self._failed_logs += 1
                if self._failed_logs in (1, 10, 100) or self._failed_logs % 1000 == 0:
                    log.warning("MLflow: step %s metrics not logged to %s (%d failures so far): %s",
                                step, self.tracking_uri, self._failed_logs, exc)

        return log_step

    # ---- lineage, evaluation, model, comparison -------------------------------------------------
    def log_dataset(self, params, data_dir: str | Path, dvc_hash: str | None = None,
                    run_id: str | None = None) -> dict[str, str]:
        """`mlflow.log_input` of the prepared train/eval data (contexts "training"/"evaluation").

        Digest: the DVC hash when given (the data directory's, shared by both splits), else the sha256
        of each split's file (first 32 hex digits; MLflow caps digests at 36 characters). Full hashes go
        to input tags and run tags (`lens.data.<split>.sha256`, `lens.data.dvc_hash`). Returns
        {split: digest}.
        """
        if not self.enabled:
            return {}
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        target = self._target(run_id)
        data_dir = Path(data_dir)
        inputs, digests, run_tags = [], {}, {}
        if dvc_hash:
            run_tags["lens.data.dvc_hash"] = dvc_hash
        for split, context in (("train", "training"), ("eval", "evaluation")):
            path = data_dir / f"{split}.jsonl"
            if not path.exists():
                continue
            sha = file_sha256(path)
            digest = (dvc_hash or sha[:32])[:MAX_DIGEST]
            df = pd.read_json(path, lines=True, dtype=False)
            tags = [InputTag("mlflow.data.context", context), InputTag("lens.sha256", sha)]
            if dvc_hash:
                tags.append(InputTag("lens.dvc_hash", dvc_hash))
            with warnings.catch_warnings():  # MLflow registers its local source twice; int-schema hint
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_pandas(df, source=str(path.resolve()), name=f"{params.profile}-{split}",
                                             digest=digest)
                inputs.append(DatasetInput(ds._to_mlflow_entity(), tags))
            digests[split] = digest
            run_tags[f"lens.data.{split}.sha256"] = sha
        if not inputs:
            raise FileNotFoundError(f"no train.jsonl / eval.jsonl under {data_dir}: run `lens prepare` first")
        self.client.log_inputs(target, datasets=inputs)
        for key, value in run_tags.items():
            self.client.set_tag(target, key, value)
        report = data_dir / "report.json"
        if report.exists():
            self.client.log_artifact(target, str(report), "data")
        return digests

    def log_eval(self, summary: dict, step: int | None = None, run_id: str | None = None) -> None:
        """summary['metrics'] (eval/acc, eval/acc_level_{L}, eval/pass_at_{k}, ...) plus per-level CI
        bounds (eval/acc_level_{L}_ci_low/_ci_high) at `step` (default train.steps), and the evaluation
        JSON as artifact eval/eval.json."""
        if not self.enabled:
            return
        target = self._target(run_id)
        metrics = dict(summary.get("metrics", {}))
        for name, block in [("", summary.get("overall"))] + [
                (f"_level_{lv}", b) for lv, b in (summary.get("levels") or {}).items()]:
            if block and "acc_ci" in block:
                metrics[f"eval/acc{name}_ci_low"], metrics[f"eval/acc{name}_ci_high"] = block["acc_ci"]
        self._log_metrics(target, metrics, self.params.train.steps if step is None else step)
        self.client.log_dict(target, summary, "eval/eval.json")

    def log_policy(self, model_dir: str | Path, algo: str, run_id: str | None = None) -> str | None:
        """The final policy as an MLflow model in the algo run, registered as `lens-policy`.

        Flavor: `mlflow.transformers` from the model directory (task text-generation, explicit
        pip_requirements, the profile's plain prompt template unless chat templates are used); if that
        flavor refuses the model, a `mlflow.pyfunc` model carrying the directory as an artifact (its
        predict generates with transformers). Registry: a new version of
        `tracking.registered_model_name` with aliases `<algo>` and `<profile>-<algo>` (registry aliases,
        not the deprecated stages). Returns the version, or None when tracking.log_model is off (and
        no version is registered when tracking.register_model is off).
        """
        tp = self.params.tracking
        if not self.enabled or not tp.log_model:
            return None
        import mlflow

        target = self._target(run_id)
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
        tags = {"lens.algo": algo, "lens.profile": self.params.profile}
        try:
            info = self._log_transformers(model_dir, target, tags)
            flavor = "transformers"
        except Exception as exc:
            log.warning("mlflow.transformers could not log %s (%s); logging a pyfunc model instead", model_dir, exc)
            info = self._log_pyfunc(model_dir, target, tags)
            flavor = "pyfunc"
        self.client.set_tag(target, "lens.model_flavor", flavor)
        self.client.set_tag(target, "lens.model_uri", info.model_uri)
        if not tp.register_model:
            return None
        name = tp.registered_model_name
        version = mlflow.register_model(info.model_uri, name, await_registration_for=60,
                                        tags=tags | {"lens.run_id": target})
        for alias in (algo, f"{self.params.profile}-{algo}"):
            self.client.set_registered_model_alias(name, metric_key(alias).replace("/", "-"), version.version)
        self.client.set_tag(target, "lens.model_version", str(version.version))
        return str(version.version)

    def _pip_requirements(self) -> list[str]:
        import mlflow
        import safetensors
        import tokenizers
        import torch
        import transformers

        return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}", f"tokenizers=={tokenizers.__version__}",
                f"safetensors=={safetensors.__version__}"]

    def _log_transformers(self, model_dir: Path, run_id: str, tags: dict):
        import mlflow.transformers
        from lens.data import PLAIN_TEMPLATE

        template = None if self.params.model.chat_template else PLAIN_TEMPLATE.replace("{problem}", "{prompt}")
        quiet = logging.getLogger("mlflow.transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "model card not on the hub" / "no license": true of every local model
        try:
            return mlflow.transformers.log_model(
                str(model_dir), name="policy", task="text-generation", run_id=run_id,
                pip_requirements=self._pip_requirements(), prompt_template=template, tags=tags)
        finally:
            quiet.setLevel(level)

    def _log_pyfunc(self, model_dir: Path, run_id: str, tags: dict):
        import mlflow.pyfunc
        from mlflow.models import Model

        # Model.log, not mlflow.pyfunc.log_model: only the former takes run_id (no fluent active run).
        return Model.log(
            artifact_path=None, name="policy", flavor=mlflow.pyfunc, flavor_name="pyfunc.CustomPythonModel",
            python_model=_policy_pyfunc(self.params.eval.max_new_tokens),
            artifacts={"model_dir": str(model_dir)}, pip_requirements=self._pip_requirements(),
            run_id=run_id, tags=tags)

    def log_comparison(self, cmp: dict, files: Mapping[str, str | Path],
                       rollouts_sample: str | Path | None = None, run_id: str | None = None) -> None:
        """On the parent run (or `run_id`): compare.{md,csv,json} and the plots under compare/, the
        rollouts sample under rollouts/ (also as an MLflow table, rollouts/sample.json), metrics
        compare/{diff_acc,p_boot,<a>_acc,<b>_acc}[_level_{L}] (+ diff CI bounds, compare/diff_pass_at_{k},
        compare/diff_greedy_acc), and the markdown table as the run's description."""
        if not self.enabled:
            return
        target = run_id or self.run_id or self._target(None)
        a, b = cmp["names"]
        metrics: dict[str, float] = {}

        def add(suffix: str, row: dict) -> None:
            metrics[f"compare/diff_acc{suffix}"] = row["diff"]
            metrics[f"compare/diff_acc{suffix}_ci_low"], metrics[f"compare/diff_acc{suffix}_ci_high"] = row["diff_ci"]
            metrics[f"compare/p_boot{suffix}"] = row["p_boot"]
            metrics[f"compare/sign_test_p{suffix}"] = row["sign_test_p"]
            metrics[f"compare/{a}_acc{suffix}"], metrics[f"compare/{b}_acc{suffix}"] = row[a], row[b]

        add("", cmp["overall"])
        for level, row in cmp.get("levels", {}).items():
            add(f"_level_{level}", row)
        for row in cmp.get("pass@k", []):
            metrics[f"compare/diff_pass_at_{row['k']}"] = row["diff"]
        if "greedy" in cmp:
            metrics["compare/diff_greedy_acc"] = cmp["greedy"]["diff"]
        self._log_metrics(target, metrics)
        logged_json = False
        for path in files.values():
            path = Path(path)
            if path.is_file():
                self.client.log_artifact(target, str(path), "compare")
                logged_json |= path.name == "compare.json"
        if not logged_json:
            self.client.log_dict(target, cmp, "compare/compare.json")
        md = next((Path(p) for p in files.values() if str(p).endswith(".md") and Path(p).is_file()), None)
        if md is not None:
            self.client.set_tag(target, "mlflow.note.content", md.read_text()[:MAX_TAG_VALUE])
        if rollouts_sample is not None and Path(rollouts_sample).is_file():
            self._log_rollouts(target, Path(rollouts_sample))

    def _log_rollouts(self, run_id: str, path: Path) -> None:
        import pandas as pd

        self.client.log_artifact(run_id, str(path), "rollouts")
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        with warnings.catch_warnings():  # pandas 3 deprecation inside MLflow's log_table
            warnings.simplefilter("ignore")
            self.client.log_table(run_id, data=df, artifact_file="rollouts/sample.json")

    def run_url(self, ui: str | None = None) -> str | None:
        """Where to look: the parent run's page (`ui` defaults to the server URI, or a local `mlflow ui`)."""
        if not self.enabled or not self.run_id:
            return None
        if ui is None:
            ui = self.tracking_uri if self.tracking_uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{ui.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def _noop_callback(step: int, metrics: dict) -> None:
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _policy_pyfunc(max_new_tokens: int):
    """A pyfunc wrapper around a saved policy directory (the fallback flavor). Defined in a function so
    cloudpickle stores the class by value: loading needs mlflow + transformers, not this package."""
    import mlflow.pyfunc

    class LensPolicy(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = context.artifacts["model_dir"]
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path).eval()
            self.max_new_tokens = max_new_tokens

        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            import torch

            prompts = list(model_input)
            outs = []
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt")
                with torch.no_grad():
                    gen = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
                outs.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
            return outs

    return LensPolicy()


def _finish_system_metrics(monitor) -> None:
    """Stop MLflow's system-metrics monitor without losing its last samples.

    The monitor publishes only at the end of a full sampling interval; finish() cuts the interval short
    and drops what it had collected, so a run shorter than one interval had no system metrics at all.
    """
    monitor.finish()
    try:
        pending = monitor.aggregate_metrics()
        if pending:
            monitor.publish_metrics(pending)
            monitor.mlflow_logger.flush()
    except Exception as exc:  # system metrics are diagnostics: never fail a run over them
        log.warning("last system-metrics samples not logged: %s", exc)
