"""What the MLflow store is and accepts: URI resolution, a fast server probe, MLflow's name and size limits,
its HTTP retry policy for this process, the delivery of one tracking record (lens.tracking builds them,
lens.tracking_queue sends them) and what became of them, and MLflow's system-metrics monitor fed into a
run's sender instead of the store."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from io import StringIO
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


def redact_uri(uri: str) -> str:
    """`uri` with its credentials (user:password@) replaced by ***: what may be logged, stored or printed."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return uri
    return f"{scheme}://***@{netloc.rsplit('@', 1)[1]}{slash}{path}"


def without_secrets(text: str, uri: str) -> str:
    """`text` (e.g. an exception's message) with the password of `uri` replaced by ***."""
    password = urllib.parse.urlsplit(uri).password if "://" in uri else None
    return text.replace(password, "***") if password else text


class RedactingFilter(logging.Filter):
    """Replaces a tracking URI's password with *** in every record of the logger it is attached to: MLflow's own
    loggers (e.g. its system-metrics monitor's warnings) print the URI as they were given it."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = without_secrets(message, self.uri)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, without_secrets(text, self.uri)
        return True


def redact_in_logs(uri: str, loggers: tuple[str, ...] = ("mlflow", "urllib3", "requests", "lens")) -> None:
    """Attach a RedactingFilter for `uri`'s password to those loggers and to the root's handlers (once)."""
    if "://" not in uri or not urllib.parse.urlsplit(uri).password:
        return
    named = [logging.getLogger(name) for name in loggers]
    # A logger's filters see only its own records; its handlers' filters also see its children's.
    targets = named + [h for lg in [*named, logging.getLogger()] for h in lg.handlers]
    for target in targets:
        if not any(isinstance(f, RedactingFilter) and f.uri == uri for f in target.filters):
            target.addFilter(RedactingFilter(uri))


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
    # Credentials in the URI go into an Authorization header, never into the URL urllib parses (its
    # errors would quote them).
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(redact_uri(uri).replace("***@", "").rstrip("/") + "/health")
    if parts.username is not None:
        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:"
                                 f"{urllib.parse.unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = without_secrets(str(getattr(exc, "reason", exc)), uri)
        raise TrackingError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}); start it, point "
            f"tracking.tracking_uri elsewhere, or set tracking.enabled=false") from None


def metric_key(name: str) -> str:
    """An MLflow-valid metric name: '@' -> '_at_', other characters MLflow rejects -> '_'."""
    return _INVALID_NAME_CHARS.sub("_", str(name).replace("@", "_at_"))[:MAX_KEY]


def param_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Flat params as MLflow param strings (lists/dicts as JSON, cut to MLflow's length limit; a URI's
    credentials replaced by ***: params are visible to everyone who can read the experiment)."""
    out = {}
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else redact_uri(str(value))
        out[metric_key(key)] = text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."
    return out


def param_dict(params) -> dict[str, str]:
    """A Params model, flattened to dotted keys, as MLflow param strings."""
    return param_strings(flatten(params))


def _numeric(value: Any) -> float | None:
    try:  # bools too: True -> 1.0
        return float(value)
    except (TypeError, ValueError):
        return None


# MLflow's defaults retry an unreachable server for minutes per call (7 retries, back-off factor 2, 120 s
# timeout): these bound every call this process makes, training's sender and the final model upload alike.
_HTTP_ENV = (("MLFLOW_HTTP_REQUEST_TIMEOUT", "http_timeout_s"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "http_max_retries"),
             ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "http_backoff_factor"))
_set_here: dict[str, str] = {}


def limit_http_retries(tracking_params) -> dict[str, str]:
    """Set MLflow's HTTP timeout, retries and back-off for this process from tracking.http_*; a value the
    user exported stays as it is. Returns the values in force."""
    in_force = {}
    for name, key in _HTTP_ENV:
        current = os.environ.get(name)
        if current is None or current == _set_here.get(name):
            current = _set_here[name] = os.environ[name] = str(int(getattr(tracking_params, key)))
        in_force[name] = current
    return in_force


