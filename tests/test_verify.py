"""lens.verify: the math-verify reward and how a Verifier counts timeouts, errors and worker deaths.

The pool mechanics themselves (soft and hard limits, replacing workers, shutdown) are specified in
test_deadline_pool.py. The scorers below are the test hook (``Verifier(scorer=...)``): top-level
functions that the spawned workers import from this module. Each misbehaves only on a marker
completion and otherwise delegates to the real ``_score_one``, so a Verifier can be checked to keep
working after the misbehaviour.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from lens import verify
from lens.verify import Verifier, VerifierError, VerifyStats, extract_boxed, score

HALF = "\\boxed{\\frac{1}{2}}"


def _slow_or_real(completion: str, gold: str):
    if completion == "SLOW":
        time.sleep(60)  # interrupted by the worker's soft (SIGALRM) limit
    return verify._score_one(completion, gold)


def _stubborn_or_real(completion: str, gold: str):
    if completion == "STUBBORN":  # ignores the soft limit: only the parent's kill stops it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return verify._score_one(completion, gold)


def _raising_or_real(completion: str, gold: str):
    if completion == "RAISE":
        raise RuntimeError("injected failure")
    return verify._score_one(completion, gold)


def _crashing_or_real(completion: str, gold: str):
    if completion == "CRASH":
        os._exit(3)
    return verify._score_one(completion, gold)


def _score_inside_pool_worker(_):
    """Runs in a daemonic multiprocessing.Pool worker, which may not normally start processes."""
    try:
        with Verifier(timeout_s=5.0, workers=1) as v:
            batch = v.score_batch([HALF, "\\boxed{3}"], ["0.5", "4"])
        return batch, score("The answer is 7", "7")
    finally:
        verify.shutdown_shared()


@pytest.fixture(scope="module")
def pool():
    with Verifier(timeout_s=10.0, workers=2) as v:
        yield v


# ---- answer extraction -------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{1} no, \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{3} then \\boxed{4", "3"),  # truncated last box: previous complete one
    ("$\\boxed 5$", "5"),
    ("no box here", None),
    ("\\boxedx{1}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---- real math-verify through the pool ---------------------------------------------------------
CASES = [  # (completion, gold, reward)
    (HALF, "0.5", 1.0),
    (HALF, "\\frac12", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    ("First \\boxed{3}, wait, actually \\boxed{4}", "4", 1.0),  # last boxed wins
    ("First \\boxed{4}, wait, actually \\boxed{3}", "4", 0.0),
    ("The answer is 7", "7", 1.0),  # no box: math-verify's own extraction
    ("\\boxed{(3, \\frac{\\pi}{2})}", "(3, \\frac{\\pi}{2})", 1.0),
    ("\\boxed{8}", "7", 0.0),
    ("}{ \\boxed{} $$ \\frac{", "7", 0.0),  # garbage
    ("", "7", 0.0),
]


def test_single_cases(pool):
    for completion, gold, want in CASES:
        assert pool.score_batch([completion], [gold]) == [want], (completion, gold)


def test_batch_order_preserved_and_stats(pool):
    items = CASES * 6  # mixed correct / incorrect, with duplicates
    calls_before = pool.stats.calls
    got = pool.score_batch([c for c, _, _ in items], [g for _, g, _ in items])
    assert got == [w for _, _, w in items]
    d = pool.last_batch_stats
    assert pool.stats.calls == calls_before + len(items)
    assert d.calls == len(items)
    assert d.correct == sum(w for _, _, w in items)
    assert d.timeouts == d.errors == d.worker_restarts == 0


def test_parse_failures_counted(pool):
    assert pool.score_batch(["I do not know.", "", HALF], ["5", "5", "0.5"]) == [0.0, 0.0, 1.0]
    d = pool.last_batch_stats
    assert (d.parse_failures, d.correct, d.errors) == (2, 1, 0)
    assert set(d.as_dict()) >= {"calls", "correct", "timeouts", "parse_failures", "errors"}


def test_unparseable_gold_is_an_error_not_a_silent_zero(pool, caplog):
    with caplog.at_level(logging.WARNING, logger="lens.verify"):
        assert pool.score_batch(["\\boxed{1}"], [""]) == [0.0]
    assert pool.last_batch_stats.errors == 1
    assert "gold answer has no extractable value" in caplog.text
    with pytest.raises(VerifierError):
        pool.score_batch(["\\boxed{1}"], [""], strict=True)


def test_called_from_non_main_threads(pool):
    """The key property: math-verify's signal-based timeout would fail here; ours must not."""
    results, errors = {}, []

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=("batch", lambda: pool.score_batch([HALF, "\\boxed{2}"], ["0.5", "3"]))),
        threading.Thread(target=run, args=("score", lambda: score(HALF, "0.5"))),
        threading.Thread(target=run, args=("inline", lambda: score(HALF, "\\frac12", timeout_s=None))),
        threading.Thread(target=run, args=("batch2", lambda: pool.score_batch(["The answer is 7"], ["7"]))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == {"batch": [1.0, 0.0], "score": 1.0, "inline": 1.0, "batch2": [1.0]}


def test_works_inside_a_daemonic_worker_process():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as p:
        assert p.map(_score_inside_pool_worker, [0], chunksize=1) == [([1.0, 0.0], 1.0)]


def test_score_function():
    assert score(HALF, "0.5") == 1.0
    assert score("\\boxed{3}", "0.5") == 0.0
    assert score("The answer is 7", "7", timeout_s=None) == 1.0
    assert score("\\boxed{x}", "7", timeout_s=2.0) == 0.0


def test_soft_timeout_is_counted_and_pool_keeps_working():
    with Verifier(timeout_s=1.0, workers=1, scorer=_slow_or_real) as v:
        t0 = time.monotonic()
        assert v.score_batch(["\\boxed{1}", "SLOW", HALF], ["1", "1", "0.5"]) == [1.0, 0.0, 1.0]
        assert time.monotonic() - t0 < 10
        assert (v.stats.timeouts, v.stats.correct, v.stats.worker_restarts) == (1, 2, 0)
        assert v.score_batch([HALF], ["0.5"]) == [1.0]  # next call fine


def test_hard_timeout_is_counted_as_a_timeout_and_a_restart():
    with Verifier(timeout_s=1.0, workers=1, scorer=_stubborn_or_real, chunk_size=8, kill_grace_s=0.5) as v:
        t0 = time.monotonic()
        got = v.score_batch(["\\boxed{2}", "STUBBORN", HALF, "\\boxed{5}"], ["2", "1", "0.5", "4"])
        assert got == [1.0, 0.0, 1.0, 0.0]  # the rest of the chunk is re-queued to the new worker
        assert time.monotonic() - t0 < 15
        assert (v.stats.timeouts, v.stats.worker_restarts, v.stats.errors) == (1, 1, 0)
        assert v.score_batch([HALF], ["0.5"]) == [1.0]
        assert v.last_batch_stats.worker_restarts == 0 and v.stats.worker_restarts == 1


def test_injected_error_is_counted_logged_and_strict_raises(caplog):
    with Verifier(timeout_s=5.0, workers=2, scorer=_raising_or_real) as v:
        with caplog.at_level(logging.WARNING, logger="lens.verify"):
            assert v.score_batch(["RAISE", HALF], ["1", "0.5"]) == [0.0, 1.0]
        assert (v.stats.errors, v.stats.correct) == (1, 1)
        assert "injected failure" in caplog.text and "RAISE" in caplog.text
        with pytest.raises(VerifierError, match="injected failure"):
            v.score_batch([HALF, "RAISE"], ["0.5", "1"], strict=True)
        assert v.stats.errors == 2 and v.stats.calls == 4  # counted before raising
        assert v.score_batch([HALF], ["0.5"], strict=True) == [1.0]


def test_worker_crash_is_an_error_and_rest_of_chunk_is_scored():
    with Verifier(timeout_s=5.0, workers=1, scorer=_crashing_or_real, chunk_size=8) as v:
        got = v.score_batch(["\\boxed{1}", "CRASH", "\\boxed{3}"], ["1", "1", "3"])
        assert got == [1.0, 0.0, 1.0]
        assert (v.stats.errors, v.stats.worker_restarts) == (1, 1)


def test_in_process_mode_and_validation():
    with Verifier(workers=0) as v:
        out = []
        th = threading.Thread(target=lambda: out.append(v.score_batch([HALF, "\\boxed{2}"], ["0.5", "3"])))
        th.start()
        th.join(60)
        assert out == [[1.0, 0.0]]
        with pytest.raises(ValueError):
            v.score_batch(["a"], [])
        assert v.score_batch([], []) == []


def test_close_stops_workers():
    v = Verifier(timeout_s=5.0, workers=2)
    pids = v._pool.pids
    assert v.score_batch([HALF], ["0.5"]) == [1.0]
    t0 = time.monotonic()
    v.close()
    v.close()  # idempotent
    assert time.monotonic() - t0 < 5
    for pid in pids:  # exited and reaped: no zombies left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert v.closed
    with pytest.raises(VerifierError):
        v.score_batch([HALF], ["0.5"])


def test_last_batch_stats_counts_one_call_and_stats_all_calls():
    with Verifier(workers=0) as v:
        v.score_batch([HALF, "\\boxed{2}", "no answer"], ["0.5", "3", "1"])
        assert v.last_batch_stats == VerifyStats(calls=3, correct=1, parse_failures=1)
        v.score_batch([HALF], ["0.5"])
        assert v.last_batch_stats == VerifyStats(calls=1, correct=1)
        assert v.stats == VerifyStats(calls=4, correct=2, parse_failures=1)
        assert v.stats.as_dict()["calls"] == 4


def test_stats_add():
    a = VerifyStats(calls=5, correct=2, errors=1)
    a.add(VerifyStats(calls=3, timeouts=1, worker_restarts=1))
    assert a == VerifyStats(calls=8, correct=2, timeouts=1, errors=1, worker_restarts=1)
