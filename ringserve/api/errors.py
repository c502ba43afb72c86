"""Every error the API answers, from one place: the status's error type, readable validation
messages, and the handlers. Errors are in OpenAI's shape (`{"error": {message, type, param,
code}}`), except on Anthropic's routes (`{"type": "error", "error": {type, message}}`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ringserve.errors import GenerationError

log = logging.getLogger(__name__)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
# Anthropic's error types (its documentation's list); the status stays the one ours has.
ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",  # the ranks are not serving now: a client retries later
    504: "timeout_error",
}
ANTHROPIC_ROUTES = "/v1/messages"
# How long a refused client is told to wait before it asks again (Retry-After), by status.
RETRY_AFTER_S: dict[int, int] = {429: 1, 503: 2}
# Refused for good: the keeper gave the ring up; no wait helps.
RING_STOPPED = "ring_stopped"


def retry_after(status: int, code: str | None = None) -> dict[str, str]:
    """The Retry-After header of a refusal, where waiting may help."""
    seconds = RETRY_AFTER_S.get(status)
    if seconds is None or code == RING_STOPPED:
        return {}
    return {"Retry-After": str(seconds)}


def speaks_anthropic(path: str) -> bool:
    """Whether the route at `path` answers errors in Anthropic's shape."""
    return path == ANTHROPIC_ROUTES or path.startswith(ANTHROPIC_ROUTES + "/")


# Why an image, a document or a file in a request is refused (or named in its place).
TEXT_ONLY = "this server's model reads text only"


class ParamError(ValueError):
    """A request field that is wrong in a way its own type cannot say (it depends on another
    field, say): validators raise it, and the answer names `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


def error_body(
    message: str,
    status: int,
    code: str | None,
    param: str | None = None,
    anthropic: bool = False,
) -> dict[str, Any]:
    if anthropic:
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    detail = ErrorDetail(
        message=message, type=ERROR_TYPES.get(status, "server_error"), param=param, code=code
    )
    return {"error": detail.model_dump()}


def error_response(
    request: Request,
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    anthropic = speaks_anthropic(request.url.path)
    body = error_body(message, status, code, param, anthropic)
    return JSONResponse(body, status, headers=dict(headers or {}))


# The responses every generation route may give besides its answer, for the OpenAPI schema.
_DESCRIPTIONS = {
    400: "Invalid parameters, or a prompt that does not fit the model's context",
    401: "Missing or wrong API key",
    404: "No such object (a stored response, say)",
    408: "The body did not arrive within the read timeout",
    413: "The request body is larger than any prompt that fits the context",
    429: "The request queue is full (Retry-After says when to ask again)",
    500: "Generating the answer failed",
    503: "The ranks are not serving (loading, restarting, or one stopped answering; "
    "Retry-After says when to ask again), or rank 0 takes no more connections now",
    504: "No answer within the request timeout",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _DESCRIPTIONS.items()
}
ANTHROPIC_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": AnthropicErrorBody, "description": text}
    for status, text in _DESCRIPTIONS.items()
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: ERROR_RESPONSES[status] for status in (401, 500, 503, 504)
}
# Routes that show every key's activity: a key that is not an admin key is refused.
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    403: {"model": ErrorBody, "description": "This key may not see every key's activity"},
}


def not_json(reason: str) -> str:
    return f"the body is not valid JSON ({reason})"


# Pydantic names union members and validators in an error's location ("prompt.str"); clients
# know only their own fields.
_TYPE_LOCATIONS = ("str", "int", "float", "bool", "list", "dict", "tuple", "json-or-python")


def _param(location: Sequence[int | str]) -> str | None:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(_TYPE_LOCATIONS) or "[" in part or part.startswith("function-"):
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def describe_validation(errors: Sequence[Any], skip: int = 0) -> tuple[str, str | None]:
    """One readable message for pydantic's errors, and the parameter it names: the first of
    those that reached deepest into the body (the others are usually a union's members that
    the value did not fit at all). `skip` drops location parts that are not the client's
    (FastAPI's "body")."""
    if not errors:
        return "invalid request", None
    first = max(errors, key=lambda error: len(error.get("loc", ())))
    raised = first.get("ctx", {}).get("error")
    if isinstance(raised, ParamError):
        return str(raised), raised.param
    if first.get("type") == "json_invalid":
        return not_json(str(raised or "decode error")), None
    param = _param(tuple(first.get("loc", ()))[skip:])
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def invalid_request(exc: ValidationError) -> GenerationError:
    message, _ = describe_validation(exc.errors())
    return GenerationError(message, 400, "invalid_parameter")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the API in OpenAI's shape; an unexpected one is logged and is a 500."""

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, exc: GenerationError) -> JSONResponse:
        headers = retry_after(exc.status, exc.code)
        return error_response(request, exc.status, str(exc), exc.code, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc.errors(), skip=1)
        return error_response(request, 400, message, "invalid_parameter", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"Invalid URL ({request.method} {request.url.path})", "not_found"
        elif exc.status_code == 405:
            message = f"Invalid method for URL ({request.method} {request.url.path})"
            code = "method_not_allowed"
        elif exc.status_code == 413:
            message, code = str(exc.detail), "request_too_large"
        elif exc.status_code == 408:
            message, code = str(exc.detail), "request_timeout"
        else:
            message, code = str(exc.detail), None
        return error_response(request, exc.status_code, message, code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        message = f"internal error ({type(exc).__name__})"
        return error_response(request, 500, message, "internal_error")
