"""OpenAI's Responses API (`/v1/responses`): its request onto the chat request every endpoint
makes, rank 0's replies as its response object or its event stream, and the responses kept
for `previous_response_id`.

Field by field as OpenAI documents them. What this server cannot do (images and files,
background responses) is refused with a 400 rather than ignored; OpenAI's hosted tools are left
out of what the model is offered (clients such as Codex send them whatever the provider).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import Field, model_validator

from ringserve.api.blocks import Block, BlockEvent, Blocks
from ringserve.api.errors import TEXT_ONLY, ParamError
from ringserve.api.schemas import (
    JsonSchemaFormat,
    OpenAIModel,
    RequestBody,
    ToolName,
    check_tools,
)
from ringserve.api.stream import (
    DISCONNECT_POLL_S,
    KEEPALIVE_S,
    Deadline,
    Idle,
    Started,
    Watch,
    replies,
)
from ringserve.errors import GenerationError
from ringserve.ipc.bounds import JsonSchema, MaxTokens, Temperature, TopP
from ringserve.ipc.messages import (
    ChatRequest,
    ChatTurn,
    Delta,
    Done,
    ResponseFormat,
    SamplingParams,
    TemplateValue,
    Tool,
    ToolCall,
)

log = logging.getLogger(__name__)

TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "reasoning_text"})
# Reasoning efforts that mean "do not think".
NO_REASONING = frozenset({"none", "minimal"})
# Text the response object repeats and the store keeps, but no model reads (metadata, a hosted
# tool's description, `user`): OpenAI's bounds of `metadata`, the longest of them for the rest.
METADATA_PAIRS = 16
METADATA_KEY_CHARS = 64
ECHOED_TEXT_CHARS = 512
EchoedText = Annotated[str, Field(max_length=ECHOED_TEXT_CHARS)]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=METADATA_KEY_CHARS)], EchoedText],
    Field(max_length=METADATA_PAIRS),
]
# The ids this server gives responses are shorter.
ResponseId = Annotated[str, Field(max_length=64)]


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None
    refusal: str | None = None


def _text_of(content: str | list[ContentPart], where: str, stand_ins: bool = False) -> str:
    """The text of a string or of text parts. With `stand_ins`, a part the model cannot read
    (a tool's picture) is named in its place: a tool's output stays in an agent's history, and
    refusing it would end the session."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type in TEXT_PARTS:
            texts.append(part.text if part.text is not None else part.refusal or "")
        elif stand_ins:
            texts.append(f"[{part.type} omitted: {TEXT_ONLY}]")
        else:
            raise ParamError(f"{where}[{i}].type", f"{part.type!r}: {TEXT_ONLY}")
    return "".join(texts)


class InputItem(OpenAIModel):
    """An item of `input`; which fields matter depends on `type` (a message may leave it out)."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None
    call_id: str | None = None  # function_call, function_call_output
    name: ToolName | None = None  # function_call
    arguments: str | None = None  # function_call
    output: str | list[ContentPart] | None = None  # function_call_output


def _required(value: Any, where: str) -> Any:
    if value is None:
        raise ParamError(where, "is required for this item type")
    return value


class _Assistant:
    """An assistant turn being gathered from items: its reasoning, text and calls."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: list[ToolCall] = []
        self.reasoning: str | None = None

    def turn(self) -> ChatTurn | None:
        if not (self.text or self.calls or self.reasoning):
            return None
        return ChatTurn(
            role="assistant",
            content="".join(self.text),
            tool_calls=tuple(self.calls),
            reasoning=self.reasoning,
        )


def input_turns(items: str | list[InputItem]) -> list[ChatTurn]:
    """The chat turns of `input`: an assistant's reasoning, messages and function calls that
    follow each other make one assistant turn, as chat templates expect."""
    if isinstance(items, str):
        return [ChatTurn(role="user", content=items)]
    turns: list[ChatTurn] = []
    assistant = _Assistant()

    def close_assistant() -> None:
        nonlocal assistant
        turn = assistant.turn()
        if turn is not None:
            turns.append(turn)
        assistant = _Assistant()

    for i, item in enumerate(items):
        at = f"input[{i}]"
        if item.type == "message" and item.role == "assistant":
            if assistant.calls:
                close_assistant()
            content = _text_of(_required(item.content, f"{at}.content"), f"{at}.content")
            assistant.text.append(content)
        elif item.type == "message":
            close_assistant()
            role = _required(item.role, f"{at}.role")
            content = _text_of(_required(item.content, f"{at}.content"), f"{at}.content")
            turns.append(ChatTurn(role=role, content=content))
        elif item.type == "function_call":
            arguments = _required(item.arguments, f"{at}.arguments")
            call_id = _required(item.call_id, f"{at}.call_id")
            name = _required(item.name, f"{at}.name")
            try:
                call = ToolCall(id=call_id, name=name, arguments=arguments)
            except ValueError as exc:
                raise ParamError(f"{at}.arguments", "must be a JSON object as a string") from exc
            assistant.calls.append(call)
        elif item.type == "function_call_output":
            close_assistant()
            output = _text_of(
                _required(item.output, f"{at}.output"), f"{at}.output", stand_ins=True
            )
            call_id = _required(item.call_id, f"{at}.call_id")
            turns.append(ChatTurn(role="tool", content=output, tool_call_id=call_id))
        elif item.type == "reasoning":
            if assistant.text or assistant.calls:
                close_assistant()
            assistant.reasoning = _text_of(item.content or [], f"{at}.content") or None
        else:
            raise ParamError(f"{at}.type", f"{item.type!r} items are not supported")
    close_assistant()
    return turns


class FunctionTool(OpenAIModel):
    """A tool entry: a function, a namespace of functions, or one of OpenAI's hosted tools."""

    type: str
    name: ToolName | None = None
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None
    tools: list[FunctionTool] | None = None  # a namespace's functions

    @model_validator(mode="after")
    def _echoed_description(self) -> FunctionTool:
        # Only a function's description reaches the model (and counts against its context).
        if self.type != "function" and len(self.description or "") > ECHOED_TEXT_CHARS:
            raise ValueError(
                f"a {self.type} tool's description is only repeated back: at most "
                f"{ECHOED_TEXT_CHARS} characters"
            )
        return self

    def echo(self) -> dict[str, Any]:
        """The entry as the response object repeats it: a hosted tool by its type, name and
        description (nothing else of it is read here)."""
        if self.type in ("function", "namespace"):
            return self.model_dump(exclude_none=True)
        return self.model_dump(include={"type", "name", "description"}, exclude_none=True)

    def functions(self, where: str) -> list[tuple[str | None, Tool]]:
        """The functions this entry offers the model, each with its namespace. OpenAI's hosted
        tools (web_search, file_search, ...) run on OpenAI's side: this server has none to
        offer, and clients (Codex) send them whatever the provider, so they are left out."""
        if self.type == "namespace":
            namespace = _required(self.name, f"{where}.name")
            inner = (
                tool.functions(f"{where}.tools[{i}]") for i, tool in enumerate(self.tools or ())
            )
            return [(namespace, tool) for found in inner for _, tool in found]
        if self.type != "function":
            return []
        name = _required(self.name, f"{where}.name")
        parameters = self.parameters or {"type": "object"}
        return [(None, Tool(name=name, description=self.description, parameters=parameters))]


class NamedFunction(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        if self.schema_ is None:
            raise ParamError("text.format.schema", "is required for type json_schema")
        JsonSchemaFormat.model_validate({"name": self.name or "", "schema": self.schema_})
        return ResponseFormat(type="json_schema", json_schema=self.schema_)


class TextOptions(OpenAIModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(OpenAIModel):
    effort: str | None = None
    summary: str | None = None


class ResponsesBody(RequestBody):
    CONVERSATION = ("input",)
    NESTED = ("content", "output")

    model: str = ""
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: ResponseId | None = None
    metadata: Metadata | None = None
    user: EchoedText | None = None
    prompt_cache_key: str | None = None
    background: bool = False

    @model_validator(mode="after")
    def _nothing_ignored(self) -> ResponsesBody:
        if self.background:
            raise ParamError("background", "background responses are not supported")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ResponsesBody:
        choice = self.tool_choice
        named = choice.name if isinstance(choice, NamedFunction) else None
        names = [tool.name for _, tool in self.offered()]
        check_tools(names, choice == "required" or named, named)
        return self

    def offered(self) -> list[tuple[str | None, Tool]]:
        """Every function the model is offered, with the namespace it came in (if any)."""
        return [
            found
            for i, tool in enumerate(self.tools or ())
            for found in tool.functions(f"tools[{i}]")
        ]

    def namespaces(self) -> dict[str, str]:
        """The namespace of each namespaced function, by name (its calls name it)."""
        return {tool.name: space for space, tool in self.offered() if space is not None}

    def to_request(self, history: Iterable[ChatTurn], cache_scope: str) -> ChatRequest:
        """The chat request: the instructions, the conversation so far (`history`, from a
        previous response), then this input."""
        turns = [ChatTurn(role="system", content=self.instructions)] if self.instructions else []
        turns += [*history, *input_turns(self.input)]
        if not turns:
            raise ParamError("input", "holds no message")
        named = self.tool_choice if isinstance(self.tool_choice, NamedFunction) else None
        template: dict[str, TemplateValue] = {}
        if self.reasoning is not None and self.reasoning.effort is not None:
            template["enable_thinking"] = self.reasoning.effort not in NO_REASONING
        text_format = self.text.format if self.text is not None else None
        return ChatRequest(
            messages=tuple(turns),
            sampling=SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                max_tokens=self.max_output_tokens,
            ),
            conversation_id=self.prompt_cache_key,  # `user` names a user, not a conversation
            cache_scope=cache_scope,
            tools=tuple(tool for _, tool in self.offered()),
            tool_choice="named" if named else (self.tool_choice or "auto"),  # type: ignore[arg-type]
            tool_name=named.name if named else None,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=text_format.format() if text_format is not None else None,
            chat_template_kwargs=template,
        )

    def echo(self) -> dict[str, Any]:
        """The request's settings, as the response object repeats them."""
        text_format = self.text.format if self.text is not None else None
        format_body = (
            text_format.model_dump(by_alias=True, exclude_none=True)
            if text_format is not None
            else {"type": "text"}
        )
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "tools": [tool.echo() for tool in self.tools or ()],
            "tool_choice": (
                self.tool_choice.model_dump()
                if isinstance(self.tool_choice, NamedFunction)
                else self.tool_choice or "auto"
            ),
            "parallel_tool_calls": self.parallel_tool_calls,
            "text": {"format": format_body},
            "reasoning": {
                "effort": self.reasoning.effort if self.reasoning else None,
                "summary": None,
            },
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "metadata": self.metadata or {},
            "user": self.user,
            "background": False,
            "truncation": "disabled",
            "service_tier": "default",
        }


@dataclass(frozen=True)
class StoredResponse:
    scope: str  # the cache scope (API key) that made it: only it may read it
    conversation: tuple[ChatTurn, ...]  # the turns so far, this response's answer included
    body: dict[str, Any]  # the response object


class ResponseStore:
    """Stored responses in memory, enough for a client to continue a conversation by
    `previous_response_id`: each key's last `per_key` (its least recently used dropped first),
    and `total` of all keys together. When all are full, the key that keeps the most gives up
    its least recently used one, so that no key pushes out another's below an equal share."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self._kept: dict[str, OrderedDict[str, StoredResponse]] = {}  # by scope
        self._count = 0

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if min(self.per_key, self.total) == 0:
            return
        kept = self._kept.setdefault(stored.scope, OrderedDict())
        self._count += response_id not in kept
        kept[response_id] = stored
        kept.move_to_end(response_id)
        if len(kept) > self.per_key:
            self._drop_oldest(kept)
        while self._count > self.total:
            self._drop_oldest(max(self._kept.values(), key=len))

    def _drop_oldest(self, kept: OrderedDict[str, StoredResponse]) -> None:
        _, dropped = kept.popitem(last=False)
        self._count -= 1
        if not kept:
            del self._kept[dropped.scope]

    def get(self, response_id: str, scope: str) -> StoredResponse:
        """The stored response (404 when none is kept under that id for this scope)."""
        kept = self._kept.get(scope)
        if kept is None or response_id not in kept:
            raise GenerationError(f"Response with id {response_id!r} not found.", 404, "not_found")
        kept.move_to_end(response_id)
        return kept[response_id]

    def previous(self, response_id: str, scope: str) -> StoredResponse:
        """The response a request continues (a 400 naming the field when none is kept)."""
        try:
            return self.get(response_id, scope)
        except GenerationError:
            raise GenerationError(
                f"Previous response with id {response_id!r} not found.",
                400,
                "previous_response_not_found",
                "previous_response_id",
            ) from None

    def delete(self, response_id: str, scope: str) -> None:
        self.get(response_id, scope)
        kept = self._kept[scope]
        del kept[response_id]
        self._count -= 1
        if not kept:
            del self._kept[scope]


def response_id() -> str:
    return f"resp_{secrets.token_hex(12)}"


class Output:
    """The response's output items, from the answer's blocks; ids made once per item."""

    def __init__(self, namespaces: dict[str, str]) -> None:
        self.ids: dict[int, str] = {}
        self.namespaces = namespaces  # a namespaced function's namespace, by its name

    def item_id(self, block: Block) -> str:
        prefix = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}[block.kind]
        return self.ids.setdefault(block.index, f"{prefix}_{secrets.token_hex(12)}")

    def item(self, block: Block, status: str, whole: bool = True) -> dict[str, Any]:
        text = block.text if whole else ""
        item_id = self.item_id(block)
        if block.kind == "reasoning":
            content = [_reasoning_part(text)] if whole else []
            return {"id": item_id, "type": "reasoning", "summary": [], "content": content}
        if block.kind == "text":
            content = [_text_part(text)] if whole else []
            return {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": status,
                "content": content,
            }
        assert block.call is not None
        call = {
            "id": item_id,
            "type": "function_call",
            "call_id": block.call.id,
            "name": block.call.name,
            "arguments": text,
            "status": status,
        }
        namespace = self.namespaces.get(block.call.name)
        return call if namespace is None else {**call, "namespace": namespace}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def _usage(done: Done, reasoning_tokens: int) -> dict[str, Any]:
    usage = done.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _answer_turn(blocks: Iterable[Block]) -> ChatTurn:
    """The answer as an assistant turn, for the conversation a stored response continues."""
    text, reasoning, calls = [], [], []
    for block in blocks:
        if block.kind == "text":
            text.append(block.text)
        elif block.kind == "reasoning":
            reasoning.append(block.text)
        elif block.call is not None:
            calls.append(ToolCall(id=block.call.id, name=block.call.name, arguments=block.text))
    return ChatTurn(
        role="assistant",
        content="".join(text),
        tool_calls=tuple(calls),
        reasoning="".join(reasoning) or None,
    )


class ResponseRun:
    """One response being answered: its object as it stands, and what it stores at the end."""

    def __init__(
        self,
        meta: dict[str, Any],
        request: ChatRequest,
        store: ResponseStore | None,
        scope: str,
        namespaces: dict[str, str],
    ) -> None:
        self.meta = meta  # id, created_at, model, and the request's settings
        self.request = request
        self.store = store
        self.scope = scope
        self.blocks = Blocks()
        self.output = Output(namespaces)
        self.reasoning_tokens = 0
        self.item_status = "completed"  # "incomplete" once the answer ended at its limit

    def feed(self, delta: Delta) -> list[BlockEvent]:
        if delta.reasoning:
            self.reasoning_tokens = delta.tokens
        return self.blocks.feed(delta)

    def body(
        self, status: str, done: Done | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        item_status = "incomplete" if status == "incomplete" else "completed"
        items = [self.output.item(block, item_status) for block in self.blocks.whole_blocks()]
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.meta["id"],
            "object": "response",
            "created_at": self.meta["created_at"],
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.meta["model"],
            "output": items if status != "in_progress" else [],
            "usage": _usage(done, self.reasoning_tokens) if done else None,
            **self.meta["echo"],
        }

    def finish(self, done: Done) -> dict[str, Any]:
        body = self.body(_status(done), done)
        if self.store is not None:
            conversation = (*self._history(), _answer_turn(self.blocks.whole_blocks()))
            self.store.put(self.meta["id"], StoredResponse(self.scope, conversation, body))
        return body

    def _history(self) -> tuple[ChatTurn, ...]:
        """The request's turns without its instructions (a next response gives its own)."""
        turns = self.request.messages
        if self.meta["echo"]["instructions"]:
            turns = turns[1:]
        return turns


async def whole_response(
    http: Request, run: ResponseRun, started: Started, deadline: Deadline
) -> dict[str, Any]:
    connection, _ = started
    watch = Watch(http.is_disconnected)
    async for reply in replies(connection, deadline, DISCONNECT_POLL_S):
        await watch.check()
        if isinstance(reply, Delta):
            run.feed(reply)
        elif isinstance(reply, Done):
            run.blocks.finish()
            return run.finish(reply)
    raise AssertionError("replies end with done")


class _Events:
    """Server-sent events, numbered as the Responses stream numbers them."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, /, **data: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"


def _block_events(run: ResponseRun, event: BlockEvent, emit: _Events) -> list[str]:
    block = event.block
    where = {"item_id": run.output.item_id(block), "output_index": block.index}
    if event.kind == "start":
        item = run.output.item(block, "in_progress", whole=False)
        events = [emit("response.output_item.added", output_index=block.index, item=item)]
        if block.kind != "tool_call":
            part = _text_part("") if block.kind == "text" else _reasoning_part("")
            events.append(emit("response.content_part.added", **where, content_index=0, part=part))
        return events
    if event.kind == "delta":
        if block.kind == "text":
            name, extra = "response.output_text.delta", {"content_index": 0, "logprobs": []}
        elif block.kind == "reasoning":
            name, extra = "response.reasoning_text.delta", {"content_index": 0}
        else:
            name, extra = "response.function_call_arguments.delta", {}
        return [emit(name, **where, **extra, delta=event.text)]
    item = run.output.item(block, run.item_status if block.whole else "incomplete")
    if block.kind == "tool_call":
        assert block.call is not None
        done = emit(
            "response.function_call_arguments.done",
            **where,
            name=block.call.name,
            arguments=block.text,
        )
        return [done, emit("response.output_item.done", output_index=block.index, item=item)]
    if block.kind == "text":
        text_done = emit(
            "response.output_text.done", **where, content_index=0, text=block.text, logprobs=[]
        )
        part = _text_part(block.text)
    else:
        text_done = emit("response.reasoning_text.done", **where, content_index=0, text=block.text)
        part = _reasoning_part(block.text)
    return [
        text_done,
        emit("response.content_part.done", **where, content_index=0, part=part),
        emit("response.output_item.done", output_index=block.index, item=item),
    ]


async def response_events(
    run: ResponseRun, started: Started, deadline: Deadline
) -> AsyncIterator[str]:
    """The Responses stream: response.created and .in_progress, each output item's added,
    deltas and done events, then response.completed (or .incomplete); a failure ends it with
    response.failed."""
    connection, _ = started
    emit = _Events()
    try:
        yield emit("response.created", response=run.body("in_progress"))
        yield emit("response.in_progress", response=run.body("in_progress"))
        async for reply in replies(connection, deadline, KEEPALIVE_S):
            if isinstance(reply, Idle):
                yield ": keep-alive\n\n"
                continue
            if isinstance(reply, Done):
                run.item_status = _status(reply)
                for event in run.blocks.finish():
                    for text in _block_events(run, event, emit):
                        yield text
                body = run.finish(reply)
                yield emit(f"response.{body['status']}", response=body)
                return
            for event in run.feed(reply):
                for text in _block_events(run, event, emit):
                    yield text
    except GenerationError as exc:
        yield _failed(run, emit, exc)
    except Exception as exc:  # whatever it is, the stream ends with it, not hanging
        log.exception("a streamed response failed")
        yield _failed(run, emit, GenerationError(f"internal error ({type(exc).__name__})", 500))
    finally:
        await connection.close()


def _failed(run: ResponseRun, emit: _Events, exc: GenerationError) -> str:
    error = {"code": _failure_code(exc), "message": str(exc)}
    return emit("response.failed", response=run.body("failed", error=error))


def _status(done: Done) -> str:
    """A finished response's status: incomplete when it ended at max_output_tokens."""
    return "incomplete" if done.finish_reason == "length" else "completed"


def _failure_code(exc: GenerationError) -> str:
    """A failure's code among the ones OpenAI gives a failed response."""
    if exc.status == 429:
        return "rate_limit_exceeded"
    if exc.code == "context_length_exceeded":
        return exc.code
    return "invalid_prompt" if exc.status == 400 else "server_error"


def started_meta(body: ResponsesBody, model: str) -> dict[str, Any]:
    return {
        "id": response_id(),
        "created_at": int(time.time()),
        "model": model,
        "echo": body.echo(),
    }
