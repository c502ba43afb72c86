"""The OpenAI-compatible HTTP API. It holds no model: every request goes to rank 0's socket."""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ringserve.api.responses import (
    CHAT,
    TEXT,
    Shape,
    StreamPlan,
    Totals,
    choice_request,
    collect_choice,
    open_started,
    stream_choices,
)
from ringserve.api.schemas import ChatCompletionBody, CompletionBody, SamplingFields, error_body
from ringserve.config.settings import Settings
from ringserve.errors import GenerationError
from ringserve.ipc.client import RankClient
from ringserve.ipc.messages import (
    ClusterInfo,
    GenerationRequest,
    InfoRequest,
    TelemetryReply,
    TelemetryRequest,
)

INFO_TIMEOUT_S = 10.0
TELEMETRY_TIMEOUT_S = 30.0


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
        echoed: str = "",
    ) -> Any:
        timeout = settings.request_timeout
        # The first choice is accepted before any answer goes out, so that a refusal (400, 429,
        # 503) is the response's own status.
        first = await open_started(client, request, timeout)
        meta = {
            "id": f"{shape.id_prefix}-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": body.model or served_model.get("id", "ringserve"),
        }
        wants_logprobs = request.sampling.logprobs is not None
        if body.stream:
            plan = StreamPlan(
                client,
                request,
                shape,
                meta,
                body.n,
                body.include_usage,
                wants_logprobs,
                timeout,
                echoed,
            )
            return StreamingResponse(
                stream_choices(plan, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        totals, choices = Totals(), []
        connection = first
        for index in range(body.n):
            if index:
                connection = await open_started(client, choice_request(request, index), timeout)
            try:
                choice, done = await collect_choice(
                    http, connection, shape, index, wants_logprobs, timeout, echoed
                )
            finally:
                await connection.close()
            choices.append(choice)
            totals.add(done)
        return {**meta, "object": shape.object, "choices": choices, "usage": totals.body()}

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
        request = body.to_request(x_conversation_id)
        return await generate(http, body, request, TEXT, body.echoed)

    return app
