"""Tracking records delivered from a background thread, so a dead or hung store never stalls training.

`put` appends to an in-memory queue (microseconds); one sender thread delivers in order. A record the
store does not take goes to a JSONL buffer on disk, and so does everything after it until the buffer is
replayed (the store answers again, or at close). What `close` cannot deliver in time stays there for the
next queue on the same directory, or `replay_directory`. Delivery is at-least-once: records carry their
own timestamps and MLflow stores an identical metric, tag or param once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lens.records import atomic_write_text

log = logging.getLogger(__name__)

BUFFER_NAME = "tracking_buffer.jsonl"
BUFFER_GLOB = "tracking_buffer*.jsonl"
REJECTED_NAME = "tracking_rejected.jsonl"
MAX_QUEUED = 10_000
_STOP, _CLOSED = object(), object()

Deliver = Callable[[dict], None]
IsTransient = Callable[[BaseException], bool]


@dataclass
class Delivery:
    """What became of a queue's records: `sent`, of which `replayed` from the disk buffer (file `buffer`,
    None if unused); `pending` still in it; `rejected` refused for good (kept in `rejected_file`)."""

    sent: int = 0
    replayed: int = 0
    pending: int = 0
    rejected: int = 0
    buffer: Path | None = None
    rejected_file: Path | None = None
    replayed_by_run: Counter = field(default_factory=Counter)
    rejected_by_run: Counter = field(default_factory=Counter)


def _lock(path: Path) -> IO[str] | None:
    """`path` opened for appending under an exclusive flock (held until closed), or None when another
    holder has it (re-taken when the file was unlinked or replaced meanwhile)."""
    while True:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        except FileNotFoundError:
            pass
        fh.close()


def read_records(path: Path) -> list[dict]:
    """The records of a buffer file; a line that is not JSON (a write cut short by a crash) is skipped
    with a warning naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: not a tracking record, skipped (%s)", path, number, exc)
    return records


def _lines(records: list[dict]) -> str:  # default=str: a stray numpy scalar must not cost the record
    return "".join(json.dumps(r, default=str) + "\n" for r in records)


