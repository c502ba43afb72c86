"""Anthropic's Messages API (`/v1/messages`): its request onto the chat request every endpoint
makes, and rank 0's replies as its message, whole or as its stream of events.

Field by field as Anthropic documents them; what this server cannot do (images, documents,
Anthropic's own server tools, continuing a prefilled assistant turn) is refused with a 400
rather than ignored.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import Field, model_validator

from ringserve.api.blocks import Block, BlockEvent, Blocks
from ringserve.api.errors import TEXT_ONLY, ParamError, error_body
from ringserve.api.schemas import OpenAIModel, RequestBody, StopList, check_tools
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
from ringserve.ipc.bounds import JsonSchema, MaxTokens, TopK, TopP
from ringserve.ipc.messages import (
    ChatRequest,
    ChatTurn,
    Done,
    ResponseFormat,
    SamplingParams,
    TemplateValue,
    Tool,
    ToolCall,
)

log = logging.getLogger(__name__)

# Anthropic's temperature range (OpenAI's goes to 2).
AnthropicTemperature = Annotated[float, Field(ge=0.0, le=1.0)]
# Anthropic's minimum thinking budget.
MIN_THINKING_BUDGET = 1024
# A tool's name as Anthropic allows it (the same rule for a name sent back in a tool_use block).
AnthropicToolName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


class ContentBlock(OpenAIModel):
    """A block of a message's content; which fields matter depends on `type`."""

    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: AnthropicToolName | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None  # tool_result
    is_error: bool = False  # tool_result
    thinking: str | None = None  # thinking (its signature is not checked)


UNSUPPORTED_BLOCKS = {"image": TEXT_ONLY, "document": TEXT_ONLY, "search_result": TEXT_ONLY}


