"""A step's rewards, verified while the engine is still generating (`verify.overlap`).

An engine that streams (`on_groups`, lens.rollout.base) hands over each batch of finished groups; a
background thread verifies what has arrived (the verifier's worker processes do the work, so generation keeps
the main thread and the accelerator busy), and `result()` waits only for the tail. Rewards and counts are
exactly those of scoring the whole batch at the end: only when the work happens changes. An engine that does
not stream, or `verify.overlap: false`, gets the same object scoring everything in `result()`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lens.rollout import Rollout, SamplingConfig, streams
from lens.verify import Verifier, VerifyStats

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Scores:
    rewards: list[float]               # in the order of the rollouts given to result()
    stats: VerifyStats
    wait_s: float                      # on the critical path: from the end of generation to the last reward
    busy_s: float                      # the verifier's working time, overlapped with generation or not
    streamed_items: int = 0            # rollouts handed to the verifier before generation ended


@dataclass
class _Scored:
    rollouts: list[Rollout] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    stats: VerifyStats = field(default_factory=VerifyStats)
    busy_s: float = 0.0


class RewardStream:
    """Rewards of rollouts against `golds[rollout.prompt_index]`, verified as they arrive (`add`)."""

    def __init__(self, verifier: Verifier, golds: Sequence[str]):
        self.verifier, self.golds = verifier, list(golds)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._done = _Scored()
        self._error: BaseException | None = None

    def add(self, rollouts: Sequence[Rollout]) -> None:
        """Finished rollouts (whole groups) to verify in the background; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lens-verify-stream", daemon=True)
            self._thread.start()
        self._queue.put(list(rollouts))

    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            while items[-1] is not _STOP and not self._queue.empty():  # all that arrived meanwhile, in one call
                items.append(self._queue.get_nowait())               # (fewer round trips to the workers)
            batch = [r for item in items if item is not _STOP for r in item]
            if batch and self._error is None:
                try:
                    self._score(batch, self._done)
                except BaseException as exc:  # re-raised by result(), in the trainer's thread
                    self._error = exc
            if items[-1] is _STOP:
                return

    def _score(self, rollouts: list[Rollout], into: _Scored) -> None:
        t0 = time.perf_counter()
        rewards, stats = self.verifier.score_with_stats([r.text for r in rollouts],
                                                        [self.golds[r.prompt_index] for r in rollouts])
        into.rollouts += rollouts
        into.rewards += rewards
        into.stats.add(stats)
        into.busy_s += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the background thread (after what it is verifying); idempotent."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def result(self, rollouts: Sequence[Rollout]) -> Scores:
        """The rewards of `rollouts`, waiting for the background work and verifying whatever never arrived.

        If what arrived is not exactly `rollouts` (an engine that streamed copies, or other rollouts), all of
        them are verified again now, so that rewards and counts always describe `rollouts` exactly."""
        t0 = time.perf_counter()
        self.close()
        if self._error is not None:
            raise self._error
        done, expected = self._done, {id(r) for r in rollouts}
        arrived = {id(r) for r in done.rollouts}
        if arrived - expected or len(arrived) != len(done.rollouts):
            log.debug("verify stream: the engine streamed rollouts it did not return; verifying them all again")
            done, arrived = _Scored(), set()
        streamed = len(done.rollouts)
        missing = [r for r in rollouts if id(r) not in arrived]
        if missing:
            self._score(missing, done)
        by_id = {id(r): reward for r, reward in zip(done.rollouts, done.rewards)}
        return Scores([by_id[id(r)] for r in rollouts], done.stats, wait_s=time.perf_counter() - t0,
                      busy_s=done.busy_s, streamed_items=streamed)


def generate_verifying(engine, verifier: Verifier, prompts: list[str], golds: Sequence[str], n: int,
                       sampling: SamplingConfig, overlap: bool = True) -> tuple[list[Rollout], RewardStream]:
    """`engine.generate`, each finished group handed to the verifier as it comes (`overlap` and an engine that
    streams); `stream.result(rollouts)` then gives the rewards (what was not verified yet is verified there)."""
    stream = RewardStream(verifier, golds)
    handover = {"on_groups": stream.add} if overlap and streams(engine) else {}
    try:
        return engine.generate(prompts, n, sampling, **handover), stream
    except BaseException:
        stream.close()
        raise
