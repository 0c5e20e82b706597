"""Reads of other processes' /proc entries beside the broker's loop: a few
threads, a deadline per read, and a bound on the threads stuck reads may hold.

The broker never waits on the outside world (DESIGN.md), and /proc of a
hostile process is the outside world: reading ``/proc/<pid>/cmdline`` takes
that process's mmap lock, which the process can keep for as long as it likes
(measured here: a thread blocked in mmap() of a FUSE ``direct_io`` file, whose
page a FUSE read the daemon never answers keeps locked, holds the lock for
writing; every reader then waits in mmap_read_lock_killable, ``ps`` too).

So each read is a :class:`Lookup` run by a :class:`LookupPool`: ``workers``
threads take lookups from a queue; the loop collects finished ones with
:meth:`LookupPool.finished` and never blocks on one (or waits a bounded,
budgeted moment with :meth:`LookupPool.wait`). A lookup running past its
deadline is given up (counted ``timed_out``): Python cannot interrupt a
thread blocked in read(2), so that thread is left behind, marked stuck, and a
fresh one takes its place, so one stuck read never stalls the lookups queued
after it. At most ``max_stuck`` threads may be stuck at once; at that bound
no thread is replaced, and once none is left lookups are refused (counted
``dropped``, their answer unknown) until a stuck read returns and its thread
ends. The broker itself runs on whatever happens.

``threaded=False`` runs every lookup inline at submit (tests on fake trees).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("c8.broker.lookups")

QUEUED, RUNNING, DONE, FAILED, TIMED_OUT, DROPPED = (
    "queued", "running", "done", "failed", "timed_out", "dropped")


class Lookup:
    """One read: ``fn()``'s result once ``state`` is DONE; FAILED (it raised),
    TIMED_OUT (given up at its deadline) and DROPPED (never run) mean unknown."""

    __slots__ = ("key", "fn", "deadline", "started", "state", "result")

    def __init__(self, key: Hashable, fn: Callable[[], Any], deadline: float) -> None:
        self.key = key
        self.fn = fn
        self.deadline = deadline
        self.started = 0.0
        self.state = QUEUED
        self.result: Any = None

    @property
    def ended(self) -> bool:
        return self.state not in (QUEUED, RUNNING)


class _Runner:
    """One thread and the lookup it runs; ``stuck`` once its lookup was given up."""

    def __init__(self, pool: LookupPool) -> None:
        self.pool = pool
        self.current: Lookup | None = None
        self.stuck = False
        self.thread = threading.Thread(target=self._loop, name=f"c8-{pool.name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        pool = self.pool
        while True:
            job = pool._queue.get()
            with pool._lock:
                if job is None or self.stuck:
                    if job is not None:
                        pool._queue.put(job)  # not ours any more: hand it on
                    return
                if job.state != QUEUED:  # dropped while queued
                    continue
                job.state, job.started, self.current = RUNNING, time.monotonic(), job
                pool._queued -= 1
            try:
                result, state = job.fn(), DONE
            except Exception as exc:  # a reader's bug or a host's oddity: unknown, never a crash
                result, state = None, FAILED
                log.warning("%s lookup %r failed: %r", pool.name, job.key, exc)
            with pool._lock:
                self.current = None
                if job.state == RUNNING:
                    pool._end(job, state, result)
                else:  # given up meanwhile: its late answer is dropped, its return told
                    pool._returned.append(job)
                if self.stuck:  # its read came back: one stuck thread fewer
                    pool.counts["stuck_threads"] -= 1
                    return


class LookupPool:
    """``workers`` threads running lookups, each with a deadline; counts what
    was asked, failed, timed out and dropped, and the threads stuck now."""

    def __init__(self, name: str, *, workers: int = 2, max_stuck: int = 8, deadline: float = 1.0,
                 max_queue: int = 1 << 16, wait_budget: float = 0.05, threaded: bool = True) -> None:
        self.name = name
        self.workers = workers
        self.max_stuck = max_stuck
        self.deadline = deadline
        self.max_queue = max_queue
        self.wait_budget = wait_budget  # seconds of waiting per second, all waits together
        self.threaded = threaded
        self.counts = {"lookups": 0, "failed": 0, "timed_out": 0, "dropped": 0, "stuck_threads": 0}
        self._queue: queue.SimpleQueue[Lookup | None] = queue.SimpleQueue()
        self._queued = 0
        self._runners: list[_Runner] = []
        self._finished: collections.deque[Lookup] = collections.deque()
        self._returned: collections.deque[Lookup] = collections.deque()  # given up, then came back
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._ended = 0  # lookups ended so far; a wait that timed out waits again only after progress
        self._stalled_at = -1
        self._window = (0.0, 0.0)  # (start, seconds waited in it)

    # -- the loop's side ------------------------------------------------------------
    def submit(self, key: Hashable, fn: Callable[[], Any], deadline: float | None = None) -> Lookup | None:
        """Queue ``fn`` (run on a pool thread); None when refused (counted
        ``dropped``): queue full, or every thread stuck."""
        job = Lookup(key, fn, self.deadline if deadline is None else deadline)
        self.counts["lookups"] += 1
        if not self.threaded:
            try:
                job.result, job.state = fn(), DONE
            except Exception as exc:
                job.state = FAILED
                self.counts["failed"] += 1
                log.warning("%s lookup %r failed: %r", self.name, key, exc)
            self._finished.append(job)
            return job
        self.check()
        with self._lock:
            if not self._runners or self._queued >= self.max_queue:
                self.counts["dropped"] += 1
                return None
            self._queued += 1
        self._queue.put(job)
        return job

    def check(self) -> None:
        """Give up lookups past their deadline (their threads are left stuck)
        and keep ``workers`` threads running while fewer than ``max_stuck`` are
        stuck; with no thread left, queued lookups are dropped."""
        if not self.threaded:
            return
        now = time.monotonic()
        with self._lock:
            for runner in list(self._runners):
                job = runner.current
                if job is not None and job.state == RUNNING and now - job.started >= job.deadline:
                    self._end(job, TIMED_OUT, None)
                    runner.stuck = True
                    self._runners.remove(runner)
                    self.counts["stuck_threads"] += 1
                    log.warning("%s lookup %r gave no answer in %.1fs: given up, its thread left "
                                "stuck (%d stuck now, at most %d)", self.name, job.key, job.deadline,
                                self.counts["stuck_threads"], self.max_stuck)
            while len(self._runners) < self.workers and self.counts["stuck_threads"] < self.max_stuck:
                self._runners.append(_Runner(self))
            if not self._runners and self._queued:
                self._drop_queued()

    def finished(self) -> list[Lookup]:
        """Lookups ended since the last call (their state says how)."""
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def returned(self) -> list[Lookup]:
        """Lookups given up at their deadline whose read has come back since the
        last call (the stall ended; their thread is gone)."""
        out = []
        while self._returned:
            out.append(self._returned.popleft())
        return out

    def wait(self, jobs: list[Lookup], timeout: float) -> bool:
        """Wait at most ``timeout`` s for every lookup of ``jobs`` to end; True
        when they all have. Once a wait times out, later waits return at once
        until some lookup ends, and all waits of one second together last at
        most ``wait_budget``: a stalled read costs the loop one short wait."""
        if all(j.ended for j in jobs):
            return True
        if not self.threaded or self._stalled_at == self._ended:
            return False
        now = time.monotonic()
        start, spent = self._window if now - self._window[0] < 1.0 else (now, 0.0)
        end = now + min(timeout, self.wait_budget - spent)
        with self._progress:
            while not all(j.ended for j in jobs):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._progress.wait(left)
            done = all(j.ended for j in jobs)
            if not done:
                self._stalled_at = self._ended
        self._window = (start, spent + time.monotonic() - now)
        return done

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or running, giving up overdue lookups
        on the way, at most ``timeout`` s (start-up only: the loop never drains)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check()
            with self._progress:
                if not self._queued and not any(r.current for r in self._runners):
                    return True
                self._progress.wait(0.05)
        return False

    def close(self) -> None:
        """Let the threads end once the queue is drained."""
        with self._lock:
            runners, self._runners = self._runners, []
        for _ in runners:
            self._queue.put(None)

    # -- under the lock -------------------------------------------------------------
    def _end(self, job: Lookup, state: str, result: Any) -> None:
        if job.state == QUEUED:
            self._queued -= 1
        job.state, job.result = state, result
        if state in (FAILED, TIMED_OUT, DROPPED):
            self.counts[state] += 1
        self._finished.append(job)
        self._ended += 1
        self._progress.notify_all()

    def _drop_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.state == QUEUED:
                self._end(job, DROPPED, None)
