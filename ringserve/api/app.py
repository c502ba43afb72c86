"""The OpenAI-compatible HTTP API. It holds no model: every request goes to rank 0's socket."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import SkipValidation, ValidationError
from starlette.background import BackgroundTask

from ringserve.api.activity import visible
from ringserve.api.anthropic_messages import (
    CountTokensBody,
    MessagesBody,
    message_events,
    message_id,
    whole_message,
)
from ringserve.api.bodies import BodyRoute
from ringserve.api.console import CONSOLE_PATHS, ConsoleBoard, console_router
from ringserve.api.console_state import LiveFigures
from ringserve.api.errors import (
    ADMIN_RESPONSES,
    ANTHROPIC_ERROR_RESPONSES,
    AUTH_RESPONSES,
    ERROR_RESPONSES,
    ParamError,
    install_error_handlers,
    invalid_request,
    retry_after,
)
from ringserve.api.guard import OPEN_PATHS, RequestGuard, salted_scope, sent_by
from ringserve.api.metrics import CONTENT_TYPE, CountRequests, Metrics
from ringserve.api.openai_responses import (
    ResponseRun,
    ResponsesBody,
    ResponseStore,
    response_events,
    started_meta,
    whole_response,
)
from ringserve.api.openapi import (
    READINESS_RESPONSES,
    AnthropicMessage,
    ChatCompletion,
    Completion,
    DeletedResponse,
    InputTokens,
    ModelList,
    ResponseObject,
    describe,
    generation_responses,
)
from ringserve.api.responses import (
    CHAT,
    TEXT,
    Answer,
    Shape,
    collect_answer,
    plan_jobs,
    stream_answer,
    system_fingerprint,
)
from ringserve.api.restarts import not_serving, restarts_view
from ringserve.api.schemas import ChatCompletionBody, CompletionBody, SamplingFields
from ringserve.api.stream import Deadline, RingLink, Started, open_started
from ringserve.config.settings import RUN_HEADER, Settings
from ringserve.errors import GenerationError
from ringserve.ipc.bounds import BodyBounds
from ringserve.ipc.client import RankClient
from ringserve.ipc.messages import (
    ChatRequest,
    ClusterInfo,
    CountRequest,
    GenerationRequest,
    InfoRequest,
    Reply,
    TelemetryReply,
    TelemetryRequest,
    TokenCount,
)

INFO_TIMEOUT_S = 10.0
# A readiness probe answers within this, whatever rank 0 is doing (frozen, say).
READY_TIMEOUT_S = 5.0
TELEMETRY_TIMEOUT_S = 30.0
COUNT_TIMEOUT_S = 30.0
# Each of a scrape's two questions to rank 0: within Prometheus' default 10 s scrape timeout.
SCRAPE_TIMEOUT_S = 3.0
METRICS_PATH = "/metrics"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def translated(make: Callable[[], ChatRequest]) -> ChatRequest:
    """A body's chat request; a rule it breaks that its own fields could not say is a 400."""
    try:
        return make()
    except ValidationError as exc:
        raise invalid_request(exc) from None
    except ValueError as exc:
        param = exc.param if isinstance(exc, ParamError) else None
        raise GenerationError(str(exc), 400, "invalid_parameter", param) from None


async def answered(
    started: Started,
    stream: bool,
    events: Callable[[], AsyncIterator[str]],
    whole: Callable[[], Awaitable[dict[str, Any]]],
) -> Any:
    """A request rank 0 accepted, answered as a stream of events (which closes the socket
    request when it ends) or whole."""
    if stream:
        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(started[0].close),  # also when the stream never began
        )
    try:
        return await whole()
    finally:
        await started[0].close()


@dataclass
class Served:
    """What the API learned from rank 0 about the served model (refreshed by every info call)."""

    model: str = ""
    bounds: BodyBounds | None = None  # what a request body may hold, once rank 0 has said
    fingerprint: str | None = None  # the serving configuration's (OpenAI's system_fingerprint)


