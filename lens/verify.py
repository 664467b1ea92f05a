"""The reward function: is a completion's final answer mathematically equal to the gold answer?

Built on math-verify 0.9 (``parse`` + ``verify``, gold first). math-verify's own time limit uses
``signal.alarm`` and only works in the main thread, so it is always disabled here
(``parsing_timeout=None`` / ``timeout_seconds=None``) and the limit is enforced by running the scoring
in worker processes instead. Everything in the calling process is signal-free: ``score`` and
``Verifier.score_batch`` may be called from any thread (trainer threads, Prefect task runners, ...).

Answer extraction (:func:`_score_one`, what a worker runs for one item)
    * the completion's LAST complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested and escaped braces
      handled; ``\\boxed 5`` too) is the answer. It is parsed as ``$<answer>$`` (falling back to
      ``\\boxed{<answer>}``) with math-verify's default extraction configs;
    * with no boxed answer, math-verify's own extraction runs on the whole completion
      (``parse(completion)``, default configs: LaTeX environments, "answer is ...", plain numbers);
    * the gold (a bare answer such as ``\\frac{1}{2}``, ``42``, ``(3, \\frac{\\pi}{2})``) is parsed the
      same way as a boxed answer (a gold that itself contains ``\\boxed`` is unwrapped first);
    * fast path: boxed answer == gold after whitespace normalisation -> 1.0 without math-verify.
    A completion with no extractable answer at all gives 0.0 and counts as a ``parse_failure``. An
    exception inside math-verify (or an unparseable gold) gives 0.0, counts as an ``error`` and is
    logged with the inputs truncated; ``score_batch(strict=True)`` raises :class:`VerifierError` instead.

Time limit (two levels, both per item)
    * soft: inside the worker (its main thread) ``signal.setitimer`` interrupts the item after
      ``timeout_s``; the worker survives and goes on with the next item;
    * hard: workers stream one result message per item, and the parent kills a worker that has not
      reported progress for ``timeout_s + kill_grace_s`` (default grace ``max(1, timeout_s / 2)``)
      -- e.g. stuck inside C code or with the alarm blocked -- counts the item it was on as a timeout,
      starts a replacement and re-queues the rest of that worker's chunk. So a chunk's deadline is
      "timeout_s (+ grace) per item, measured from the previous item's result", never
      ``timeout_s * len(chunk)`` in one lump, and a slow item cannot use up its neighbours' budget.
    Items are sent to workers in chunks (about 4 chunks per worker per batch, at most 32 items) to
    amortise IPC; identical (completion, gold) pairs within a batch are scored once, and each worker
    caches parsed answers / golds and (boxed answer, gold) results (LRU) across batches.

Processes
    Workers are started with the ``spawn`` context (never ``fork``: the caller may hold torch / CUDA
    threads), once, at ``Verifier(...)``; they stay alive across ``score_batch`` calls. Each imports
    math-verify and runs a self-check (a boxed LaTeX fraction must verify against ``0.5``; this also
    warms up the LaTeX parser) before it takes work, whatever the ``scorer``, so a broken install (e.g. an incompatible antlr4 runtime, which makes every LaTeX
    answer unparseable) raises :class:`VerifierError` instead of silently giving reward 0. Like every
    spawn-based pool, workers re-import the main module as ``__mp_main__``: keep heavy work in the
    main script under ``if __name__ == "__main__":``.

``workers=0`` scores in the calling thread with NO time limit (debugging); ``score(..., timeout_s=None)``
does the same for one item. ``score(...)`` with a time limit uses a shared, lazily created
single-worker ``Verifier`` (re-created after ``os.fork``; closed at interpreter exit).

Test hook: ``Verifier(scorer=fn)`` makes the workers call ``fn(completion, gold)`` instead of
:func:`_score_one`. ``fn`` must be a picklable top-level function and follow ``_score_one``'s contract:
return the reward (1.0 / 0.0; bools accepted), ``None`` for "no extractable answer", or raise for an
internal error. A slow or raising ``fn`` exercises the timeout and error paths without monkeypatching.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as _mp_wait
from typing import Any

from lens.data import last_boxed as extract_boxed  # one answer extractor for data, reward and warm start

log = logging.getLogger(__name__)

__all__ = ["score", "Verifier", "VerifyStats", "VerifierError", "extract_boxed", "shutdown_shared"]

Scorer = Callable[[str, str], "float | bool | None"]

_TRUNC = 200  # characters of an input shown in log messages
_MAX_LOGGED_PER_BATCH = 5  # individual error warnings per batch (then one summary line)
_START_TIMEOUT_S = 180.0  # a worker must import math-verify and pass its self-check within this


class VerifierError(RuntimeError):
    """The verifier failed internally (strict mode), or its worker processes cannot start."""


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
@dataclass
class VerifyStats:
    """Cumulative counters. ``calls`` counts items; every item is exactly one of correct / wrong /
    ``parse_failures`` / ``timeouts`` / ``errors`` (wrong = the rest). ``worker_restarts`` counts
    worker processes replaced after a hard timeout or a crash."""

    calls: int = 0
    correct: int = 0
    timeouts: int = 0
    parse_failures: int = 0
    errors: int = 0
    worker_restarts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def snapshot(self) -> VerifyStats:
        return dataclasses.replace(self)

    def delta(self, since: VerifyStats) -> VerifyStats:
        """Counts accumulated after ``since`` (an earlier :meth:`snapshot`)."""
        return VerifyStats(**{f.name: getattr(self, f.name) - getattr(since, f.name)
                              for f in dataclasses.fields(self)})

    __sub__ = delta


# ---------------------------------------------------------------------------------------------
# answer extraction and scoring of one item (runs in the workers)
# ---------------------------------------------------------------------------------------------
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


_MV: tuple[Any, Any] | None = None


def _math_verify() -> tuple[Any, Any]:
    """(parse, verify), imported lazily so that importing lens.verify stays cheap."""
    global _MV
    if _MV is None:
        import math_verify
        from math_verify import grader, parser

        # We enforce time limits ourselves; silence the one-time "Timeout is disabled" warning.
        for mod in (parser, grader):
            if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
                mod.TIMEOUT_WARNING_SHOWN = True
        _MV = (math_verify.parse, math_verify.verify)
    return _MV


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    """Parse a bare answer (boxed content or a gold): ``$answer$``, else ``\\boxed{answer}``.
    Cached: in GRPO every gold repeats G times and boxed answers repeat a lot."""
    parse, _ = _math_verify()
    ans = _UNESCAPED_DOLLAR_RE.sub(" ", answer).replace("\n", " ").strip()
    if not ans:
        return ()
    out = parse(f"${ans}$", parsing_timeout=None, raise_on_error=True)
    if not out:
        out = parse(f"\\boxed{{{ans}}}", parsing_timeout=None, raise_on_error=True)
    return tuple(out)


def _parse_gold(gold: str) -> tuple:
    inner = extract_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else None
    return _parse_answer(inner if inner is not None else gold)


def _verify_any(gold: Sequence, pred: Sequence) -> bool:
    """math-verify's ``verify(gold_list, pred_list)`` (any pair equal), but with exceptions raised:
    a pair that raises does not hide a later pair that matches; if nothing matches, the first
    exception propagates (so it is counted as an error, never a silent 0)."""
    _, verify = _math_verify()
    first_exc: BaseException | None = None
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=None, raise_on_error=True):
                    return True
            except Exception as exc:  # noqa: BLE001 - re-raised below unless a later pair matches
                first_exc = first_exc or exc
    if first_exc is not None:
        raise first_exc
    return False


def _score_one(completion: str, gold: str) -> float | None:
    """Reward of one completion: 1.0 / 0.0, or None when it has no extractable answer at all.
    Raises on internal errors (math-verify exceptions, unparseable gold). No time limit of its own."""
    answer = extract_boxed(completion)
    if answer is None:
        return _score_unboxed(completion, gold)
    if _norm_ws(answer) and _norm_ws(answer) == _norm_ws(gold):
        return 1.0
    return _score_answer(answer, gold)


def _gold_or_raise(gold: str) -> tuple:
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        raise VerifierError(f"gold answer has no extractable value: {gold[:_TRUNC]!r}")
    return gold_parsed


@functools.lru_cache(maxsize=8192)
def _score_answer(answer: str, gold: str) -> float | None:
    """A boxed answer against a gold. Cached per worker: the same (wrong) answers to a problem recur
    across samples and steps, and sympy's simplify dominates the cost of a wrong answer.
    (Exceptions and interrupted calls are not cached.)"""
    gold_parsed = _gold_or_raise(gold)
    pred = _parse_answer(answer)
    if not pred:
        return None
    return 1.0 if _verify_any(gold_parsed, pred) else 0.0


def _score_unboxed(completion: str, gold: str) -> float | None:
    gold_parsed = _gold_or_raise(gold)
    parse, _ = _math_verify()
    pred = parse(completion, parsing_timeout=None, raise_on_error=True)
    if not pred:
        return None
    return 1.0 if _verify_any(gold_parsed, pred) else 0.0


def _self_check() -> None:
    """Fail loudly when math-verify cannot parse LaTeX (e.g. an incompatible antlr4 runtime)."""
    import sympy

    got = _parse_answer("\\frac{1}{2}")
    if not got or not isinstance(got[0], sympy.Basic):
        raise VerifierError(
            f"math-verify self-check failed: parse('$\\frac{{1}}{{2}}$') -> {got!r}; LaTeX parsing is "
            "broken (is the antlr4 runtime the one math-verify[antlr4_9_3] pins?)")
    r = _score_one("so \\boxed{\\frac{\\sqrt{4}}{4}}", "0.5")
    if r != 1.0:
        raise VerifierError(f"math-verify self-check failed: \\frac{{\\sqrt{{4}}}}{{4}} vs 0.5 scored {r!r}")


# ---------------------------------------------------------------------------------------------
# one item, with outcome classification
# ---------------------------------------------------------------------------------------------
OK, TIMEOUT, ERROR = "ok", "timeout", "error"


class _ItemTimeout(BaseException):
    """Raised by the worker's SIGALRM handler. A BaseException so that the many ``except Exception``
    blocks inside math-verify / sympy do not swallow it (math-verify's own TimeoutException is
    caught by math-verify itself, so it is not used)."""


_ARMED = False


def _on_alarm(signum, frame):  # noqa: ARG001
    if _ARMED:
        raise _ItemTimeout()


def _format_exc(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {str(exc)[:500]}{where}"


def _run_item(scorer: Scorer, completion: str, gold: str, timeout_s: float | None) -> tuple:
    """(kind, reward_or_None, error_message). The soft time limit needs the main thread of a worker."""
    global _ARMED
    try:
        if timeout_s:
            _ARMED = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = scorer(completion, gold)
        finally:
            _ARMED = False
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return OK, (None if value is None else float(value)), None
    except _ItemTimeout:
        return TIMEOUT, None, None
    except Exception as exc:  # noqa: BLE001 - reported to the parent, counted as an error
        return ERROR, None, _format_exc(exc)


def _fast_exit() -> None:
    """Exit a worker without the interpreter's slow teardown of sympy's modules (~0.5 s)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(0)


