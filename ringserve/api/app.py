"""The OpenAI-compatible HTTP API. It holds no model: every request goes to rank 0's socket."""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ringserve.api.schemas import (
    ChatCompletionBody,
    CompletionBody,
    SamplingFields,
    error_body,
    usage_body,
)
from ringserve.config.settings import Settings
from ringserve.errors import GenerationError, ProtocolError
from ringserve.ipc.client import RankClient, RankConnection
from ringserve.ipc.messages import (
    ClusterInfo,
    Delta,
    Done,
    Error,
    GenerationRequest,
    InfoRequest,
    Start,
    TelemetryReply,
    TelemetryRequest,
    TokenLogprob,
)

KEEPALIVE_S = 5.0
INFO_TIMEOUT_S = 10.0
TELEMETRY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Shape:
    """How one endpoint names its objects: chat completions or text completions."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def choice(
        self, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

    def chunk_choice(
        self,
        text: str | None,
        finish_reason: str | None,
        first: bool,
        logprobs: dict[str, Any] | None = None,
    ) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {
                "index": 0,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        return {
            "index": 0,
            "text": text or "",
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        }

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """The `logprobs` of a choice: chat's list of entries, or the legacy endpoint's columns
        (`offset`: characters of the completion before these tokens)."""
        if self.chat:
            return {"content": [_chat_logprob(entry) for entry in entries]}
        offsets = list(itertools.accumulate((len(e.token) for e in entries), initial=offset))
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_by_text(e.top) for e in entries],
            "text_offset": offsets[:-1],
        }


def _by_text(top: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The legacy alternatives, keyed by text: of two tokens that decode alike, the likelier."""
    by_text: dict[str, float] = {}
    for token, logprob in top:
        by_text.setdefault(token, logprob)
    return by_text


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    def described(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    top = [described(token, logprob) for token, logprob in entry.top]
    return {**described(entry.token, entry.logprob), "top_logprobs": top}


CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)
TEXT = Shape("text_completion", "text_completion", "cmpl", chat=False)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="ringserve", version="0.1.0")
    client = RankClient(settings.rank_socket)
    served_model: dict[str, str] = {}

    def check_auth(authorization: str | None = Header(default=None)) -> None:
        if not settings.api_key:
            return
        expected = f"Bearer {settings.api_key}"
        if authorization is None or not secrets.compare_digest(authorization, expected):
            raise GenerationError("invalid or missing API key", 401, "invalid_api_key")

    @app.exception_handler(GenerationError)
    async def _generation_error(_: Request, exc: GenerationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.status, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        if param:
            message = f"{param}: {message}"
        return JSONResponse(error_body(message, 400, "invalid_parameter", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), exc.status_code, None), status_code=exc.status_code
        )

    async def cluster_info() -> ClusterInfo:
        reply = await client.call(InfoRequest(), INFO_TIMEOUT_S)
        assert isinstance(reply, ClusterInfo)
        served_model.setdefault("id", reply.model)
        return reply

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        try:
            info = await cluster_info()
        except GenerationError as exc:
            return JSONResponse({"ready": False, "reason": str(exc)}, status_code=503)
        body = {"ready": info.ready, "reason": info.reason, "ranks": info.ranks}
        return JSONResponse(body, status_code=200 if info.ready else 503)

    @app.get("/model/info", dependencies=[Depends(check_auth)])
    async def model_info() -> dict[str, Any]:
        return (await cluster_info()).model_dump(exclude={"kind"})

    @app.get("/gpu/info", dependencies=[Depends(check_auth)])
    async def gpu_info() -> dict[str, Any]:
        reply = await client.call(TelemetryRequest(), TELEMETRY_TIMEOUT_S)
        assert isinstance(reply, TelemetryReply)
        return {"ranks": list(reply.ranks)}

    @app.get("/v1/models", dependencies=[Depends(check_auth)])
    async def models() -> dict[str, Any]:
        info = await cluster_info()
        entry = {"id": info.model, "object": "model", "created": 0, "owned_by": "ringserve"}
        return {"object": "list", "data": [entry]}

    async def generate(
        http: Request,
        body: SamplingFields,
        request: GenerationRequest,
        shape: Shape,
    ) -> Any:
        connection = await client.open(request)
        try:
            first = await _next(connection, settings.request_timeout)
            if not isinstance(first, Start):
                raise _unexpected(first)
        except BaseException:
            await connection.close()
            raise
        meta = {
            "id": f"{shape.id_prefix}-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": body.model or served_model.get("id", "ringserve"),
        }
        wants_logprobs = request.sampling.logprobs is not None
        if body.stream:
            stream = _stream(
                connection,
                meta,
                shape,
                body.include_usage,
                wants_logprobs,
                settings.request_timeout,
            )
            return StreamingResponse(
                stream,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await _collect(
                http, connection, meta, shape, wants_logprobs, settings.request_timeout
            )
        finally:
            await connection.close()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_auth)])
    async def chat_completions(
        http: Request,
        body: ChatCompletionBody,
        x_conversation_id: str | None = Header(default=None),
    ) -> Any:
        try:
            request = body.to_request(x_conversation_id)
        except ValueError as exc:
            raise GenerationError(str(exc), 400, "invalid_parameter") from exc
        return await generate(http, body, request, CHAT)

    @app.post("/v1/completions", dependencies=[Depends(check_auth)])
    async def completions(
        http: Request,
        body: CompletionBody,
        x_conversation_id: str | None = Header(default=None),
    ) -> Any:
        return await generate(http, body, body.to_request(x_conversation_id), TEXT)

    return app


