"""The lockstep loop every rank runs: exchange a header (and a tick's payload), act on it,
repeat; one exchange per engine step.

Only rank 0 has a Leader; it decides each header. The other ranks act on what they receive,
so every rank's batch holds the same sequences and runs the same steps in the same order.

What can go wrong while serving, and what every rank then does alike:
- an action fails (a step raises; admitting or removing a sequence raises): the rank says so
  in the next exchange, and every rank drops the whole batch and the prefix cache (after a
  failure on one rank alone their states may differ) and starts afresh, before acting on
  anything else. The answers end with an error; the ring goes on serving.
- a rank took other tokens than rank 0 (the exchange shows every rank's): the same.
- a collective fails: the rank is lost (RankLost) and leaves the ring (see rank.py).
A failed action is answered after the exchange that follows it: when that exchange fails too,
the action most likely failed because the ring broke, and the answers say the ring lost a rank
rather than what the broken collective raised.
A failure is only containable when it leaves the ranks' collectives paired: a rank that raises
inside the model's own collectives while the others wait there cannot be (it is a lost ring).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import mlx.core as mx

from ringserve.distributed.idle import IdleBackoff
from ringserve.distributed.ops import STEP_ONLY, Tick
from ringserve.distributed.protocol import Collectives, Header, Op
from ringserve.engine.batch import BatchEngine
from ringserve.engine.health import Health
from ringserve.engine.leader import Leader
from ringserve.engine.requests import PreparedRequest

log = logging.getLogger(__name__)
# Steps of the warm-up: its prompt's chunk, and the decode steps that follow it.
WARM_UP_STEPS = 3


class RankLost(RuntimeError):
    """A collective failed: a peer died or the connection between ranks broke."""


class RankLoop:
    def __init__(
        self,
        collectives: Collectives,
        batch: BatchEngine,
        telemetry: Callable[[], bytes],
        health: Health,
        leader: Leader | None = None,
        idle: IdleBackoff | None = None,
    ) -> None:
        self.collectives = collectives
        self.batch = batch
        self.telemetry = telemetry
        self.health = health  # read on rank 0 only, kept alike on every rank
        self.leader = leader
        self.idle = idle or IdleBackoff()
        self.tokens: tuple[int, ...] = ()  # what this rank took in its last step
        self.failed = False  # this rank's last action failed: told in the next exchange
        self.failure: str | None = None  # rank 0's account of it, answered after that exchange
        self.failed_admission: PreparedRequest | None = None  # the request it failed to admit
        self.forward_pending = False
        self.shutdown_requested = False

    def _exchange(self, header: Header | None, payload: bytes) -> tuple[Header, bytes]:
        try:
            if self.forward_pending and self.collectives.size > 1:
                # The batch works one token ahead: the next forward pass may still be running
                # on the stream. Wait for it as a model step, so that the exchange behind it is
                # timed alone. (A single rank has no one to wait for, and would lose the
                # overlap of its Python work with that forward pass.)
                with self.health.model_step(self.batch.prefilling):
                    mx.synchronize(self.collectives.stream)
                self.forward_pending = False
            with self.health.exchange(after_failure=self.failed):
                header = self.collectives.exchange_header(header, self.tokens, self.failed)
                data = self.collectives.broadcast_bytes(payload, header.length)
        except RuntimeError as exc:
            self._unsettled_back()
            raise RankLost(str(exc)) from exc
        except ValueError as exc:  # words that make no header: the collectives are out of step
            self._unsettled_back()
            raise RankLost(f"the ranks are out of step ({exc})") from exc
        self.failed = False
        return header, data

    def _unsettled_back(self) -> None:
        """The ring is lost: a request whose admission failed waits again, with the others."""
        if self.leader is not None and self.failed_admission is not None:
            self.leader.not_admitted([self.failed_admission])
        self.failed_admission = None

    def warm_up(self) -> None:
        """Before serving, every rank runs one prompt chunk and a few decode steps of a
        throwaway sequence, alike: the model's first steps are compiled before a client waits
        on them, and timed, so that a stalled step is told from a slow one from the start (a
        kind of step not timed yet gets the longest deadline)."""
        self.batch.start_warm_up()
        try:
            for _ in range(WARM_UP_STEPS):
                with self.health.model_step(self.batch.prefilling):
                    self.batch.step()
                    mx.synchronize(self.collectives.stream)
        except RuntimeError as exc:  # as a failed collective raises
            raise RankLost(str(exc)) from exc
        except Exception:
            # The model refused the throwaway prompt: on every rank alike, as it computes the
            # same thing everywhere.
            log.exception("the warm-up failed; serving without it")
            self.batch.drop_all()
            return
        self.batch.end_warm_up()

    def run(self) -> None:
        while True:
            decided, payload, admitted = self._decide()
            header, data = self._exchange(decided, payload)
            if header.failed or header.diverged:
                self._drop_batch(header, admitted)
                continue
            if header.op is Op.IDLE:
                time.sleep(self.idle.next_sleep())
                continue
            self.idle.reset()
            if header.op is Op.SHUTDOWN:
                log.info("shutdown op received")
                return
            tick = Tick.model_validate_json(data) if header.op is Op.TICK else STEP_ONLY
            self._apply(tick, admitted)

    def _decide(self) -> tuple[Header | None, bytes, list[PreparedRequest]]:
        if self.leader is None:
            return None, b"", []
        self.leader.shutdown_requested = self.shutdown_requested
        return self.leader.next_tick()

    def _drop_batch(self, header: Header, admitted: list[PreparedRequest]) -> None:
        """Some rank failed or diverged: every rank drops the batch, whatever rank 0 decided
        before it knew (the requests that tick would have admitted wait again)."""
        what = "failed" if header.failed else "took other tokens than rank 0"
        count = header.failed or header.diverged
        if not header.failed:
            log.error("rank 0 took %s; this rank took %s", header.tokens, self.tokens)
        dropped = self.batch.drop_all()
        self.tokens = ()
        log.warning(
            "%d rank(s) %s: dropped %d sequence(s) and the prefix cache", count, what, len(dropped)
        )
        if self.leader is not None:
            self.leader.not_admitted(admitted)
            diverged = f"{count} rank(s) {what}, so every sequence was dropped"
            failure = self.failure if header.failed else diverged
            if self.failed_admission is not None:
                self.leader.admission_failed(self.failed_admission, failure)
            self.leader.batch_failed(failure)
        self.failure, self.failed_admission = None, None

    def _apply(self, tick: Tick, admitted: list[PreparedRequest]) -> None:
        """The tick's parts in a fixed order. Telemetry comes first and cannot fail: every rank
        must reach its gather. A failure in the rest is told in the next exchange."""
        leader = self.leader
        if tick.telemetry:
            report = self._telemetry_report()
            try:
                with self.health.exchange():
                    reports = self.collectives.gather_bytes(report)
            except RuntimeError as exc:
                raise RankLost(str(exc)) from exc
            if leader is not None:
                leader.deliver_telemetry(reports)
        waiting = {request.request_id: request for request in admitted}
        admitting = False
        try:
            for removal in tick.removals:
                self.batch.remove(removal.request_id, removal.code)
                if leader is not None:
                    leader.removed(removal.request_id, removal.code)
            admitting = True
            for op in tick.admissions:
                cached = self.batch.admit(op)
                if leader is not None:
                    leader.admitted(waiting[op.request_id], cached)
                    del waiting[op.request_id]
            admitting = False
            if tick.step:
                self._step()
        except Exception as exc:
            log.exception("a tick failed")
            self.failed = True
            # No wait for the stream: what a failed step left there may never finish (a peer
            # gone). The exchange comes next on the same stream, and fails if the ring did.
            self.forward_pending = False
            if leader is not None:
                self.failure = f"rank 0 raised {type(exc).__name__}: {exc}"
                unserved = list(waiting.values())
                if admitting and unserved:
                    self.failed_admission = unserved.pop(0)
                leader.not_admitted(unserved)

    def _step(self) -> None:
        with self.health.model_step(self.batch.prefilling):
            outcome = self.batch.step()
        self.forward_pending = True  # also after the last step, until the next exchange
        self.tokens = tuple(t.token for t in outcome.tokens)
        if self.leader is not None:
            self.leader.scored(outcome.scores)  # a prompt's scores precede its first token
            self.leader.took(outcome.tokens)

    def _telemetry_report(self) -> bytes:
        """This rank's report; never raises, since every rank must reach the gather."""
        try:
            return self.telemetry()
        except Exception as exc:
            log.exception("telemetry report failed")
            return json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
