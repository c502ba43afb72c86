"""Request bodies read within bounds, off the event loop.

FastAPI parses and validates a body on the event loop, where a large one stalls every other
client's stream for as long as that takes. A body route here declares its body
`SkipValidation[Model]` (FastAPI still describes it in the OpenAPI schema, and passes on what it
is given), and its route class reads the body first, in a worker thread: weighed on its bytes
(its JSON values and depth, against what the served context can need), parsed, its
conversation counted against the context, then validated.

The JSON parser holds the interpreter while it runs, in whatever thread: the weighing before
it is what keeps each parse short. Bodies larger than SMALL_BODY_BYTES are read one at a time,
so that parses never follow each other back to back while a stream waits.
"""

from __future__ import annotations

import asyncio
import email.message
import json
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import SkipValidation, ValidationError
from starlette.types import Receive, Scope

from ringserve.api.errors import describe_validation, not_json
from ringserve.api.schemas import NO_SURROGATES, SURROGATE_ESCAPE, RequestBody
from ringserve.errors import GenerationError
from ringserve.ipc.bounds import MAX_BODY_NESTING, MAX_NESTING, BodyBounds, too_deep
from ringserve.ipc.json_shape import json_shape

SMALL_BODY_BYTES = 1 << 16
_large_bodies = ThreadPoolExecutor(1, thread_name_prefix="large-body")

Body = TypeVar("Body", bound=RequestBody)


def parse_body(raw: bytes, model: type[Body], bounds: BodyBounds) -> Body:
    """The body `raw` validated as `model`, or a GenerationError (400) naming what it breaks."""
    shape = json_shape(raw)
    if shape.depth > MAX_BODY_NESTING:
        raise GenerationError(
            f"the body {too_deep(MAX_BODY_NESTING)} (a JSON schema in it may nest {MAX_NESTING})",
            400,
            "nesting_too_deep",
        )
    for held, most, what in (
        (shape.values, bounds.max_values, "JSON values (objects, arrays and their items)"),
        (shape.containers, bounds.max_containers, "JSON objects and arrays"),
    ):
        if held > most:
            raise GenerationError(
                f"the body holds {held} {what}; a request to this model, whose context is "
                f"{bounds.context_limit} tokens, holds at most {most}",
                400,
                "request_too_large",
            )
    try:
        data = json.loads(raw)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise GenerationError(not_json(reason), 400, "invalid_parameter") from None
    if isinstance(data, dict):
        model.weigh(data, bounds)
    context = {NO_SURROGATES: SURROGATE_ESCAPE.search(raw) is None}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        message, param = describe_validation(exc.errors())
        raise GenerationError(message, 400, "invalid_parameter", param) from None


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI takes a body of this content type for JSON (its own rule)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def read_body(request: Request, model: type[Body]) -> tuple[bytes, Body]:
    raw = await request.body()  # within the guard's bounds of size and time
    if not _is_json(request.headers.get("content-type")):
        raise GenerationError(
            "the body must be JSON, sent with content-type: application/json", 400, "invalid_json"
        )
    bounds: BodyBounds = request.state.body_bounds  # set by the guard for every POST
    loop = asyncio.get_running_loop()
    executor = _large_bodies if len(raw) > SMALL_BODY_BYTES else None
    return raw, await loop.run_in_executor(executor, parse_body, raw, model, bounds)


class ReadRequest(Request):
    """The request once its body was read: FastAPI takes the validated body from here."""

    def __init__(self, scope: Scope, receive: Receive, raw: bytes, body: RequestBody) -> None:
        super().__init__(scope, receive)
        self._raw = raw
        self._read = body

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._read


class BodyRoute(APIRoute):
    """A route whose body, declared `SkipValidation[Model]`, is read by `read_body`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        info = self.body_field.field_info
        model = info.annotation
        # pydantic's SkipValidation is a class at run time, a type alias to the type checker.
        skipped = any(isinstance(meta, SkipValidation) for meta in info.metadata)  # type: ignore[misc]
        if not (isinstance(model, type) and issubclass(model, RequestBody) and skipped):
            raise TypeError(f"{self.path}: declare its body as SkipValidation[a RequestBody]")

        async def read_first(request: Request) -> Response:
            raw, body = await read_body(request, model)
            return await handler(ReadRequest(request.scope, request.receive, raw, body))

        return read_first