async def _next(connection: RankConnection, timeout: float) -> Any:
    try:
        reply = await connection.next(timeout)
    except TimeoutError as exc:
        raise GenerationError(f"no answer within {timeout:.0f} s", 504, "timeout") from exc
    except ProtocolError as exc:
        raise GenerationError(str(exc), 502, "bad_reply") from exc
    if reply is None:
        raise GenerationError("rank 0 closed the stream early", 503, "ranks_unavailable")
    return reply


def _unexpected(reply: Any) -> GenerationError:
    if isinstance(reply, Error):
        return GenerationError(reply.message, reply.status, reply.code)
    return GenerationError(f"unexpected reply {reply.kind!r} from rank 0", 502, "bad_reply")


async def _collect(
    http: Request,
    connection: RankConnection,
    meta: dict,
    shape: Shape,
    wants_logprobs: bool,
    timeout: float,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    text: list[str] = []
    entries: list[TokenLogprob] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GenerationError(f"the request took longer than {timeout:.0f} s", 504, "timeout")
        try:
            reply = await connection.next(min(1.0, remaining))
        except TimeoutError:
            if await http.is_disconnected():
                raise GenerationError("client disconnected", 499, "client_closed") from None
            continue
        if reply is None:
            raise GenerationError("rank 0 closed the stream early", 503, "ranks_unavailable")
        if isinstance(reply, Delta):
            text.append(reply.text)
            entries.extend(reply.logprobs)
        elif isinstance(reply, Done):
            usage = reply.usage
            logprobs = shape.logprobs(entries) if wants_logprobs else None
            return {
                **meta,
                "object": shape.object,
                "choices": [shape.choice("".join(text), reply.finish_reason, logprobs)],
                "usage": usage_body(
                    usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
                ),
            }
        else:
            raise _unexpected(reply)


async def _stream(
    connection: RankConnection,
    meta: dict,
    shape: Shape,
    include_usage: bool,
    wants_logprobs: bool,
    timeout: float,
) -> AsyncIterator[str]:
    chunk = {**meta, "object": shape.chunk_object}
    deadline = time.monotonic() + timeout
    offset = 0  # characters of the completion's tokens sent so far (the legacy text_offset)
    try:
        if shape.chat:
            yield _sse({**chunk, "choices": [shape.chunk_choice("", None, first=True)]})
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = error_body(f"the request took longer than {timeout:.0f} s", 504, "timeout")
                yield _sse(error)
                return
            try:
                reply = await connection.next(min(KEEPALIVE_S, remaining))
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if isinstance(reply, Delta):
                logprobs = shape.logprobs(reply.logprobs, offset) if wants_logprobs else None
                offset += sum(len(entry.token) for entry in reply.logprobs)
                choice = shape.chunk_choice(reply.text, None, False, logprobs)
                yield _sse({**chunk, "choices": [choice]})
            elif isinstance(reply, Done):
                finish = shape.chunk_choice(None, reply.finish_reason, False)
                yield _sse({**chunk, "choices": [finish]})
                if include_usage:
                    u = reply.usage
                    usage = usage_body(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
                    yield _sse({**chunk, "choices": [], "usage": usage})
                yield _sse("[DONE]")
                return
            else:
                message = reply.message if isinstance(reply, Error) else "rank 0 closed the stream"
                status = reply.status if isinstance(reply, Error) else 503
                yield _sse(error_body(message, status, "generation_failed"))
                return
    finally:
        await connection.close()
