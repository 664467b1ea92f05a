"""What the MLflow store is and accepts: URI resolution, a fast server probe, MLflow's name and size limits."""

from __future__ import annotations

import json
import os
import re
import base64
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lens.params import PROJECT_ROOT, flatten

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
