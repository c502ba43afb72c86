"""Rank 0's view of the ranks: how long it has waited on them, and whether the ring broke."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from ringserve.ipc.messages import RingState


class Health:
    """Whether every rank answers, as rank 0 sees it: no wait on the other ranks has lasted too
    long, and no collective has failed. Read by the socket threads, written by the loop.

    Two waits are timed. A header exchange should take no time beyond the slowest rank's
    arrival, so `heartbeat_timeout` bounds it. A model step (one decode step, or one prefill
    chunk) takes as long as the model needs, which may be seconds for a big model on CPUs, so
    it gets the larger `step_timeout`: a rank that hangs inside the model's own collectives is
    reported then, and a slow step is never taken for a silent rank."""

    def __init__(self, heartbeat_timeout: float, step_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.step_timeout = step_timeout
        self._lock = threading.Lock()
        self._wait: tuple[float, float, str] | None = None  # since, limit, what is awaited
        self._broken: str | None = None
        self.loaded = False

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        with self._timed(self.heartbeat_timeout, "a rank has not answered"):
            yield

    @contextlib.contextmanager
    def model_step(self) -> Iterator[None]:
        with self._timed(self.step_timeout, "a model step has not finished"):
            yield

    def progress(self) -> None:
        """The step in progress moved on (a prefill chunk is done): time it afresh."""
        with self._lock:
            if self._wait is not None:
                self._wait = (time.monotonic(), *self._wait[1:])

    @contextlib.contextmanager
    def _timed(self, limit: float, what: str) -> Iterator[None]:
        with self._lock:
            self._wait = (time.monotonic(), limit, what)
        try:
            yield
        finally:
            with self._lock:
                self._wait = None

    def mark_broken(self, reason: str) -> None:
        with self._lock:
            self._broken = reason

    def problem(self) -> str | None:
        with self._lock:
            if self._broken:
                return self._broken
            if not self.loaded:
                return "the model is still loading"
            wait = self._wait
        if wait is not None:
            since, limit, what = wait
            waited = time.monotonic() - since
            if waited > limit:
                return f"{what} for {waited:.1f} s"
        return None

    def state(self) -> RingState:
        with self._lock:
            broken = self._broken is not None
        if broken:
            return "broken"
        if not self.loaded:
            return "loading"
        return "serving" if self.problem() is None else "waiting"
