"""A rank's view of the ring: how long it has waited on the other ranks, and whether the ring
broke. Rank 0 reports it; every rank leaves the ring when a wait outlasts every limit."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ringserve.ipc.messages import RingState

# A model step may take this many times the slowest recent step of its kind before it counts
# as stalled (never less than the floor, never more than the cap: see Health).
STEP_DEADLINE_FACTOR = 10.0
RECENT_STEPS = 64


class StepTimes:
    """How long the recent model steps of one kind (decode, or with a prefill chunk) took."""

    def __init__(self) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)

    def slowest(self) -> float | None:
        return max(self._recent, default=None)


@dataclass(frozen=True)
class HealthLimits:
    """`heartbeat`: the longest an exchange may wait beyond the slowest rank's arrival.
    `step_min` / `step_max`: the floor and cap of a model step's deadline (the cap is also the
    deadline of a kind of step not seen yet). `frozen`: how long past its deadline a wait may go
    on before the rank gives the ring up as lost (reported meanwhile: the ring may thaw)."""

    heartbeat: float
    step_min: float
    step_max: float
    frozen: float


@dataclass(frozen=True)
class _Wait:
    since: float
    limit: float
    what: str
    grace: float  # how long past `limit` before the rank gives the ring up


class Health:
    """Whether every rank answers, as this rank sees it: no wait on the other ranks has lasted
    too long, and no collective has failed. Read by the socket threads and the watchdog,
    written by the loop.

    A header exchange should take no time beyond the slowest rank's arrival, so the heartbeat
    bounds it. A model step (a decode step, or one with a prefill chunk) takes as long as the
    model needs: its deadline follows what recent steps of its kind took (a multiple of the
    slowest, with a floor), so a stalled decode step is seen in seconds while the first prefill
    chunk of a large model, whose time nothing predicts yet, gets the cap."""

    def __init__(self, limits: HealthLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._wait: _Wait | None = None
        self._broken: str | None = None
        self._decode = StepTimes()
        self._prefill = StepTimes()
        self.loaded = False

    @contextlib.contextmanager
    def exchange(self, after_failure: bool = False) -> Iterator[None]:
        """`after_failure`: this rank's last action failed. A collective that failed inside it
        may leave the next one waiting forever (MLX's ring raises for the first few operations
        after a peer is gone, then waits), so this exchange gets no grace past the heartbeat."""
        grace = 0.0 if after_failure else self.limits.frozen
        with self._timed(self.limits.heartbeat, "a rank has not answered", None, grace):
            yield

    @contextlib.contextmanager
    def model_step(self, prefill: bool = False) -> Iterator[None]:
        """A wait on the model's own work (and its collectives); `prefill`: a prompt is being
        prefilled in it."""
        times = self._prefill if prefill else self._decode
        deadline = self.step_deadline(prefill)
        with self._timed(deadline, "a model step has not finished", times, self.limits.frozen):
            yield

    def step_deadline(self, prefill: bool) -> float:
        slowest = (self._prefill if prefill else self._decode).slowest()
        if slowest is None and not prefill:
            slowest = self._prefill.slowest()  # a decode step is no slower than a prefill chunk
        if slowest is None:
            return self.limits.step_max
        deadline = max(self.limits.step_min, STEP_DEADLINE_FACTOR * slowest)
        return min(self.limits.step_max, deadline)

    def progress(self) -> None:
        """The step in progress moved on (a prefill chunk is done): time it afresh."""
        with self._lock:
            if self._wait is not None:
                self._wait = dataclasses.replace(self._wait, since=time.monotonic())

    @contextlib.contextmanager
    def _timed(
        self, limit: float, what: str, times: StepTimes | None, grace: float
    ) -> Iterator[None]:
        with self._lock:
            self._wait = _Wait(time.monotonic(), limit, what, grace)
        try:
            yield
        except BaseException:
            with self._lock:
                self._wait = None
            raise
        with self._lock:
            wait, self._wait = self._wait, None
        if times is not None and wait is not None:
            times.add(time.monotonic() - wait.since)

    def mark_broken(self, reason: str) -> None:
        with self._lock:
            self._broken = reason

    @property
    def broken(self) -> bool:
        with self._lock:
            return self._broken is not None

    def problem(self) -> str | None:
        with self._lock:
            if self._broken:
                return self._broken
            if not self.loaded:
                return "the model is still loading"
            wait = self._wait
        # A wait with no grace is not reported: past its limit the rank leaves the ring, and
        # its clients learn that the ring lost a rank.
        if wait is not None and wait.grace > 0:
            waited = time.monotonic() - wait.since
            if waited > wait.limit:
                return f"{wait.what} for {waited:.1f} s"
        return None

    def state(self) -> RingState:
        with self._lock:
            broken = self._broken is not None
        if broken:
            return "broken"
        if not self.loaded:
            return "loading"
        return "serving" if self.problem() is None else "waiting"

    def abandoned(self) -> str | None:
        """Why this rank should leave the ring: a wait that outlasted its deadline by the
        frozen limit (a rank that froze, or one gone without closing its connections)."""
        with self._lock:
            wait = self._wait
        if wait is None:
            return None
        waited = time.monotonic() - wait.since
        if waited <= wait.limit + wait.grace:
            return None
        return f"{wait.what} for {waited:.1f} s"
