"""The OpenAI-compatible HTTP API. It holds no model: every request goes to rank 0's socket."""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ringserve.api.errors import AUTH_RESPONSES, install_error_handlers, invalid_request
from ringserve.api.guard import RequestGuard
from ringserve.api.openapi import (
    READINESS_RESPONSES,
    ChatCompletion,
    Completion,
    ModelList,
    describe,
    generation_responses,
)
from ringserve.api.responses import (
    CHAT,
    TEXT,
    Answer,
    Shape,
    collect_answer,
    open_started,
    plan_jobs,
    stream_answer,
)
from ringserve.api.schemas import ChatCompletionBody, CompletionBody, SamplingFields
from ringserve.cluster.state import RUN_HEADER
from ringserve.config.settings import Settings
from ringserve.errors import GenerationError
from ringserve.ipc.client import RankClient
from ringserve.ipc.framing import MAX_FRAME_BYTES
from ringserve.ipc.messages import (
    ClusterInfo,
    GenerationRequest,
    InfoRequest,
    TelemetryReply,
    TelemetryRequest,
)

INFO_TIMEOUT_S = 10.0
TELEMETRY_TIMEOUT_S = 30.0


@dataclass
class Served:
    """What the API learned from rank 0 about the served model (refreshed by every info call)."""

    model: str = ""
    max_request_bytes: int = MAX_FRAME_BYTES // 2  # until rank 0 has said


def create_app(settings: Settings, run_id: str = "") -> FastAPI:
    """`run_id`: the run `launch.py` started this API for; its readiness answer carries it."""
    client = RankClient(settings.rank_socket)
    served = Served()

    async def cluster_info() -> ClusterInfo:
        reply = await client.call(InfoRequest(), INFO_TIMEOUT_S)
        assert isinstance(reply, ClusterInfo)
        served.model, served.max_request_bytes = reply.model, reply.max_request_bytes
        return reply

    async def body_limit() -> int:
        if not served.model:
            with contextlib.suppress(GenerationError):  # not serving: the route will say so
                await cluster_info()
        return served.max_request_bytes

    app = FastAPI(title="ringserve", version="0.1.0")
    app.add_middleware(RequestGuard, keys=settings.api_keys, body_limit=body_limit)
    install_error_handlers(app)
    describe(app)

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/health/ready", responses=READINESS_RESPONSES)
    async def ready() -> JSONResponse:
        headers = {RUN_HEADER: run_id}
        try:
            info = await cluster_info()
        except GenerationError as exc:
            # Open to anyone: the reason stays general (the API's log has the details).
            reason = "the ranks are not answering" if exc.status == 503 else str(exc)
            return JSONResponse({"ready": False, "reason": reason}, 503, headers=headers)
        body = {"ready": info.ready, "reason": info.reason, "ranks": info.ranks}
        return JSONResponse(body, 200 if info.ready else 503, headers=headers)

    @app.get("/model/info", responses=AUTH_RESPONSES)
    async def model_info() -> dict[str, Any]:
        return (await cluster_info()).model_dump(exclude={"kind"})

    @app.get("/gpu/info", responses=AUTH_RESPONSES)
    async def gpu_info() -> dict[str, Any]:
        reply = await client.call(TelemetryRequest(), TELEMETRY_TIMEOUT_S)
        assert isinstance(reply, TelemetryReply)
        return {"ranks": list(reply.ranks)}

    @app.get("/v1/models", responses={200: {"model": ModelList}, **AUTH_RESPONSES})
    async def models() -> dict[str, Any]:
        info = await cluster_info()
        entry = {"id": info.model, "object": "model", "created": 0, "owned_by": "ringserve"}
        return {"object": "list", "data": [entry]}

    async def generate(
        http: Request, body: SamplingFields, prompts: list[GenerationRequest], shape: Shape
    ) -> Any:
        answer = Answer(
            client=client,
            shape=shape,
            meta={
                "id": f"{shape.id_prefix}-{secrets.token_hex(12)}",
                "created": int(time.time()),
                "model": body.model or served.model or "ringserve",
            },
            jobs=plan_jobs(prompts, body.n),
            include_usage=body.include_usage,
            wants_logprobs=prompts[0].sampling.logprobs is not None,
            timeout=settings.request_timeout,
            deadline=time.monotonic() + settings.request_timeout,
        )
        # The first choice is accepted before any answer goes out, so that a refusal (400, 429,
        # 503) is the response's own status.
        first = await open_started(client, answer.jobs[0].request, answer.deadline)
        if body.stream:
            return StreamingResponse(
                stream_answer(answer, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect_answer(http, answer, first)

    @app.post("/v1/chat/completions", responses=generation_responses(ChatCompletion))
    async def chat_completions(
        http: Request,
        body: ChatCompletionBody,
        x_conversation_id: str | None = Header(default=None),
    ) -> Any:
        try:
            request = body.to_request(x_conversation_id, http.state.cache_scope)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        except ValueError as exc:
            raise GenerationError(str(exc), 400, "invalid_parameter") from None
        return await generate(http, body, [request], CHAT)

    @app.post("/v1/completions", responses=generation_responses(Completion))
    async def completions(
        http: Request,
        body: CompletionBody,
        x_conversation_id: str | None = Header(default=None),
    ) -> Any:
        try:
            requests = body.to_requests(x_conversation_id, http.state.cache_scope)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        return await generate(http, body, list(requests), TEXT)

    return app