def is_transient(exc: BaseException) -> bool:
    """Whether a failed store call may succeed later (unreachable, timed out, 5xx, rate-limited, refused
    credentials) rather than the store refusing the record itself (another 4xx) or the record being unusable
    (its file gone, a value that is not JSON)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return not 400 <= status < 500 or status in (401, 403, 408, 429)
    return isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))


def deliver(client, record: Mapping[str, Any]) -> None:
    """Send one tracking record with MlflowClient `client`; raises what MLflow raises.

    Records are JSON-able dicts with `op` and `run_id`: metrics ([key, value, timestamp_ms, step] rows),
    params, tags, end (status, end_time), artifact (a local path), dict, table (a DataFrame as split JSON),
    datasets (DatasetRecord fields), policy (lens.model_registry).
    """
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "metrics":
        items = [Metric(key, value, timestamp, step) for key, value, timestamp, step in record["metrics"]]
        for i in range(0, len(items), BATCH_METRICS):
            client.log_batch(run_id, metrics=items[i:i + BATCH_METRICS])
    elif op in ("params", "tags"):
        entity = Param if op == "params" else RunTag
        items = [entity(k, v) for k, v in record[op].items()]
        for i in range(0, len(items), BATCH_PARAMS):
            client.log_batch(run_id, **{op: items[i:i + BATCH_PARAMS]})
    elif op == "end":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    elif op == "artifact":
        if not Path(record["path"]).exists():
            raise FileNotFoundError(f"artifact {record['path']} no longer exists")
        client.log_artifact(run_id, record["path"], record["artifact_dir"])
    elif op == "dict":
        client.log_dict(run_id, record["obj"], record["artifact_file"])
    elif op == "table":
        import pandas as pd

        with warnings.catch_warnings():  # pandas 3 deprecation inside MLflow's log_table
            warnings.simplefilter("ignore")
            client.log_table(run_id, data=pd.read_json(StringIO(record["data"]), orient="split"),
                             artifact_file=record["artifact_file"])
    elif op == "datasets":
        _log_datasets(client, run_id, record["datasets"])
    elif op == "policy":
        from lens.model_registry import deliver_policy

        deliver_policy(client, record)
    else:
        raise ValueError(f"unknown tracking record op {op!r}")


def _log_datasets(client, run_id: str, datasets: list[Mapping[str, Any]]) -> None:
    """`log_inputs` of each dataset's .jsonl file: MLflow's schema and profile come from reading it."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for record in datasets:
        df = pd.read_json(record["path"], lines=True, dtype=False)
        tags = [InputTag("mlflow.data.context", record["context"]),
                *(InputTag(k, str(v)) for k, v in record["tags"].items())]
        with warnings.catch_warnings():  # MLflow registers its local source twice; int-schema hint
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=record["path"], name=record["name"],
                                         digest=record["digest"][:MAX_DIGEST])
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def account_delivery(client, report, tracking_uri: str, flush_timeout_s: float) -> None:
    """Say what a sender did (a lens.tracking_queue.Delivery); tag the runs whose records were delivered
    late (lens.tracking.replayed, lens.tracking.buffer) or refused (lens.tracking.undelivered,
    lens.tracking.rejected_file). Only when nothing is pending: the store answered, a dead one would only
    cost more waiting (its runs stay RUNNING until the buffer is sent)."""
    uri = redact_uri(tracking_uri)
    refused = [{"op": "tags", "run_id": run, "tags": {"lens.tracking.undelivered": str(n),
                                                      "lens.tracking.rejected_file": str(report.rejected_file)}}
               for run, n in report.rejected_by_run.items()]
    if report.pending:
        log.warning("MLflow: %d tracking records not delivered to %s within tracking.flush_timeout_s=%g s; "
                    "kept in %s: the next run on these outputs sends them (or `lens replay-tracking`)",
                    report.pending, uri, flush_timeout_s, report.buffer)
        if refused:  # the refusals are told with the rest, when the buffer is sent
            from lens.tracking_queue import append_records

            append_records(report.buffer, refused)
        return
    if report.replayed:
        log.info("MLflow: %d tracking records buffered in %s while %s did not answer were delivered",
                 report.replayed, report.buffer, uri)
    records = [{"op": "tags", "run_id": run, "tags": {"lens.tracking.replayed": str(n),
                                                      "lens.tracking.buffer": str(report.buffer)}}
               for run, n in report.replayed_by_run.items()]
    for record in records + refused:
        try:
            deliver(client, record)
        except Exception as exc:
            log.warning("MLflow: run %s not tagged with %s: %s", record["run_id"], record["tags"],
                        without_secrets(str(exc), tracking_uri))


def start_system_metrics(tracking_params, run_id: str, tracking_uri: str, *, resume: bool, log_metrics):
    """MLflow's SystemMetricsMonitor for `run_id` (None when tracking.system_metrics is off or it cannot
    start), publishing through `log_metrics(metrics, step)` instead of a log_batch that waits on the store."""
    if not tracking_params.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking_params.system_metrics_interval_s,
                                       resume_logging=resume, tracking_uri=tracking_uri)
        monitor.mlflow_logger = _SenderMetricsLogger(log_metrics)
        monitor.start()
        return monitor
    except Exception as exc:  # psutil missing, etc.: metrics are a nice-to-have
        log.warning("system metrics not logged: %s", exc)
        return None


class _SenderMetricsLogger:
    """Stands in for the monitor's BatchMetricsLogger (the calls and attributes the monitor uses)."""

    def __init__(self, log_metrics):
        self.log_metrics = log_metrics
        self.data: list = []
        self.total_training_time = self.total_log_batch_time = 0.0  # read by the monitor's debug log

    def record_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metrics(metrics, step or 0)

    def flush(self) -> None:
        pass


def finish_system_metrics(monitor, timeout_s: float) -> None:
    """Stop MLflow's system-metrics monitor without losing its last samples, waiting at most `timeout_s`.

    finish() joins the monitor's thread, which asks the store for the run's status each interval: with
    the store dead that call sits in MLflow's retries, so it is left behind (a daemon thread) after
    `timeout_s`. The monitor publishes only at the end of a full sampling interval and finish() drops
    what it had collected, so a run shorter than one interval would have no system metrics at all.
    """
    stopper = threading.Thread(target=monitor.finish, name="system-metrics-stop", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        log.warning("MLflow's system-metrics monitor did not stop within %g s (the store does not answer); "
                    "its last samples are not logged", timeout_s)
        return
    try:
        pending = monitor.aggregate_metrics()
        if pending:
            monitor.publish_metrics(pending)
    except Exception as exc:  # system metrics are diagnostics: never fail a run over them
        log.warning("last system-metrics samples not logged: %s", exc)
