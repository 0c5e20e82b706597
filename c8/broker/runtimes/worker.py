"""Metadata lookups beside the broker's loop: a thread, a queue, a deadline per job.

The broker never waits on the outside world (DESIGN.md). Reading a runtime's
state is bounded by c8.host (no FIFO, no device, capped, typed), but a read
can still stall where no flag helps: a file on a hung NFS or FUSE mount, a
``cmdline`` whose process holds its mm lock, a daemon that never answers. So
every lookup runs here: the loop submits a job and waits for it at most a
short ``wait`` (so a container's first events usually carry its name), then
goes on with the identity unknown and collects the answer later.

A job running past its deadline is given up (counted); its thread is left to
finish alone and a fresh one takes the queue. After ``max_abandoned`` stuck
threads the worker stops taking jobs: every lookup is then unknown, counted,
and the broker still runs. ``Worker(threaded=False)`` runs jobs inline (tests
on fake trees).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("c8.broker.runtimes.worker")


class Job:
    """One lookup: done once it has a result, failed, or was given up."""

    __slots__ = ("fn", "deadline", "done", "result", "failed", "started", "_lock")

    def __init__(self, fn: Callable[[], Any], deadline: float) -> None:
        self.fn = fn
        self.deadline = deadline
        self.done = threading.Event()
        self.result: Any = None
        self.failed = False  # raised, or given up at its deadline: the answer is "unknown"
        self.started = 0.0
        self._lock = threading.Lock()

    def _finish(self, result: Any, failed: bool) -> bool:
        with self._lock:
            if self.done.is_set():
                return False  # given up meanwhile: a late answer is dropped
            self.result, self.failed = result, failed
            self.done.set()
            return True


class _Runner:
    """One worker thread and the job it is running."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.current: Job | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="c8-metadata", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        q = self.worker._queue
        while not self.abandoned:
            job = q.get()
            if job is None:
                return
            if self.abandoned:  # given up while waiting on get(): hand the job on
                q.put(job)
                return
            job.started = time.monotonic()
            self.current = job
            self.worker._run(job)
            self.current = None


class Worker:
    """Runs lookups with a deadline each; counts what failed and why."""

    def __init__(self, *, threaded: bool = True, max_queue: int = 1024,
                 max_abandoned: int = 4, wait_budget: float = 0.25) -> None:
        self.threaded = threaded
        self.wait_budget = wait_budget  # seconds of waiting per second, all waits together
        self._window = (0.0, 0.0)  # (start, seconds waited in it)
        self.max_abandoned = max_abandoned
        self.counts = {"jobs": 0, "failed": 0, "timed_out": 0, "dropped": 0, "stuck_threads": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._runner: _Runner | None = None
        self._progress = 0  # jobs finished; a wait that timed out waits again only after progress
        self._stalled_at = -1
        self.disabled = False

    def _run(self, job: Job) -> None:
        try:
            result = job.fn()
        except Exception as exc:  # a reader's bug or a host's oddity: unknown, never a crash
            if job._finish(None, True):
                self.counts["failed"] += 1
                log.warning("metadata lookup failed: %r", exc)
        else:
            job._finish(result, False)
        self._progress += 1

    def submit(self, fn: Callable[[], Any], deadline: float = 2.0) -> Job | None:
        """Queue ``fn``; None when the worker is disabled or its queue full (counted)."""
        self.check()
        if self.disabled:
            self.counts["dropped"] += 1
            return None
        job = Job(fn, deadline)
        self.counts["jobs"] += 1
        if not self.threaded:
            job.started = time.monotonic()
            self._run(job)
            return job
        if self._runner is None:
            self._runner = _Runner(self)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.counts["dropped"] += 1
            return None
        return job

    def wait(self, job: Job | None, timeout: float) -> bool:
        """Wait at most ``timeout`` for ``job``; True when it is done. Once a
        wait times out, later waits return at once until some job finishes,
        so a stalled lookup costs the loop one ``timeout``, not one per call;
        and all waits of one second together last at most ``wait_budget``."""
        if job is None:
            return False
        if job.done.is_set() or not self.threaded:
            return job.done.is_set()
        if self._stalled_at == self._progress:
            return False
        now = time.monotonic()
        start, spent = self._window if now - self._window[0] < 1.0 else (now, 0.0)
        timeout = min(timeout, self.wait_budget - spent)
        if timeout <= 0:
            return False
        done = job.done.wait(timeout)
        self._window = (start, spent + time.monotonic() - now)
        if not done:
            self._stalled_at = self._progress
        return done

    def check(self) -> None:
        """Give up a job past its deadline: its thread is left behind, a new
        one takes the queue (after ``max_abandoned`` of them, stop taking jobs)."""
        runner = self._runner
        job = runner.current if runner is not None else None
        if job is None or time.monotonic() - job.started < job.deadline:
            return
        if job._finish(None, True):
            self.counts["timed_out"] += 1
            log.warning("metadata lookup gave no answer in %.1fs: given up", job.deadline)
        runner.abandoned = True
        self.counts["stuck_threads"] += 1
        if self.counts["stuck_threads"] >= self.max_abandoned:
            self.disabled = True
            self._runner = None
            log.error("%d metadata lookups stuck: container names stay unknown from now on",
                      self.counts["stuck_threads"])
            self._fail_queued()
            return
        self._runner = _Runner(self)

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job._finish(None, True):
                self.counts["dropped"] += 1

    def close(self) -> None:
        """Let the thread end once the queue is drained."""
        if self._runner is not None:
            self._runner.abandoned = True
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._runner = None
