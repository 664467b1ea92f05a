"""A process pool that runs one function per item under a per-item time limit, from any thread.

``DeadlinePool(fn, workers, timeout_s=...)`` keeps ``workers`` spawn-context processes (never ``fork``:
the caller may hold torch / CUDA threads) alive until ``close()``; ``pool.run([args, ...])`` returns
one :class:`Outcome` of ``fn(*args)`` per item, in input order: a value, a timeout, an exception, or
the death of its worker. ``fn`` and ``initializer`` must be picklable (importable top-level functions
or ``functools.partial`` of them), and the main script's work must sit under
``if __name__ == "__main__":``, since spawned workers re-import it.

Two limits per item: a soft one inside the worker (``signal.setitimer`` in its main thread; the worker
goes on with the next item), and a hard one in the parent, which kills a worker that has reported no
result for ``timeout_s + kill_grace_s`` (stuck in C code, alarm blocked), reports that item as a
timeout, starts a replacement and re-queues the rest of its chunk. Each item's clock starts at the
previous item's result, so a slow item cannot use up its neighbours' budget. Items travel in chunks
(about 4 per worker per call, at most 32 items) to amortise IPC.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as _mp_wait
from typing import Any, NamedTuple

__all__ = ["DeadlinePool", "DeadlinePoolError", "Outcome", "run_inline", "VALUE", "TIMEOUT", "ERROR", "DIED"]

VALUE, TIMEOUT, ERROR, DIED = "value", "timeout", "error", "died"


class Outcome(NamedTuple):
    """What became of one item: ``kind`` is VALUE (``value`` holds ``fn``'s result), TIMEOUT,
    ERROR (``fn`` raised; ``error`` describes it) or DIED (its worker exited; ``error`` says how)."""

    kind: str
    value: Any = None
    error: str | None = None


class DeadlinePoolError(RuntimeError):
    """The pool cannot work: closed, used after a fork, or its workers cannot start."""


# ---- one item, inside a worker (or inline) -----------------------------------------------------
class _ItemTimeout(BaseException):
    """Raised by the worker's SIGALRM handler. A BaseException so that ``except Exception`` blocks
    inside ``fn`` (sympy and friends have many) do not swallow it."""


_ARMED = False


def _on_alarm(signum, frame):  # noqa: ARG001
    if _ARMED:
        raise _ItemTimeout()


def _format_exc(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {str(exc)[:500]}{where}"


def _run_item(fn: Callable, args: tuple, timeout_s: float | None) -> Outcome:
    """The soft time limit needs the main thread of a worker (SIGALRM)."""
    global _ARMED
    try:
        if timeout_s:
            _ARMED = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = fn(*args)
        finally:
            _ARMED = False
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return Outcome(VALUE, value)
    except _ItemTimeout:
        return Outcome(TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported as the item's outcome
        return Outcome(ERROR, None, _format_exc(exc))


def run_inline(fn: Callable, *args) -> Outcome:
    """``fn(*args)`` in the calling thread, no time limit, as an :class:`Outcome`."""
    return _run_item(fn, args, None)


def _fast_exit() -> None:
    """Exit a worker without the interpreter's slow teardown of big modules (sympy: ~0.5 s)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _worker_main(conn, fn: Callable, initializer: Callable[[], None] | None) -> None:
    """Worker loop. Parent -> worker: ``(chunk_id, [args, ...], timeout_s)`` or None (shut down).
    Worker -> parent: ``("ready", pid)`` or ``("fatal", msg)`` once, then one
    ``(chunk_id, position, kind, value, error)`` per item, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which closes us
    try:
        if initializer is not None:
            initializer()
        signal.signal(signal.SIGALRM, _on_alarm)
        conn.send(("ready", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported, then this worker exits
        with contextlib.suppress(Exception):
            conn.send(("fatal", _format_exc(exc)))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            _fast_exit()
        chunk_id, items, timeout_s = msg
        for pos, args in enumerate(items):
            outcome = _run_item(fn, args, timeout_s)
            try:
                conn.send((chunk_id, pos, *outcome))
            except (EOFError, OSError):  # parent gone
                return


# ---- worker processes, seen from the parent ------------------------------------------------
@dataclass(eq=False)
class _Worker:
    proc: Any
    conn: Any
    state: str = "starting"  # starting -> idle <-> busy
    since: float = field(default_factory=time.monotonic)
    chunk_id: int | None = None
    chunk: list[int] = field(default_factory=list)
    pos: int = 0
    deadline: float = math.inf  # busy: kill it if no result arrives before this (monotonic)
    hard: float = math.inf  # seconds allowed per item before the kill


def _stop_worker(w: _Worker, graceful: bool, notify: bool = True) -> None:
    """Stop and reap one worker (never leaves a zombie): ask (``graceful``), then SIGTERM, SIGKILL."""
    try:
        if graceful and w.proc.is_alive():
            if notify:
                with contextlib.suppress(OSError, EOFError):
                    w.conn.send(None)
            w.proc.join(2.0)
        if w.proc.is_alive():
            w.proc.terminate()
            w.proc.join(2.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(5.0)
    except (AssertionError, ValueError, OSError):  # not our child (after fork) / already closed
        pass
    finally:
        with contextlib.suppress(OSError):
            w.conn.close()
        with contextlib.suppress(AssertionError, ValueError):
            w.proc.close()  # release its sentinel now (only possible once it has been reaped)


def _shutdown(slots: list, owner_pid: int) -> None:
    """Finalizer: stop every worker. A forked copy of the parent never touches the real workers."""
    if os.getpid() != owner_pid:
        return
    workers = [w for w in slots if w is not None]
    slots[:] = [None] * len(slots)
    for w in workers:  # ask all first, then reap: shutdown takes one join, not one per worker
        with contextlib.suppress(OSError, EOFError):
            w.conn.send(None)
    for w in workers:
        _stop_worker(w, graceful=True, notify=False)


_START_LOCK = threading.Lock()


def _start_process(proc) -> None:
    """``proc.start()``, also from a daemonic process (e.g. a ``multiprocessing.Pool`` worker), which
    multiprocessing refuses to let have children. That rule exists because a daemon's children are
    orphaned when it is terminated; ours exit by themselves when their pipe to the parent closes (and
    an item in progress is cut off by the soft limit), so the flag is lifted just for the start."""
    cfg = multiprocessing.current_process()._config  # noqa: SLF001
    with _START_LOCK:
        daemonic = cfg.get("daemon")
        if daemonic:
            cfg["daemon"] = False
        try:
            proc.start()
        finally:
            if daemonic:
                cfg["daemon"] = daemonic


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")


class DeadlinePool:
    """``fn(*args)`` per item in ``workers`` processes, each item under its own time limit.

    Options: ``timeout_s`` (per item; None: none), ``initializer`` (runs in each worker before it
    takes work; if it raises, ``run`` raises :class:`DeadlinePoolError`), ``chunk_size`` (items per
    worker task; default ``clamp(ceil(n / (4 * workers)), 1, 32)``), ``kill_grace_s`` (before a worker
    that ignores the soft limit is killed; default ``max(1, timeout_s / 2)``), ``start_timeout_s``
    (for a worker's start and initializer), ``name`` (of the processes, in messages too).
    ``workers=0`` runs items in the calling thread with no time limit (debugging; the initializer runs
    once, there, and its exception propagates). ``restarts`` counts workers replaced after a hard
    timeout or a death. Concurrent ``run`` calls are serialised.
    """

    def __init__(self, fn: Callable, workers: int = 2, *, timeout_s: float | None = 5.0,
                 initializer: Callable[[], None] | None = None, chunk_size: int | None = None,
                 kill_grace_s: float | None = None, start_timeout_s: float = 180.0, name: str = "deadline-pool"):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        _check_timeout(timeout_s)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.fn, self.workers, self.timeout_s = fn, workers, timeout_s
        self.initializer, self.chunk_size, self.kill_grace_s = initializer, chunk_size, kill_grace_s
        self.start_timeout_s, self.name = start_timeout_s, name
        self.restarts = 0
        self.owner_pid = os.getpid()
        self._initialized_inline = False
        self.closed = False
        self._lock = threading.Lock()
        self._chunk_ids = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Worker | None] = []  # the finalizer also stops workers started before a failure
        self._finalizer = weakref.finalize(self, _shutdown, self._slots, self.owner_pid)
        self._slots.extend(self._start_worker() for _ in range(workers))

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self.fn, self.initializer),
                                 name=self.name, daemon=True)
        _start_process(proc)
        child_conn.close()
        return _Worker(proc, parent_conn)

    def close(self) -> None:
        """Stop the workers (idempotent). Later ``run`` calls raise."""
        with self._lock:
            self.closed = True
            self._finalizer()

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.proc.pid for w in self._slots if w is not None]

    def run(self, items: Sequence[tuple], *, timeout_s: float | None | type[...] = ...) -> list[Outcome]:
        """One :class:`Outcome` per item (``fn(*item)``), in input order. ``timeout_s`` overrides the
        pool's per-item limit for this call (None: no limit)."""
        t = self.timeout_s if timeout_s is ... else timeout_s
        _check_timeout(t)
        if not items:
            return []
        with self._lock:
            if self.closed:
                raise DeadlinePoolError(f"{self.name} is closed")
            if os.getpid() != self.owner_pid:
                raise DeadlinePoolError(f"{self.name} was created in another process (fork); create a new one")
            if self.workers == 0:
                return self._run_inline(items)
            return self._run_pool(items, t)

    def _run_inline(self, items: Sequence[tuple]) -> list[Outcome]:
        if not self._initialized_inline:
            if self.initializer is not None:
                self.initializer()
            self._initialized_inline = True
        return [_run_item(self.fn, args, None) for args in items]

    def _hard_limit(self, t: float | None) -> float:
        if t is None:
            return math.inf
        grace = self.kill_grace_s if self.kill_grace_s is not None else max(1.0, 0.5 * t)
        return t + grace

    def _replace(self, slot: int) -> None:
        _stop_worker(self._slots[slot], graceful=False)
        self.restarts += 1
        self._slots[slot] = self._start_worker()

    def _run_pool(self, items: Sequence[tuple], t: float | None) -> list[Outcome]:
        n = len(items)
        size = self.chunk_size or max(1, min(32, math.ceil(n / (4 * self.workers))))
        pending: deque[list[int]] = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))
        outcomes: list[Outcome | None] = [None] * n
        remaining = n
        for i, w in enumerate(self._slots):  # a slot emptied by an interrupted call
            if w is None:
                self._slots[i] = self._start_worker()
        try:
            while remaining:
                now = time.monotonic()
                for w in self._slots:  # hand out work
                    if w.state == "idle" and pending:
                        self._send(w, pending, items, t, now)
                waits = [w.deadline if w.state == "busy" else w.since + self.start_timeout_s
                         for w in self._slots if w.state != "idle"]
                timeout = max(0.0, min(waits) - now) if waits else None
                handles = [h for w in self._slots for h in (w.conn, w.proc.sentinel)]
                ready = set(_mp_wait(handles, timeout=None if timeout is None else min(timeout, 60.0)))
                now = time.monotonic()
                for slot, w in enumerate(self._slots):
                    if w.conn in ready:
                        remaining -= self._drain(w, outcomes, now)
                    if w.proc.sentinel in ready or not w.proc.is_alive():
                        remaining -= self._on_death(slot, w, outcomes, pending, now)
                    elif w.state == "busy" and now >= w.deadline:
                        remaining -= self._on_hard_timeout(slot, w, outcomes, pending)
                    elif w.state == "starting" and now >= w.since + self.start_timeout_s:
                        raise DeadlinePoolError(
                            f"{self.name} worker did not start within {self.start_timeout_s:.0f}s")
        except BaseException:
            # Interrupted (KeyboardInterrupt, DeadlinePoolError, ...): busy workers still hold stale
            # chunks; kill them so the next call starts from a clean pool.
            for slot, w in enumerate(self._slots):
                if w is not None and w.state != "idle":
                    _stop_worker(w, graceful=False)
                    self._slots[slot] = None
            raise
        return outcomes  # type: ignore[return-value]

    def _send(self, w: _Worker, pending: deque, items: Sequence[tuple], t: float | None, now: float) -> None:
        chunk = pending.popleft()
        self._chunk_ids += 1
        try:
            w.conn.send((self._chunk_ids, [items[j] for j in chunk], t))
        except (BrokenPipeError, EOFError, OSError):  # it just died: the sentinel path replaces it
            pending.appendleft(chunk)
            return
        w.chunk_id, w.chunk, w.pos = self._chunk_ids, chunk, 0
        w.state = "busy"
        w.hard = self._hard_limit(t)
        w.deadline = now + w.hard

    def _drain(self, w: _Worker, outcomes: list, now: float) -> int:
        """Read every message a worker has sent; returns how many items completed."""
        done = 0
        while True:
            try:
                if not w.conn.poll():
                    return done
                msg = w.conn.recv()
            except (EOFError, OSError):  # died; the sentinel path handles it
                return done
            if msg[0] == "ready":
                w.state, w.deadline = "idle", math.inf
            elif msg[0] == "fatal":
                raise DeadlinePoolError(f"{self.name} worker failed its initializer: {msg[1]}")
            else:
                chunk_id, pos, kind, value, err = msg
                if chunk_id != w.chunk_id or w.state != "busy":
                    continue  # stale
                outcomes[w.chunk[pos]] = Outcome(kind, value, err)
                done += 1
                w.pos = pos + 1
                w.deadline = now + w.hard  # the next item's clock starts now
                if w.pos == len(w.chunk):
                    w.state, w.chunk_id, w.chunk, w.deadline = "idle", None, [], math.inf

    def _abandon(self, w: _Worker, outcome: Outcome, outcomes: list, pending: deque) -> None:
        """The item ``w`` is on gets ``outcome``; the rest of its chunk goes back to the queue."""
        outcomes[w.chunk[w.pos]] = outcome
        if rest := w.chunk[w.pos + 1:]:
            pending.appendleft(rest)

    def _on_hard_timeout(self, slot: int, w: _Worker, outcomes: list, pending: deque) -> int:
        self._abandon(w, Outcome(TIMEOUT), outcomes, pending)
        self._replace(slot)
        return 1

    def _on_death(self, slot: int, w: _Worker, outcomes: list, pending: deque, now: float) -> int:
        w.proc.join(1.0)
        done = self._drain(w, outcomes, now)  # it may have sent results just before dying
        code = w.proc.exitcode
        if w.state == "starting":
            self._slots[slot] = None
            _stop_worker(w, graceful=False)
            raise DeadlinePoolError(
                f"{self.name} worker exited during start-up (exit code {code}; its traceback is on stderr). "
                "Common causes: the main script starts a pool without `if __name__ == '__main__':` "
                "(spawned workers re-import it), or the function is not an importable top-level function.")
        if w.state == "busy":
            self._abandon(w, Outcome(DIED, None, f"{self.name} worker died (exit code {code}) on this item"),
                          outcomes, pending)
            done += 1
        self._replace(slot)
        return done
