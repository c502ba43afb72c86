"""The API's one error mapping: whatever a route raises leaves in OpenAI's shape."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from ringserve.api.errors import install_error_handlers
from ringserve.errors import GenerationError


def app_raising(exc: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


def test_an_unexpected_error_is_a_500_in_openai_shape() -> None:
    reply = app_raising(KeyError("secret internals")).get("/boom")
    assert reply.status_code == 500
    assert reply.json() == {
        "error": {
            "message": "internal error (KeyError)",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


def test_a_generation_error_keeps_its_status_and_code() -> None:
    reply = app_raising(GenerationError("the queue is full", 429, "queue_full")).get("/boom")
    assert reply.status_code == 429
    assert reply.json()["error"]["type"] == "rate_limit_error"
    assert reply.json()["error"]["code"] == "queue_full"


def test_an_unknown_method_and_path_have_their_own_codes() -> None:
    client = app_raising(RuntimeError())
    wrong_method = client.post("/boom")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET"
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