def _worker_main(conn, scorer: Scorer) -> None:
    """Worker loop. Protocol, parent -> worker: ``(chunk_id, [(completion, gold), ...], timeout_s)``
    or None (shut down). Worker -> parent: ``("ready", pid)`` or ``("fatal", msg)`` once, then one
    ``(chunk_id, position, kind, value, error)`` per item, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which closes us
    try:
        _self_check()  # also warms up math-verify (imports, regexes, the LaTeX parser)
        signal.signal(signal.SIGALRM, _on_alarm)
        conn.send(("ready", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported, then this worker exits
        try:
            conn.send(("fatal", _format_exc(exc)))
        except Exception:  # noqa: BLE001
            pass
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            _fast_exit()
        chunk_id, items, timeout_s = msg
        for pos, (completion, gold) in enumerate(items):
            kind, value, err = _run_item(scorer, completion, gold, timeout_s)
            try:
                conn.send((chunk_id, pos, kind, value, err))
            except (BrokenPipeError, EOFError, OSError):
                return


# ---------------------------------------------------------------------------------------------
# the process pool
# ---------------------------------------------------------------------------------------------
class _Worker:
    __slots__ = ("proc", "conn", "state", "since", "chunk_id", "chunk", "pos", "deadline", "hard")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.state = "starting"  # starting -> idle <-> busy
        self.since = time.monotonic()
        self.chunk_id: int | None = None
        self.chunk: list[int] = []
        self.pos = 0
        self.deadline = math.inf  # busy: kill it if no result arrives before this (monotonic)
        self.hard = math.inf  # seconds allowed per item before the kill


def _stop_worker(w: _Worker, graceful: bool, notify: bool = True) -> None:
    """Stop and reap one worker (never leaves a zombie): ask (``graceful``), then SIGTERM, SIGKILL."""
    try:
        if graceful and w.proc.is_alive():
            if notify:
                try:
                    w.conn.send(None)
                except (BrokenPipeError, EOFError, OSError):
                    pass
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
        try:
            w.conn.close()
        except OSError:
            pass
        try:
            w.proc.close()  # release its sentinel now (only possible once it has been reaped)
        except (AssertionError, ValueError):
            pass


def _shutdown(slots: list, owner_pid: int) -> None:
    """Finalizer: stop every worker. A forked copy of the parent never touches the real workers."""
    if os.getpid() != owner_pid:
        return
    workers = [w for w in slots if w is not None]
    slots[:] = [None] * len(slots)
    for w in workers:  # ask all first, then reap: shutdown takes one join, not one per worker
        try:
            w.conn.send(None)
        except (BrokenPipeError, EOFError, OSError):
            pass
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


def _outcome_reward(kind: str, value: float | None) -> float:
    return float(value) if kind == OK and value is not None else 0.0


def _trunc(s: str) -> str:
    return s if len(s) <= _TRUNC else s[:_TRUNC] + f"...[{len(s) - _TRUNC} more chars]"


class Verifier:
    """Parallel reward computation with a per-item time limit; safe to use from any thread.

    ``Verifier(timeout_s=5.0, workers=2)``: ``workers`` spawn-context processes, started now and
    kept alive until :meth:`close` (or the end of a ``with`` block, or interpreter exit).
    ``workers=0``: score in the calling thread, no time limit (debugging only).

    Keyword-only options: ``scorer`` (test hook, see the module doc), ``chunk_size`` (items per
    worker task; default ``clamp(ceil(n / (4 * workers)), 1, 32)``), ``kill_grace_s`` (extra time
    before a worker that ignores the soft limit is killed; default ``max(1, timeout_s / 2)``).
    Concurrent ``score_batch`` calls on one Verifier are serialised.
    """

    def __init__(self, timeout_s: float | None = 5.0, workers: int = 2, *, scorer: Scorer | None = None,
                 chunk_size: int | None = None, kill_grace_s: float | None = None):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.timeout_s = timeout_s
        self.workers = workers
        self.chunk_size = chunk_size
        self.kill_grace_s = kill_grace_s
        self.stats = VerifyStats()
        self._scorer: Scorer = scorer or _score_one
        self._checked_inline = False
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._closed = False
        self._chunk_ids = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Worker | None] = [None] * workers
        self._finalizer = weakref.finalize(self, _shutdown, self._slots, self._owner_pid)
        for i in range(workers):
            self._slots[i] = self._start_worker()

    # ---- lifecycle -------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self._scorer),
                                 name="lens-verify", daemon=True)
        _start_process(proc)
        child_conn.close()
        return _Worker(proc, parent_conn)

    def close(self) -> None:
        """Stop the workers (idempotent). Later ``score_batch`` calls raise."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"Verifier(timeout_s={self.timeout_s}, workers={self.workers}, stats={self.stats.as_dict()})"

    # ---- scoring ---------------------------------------------------------------------------
    def score_batch(self, completions: Sequence[str], golds: Sequence[str], *, strict: bool = False,
                    timeout_s: float | None | type[...] = ...) -> list[float]:
        """Rewards (1.0 / 0.0) in input order. ``timeout_s`` overrides the per-item limit for this
        call (``None``: no limit). Timeouts, parse failures and internal errors all give 0.0 and are
        counted in ``stats``; errors are also logged. ``strict=True`` raises :class:`VerifierError`
        after the batch (stats already updated) if any item had an internal error."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        t = self.timeout_s if timeout_s is ... else timeout_s
        if t is not None and not t > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {t}")
        pairs = [("" if c is None else str(c), "" if g is None else str(g)) for c, g in zip(completions, golds)]
        if not pairs:
            return []
        with self._lock:
            if self._closed:
                raise VerifierError("Verifier is closed")
            if os.getpid() != self._owner_pid:
                raise VerifierError("Verifier was created in another process (fork); create a new one")
            index: dict[tuple[str, str], int] = {}  # identical pairs are scored once
            where = [index.setdefault(p, len(index)) for p in pairs]
            uniq = list(index)
            if self.workers == 0:
                outcomes = self._run_inline(uniq)
            else:
                outcomes = self._run_pool(uniq, t)
            return self._account(pairs, [outcomes[j] for j in where], strict, t)

    def _run_inline(self, items: list[tuple[str, str]]) -> list[tuple]:
        if not self._checked_inline:
            _self_check()
            self._checked_inline = True
        return [_run_item(self._scorer, c, g, None) for c, g in items]

    def _account(self, pairs, outcomes, strict: bool, t: float | None) -> list[float]:
        st = self.stats
        rewards: list[float] = []
        errors: list[tuple[int, str]] = []
        timeouts: list[int] = []
        for i, (kind, value, err) in enumerate(outcomes):
            st.calls += 1
            r = _outcome_reward(kind, value)
            rewards.append(r)
            if kind == TIMEOUT:
                st.timeouts += 1
                timeouts.append(i)
            elif kind == ERROR:
                st.errors += 1
                errors.append((i, err))
            elif value is None:
                st.parse_failures += 1
            elif r > 0:
                st.correct += 1
        if timeouts:
            c, g = pairs[timeouts[0]]
            log.warning("verifier: %d of %d item(s) timed out (limit %ss); first: completion=%r gold=%r",
                        len(timeouts), len(pairs), t, _trunc(c), _trunc(g))
        for i, err in errors[:_MAX_LOGGED_PER_BATCH]:
            c, g = pairs[i]
            log.warning("verifier: internal error, reward 0.0: %s; completion=%r gold=%r",
                        err, _trunc(c), _trunc(g))
        if len(errors) > _MAX_LOGGED_PER_BATCH:
            log.warning("verifier: %d more internal error(s) in this batch not shown",
                        len(errors) - _MAX_LOGGED_PER_BATCH)
        if strict and errors:
            i, err = errors[0]
            c, g = pairs[i]
            raise VerifierError(f"{len(errors)} internal verifier error(s) in a batch of {len(pairs)}; "
                                f"first: {err}; completion={_trunc(c)!r} gold={_trunc(g)!r}")
        return rewards

    def _hard_limit(self, t: float | None) -> float:
        if t is None:
            return math.inf
        grace = self.kill_grace_s if self.kill_grace_s is not None else max(1.0, 0.5 * t)
        return t + grace

    def _replace(self, slot: int, graceful: bool = False) -> None:
        w = self._slots[slot]
        if w is not None:
            _stop_worker(w, graceful=graceful)
        self._slots[slot] = self._start_worker()

    def _run_pool(self, items: list[tuple[str, str]], t: float | None) -> list[tuple]:
        n = len(items)
        size = self.chunk_size or max(1, min(32, math.ceil(n / (4 * self.workers))))
        pending: deque[list[int]] = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))
        outcomes: list[tuple | None] = [None] * n
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
                waits = [w.deadline if w.state == "busy" else w.since + _START_TIMEOUT_S
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
                    elif w.state == "starting" and now >= w.since + _START_TIMEOUT_S:
                        raise VerifierError(f"verifier worker did not start within {_START_TIMEOUT_S:.0f}s")
        except BaseException:
            # Interrupted (KeyboardInterrupt, VerifierError, ...): busy workers still hold stale
            # chunks; kill them so the next call starts from a clean pool.
            for slot, w in enumerate(self._slots):
                if w is not None and w.state != "idle":
                    _stop_worker(w, graceful=False)
                    self._slots[slot] = None
            raise
        return outcomes  # type: ignore[return-value]

    def _send(self, w: _Worker, pending: deque, items, t, now: float) -> None:
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
                raise VerifierError(f"verifier worker failed its start-up check: {msg[1]}")
            else:
                chunk_id, pos, kind, value, err = msg
                if chunk_id != w.chunk_id or w.state != "busy":
                    continue  # stale
                outcomes[w.chunk[pos]] = (kind, value, err)
                done += 1
                w.pos = pos + 1
                w.deadline = now + w.hard  # the next item's clock starts now
                if w.pos == len(w.chunk):
                    w.state, w.chunk_id, w.chunk, w.deadline = "idle", None, [], math.inf

    def _requeue_rest(self, w: _Worker, pending: deque) -> None:
        rest = w.chunk[w.pos + 1:]
        if rest:
            pending.appendleft(rest)

    def _on_hard_timeout(self, slot: int, w: _Worker, outcomes: list, pending: deque) -> int:
        outcomes[w.chunk[w.pos]] = (TIMEOUT, None, None)
        self._requeue_rest(w, pending)
        self.stats.worker_restarts += 1
        self._replace(slot)
        return 1

    def _on_death(self, slot: int, w: _Worker, outcomes: list, pending: deque, now: float) -> int:
        w.proc.join(1.0)
        done = self._drain(w, outcomes, now)  # it may have sent results just before dying
        code = w.proc.exitcode
        if w.state == "starting":
            self._slots[slot] = None
            _stop_worker(w, graceful=False)
            raise VerifierError(
                f"verifier worker exited during start-up (exit code {code}; its traceback is on stderr). "
                "Common causes: the main script starts a Verifier without `if __name__ == '__main__':` "
                "(spawned workers re-import it), or `scorer` is not an importable top-level function.")
        if w.state == "busy":
            outcomes[w.chunk[w.pos]] = (ERROR, None, f"verifier worker died (exit code {code}) on this item")
            self._requeue_rest(w, pending)
            done += 1
        self.stats.worker_restarts += 1
        self._replace(slot)
        return done


# ---------------------------------------------------------------------------------------------
# one-off scoring
# ---------------------------------------------------------------------------------------------
_SHARED: Verifier | None = None
_SHARED_LOCK = threading.Lock()


def _shared_verifier() -> Verifier:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.closed or _SHARED._owner_pid != os.getpid():
            _SHARED = Verifier(timeout_s=5.0, workers=1)
        return _SHARED


def shutdown_shared() -> None:
    """Close the worker behind :func:`score` (it is also closed at interpreter exit)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None and _SHARED._owner_pid == os.getpid():
            _SHARED.close()
        _SHARED = None


def score(completion: str, gold: str, timeout_s: float | None = 5.0) -> float:
    """Reward of one completion (1.0 / 0.0). With a time limit it runs in a shared single worker
    process (thread-safe; calls are serialised); ``timeout_s=None`` scores in the calling thread
    with no limit. Timeouts and internal errors give 0.0 (errors are logged)."""
    if timeout_s is None:
        kind, value, err = _run_item(_score_one, "" if completion is None else str(completion),
                                     "" if gold is None else str(gold), None)
        if kind == ERROR:
            log.warning("verifier: internal error, reward 0.0: %s; completion=%r gold=%r",
                        err, _trunc(str(completion)), _trunc(str(gold)))
        return _outcome_reward(kind, value)
    return _shared_verifier().score_batch([completion], [gold], timeout_s=timeout_s)[0]