def create_app(settings: Settings, run_id: str = "") -> FastAPI:
    """`run_id`: the run `launch.py` started this API for; its readiness answer carries it."""
    metrics = Metrics()
    figures = LiveFigures()

    def observe(reply: Reply) -> None:
        metrics.observe(reply)
        figures.observe(reply)

    client = RankClient(settings.rank_socket, on_reply=observe)
    link = RingLink(client, settings.run_dir)
    served = Served()

    async def cluster_info(timeout: float = INFO_TIMEOUT_S) -> ClusterInfo:
        reply = await client.call(InfoRequest(), timeout)
        assert isinstance(reply, ClusterInfo)
        served.model = reply.model
        served.fingerprint = system_fingerprint(reply)
        served.bounds = BodyBounds(reply.context_limit, reply.max_request_bytes)
        return reply

    async def body_bounds() -> BodyBounds:
        """What a body may hold: rank 0's answer, asked until it gave one (a body is not read
        while the ranks cannot serve it)."""
        if served.bounds is None:
            await cluster_info()
        assert served.bounds is not None
        return served.bounds

    app = FastAPI(title="ringserve", version="0.1.0")
    app.router.route_class = BodyRoute
    open_paths = OPEN_PATHS | CONSOLE_PATHS | ({METRICS_PATH} if settings.metrics_open else set())
    app.add_middleware(
        RequestGuard,
        keys=settings.api_keys,
        admin_keys=settings.admin_keys,
        bounds=body_bounds,
        read_timeout=settings.api_read_timeout,
        open_paths=open_paths,
    )
    # Outermost: it counts the requests the guard turns away too.
    app.add_middleware(CountRequests, metrics=metrics, routes=lambda: app.routes)
    install_error_handlers(app)
    describe(app)
    app.include_router(
        console_router(
            ConsoleBoard(
                cluster_info, client, figures, lambda: restarts_view(link.keeper(), detailed=True)
            )
        )
    )

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/health/ready", responses=READINESS_RESPONSES)
    async def ready() -> JSONResponse:
        headers = {RUN_HEADER: run_id}
        keeper = link.keeper()
        restarts = restarts_view(keeper, detailed=False)
        try:
            info = await cluster_info(READY_TIMEOUT_S)
        except GenerationError as exc:
            # Open to anyone: the reason stays general (the API's log has the details).
            reason = "the ranks are not answering" if exc.status == 503 else str(exc)
            reason, code = not_serving(keeper, reason)
            body = {"ready": False, "reason": reason, "restarts": restarts}
            return JSONResponse(body, 503, headers={**headers, **retry_after(503, code)})
        body = {"ready": info.ready, "reason": info.reason, "ranks": info.ranks}
        body["restarts"] = restarts
        if not info.ready:
            headers.update(retry_after(503))
        return JSONResponse(body, 200 if info.ready else 503, headers=headers)

    @app.get("/model/info", responses=AUTH_RESPONSES)
    async def model_info(http: Request) -> dict[str, Any]:
        info = (await cluster_info()).model_dump(exclude={"kind"})
        restarts = restarts_view(link.keeper(), detailed=True)
        return visible({**info, "restarts": restarts}, http.state.admin)

    @app.get("/gpu/info", responses=AUTH_RESPONSES)
    async def gpu_info(http: Request) -> dict[str, Any]:
        reply = await client.call(TelemetryRequest(), TELEMETRY_TIMEOUT_S)
        assert isinstance(reply, TelemetryReply)
        return {"ranks": [visible(rank, http.state.admin) for rank in reply.ranks]}

    @app.get(
        METRICS_PATH,
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
            **ADMIN_RESPONSES,
        },
    )
    async def prometheus_metrics(http: Request) -> Response:
        if not (http.state.admin or settings.metrics_open):
            raise GenerationError(
                "/metrics shows every key's activity: it needs an admin key "
                "(RINGSERVE_ADMIN_KEY), or RINGSERVE_METRICS_OPEN",
                403,
                "admin_key_required",
            )
        info, telemetry = None, None
        with contextlib.suppress(GenerationError):  # not serving: `ringserve_ready 0` says so
            info = await cluster_info(SCRAPE_TIMEOUT_S)
        if info is not None and info.ready:
            with contextlib.suppress(GenerationError):
                reply = await client.call(TelemetryRequest(), SCRAPE_TIMEOUT_S)
                telemetry = reply if isinstance(reply, TelemetryReply) else None
        exposition = metrics.exposition(info, telemetry, link.keeper())
        return Response(exposition, media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses={200: {"model": ModelList}, **AUTH_RESPONSES})
    async def models() -> dict[str, Any]:
        info = await cluster_info()
        entry = {"id": info.model, "object": "model", "created": 0, "owned_by": "ringserve"}
        return {"object": "list", "data": [entry]}

    async def generate(
        http: Request, body: SamplingFields, prompts: list[GenerationRequest], shape: Shape
    ) -> Any:
        answer = Answer(
            link=link,
            shape=shape,
            meta={
                "id": f"{shape.id_prefix}-{secrets.token_hex(12)}",
                "created": int(time.time()),
                "model": body.model or served.model or "ringserve",
                "system_fingerprint": served.fingerprint,
            },
            jobs=plan_jobs(prompts, body.n),
            include_usage=body.include_usage,
            wants_logprobs=prompts[0].sampling.logprobs is not None,
            deadline=Deadline.after(settings.request_timeout),
            gone=http.is_disconnected,
        )
        # The first choice is accepted before any answer goes out, so that a refusal (400, 429,
        # 503) is the response's own status.
        first = await open_started(link, answer.jobs[0].request, answer.deadline, answer.gone)
        if body.stream:
            return StreamingResponse(
                stream_answer(answer, first),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
                background=BackgroundTask(first[0].close),  # also when the stream never began
            )
        return await collect_answer(http, answer, first)

    @app.post("/v1/chat/completions", responses=generation_responses(ChatCompletion))
    async def chat_completions(
        http: Request,
        body: SkipValidation[ChatCompletionBody],
        x_conversation_id: str | None = Header(default=None),
    ) -> Any:
        scope = salted_scope(http.state.cache_scope, body.cache_salt)
        request = translated(lambda: body.to_request(x_conversation_id, scope))
        return await generate(http, body, [sent_by(request, http.state.cache_scope)], CHAT)

    @app.post("/v1/completions", responses=generation_responses(Completion))
    async def completions(
        http: Request,
        body: SkipValidation[CompletionBody],
        x_conversation_id: str | None = Header(default=None),
    ) -> Any:
        scope = salted_scope(http.state.cache_scope, body.cache_salt)
        try:
            requests = body.to_requests(x_conversation_id, scope)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        mine: list[GenerationRequest] = [sent_by(r, http.state.cache_scope) for r in requests]
        return await generate(http, body, mine, TEXT)

    @app.post("/v1/messages", responses=generation_responses(AnthropicMessage, anthropic=True))
    async def messages(http: Request, body: SkipValidation[MessagesBody]) -> Any:
        request = translated(
            lambda: body.to_request(salted_scope(http.state.cache_scope, body.cache_salt))
        )
        request = sent_by(request, http.state.cache_scope)
        meta = {"id": message_id(), "model": body.model or served.model or "ringserve"}
        deadline = Deadline.after(settings.request_timeout)
        started = await open_started(link, request, deadline, http.is_disconnected)
        return await answered(
            started,
            body.stream,
            lambda: message_events(meta, started, deadline),
            lambda: whole_message(http, meta, started, deadline),
        )

    @app.post(
        "/v1/messages/count_tokens",
        responses={200: {"model": InputTokens}, **ANTHROPIC_ERROR_RESPONSES},
    )
    async def count_tokens(http: Request, body: SkipValidation[CountTokensBody]) -> dict[str, Any]:
        scope = salted_scope(http.state.cache_scope, body.cache_salt)
        request = translated(lambda: body.to_request(scope, generating=False))
        reply = await client.call(CountRequest(request=request), COUNT_TIMEOUT_S)
        assert isinstance(reply, TokenCount)
        return {"input_tokens": reply.tokens}

    stored = ResponseStore(settings.responses_stored_per_key, settings.responses_stored)

    @app.post("/v1/responses", responses=generation_responses(ResponseObject))
    async def create_response(http: Request, body: SkipValidation[ResponsesBody]) -> Any:
        scope = http.state.cache_scope  # whose the stored responses are
        previous = body.previous_response_id
        history = stored.previous(previous, scope).conversation if previous else ()
        salted = salted_scope(scope, body.cache_salt)
        request = sent_by(translated(lambda: body.to_request(history, salted)), scope)
        meta = started_meta(body, body.model or served.model or "ringserve")
        store = stored if body.store else None
        run = ResponseRun(meta, request, store, scope, body.namespaces())
        deadline = Deadline.after(settings.request_timeout)
        started = await open_started(link, request, deadline, http.is_disconnected)
        return await answered(
            started,
            body.stream,
            lambda: response_events(run, started, deadline),
            lambda: whole_response(http, run, started, deadline),
        )

    @app.get(
        "/v1/responses/{response_id}",
        responses={200: {"model": ResponseObject}, 404: ERROR_RESPONSES[404], **AUTH_RESPONSES},
    )
    async def get_response(http: Request, response_id: str) -> dict[str, Any]:
        return stored.get(response_id, http.state.cache_scope).body

    @app.delete(
        "/v1/responses/{response_id}",
        responses={200: {"model": DeletedResponse}, 404: ERROR_RESPONSES[404], **AUTH_RESPONSES},
    )
    async def delete_response(http: Request, response_id: str) -> dict[str, Any]:
        stored.delete(response_id, http.state.cache_scope)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    return app
