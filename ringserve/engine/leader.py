"""Rank 0's half of the loop: it alone reads requests, decides each tick and answers clients.

The socket threads queue requests; the loop asks `next_tick` what to broadcast, then tells the
leader what every rank did (admitted, stepped, removed), and the leader answers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
from collections.abc import Sequence

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.distributed.ops import GenerateOp, Tick
from ringserve.distributed.protocol import FinishCode, Header, Op
from ringserve.engine.batch import StepToken
from ringserve.engine.decisions import Snapshot, plan
from ringserve.engine.detokenize import ExactDetokenizers
from ringserve.engine.health import Health
from ringserve.engine.logprobs import token_texts
from ringserve.engine.prompt_scores import PromptScores
from ringserve.engine.replies import Answer
from ringserve.engine.requests import PreparedRequest
from ringserve.engine.splitter import AnswerSplitter, Markers, model_markers
from ringserve.engine.stops import StopMatcher
from ringserve.engine.telemetry_board import TelemetryBoard
from ringserve.ipc.messages import (
    NOT_STARTED,
    NOT_STARTED_MESSAGE,
    RING_LOST,
    RING_LOST_MESSAGE,
    Error,
)

log = logging.getLogger(__name__)
# Clients whose last admission the leader remembers (the least recent are forgotten first).
REMEMBERED_CLIENTS = 4096


class Leader:
    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        queue_size: int,
        max_sequences: int,
        health: Health,
        texts: Sequence[str] | None = None,
    ) -> None:
        """`texts`: what each token decodes to alone (token_texts), if already decoded."""
        self.tokenizer = tokenizer
        self.token_texts = texts if texts is not None else token_texts(tokenizer)
        self.queue_size = queue_size
        self.max_sequences = max_sequences
        self.health = health
        self.answers: dict[int, Answer] = {}  # the sequences in the batch, by request id
        self.telemetry = TelemetryBoard()
        self.detokenizers = ExactDetokenizers(tokenizer)
        self.markers = model_markers(tokenizer)
        self.shutdown_requested = False
        self.generated_tokens = 0  # written by the loop only; the socket threads read it
        # Requests waiting for room in the batch, oldest first (the socket threads add to it).
        self._waiting: collections.deque[PreparedRequest] = collections.deque()
        self._waiting_lock = threading.Lock()
        self._ids = itertools.count(1)
        # When each client's request last got a place in the batch (its admission's number),
        # the least recent first.
        self._served_at: dict[str, int] = {}
        self._admissions = itertools.count()

    def submit(self, request: PreparedRequest) -> None:
        """Queue a request; raises queue.Full when the queue is at its limit (requests whose
        clients left are dropped first: they never hold a place)."""
        with self._waiting_lock:
            self._drop_cancelled()
            if len(self._waiting) >= self.queue_size:
                raise queue.Full
            request.request_id = next(self._ids)
            self._waiting.append(request)

    def _drop_cancelled(self) -> None:
        if any(request.cancelled.is_set() for request in self._waiting):
            for request in [r for r in self._waiting if r.cancelled.is_set()]:
                self._waiting.remove(request)
                request.close()

    @property
    def waiting(self) -> int:
        with self._waiting_lock:
            self._drop_cancelled()
            return len(self._waiting)

    def next_tick(self) -> tuple[Header, bytes, list[PreparedRequest]]:
        """What to broadcast next, and the requests it admits."""
        ending = [
            (rid, FinishCode.CANCELLED if answer.finish is None else answer.finish)
            for rid, answer in self.answers.items()
            if answer.finish is not None or answer.request.cancelled.is_set()
        ]
        decided = plan(
            Snapshot(
                shutdown=self.shutdown_requested,
                running=len(self.answers),
                ending=ending,
                waiting=self.waiting,
                telemetry=self.telemetry.wanted.is_set(),
                max_sequences=self.max_sequences,
            )
        )
        if decided.op is not Op.TICK:
            return Header(decided.op), b"", []
        admitted = self._take_waiting(decided.admit)
        tick = Tick(
            removals=decided.removals,
            admissions=tuple(_generate_op(r) for r in admitted),
            telemetry=decided.telemetry,
        )
        if not (tick.removals or tick.admissions or tick.telemetry):
            return Header(Op.STEP if self.answers else Op.IDLE), b"", []
        payload = tick.model_dump_json().encode()
        return Header(Op.TICK, length=len(payload)), payload, admitted

    def _take_waiting(self, count: int) -> list[PreparedRequest]:
        """Up to `count` waiting requests for the batch's free places, shared between clients:
        each place goes to the oldest request of the client that has the fewest sequences in
        the batch (counting the ones taken now; among equals, the client served longest ago),
        so one client's burst of requests (or its n choices) does not keep another client's
        request waiting behind it. A client alone still gets every place."""
        if count <= 0:
            return []  # most steps: nothing to count
        places = collections.Counter(
            answer.request.client
            for answer in self.answers.values()
            if answer.finish is None and not answer.request.cancelled.is_set()
        )
        taken: list[PreparedRequest] = []
        with self._waiting_lock:
            self._drop_cancelled()
            for _ in range(min(count, len(self._waiting))):
                first = min(range(len(self._waiting)), key=lambda i: self._turn(places, i))
                request = self._waiting[first]
                del self._waiting[first]
                places[request.client] += 1
                self._served_at.pop(request.client, None)
                self._served_at[request.client] = next(self._admissions)
                while len(self._served_at) > REMEMBERED_CLIENTS:
                    self._served_at.pop(next(iter(self._served_at)))
                taken.append(request)
        return taken

    def _turn(self, places: collections.Counter[str], index: int) -> tuple[int, int, int]:
        client = self._waiting[index].client
        return places[client], self._served_at.get(client, -1), index

    def not_admitted(self, requests: Sequence[PreparedRequest]) -> None:
        """Requests a tick took from the queue that the ranks did not apply: first in line."""
        with self._waiting_lock:
            self._waiting.extendleft(reversed(requests))

    def admission_failed(self, request: PreparedRequest, failure: str | None) -> None:
        """Admitting this request failed: it ends with the error."""
        answer = self._answer(request)
        answer.fail(failure)
        answer.end(FinishCode.FAILED)

    def admitted(self, request: PreparedRequest, cached_tokens: int) -> None:
        request.admitted = True
        answer = self._answer(request)
        answer.cached_tokens = cached_tokens
        self.answers[request.request_id] = answer

    def _answer(self, request: PreparedRequest) -> Answer:
        shape = request.shape
        markers = self.markers if shape.chat else Markers()
        if not shape.markers:  # only a think block the template opened is closed
            markers = Markers(think=markers.think if shape.thinking else None)
        splitter = AnswerSplitter(markers, shape.thinking, self.tokenizer.tool_parser, shape.tools)
        stops = StopMatcher(request.sampling.stop)
        return Answer(request, self.detokenizers.fresh(), stops, splitter)

    def scored(self, scores: Sequence[PromptScores]) -> None:
        """The prompt chunks a step scored: each goes out to its answer's client. A failure
        here is one request's (its answer ends as failed), never the step's."""
        for chunk in scores:
            answer = self.answers.get(chunk.request_id)
            if answer is None:
                continue
            try:
                answer.scored(self.token_texts, chunk)
            except Exception as exc:
                log.exception("request %d: the prompt's scores failed", chunk.request_id)
                answer.fail(f"rank 0 raised {type(exc).__name__}: {exc}")

    def took(self, tokens: Sequence[StepToken]) -> None:
        """The tokens a step took: each answer's text goes out, and its finish is decided. A
        failure here is one request's (its answer ends as failed), never the step's."""
        self.generated_tokens += len(tokens)
        for taken in tokens:
            answer = self.answers.get(taken.request_id)
            if answer is None:
                continue
            try:
                answer.take(self.tokenizer, taken.token, taken.logprobs)
            except Exception as exc:
                log.exception("request %d: a token's reply failed", taken.request_id)
                answer.fail(f"rank 0 raised {type(exc).__name__}: {exc}")

    def removed(self, request_id: int, code: FinishCode) -> None:
        answer = self.answers.pop(request_id, None)
        if answer is not None:
            answer.end(code)

    def batch_failed(self, failure: str | None) -> None:
        """Every sequence was dropped: each answer ends, as failed unless it was finished."""
        for request_id, answer in list(self.answers.items()):
            if answer.finish in (None, FinishCode.FAILED):
                answer.fail(failure)
            assert answer.finish is not None
            self.removed(request_id, answer.finish)

    def deliver_telemetry(self, reports: list[bytes]) -> None:
        self.telemetry.deliver(reports)

    def ring_lost(self) -> None:
        """The ring lost a rank: every request being generated ends with an error that says
        so, and every waiting one is told it was never started (the API may send it again)."""
        lost = Error(status=503, message=RING_LOST_MESSAGE, code=RING_LOST)
        for answer in self.answers.values():
            answer.request.reply(lost)
            answer.request.close()
        self.answers.clear()
        not_started = Error(status=503, message=NOT_STARTED_MESSAGE, code=NOT_STARTED)
        with self._waiting_lock:
            waiting, self._waiting = self._waiting, collections.deque()
        for request in waiting:
            request.reply(not_started)
            request.close()


def _generate_op(request: PreparedRequest) -> GenerateOp:
    return GenerateOp(
        request_id=request.request_id,
        tokens=tuple(request.tokens),
        sampling=request.sampling,
        seed=request.seed,
        max_tokens=request.max_tokens,
        conversation_id=request.conversation_id,
        cache_scope=request.cache_scope,
        grammar=request.shape.grammar,
        prompt_logprobs=request.prompt_logprobs,
    )
