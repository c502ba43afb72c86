"""The web console at `/`: the ring at a glance and a chat, in one page.

The page and its scripts ship in the package (`console_files/`, plain HTML, CSS and JS, no
build step) and load nothing from elsewhere: many labs are offline. They are open to anyone,
since they hold nothing of the ring; the page asks `/console/state` for the ring (with the API
key, where one is set) and chats through the public `/v1/chat/completions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from ringserve.api.activity import visible
from ringserve.api.console_state import (
    ConsoleState,
    LiveFigures,
    LiveView,
    console_state,
    reports_by_rank,
)
from ringserve.api.errors import AUTH_RESPONSES
from ringserve.errors import GenerationError
from ringserve.ipc.client import RankClient
from ringserve.ipc.messages import ClusterInfo, TelemetryReply, TelemetryRequest

FILES_DIR = Path(__file__).with_name("console_files")
# Path -> (file, media type): the page and everything it loads.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
}
CONSOLE_PATHS = frozenset(ASSETS)
STATE_PATH = "/console/state"
# The page runs only its own scripts and talks only to this server; nothing inline, so text a
# model wrote can never run as code even if it reached the page as markup.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Each question to rank 0 for a state; the page asks again every second or two.
ASK_TIMEOUT_S = 3.0
# One state serves every page that asks within this time (each costs the ranks a telemetry tick).
STATE_MAX_AGE_S = 1.0
# How often the API asks rank 0 for its token count, page open or not, for the throughput chart
# (an info question: rank 0's socket thread answers it, no collective runs).
THROUGHPUT_SAMPLE_S = 2.0


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    assets = {}
    for path, (name, media_type) in ASSETS.items():
        body = (FILES_DIR / name).read_bytes()
        assets[path] = Asset(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return assets


class ConsoleBoard:
    """Builds the console's state from rank 0's answers, at most once per STATE_MAX_AGE_S,
    and remembers the last info and each rank's last telemetry for when the ring breaks."""

    def __init__(
        self,
        ask_info: Callable[[float], Awaitable[ClusterInfo]],
        client: RankClient,
        live: LiveFigures,
        restarts: Callable[[], dict[str, Any]],
    ) -> None:
        self.ask_info = ask_info
        self.client = client
        self.live = live
        self.restarts = restarts  # the keeper's count, which outlives rank 0
        self.last_info: ClusterInfo | None = None
        self.reports: dict[int, tuple[float, dict[str, Any]]] = {}
        self._lock = asyncio.Lock()
        self._built: tuple[float, ConsoleState] | None = None

    async def state(self) -> ConsoleState:
        async with self._lock:  # pages asking at once share one build
            if self._built is not None and time.monotonic() - self._built[0] < STATE_MAX_AGE_S:
                return self._built[1]
            state = await self._build()
            self._built = (time.monotonic(), state)
            return state

    async def sample_forever(self) -> None:
        """Ask rank 0 for its info all along (the live figures see every answer)."""
        while True:
            with contextlib.suppress(GenerationError):  # not answering: nothing to count
                await self.ask_info(ASK_TIMEOUT_S)
            await asyncio.sleep(THROUGHPUT_SAMPLE_S)

    async def _build(self) -> ConsoleState:
        answering, reason = True, None
        try:
            self.last_info = await self.ask_info(ASK_TIMEOUT_S)
        except GenerationError as exc:
            answering, reason = False, str(exc)
        info = self.last_info
        telemetry_s = None
        if answering and info is not None and info.state == "serving":
            asked = time.monotonic()
            try:
                reply = await self.client.call(TelemetryRequest(), ASK_TIMEOUT_S)
            except GenerationError:
                reply = None  # late or refused: the ranks show as slow
            if isinstance(reply, TelemetryReply):
                came = time.monotonic()
                telemetry_s = came - asked
                for rank, report in reports_by_rank(reply.ranks).items():
                    self.reports[rank] = (came, report)
        return console_state(
            info,
            answering,
            reason,
            self.reports,
            telemetry_s,
            self.live,
            time.monotonic(),
            self.restarts(),
        )


def for_key(state: ConsoleState, admin: bool) -> ConsoleState:
    """The console's state as a key may see it: other keys' activity only for an admin key."""
    if admin:
        return state
    hidden = {name: None for name in LiveView.model_fields if name.startswith("prefix_cache")}
    return state.model_copy(
        update={
            "model": visible(state.model, admin) if state.model is not None else None,
            "live": state.live.model_copy(update=hidden),
        }
    )


class QuietPolls(logging.Filter):
    """Leaves out of uvicorn's access log the answered polls of the console's state (an open
    page asks every 1.5 s); refusals and failures stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path with query, HTTP version, status)
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        return not (args[2] == STATE_PATH and args[4] == 200)


def console_router(board: ConsoleBoard) -> APIRouter:
    @contextlib.asynccontextmanager
    async def sampling(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(board.sample_forever())
        access_log, quiet = logging.getLogger("uvicorn.access"), QuietPolls()
        access_log.addFilter(quiet)
        try:
            yield
        finally:
            access_log.removeFilter(quiet)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    router = APIRouter(lifespan=sampling)  # the app runs it (include_router merges lifespans)
    assets = load_assets()

    def serve(path: str) -> Callable[[Request], Awaitable[Response]]:
        asset = assets[path]
        headers = {
            "ETag": asset.etag,
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

        async def answer(request: Request) -> Response:
            if request.headers.get("if-none-match") == asset.etag:
                return Response(status_code=304, headers=headers)
            return Response(asset.body, media_type=asset.media_type, headers=headers)

        return answer

    for path in ASSETS:
        router.add_api_route(path, serve(path), methods=["GET"], include_in_schema=False)

    @router.get(STATE_PATH, response_model=ConsoleState, responses=AUTH_RESPONSES)
    async def console_state_route(http: Request) -> Response:
        state = for_key(await board.state(), http.state.admin)
        return Response(
            state.model_dump_json(),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    return router