class _Buffer:
    """The sender's own buffer file in `directory`: flock-owned while open, created on first use. `done`
    counts records at its head already delivered (rewritten away at close, or truncated once all are)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path: Path | None = None
        self._fh: IO[str] | None = None
        self.count = 0
        self.done = 0

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in (BUFFER_NAME, f"tracking_buffer-{os.getpid()}-{id(self):x}.jsonl"):
            fh = _lock(self.directory / name)
            if fh is not None:
                self.path, self._fh = self.directory / name, fh
                self.count = len(read_records(self.path))
                return
        raise RuntimeError(f"no free tracking buffer in {self.directory}")

    def adopt_leftovers(self) -> int:
        """Take over the records of buffers no live sender owns (a previous process's): they go first."""
        leftovers = sorted(self.directory.glob(BUFFER_GLOB), key=lambda p: (p.name != BUFFER_NAME, p.name))
        if not leftovers:
            return 0
        if self._fh is None:
            self._open()
        for path in leftovers:
            if path == self.path:
                continue
            fh = _lock(path)
            if fh is None:
                log.info("%s is in use by a running sender, which sends it itself", path)
                continue
            with fh:
                self.append(read_records(path))
                path.unlink()
        return self.count

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        if self._fh is None:
            self._open()
        self._fh.write(_lines(records))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.count += len(records)

    def pending(self) -> list[dict]:
        return read_records(self.path)[self.done:] if self.path and self.count > self.done else []

    def mark_done(self, n: int) -> None:
        self.done += n
        if self.done >= self.count:  # all delivered: an empty file, nothing to skip
            self._fh.truncate(0)
            os.fsync(self._fh.fileno())
            self.count = self.done = 0

    def close(self) -> int:
        """Release the file: removed when empty, else rewritten without the delivered head; the records left."""
        if self._fh is None:
            return 0
        left = self.count - self.done
        if left == 0:
            self.path.unlink(missing_ok=True)  # still locked: nobody adopts it meanwhile
        elif self.done:
            atomic_write_text(self.path, _lines(self.pending()))
        self._fh.close()
        self._fh = None
        return left


def _batches(records: list[dict], limit: int) -> Iterator[list[dict]]:
    """Consecutive metric records of one run (up to `limit` points) as one group; other records alone."""
    group: list[dict] = []
    points = 0
    for record in records:
        size = len(record["metrics"]) if record.get("op") == "metrics" else None
        joins = (size is not None and bool(group) and group[-1].get("op") == "metrics"
                 and group[-1].get("run_id") == record.get("run_id") and points + size <= limit)
        if group and not joins:
            yield group
            group, points = [], 0
        group.append(record)
        points += size or 0
    if group:
        yield group


def _merged(group: list[dict]) -> dict:
    if len(group) == 1:
        return group[0]
    return group[0] | {"metrics": [m for r in group for m in r["metrics"]]}


class TrackingQueue:
    """A background sender of tracking records for one run, buffering to `directory` when the store fails.

    `deliver(record)` sends one record (raising on failure); `is_transient(exc)` says whether a failure
    may pass (unreachable, 5xx) or is the store refusing the record for good (kept in tracking_rejected.jsonl
    and counted, never blocking the rest). `probe()` (raising when the store does not answer) is a cheap
    check before replaying, so a dead store costs one refused connection per `retry_interval_s`.
    `redact(text)` cleans an error's text before it is logged or written (a URI's password).
    """

    def __init__(self, deliver: Deliver, directory: str | os.PathLike[str], *, is_transient: IsTransient,
                 probe: Callable[[], None] | None = None, retry_interval_s: float = 10.0,
                 max_queued: int = MAX_QUEUED, batch_limit: int = 1000, name: str = "tracking",
                 redact: Callable[[str], str] = str):
        self._deliver, self._is_transient, self._probe, self._redact = deliver, is_transient, probe, redact
        self._retry_interval_s, self._batch_limit = retry_interval_s, batch_limit
        self._records: deque[dict] = deque()
        self._max_queued = max_queued
        # _ready guards the records, the record in flight and the stop/closed flags (microseconds); _lock
        # the buffer file (milliseconds). Neither is held while a record is sent.
        self._ready = threading.Condition()
        self._lock = threading.Lock()
        self._buffer = _Buffer(Path(directory))
        self._stopping = self._closed = False
        self._inflight: dict | None = None
        self._next_try = 0.0
        self.report = Delivery()
        self.down_since: float | None = None
        with self._lock:
            adopted = self._buffer.adopt_leftovers()
        if adopted:
            log.info("MLflow: %d undelivered tracking records found in %s; sending them first", adopted,
                     self._buffer.path)
        self._thread = threading.Thread(target=self._run, name=f"{name}-sender", daemon=True)
        self._thread.start()

    @property
    def down(self) -> bool:
        """The store failed and has not taken the buffer since."""
        return self.down_since is not None

    def put(self, record: dict) -> None:
        """Queue `record`; never waits on the store. With the queue full (a sender stuck for `max_queued`
        records) it goes straight to the disk buffer: its order is lost, not the record."""
        with self._ready:
            closed, queued = self._closed, len(self._records) < self._max_queued and not self._closed
            if queued:
                self._records.append(record)
                self._ready.notify()
        if closed:
            log.warning("MLflow: a %s record after its run was closed is not sent", record.get("op"))
        elif not queued:
            try:
                self._to_disk([record])
            except OSError as exc:  # training goes on: a lost metric point beats a lost run
                log.error("MLflow: a %s record is lost: the queue is full and %s failed (%s)", record.get("op"),
                          self._buffer.directory, exc)

    # ---- the sender thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            try:
                if not self._step():
                    return
            except Exception:  # the buffer file failed (disk full?): say so, and keep the sender alive
                log.exception("MLflow: the tracking sender could not keep a record in %s", self._buffer.directory)

    def _step(self) -> bool:
        """One record (or a due replay); False once the queue is closed."""
        if self._has_pending() and time.monotonic() >= self._next_try:
            self._replay()
        record = self._take(max(self._next_try - time.monotonic(), 0.0) if self._has_pending() else None)
        if record is _CLOSED:
            return False
        if record is _STOP:
            if self._has_pending():
                self._replay()
            return False
        if record is not None:
            self._handle(record)
        return True

    def _take(self, timeout: float | None):  # the next record (now in flight), _STOP, _CLOSED or None
        with self._ready:
            if not self._records and not self._stopping:
                self._ready.wait(timeout)
            if self._closed:
                return _CLOSED
            if self._records:
                self._inflight = self._records.popleft()
                return self._inflight
            return _STOP if self._stopping else None

    def _has_pending(self) -> bool:  # records on disk wait for a replay
        return self._buffer.count > self._buffer.done

    def _handle(self, record: dict) -> None:
        try:
            if self._has_pending():  # nothing overtakes what waits on disk
                self._to_disk([record])
                return
            self._deliver(record)
            self.report.sent += 1
        except Exception as exc:
            if self._is_transient(exc):
                self._went_down(exc)
                self._to_disk([record])
            else:
                self._reject([record], exc)
        finally:
            self._inflight = None

    def _to_disk(self, records: list[dict]) -> None:
        with self._lock:
            if not self._closed:  # after close, close() has written what was left
                self._buffer.append(records)

    def _went_down(self, exc: BaseException) -> None:
        self._next_try = time.monotonic() + self._retry_interval_s
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("MLflow: the tracking store did not take a record (%s); records go to %s until it "
                        "answers again", self._redact(str(exc))[:300], self._buffer.directory / BUFFER_GLOB)

    def _reject(self, records: list[dict], exc: BaseException) -> None:
        path = self._buffer.directory / REJECTED_NAME
        log.warning("MLflow: the tracking store refused %d %s record(s) for run %s (%s); kept in %s",
                    len(records), records[0].get("op"), records[0].get("run_id"), self._redact(str(exc))[:300], path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(_lines([r | {"error": self._redact(str(exc))[:2000]} for r in records]))
        self.report.rejected += len(records)
        self.report.rejected_file = path
        self.report.rejected_by_run.update(r.get("run_id") for r in records)

    def _replay(self) -> None:
        """Send the buffer in order; stop at the first transient failure (and try again later)."""
        if self._probe is not None:
            try:
                self._probe()
            except Exception as exc:
                self._went_down(exc)
                return
        while True:
            with self._lock:
                if self._closed:
                    return
                records = self._buffer.pending()
            if not records:
                break
            for group in _batches(records, self._batch_limit):
                done = self._send_group(group)
                with self._lock:
                    if self._closed:
                        return
                    self._buffer.mark_done(done)
                if done < len(group):
                    return
        if self.down_since is not None:
            log.info("MLflow: the tracking store answers again after %.0f s; buffered records delivered "
                     "(%d so far)", time.monotonic() - self.down_since, self.report.replayed)
        self.down_since = None

    def _send_group(self, group: list[dict]) -> int:
        """Deliver `group` (merged into one request); the records done with (sent or rejected)."""
        try:
            self._deliver(_merged(group))
            self.report.sent += len(group)
            self.report.replayed += len(group)
            self.report.replayed_by_run.update(r.get("run_id") for r in group)
            return len(group)
        except Exception as exc:
            if self._is_transient(exc):
                self._went_down(exc)
                return 0
            if len(group) == 1:
                self._reject(group, exc)
                return 1
        for i, record in enumerate(group):  # find the refused one without losing the others
            done = self._send_group([record])
            if done == 0:
                return i
        return len(group)

    # ---- closing -----------------------------------------------------------------------------------

    def close(self, timeout_s: float | None) -> Delivery:
        """Deliver what is queued, waiting at most `timeout_s` (None: until done); what is left stays in
        the buffer file (`report.pending` records at `report.buffer`). Never raises, never waits longer."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout_s)
        with self._ready:
            self._closed = True  # an abandoned sender takes and writes nothing more
            left = [self._inflight] if self._thread.is_alive() and self._inflight is not None else []
            left += self._records
            self._records.clear()
        with self._lock:
            try:
                self._buffer.append(left)
                self.report.buffer = self._buffer.path
                self.report.pending = self._buffer.close()
            except OSError as exc:
                log.error("MLflow: %d tracking records are lost: %s failed (%s)", len(left), self._buffer.directory, exc)
        return self.report


def append_records(path: Path, records: list[dict]) -> bool:
    """Add `records` to the buffer file `path` (one no sender owns now); False when a sender owns it."""
    fh = _lock(path)
    if fh is None:
        return False
    with fh:
        fh.write(_lines(records))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def replay_directory(directory: str | os.PathLike[str], deliver: Deliver, *, is_transient: IsTransient,
                     batch_limit: int = 1000, redact: Callable[[str], str] = str) -> Delivery:
    """Send, in order, the buffers in `directory` that no running sender owns (what finished or killed
    processes left behind); what the store refuses goes to tracking_rejected.jsonl, what it does not take
    now stays (in tracking_buffer.jsonl)."""
    sender = TrackingQueue(deliver, directory, is_transient=is_transient, batch_limit=batch_limit,
                           retry_interval_s=3600.0, name="replay", redact=redact)
    return sender.close(timeout_s=None)
