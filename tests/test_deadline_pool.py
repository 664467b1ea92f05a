"""lens.deadline_pool: any function per item in worker processes, each item under its own deadline.

The functions below run in the spawned workers, which import them from this module. ``_shout``
misbehaves only on a marker argument (sleeps, ignores the soft limit, raises, exits) and otherwise
upper-cases its text, so a pool can be checked to keep working after the misbehaviour.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lens.deadline_pool import DIED, ERROR, TIMEOUT, VALUE, DeadlinePool, DeadlinePoolError, Outcome, run_inline

_GREETING = "unset"


def _shout(text: str) -> str:
    if text == "SLOW":
        time.sleep(60)  # interrupted by the worker's soft (SIGALRM) limit
    elif text == "STUBBORN":  # ignores the soft limit: only the parent's kill stops it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    elif text == "RAISE":
        raise RuntimeError("injected failure")
    elif text == "CRASH":
        os._exit(3)
    return text.upper()


def _set_greeting() -> None:
    global _GREETING
    _GREETING = "hello"


def _greet(name: str) -> str:
    return f"{_GREETING}, {name}"


def _failing_initializer() -> None:
    raise RuntimeError("broken install")


def test_any_function_values_in_input_order():
    with DeadlinePool(divmod, workers=2, timeout_s=5.0, chunk_size=3) as pool:
        assert pool.run([(n, 7) for n in range(20)]) == [Outcome(VALUE, divmod(n, 7)) for n in range(20)]
        assert pool.run([]) == [] and pool.restarts == 0


def test_initializer_runs_in_each_worker_before_work():
    with DeadlinePool(_greet, workers=2, initializer=_set_greeting) as pool:
        assert [o.value for o in pool.run([("a",), ("b",), ("c",)])] == ["hello, a", "hello, b", "hello, c"]


def test_failing_initializer_raises():
    with DeadlinePool(_greet, workers=1, initializer=_failing_initializer) as pool:
        with pytest.raises(DeadlinePoolError, match="broken install"):
            pool.run([("a",)])


def test_soft_timeout_and_the_worker_keeps_working():
    with DeadlinePool(_shout, workers=1, timeout_s=1.0) as pool:
        pid = pool.pids[0]
        t0 = time.monotonic()
        assert [o.kind for o in pool.run([("a",), ("SLOW",), ("b",)])] == [VALUE, TIMEOUT, VALUE]
        assert time.monotonic() - t0 < 10
        assert pool.restarts == 0 and pool.pids == [pid]  # the same worker, not a replacement
        assert pool.run([("c",)]) == [Outcome(VALUE, "C")]


def test_hard_timeout_kills_and_replaces_the_worker():
    with DeadlinePool(_shout, workers=1, timeout_s=1.0, chunk_size=8, kill_grace_s=0.5) as pool:
        old_pid = pool.pids[0]
        t0 = time.monotonic()
        got = pool.run([("a",), ("STUBBORN",), ("b",), ("c",)])
        assert got == [Outcome(VALUE, "A"), Outcome(TIMEOUT), Outcome(VALUE, "B"), Outcome(VALUE, "C")]
        assert time.monotonic() - t0 < 15  # the rest of the chunk is re-queued to the new worker
        assert pool.restarts == 1
        assert pool.pids[0] != old_pid
        with pytest.raises(ProcessLookupError):  # killed and reaped, not a zombie
            os.kill(old_pid, 0)
        assert pool.run([("d",)]) == [Outcome(VALUE, "D")]


def test_exception_is_the_items_outcome():
    with DeadlinePool(_shout, workers=2) as pool:
        raised, fine = pool.run([("RAISE",), ("x",)])
        assert raised.kind == ERROR and "RuntimeError: injected failure" in raised.error
        assert fine == Outcome(VALUE, "X") and pool.restarts == 0


def test_worker_death_is_the_items_outcome_and_rest_of_chunk_runs():
    with DeadlinePool(_shout, workers=1, chunk_size=8, name="shouter") as pool:
        a, crashed, b = pool.run([("a",), ("CRASH",), ("b",)])
        assert (a, b) == (Outcome(VALUE, "A"), Outcome(VALUE, "B"))
        assert crashed.kind == DIED and "shouter worker died (exit code 3)" in crashed.error
        assert pool.restarts == 1


def test_per_call_timeout_override_and_validation():
    with DeadlinePool(_shout, workers=1, timeout_s=30.0) as pool:
        assert pool.run([("SLOW",)], timeout_s=0.5) == [Outcome(TIMEOUT)]
        with pytest.raises(ValueError):
            pool.run([("a",)], timeout_s=0)
    for bad in ({"workers": -1}, {"timeout_s": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            DeadlinePool(_shout, **bad)


def test_called_from_several_threads():
    results: dict[int, list] = {}
    with DeadlinePool(_shout, workers=2) as pool:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, pool.run([(f"t{i}",)] * 3)))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == {i: [Outcome(VALUE, f"T{i}")] * 3 for i in range(4)}


def test_inline_mode_runs_in_the_calling_thread_without_a_limit():
    with DeadlinePool(_greet, workers=0, initializer=_set_greeting) as pool:
        assert pool.pids == []
        assert pool.run([("x",)]) == [Outcome(VALUE, "hello, x")]
    assert run_inline(_shout, "RAISE").kind == ERROR
    assert run_inline(_shout, "ok") == Outcome(VALUE, "OK")


def test_close_stops_workers():
    pool = DeadlinePool(_shout, workers=2)
    pids = pool.pids
    assert pool.run([("a",)]) == [Outcome(VALUE, "A")]
    t0 = time.monotonic()
    pool.close()
    pool.close()  # idempotent
    assert time.monotonic() - t0 < 5
    for pid in pids:  # exited and reaped: no zombies left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert pool.closed
    with pytest.raises(DeadlinePoolError):
        pool.run([("a",)])