def _text_of(blocks: str | list[ContentBlock] | None, where: str, stand_ins: bool = False) -> str:
    """The text of a string or of text blocks (a system prompt, a tool's result). With
    `stand_ins`, a block the model cannot read (a tool's picture) is named in its place: a
    tool result stays in an agent's history, and refusing it would end the session."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    texts = []
    for i, block in enumerate(blocks):
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif stand_ins and block.type in UNSUPPORTED_BLOCKS:
            texts.append(f"[{block.type} omitted: {UNSUPPORTED_BLOCKS[block.type]}]")
        else:
            raise ParamError(f"{where}[{i}].type", f"must be text here, not {block.type!r}")
    return "\n".join(texts)


class AnthropicMessage(OpenAIModel):
    # A system message among the others (Claude Code sends them) is text for the model then.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]
    # A system message's: shown until a later user message exists, or always.
    clear_at: Literal["next_user_message", "never"] | None = None

    def turns(self, where: str) -> list[ChatTurn]:
        """The chat turns of this message: a user message's tool results come first, as tool
        turns, then its text; an assistant message is one turn with its thinking and calls."""
        if self.role == "system":
            return [ChatTurn(role="system", content=_text_of(self.content, f"{where}.content"))]
        if isinstance(self.content, str):
            return [ChatTurn(role=self.role, content=self.content)]
        texts: list[str] = []
        results: list[ChatTurn] = []
        calls: list[ToolCall] = []
        thinking: list[str] = []
        for i, block in enumerate(self.content):
            at = f"{where}.content[{i}]"
            expected = {"text"} | (
                {"tool_use", "thinking", "redacted_thinking"}
                if self.role == "assistant"
                else {"tool_result"}
            )
            if block.type in UNSUPPORTED_BLOCKS:
                raise ParamError(f"{at}.type", f"{block.type!r}: {UNSUPPORTED_BLOCKS[block.type]}")
            if block.type not in expected:
                raise ParamError(f"{at}.type", f"a {self.role} message cannot hold {block.type!r}")
            if block.type == "text":
                texts.append(_required(block.text, f"{at}.text"))
            elif block.type == "tool_use":
                arguments = json.dumps(_required(block.input, f"{at}.input"))
                name = _required(block.name, f"{at}.name")
                calls.append(
                    ToolCall(id=_required(block.id, f"{at}.id"), name=name, arguments=arguments)
                )
            elif block.type == "thinking":
                thinking.append(block.thinking or "")
            elif block.type == "tool_result":
                result = _text_of(block.content, f"{at}.content", stand_ins=True)
                results.append(
                    ChatTurn(
                        role="tool",
                        content=f"Error: {result}" if block.is_error else result,
                        tool_call_id=_required(block.tool_use_id, f"{at}.tool_use_id"),
                    )
                )
        text = "\n".join(texts)
        if self.role == "assistant":
            reasoning = "".join(thinking) or None
            turn = ChatTurn(
                role="assistant", content=text, tool_calls=tuple(calls), reasoning=reasoning
            )
            return [turn]
        return results + ([ChatTurn(role="user", content=text)] if texts or not results else [])


def _required(value: Any, where: str) -> Any:
    if value is None:
        raise ParamError(where, "is required for this block type")
    return value


class AnthropicTool(OpenAIModel):
    name: AnthropicToolName
    description: str | None = None
    input_schema: JsonSchema | None = None
    type: str | None = None  # "custom", or one of Anthropic's own tools (refused)

    def tool(self, where: str) -> Tool:
        if self.type not in (None, "custom"):
            raise ParamError(
                f"{where}.type", f"{self.type!r}: only custom tools (with input_schema) are served"
            )
        schema = _required(self.input_schema, f"{where}.input_schema")
        return Tool(name=self.name, description=self.description, parameters=schema)


class ToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named_with_its_name(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ParamError("tool_choice.name", "is required for type tool")
        return self


class Thinking(OpenAIModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None


class OutputFormat(OpenAIModel):
    type: Literal["json_schema"]
    schema_: JsonSchema = Field(alias="schema")


class OutputConfig(OpenAIModel):
    format: OutputFormat | None = None
    effort: str | None = None  # how hard a Claude model works; nothing to map it to here


class MessagesBody(RequestBody):
    CONVERSATION = ("messages", "system")

    model: str = ""
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: MaxTokens
    system: str | list[ContentBlock] | None = None
    stop_sequences: StopList = None
    temperature: AnthropicTemperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @model_validator(mode="after")
    def _thinking_budget(self) -> MessagesBody:
        thinking = self.thinking
        if thinking is None or thinking.type != "enabled":
            return self
        budget = thinking.budget_tokens
        if budget is None or budget < MIN_THINKING_BUDGET:
            raise ParamError(
                "thinking.budget_tokens", f"must be at least {MIN_THINKING_BUDGET} when enabled"
            )
        if budget >= self.max_tokens:
            raise ParamError("thinking.budget_tokens", "must be less than max_tokens")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> MessagesBody:
        choice = self.tool_choice or ToolChoice(type="auto")
        named = choice.name if choice.type == "tool" else None
        check_tools([tool.name for tool in self.tools or ()], choice.type in ("any", "tool"), named)
        return self

    def to_request(self, cache_scope: str, generating: bool = True) -> ChatRequest:
        """The chat request (`generating` false: only for counting its prompt's tokens)."""
        turns: list[ChatTurn] = []
        if self.system:
            turns.append(ChatTurn(role="system", content=_text_of(self.system, "system")))
        for i, message in enumerate(self.messages):
            later = self.messages[i + 1 :]
            cleared = message.clear_at == "next_user_message" and any(
                m.role == "user" for m in later
            )
            if not cleared:
                turns += message.turns(f"messages[{i}]")
        if generating and self.messages[-1].role == "assistant":
            raise ParamError(
                f"messages[{len(self.messages) - 1}]",
                "a final assistant message (prefilling the answer) is not supported",
            )
        choice = self.tool_choice or ToolChoice(type="auto")
        tool_choice = {"any": "required", "tool": "named"}.get(choice.type, choice.type)
        # Thinking only when asked for, as Claude answers: a client that did not ask reads
        # text blocks only.
        thinks = self.thinking is not None and self.thinking.type != "disabled"
        template: dict[str, TemplateValue] = {"enable_thinking": thinks}
        output = self.output_config.format if self.output_config else None
        return ChatRequest(
            messages=tuple(turns),
            sampling=SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                max_tokens=self.max_tokens,
                stop=tuple(self.stop_sequences or ()),
            ),
            # Not metadata.user_id: it names a user, whose agents' requests (a main loop, its
            # side questions) are different conversations to the prefix cache.
            cache_scope=cache_scope,
            max_tokens_ceiling=True,
            tools=tuple(tool.tool(f"tools[{i}]") for i, tool in enumerate(self.tools or ())),
            tool_choice=tool_choice,  # type: ignore[arg-type]
            tool_name=choice.name if choice.type == "tool" else None,
            parallel_tool_calls=not choice.disable_parallel_tool_use,
            response_format=(
                ResponseFormat(type="json_schema", json_schema=output.schema_) if output else None
            ),
            chat_template_kwargs=template,
        )


