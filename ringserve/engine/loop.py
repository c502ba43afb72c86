"""The lockstep loop every rank runs: exchange a header, act on it, repeat.

Only rank 0 has a Leader; it decides each header. The other ranks act on what they receive,
so every rank runs the same model steps in the same order.

A failure while acting (a model step that raises, a bad reply on rank 0) ends the request in
progress, not the rank: the rank says so in the next header exchange, and every rank that
learns of a failure there ends that request the same way. Only a failed collective ends a rank.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ringserve.distributed.idle import IdleBackoff
from ringserve.distributed.ops import GenerateOp
from ringserve.distributed.protocol import Collectives, FinishCode, Header, Op
from ringserve.engine.generation import Generation
from ringserve.engine.leader import Health, Leader
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.engine.prefix_index import Owner

log = logging.getLogger(__name__)


class RankLost(RuntimeError):
    """A collective failed: a peer died or the connection between ranks broke."""


class RankLoop:
    def __init__(
        self,
        collectives: Collectives,
        model: nn.Module,
        prefix_cache: PrefixCache,
        telemetry: Callable[[], bytes],
        health: Health,
        leader: Leader | None = None,
        idle: IdleBackoff | None = None,
    ) -> None:
        self.collectives = collectives
        self.model = model
        self.prefix_cache = prefix_cache
        self.telemetry = telemetry
        self.health = health  # read on rank 0 only, kept alike on every rank
        self.leader = leader
        self.idle = idle or IdleBackoff()
        self.generation: Generation | None = None
        self.active_request = 0  # the request every rank is serving (from the headers), or 0
        self.failed = False  # whether this rank's last action failed, told at the next exchange
        self.forward_pending = False
        self.shutdown_requested = False

    def _exchange(self, header: Header | None, payload: bytes) -> tuple[Header, bytes]:
        try:
            if self.forward_pending and self.collectives.size > 1:
                # generate_step works one token ahead: the next forward pass may still be
                # running on the stream. Wait for it as a model step, so that the exchange
                # behind it is timed alone. (A single rank has no one to wait for, and would
                # lose the overlap of its Python work with that forward pass.)
                with self.health.model_step():
                    mx.synchronize(self.collectives.stream)
                self.forward_pending = False
            with self.health.exchange():
                header = self.collectives.exchange_header(header, self.failed)
                data = self.collectives.broadcast_bytes(payload, header.length)
        except RuntimeError as exc:
            raise RankLost(str(exc)) from exc
        except ValueError as exc:  # words that make no header: the collectives are out of step
            raise RankLost(f"the ranks are out of step ({exc})") from exc
        self.failed = False
        return header, data

    def _after_failures(self, header: Header) -> Header:
        """The op every rank carries out once some rank failed its last action: the request
        in progress ends as failed, whatever rank 0 decided before it knew."""
        if not header.failures:
            return header
        if self.active_request:
            log.warning(
                "%d rank(s) failed serving request %d: ending it",
                header.failures,
                self.active_request,
            )
            return Header(Op.FINISH, request_id=self.active_request, code=FinishCode.FAILED)
        log.warning("%d rank(s) failed between requests", header.failures)
        return header

    def run(self) -> None:
        while True:
            decided: Header | None = None
            payload = b""
            request = None
            if self.leader is not None:
                if self.shutdown_requested:
                    decided = Header(Op.SHUTDOWN)
                else:
                    decided, payload, request = self.leader.next_op()
            header, data = self._exchange(decided, payload)
            header = self._after_failures(header)
            if header.op is Op.IDLE:
                time.sleep(self.idle.next_sleep())
                continue
            self.idle.reset()
            if header.op is Op.SHUTDOWN:
                log.info("shutdown op received")
                return
            try:
                self._act(header, data, request)
            except Exception as exc:
                # The same data makes every rank raise alike; if the ring itself broke, the
                # next exchange fails and ends the rank.
                log.exception("%s failed for request %d", header.op.name, header.request_id)
                self.failed = True
                self.forward_pending = True
                if self.leader is not None:
                    self.leader.failed(exc)

    def _act(self, header: Header, data: bytes, request: Any) -> None:
        leader = self.leader
        if header.op is Op.GENERATE:
            self.active_request = header.request_id
            if leader is not None:
                leader.admitted(request)
            op = GenerateOp.model_validate_json(data)
            prompt, cache, cached = self.prefix_cache.checkout(op.tokens, _owner(op))
            self.generation = Generation(
                self.model, op, prompt, cache, on_prefill_chunk=self.health.progress
            )
            if leader is not None:
                leader.reused(cached)
        elif header.op is Op.STEP:
            assert self.generation is not None
            with self.health.model_step():  # the first step holds the whole prefill
                token = self.generation.step()
            self.forward_pending = True  # also after the last step, until the next exchange
            if leader is not None:
                leader.on_token(token, self.generation.logprobs)
        elif header.op is Op.FINISH:
            generation, self.generation = self.generation, None
            self.active_request = 0
            code = FinishCode(header.code)
            if generation is not None and code is not FinishCode.FAILED:
                self.prefix_cache.checkin(
                    generation.op.tokens,
                    generation.generated,
                    generation.cache,
                    _owner(generation.op),
                    complete=code is not FinishCode.CANCELLED,
                )
            if leader is not None:
                leader.finished(code)
        elif header.op is Op.TELEMETRY:
            reports = self.collectives.gather_bytes(self._telemetry_report())
            if leader is not None:
                leader.deliver_telemetry(reports)

    def _telemetry_report(self) -> bytes:
        """This rank's report; never raises, since every rank must reach the gather."""
        try:
            return self.telemetry()
        except Exception as exc:
            log.exception("telemetry report failed")
            return json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()


def _owner(op: GenerateOp) -> Owner:
    return Owner(op.cache_scope, op.conversation_id)