class CountTokensBody(MessagesBody):
    """count_tokens takes a message request without max_tokens (nor a thinking budget)."""

    max_tokens: MaxTokens = 1

    @model_validator(mode="after")
    def _thinking_budget(self) -> CountTokensBody:
        return self


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def _content_block(block: Block, whole: bool) -> dict[str, Any]:
    """A block as Anthropic writes it: whole, or empty as its stream starts it."""
    text = block.text if whole else ""
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": text, "signature": ""}
    if block.kind == "text":
        return {"type": "text", "text": text}
    assert block.call is not None
    arguments = json.loads(block.text) if whole else {}
    return {"type": "tool_use", "id": block.call.id, "name": block.call.name, "input": arguments}


def _stop_reason(done: Done) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    if done.finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def _usage(done: Done) -> dict[str, int]:
    usage = done.usage
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _message(meta: dict[str, Any], content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": meta["id"],
        "type": "message",
        "role": "assistant",
        "model": meta["model"],
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
    }


async def whole_message(
    http: Request, meta: dict[str, Any], started: Started, deadline: Deadline
) -> dict[str, Any]:
    connection, _ = started
    blocks, watch = Blocks(), Watch(http.is_disconnected)
    async for reply in replies(connection, deadline, DISCONNECT_POLL_S):
        await watch.check()
        if isinstance(reply, Idle):
            continue
        if isinstance(reply, Done):
            content = [_content_block(block, whole=True) for block in blocks.whole_blocks()]
            return {
                **_message(meta, content),
                "stop_reason": _stop_reason(reply),
                "stop_sequence": reply.stop_sequence,
                "usage": _usage(reply),
            }
        blocks.feed(reply)
    raise AssertionError("replies end with done")


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


def _block_event(event: BlockEvent) -> str:
    index = event.block.index
    if event.kind == "start":
        block = _content_block(event.block, whole=False)
        return _event("content_block_start", {"index": index, "content_block": block})
    if event.kind == "stop":
        return _event("content_block_stop", {"index": index})
    kind = event.block.kind
    if kind == "reasoning":
        delta = {"type": "thinking_delta", "thinking": event.text}
    elif kind == "text":
        delta = {"type": "text_delta", "text": event.text}
    else:
        delta = {"type": "input_json_delta", "partial_json": event.text}
    return _event("content_block_delta", {"index": index, "delta": delta})


async def message_events(
    meta: dict[str, Any], started: Started, deadline: Deadline
) -> AsyncIterator[str]:
    """Anthropic's event stream: message_start, each block's start, deltas and stop, then
    message_delta (the stop reason and usage) and message_stop; `ping` while nothing comes. A
    failure ends the stream with an `error` event."""
    connection, start = started
    try:
        usage = {
            "input_tokens": start.prompt_tokens,
            "output_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        }
        yield _event("message_start", {"message": {**_message(meta, []), "usage": usage}})
        blocks = Blocks()
        async for reply in replies(connection, deadline, KEEPALIVE_S):
            if isinstance(reply, Idle):
                yield _event("ping", {})
                continue
            if isinstance(reply, Done):
                for event in blocks.finish():
                    yield _block_event(event)
                delta = {"stop_reason": _stop_reason(reply), "stop_sequence": reply.stop_sequence}
                yield _event("message_delta", {"delta": delta, "usage": _usage(reply)})
                yield _event("message_stop", {})
                return
            for event in blocks.feed(reply):
                yield _block_event(event)
    except GenerationError as exc:
        yield _error_event(exc)
    except Exception as exc:  # whatever it is, the stream ends with it, not hanging
        log.exception("a streamed message failed")
        yield _error_event(GenerationError(f"internal error ({type(exc).__name__})", 500))
    finally:
        await connection.close()


def _error_event(exc: GenerationError) -> str:
    body = error_body(str(exc), exc.status, exc.code, anthropic=True)
    return f"event: error\ndata: {json.dumps(body)}\n\n"
