"""OpenAI request bodies (validated) and their translation into socket messages.

The bounds of each field come from `ringserve.ipc.bounds`, the same ones the socket messages
are held to. Clients send `null` for fields they leave unset: null counts as absent, for
every field. Fields this server does not know are ignored, as most OpenAI-compatible servers
do (clients send vendor extensions).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ringserve.api.errors import ParamError
from ringserve.errors import GenerationError
from ringserve.ipc.bounds import (
    MAX_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    BodyBounds,
    Choices,
    EchoMaxTokens,
    JsonSchema,
    LogitBias,
    MaxTokens,
    MinP,
    Penalty,
    RepetitionPenalty,
    Seed,
    Temperature,
    TokenId,
    TopK,
    TopLogprobs,
    TopP,
)
from ringserve.ipc.messages import (
    ChatRequest,
    ChatTurn,
    CompletionRequest,
    ResponseFormat,
    SamplingParams,
    TemplateValue,
    Tool,
    ToolCall,
    json_object_text,
)


class OpenAIModel(BaseModel):
    """A part of a client's request."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


# Validation context: the body's JSON text escapes no surrogate (`\ud800` to `\udfff`), so
# none of its strings can hold one and they need not be walked.
NO_SURROGATES = "no_surrogates"
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_at(body: Any) -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (JSON's `"\\ud800"`
    parses to one; it is not text, and no tokenizer or socket frame can encode it). Walked
    without recursion: a body may nest as deep as the JSON parser allows."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return where or "the body"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                pending.append((f"{where}.{key}" if where else str(key), item))
                pending.append((where or "the body", key))
        elif isinstance(value, list):
            pending.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


# vLLM's `cache_salt`: requests reuse each other's cached prompts only under the same salt.
CacheSalt = Annotated[str, Field(min_length=1, max_length=256)]
# A function's name, as OpenAI's function tools allow it (the same rule for a name sent back in
# a conversation's calls): nothing of a chat template's markup fits in it.
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def conversation_size(items: Any, nested: Sequence[str], most: int) -> int:
    """The items of the list `items` and of the lists under the `nested` keys of its objects,
    level by level (a message's content parts, a tool result's blocks). Counting stops once
    more than `most` are found, so a long list is measured, never walked."""
    level: list[list[Any]] = [items] if isinstance(items, list) else []
    total = 0
    while level and total <= most:
        total += sum(len(found) for found in level)
        level = [
            inner
            for found in level
            for item in found
            if isinstance(item, dict)
            for key in nested
            if isinstance(inner := item.get(key), list)
        ]
    return total


class RequestBody(OpenAIModel):
    """A whole request body."""

    cache_salt: CacheSalt | None = None
    # Where the body keeps its conversation, and the keys of the lists inside its items
    # (content parts, a tool call's list, a tool result's blocks): counted before validation.
    CONVERSATION: ClassVar[tuple[str, ...]] = ()
    NESTED: ClassVar[tuple[str, ...]] = ("content",)

    @classmethod
    def weigh(cls, data: dict[str, Any], bounds: BodyBounds) -> None:
        """Refuse a body that holds more than any request that fits the context, before any of
        it is walked."""
        if not cls.CONVERSATION:
            return
        count = sum(
            conversation_size(data.get(field), cls.NESTED, bounds.max_turns)
            for field in cls.CONVERSATION
        )
        if count > bounds.max_turns:
            raise GenerationError(
                f"{cls.CONVERSATION[0]} holds {count} messages and content parts; at most "
                f"{bounds.max_turns} fit this model's context of {bounds.context_limit} tokens "
                "(each takes a token or more)",
                400,
                "array_above_max_length",
                cls.CONVERSATION[0],
            )

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any, info: ValidationInfo) -> Any:
        if (info.context or {}).get(NO_SURROGATES):
            return data
        where = lone_surrogate_at(data)
        if where is not None:
            raise ParamError(
                where, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
            )
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False


def bounded_stops(stops: str | list[str] | None) -> str | list[str] | None:
    """One message for every way stop strings break the bounds, naming the field itself."""
    listed = [stops] if isinstance(stops, str) else stops or []
    if len(listed) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(listed)}")
    longest = max((len(stop) for stop in listed), default=0)
    if longest > MAX_STOP_CHARS:
        raise ValueError(f"a stop string has {longest} characters; at most {MAX_STOP_CHARS}")
    return stops


Stops = Annotated[str | list[str] | None, AfterValidator(bounded_stops)]
StopList = Annotated[list[str] | None, AfterValidator(bounded_stops)]


class SamplingFields(RequestBody):
    """The sampling parameters shared by chat and text completions (OpenAI names)."""

    model: str = ""
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    n: Choices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stops = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "only allowed when stream is true")
        return self

    def sampling(self, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias or {},
            max_tokens=max_tokens,
            stop=tuple(stops),
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class FunctionCall(OpenAIModel):
    name: ToolName
    arguments: Annotated[str, AfterValidator(json_object_text)]


class ToolCallBody(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None
    # An assistant turn's thinking, given back (vLLM and DeepSeek name it so; some `reasoning`).
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _tool_calls_are_the_assistants(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            parts.append(part.text)
        return "".join(parts)

    def turn(self) -> ChatTurn:
        calls = tuple(
            ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
            for call in self.tool_calls or ()
        )
        return ChatTurn(
            role=self.role,
            content=self.text(),
            name=self.name,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            reasoning=self.reasoning_content
            if self.reasoning_content is not None
            else self.reasoning,
        )


# What apply_chat_template itself takes (transformers' and mlx-lm's): never from a client.
RENDERER_PARAMETERS = frozenset(
    {
        "chat_template",
        "conversation",
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def check_tools(names: Sequence[str | None], wants_a_call: object, named: str | None) -> None:
    """The rules of `tools` and `tool_choice`, whichever API names them: a call asked for
    needs tools, a named one must be among them, and no two tools share a name."""
    if wants_a_call and not names:
        raise ParamError("tool_choice", "asks for a tool call, but no tools were given")
    if named is not None and named not in names:
        raise ParamError("tool_choice", f"names {named!r}, which is not among the tools")
    if len(set(names)) != len(names):
        raise ParamError("tools", "two tools have the same name")


class FunctionName(OpenAIModel):
    name: str


class FunctionDefinition(OpenAIModel):
    name: ToolName
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition

    def tool(self) -> Tool:
        function = self.function
        return Tool(
            name=function.name,
            description=function.description,
            parameters=function.parameters or {"type": "object"},
        )


class JsonSchemaFormat(OpenAIModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatBody(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormatBody:
        if self.type == "json_schema" and self.json_schema is None:
            raise ParamError("response_format.json_schema", "is required for type json_schema")
        return self

    def format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        if self.type == "json_object":
            schema = None
        return ResponseFormat(type=self.type, json_schema=schema)


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionBody(SamplingFields):
    CONVERSATION = ("messages",)
    NESTED = ("content", "tool_calls")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormatBody | None = None
    # Variables for the model's chat template (e.g. {"enable_thinking": false} for Qwen3).
    chat_template_kwargs: dict[str, TemplateValue] | None = None
    # Known, and refused rather than ignored: the deprecated way to offer tools.
    functions: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _nothing_ignored(self) -> ChatCompletionBody:
        if self.functions:
            raise ParamError("functions", "deprecated: offer them as tools")
        return self

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionBody:
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionBody:
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        check_tools(
            [t.function.name for t in self.tools or ()], choice == "required" or named, named
        )
        return self

    @model_validator(mode="after")
    def _template_variables_only(self) -> ChatCompletionBody:
        # Not the renderer's own parameters: `chat_template` would run a client's template.
        taken = sorted(set(self.chat_template_kwargs or {}) & RENDERER_PARAMETERS)
        if taken:
            raise ParamError(
                "chat_template_kwargs", f"{', '.join(taken)} cannot be set; only template variables"
            )
        return self

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_request(self, conversation_id: str | None, cache_scope: str) -> ChatRequest:
        named = self.tool_choice if isinstance(self.tool_choice, NamedToolChoice) else None
        turns = []
        for index, message in enumerate(self.messages):
            try:
                turns.append(message.turn())
            except ValueError as exc:
                raise ParamError(f"messages[{index}].content", str(exc)) from None
        return ChatRequest(
            messages=tuple(turns),
            sampling=self.sampling(
                self.max_completion_tokens or self.max_tokens, self.logprobs_wanted
            ),
            conversation_id=conversation_id or self.user,
            cache_scope=cache_scope,
            tools=tuple(tool.tool() for tool in self.tools or ()),
            tool_choice="named" if named else (self.tool_choice or "auto"),  # type: ignore[arg-type]
            tool_name=named.function.name if named else None,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format.format() if self.response_format else None,
            chat_template_kwargs=self.chat_template_kwargs or {},
        )


Prompt = str | tuple[int, ...]
PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_token_id(value: Any) -> bool:
    """An integer, as JSON may write one (`7` or `7.0`); never a boolean."""
    return (type(value) is int) or (type(value) is float and value.is_integer())


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_token_id(t) for t in value)


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionBody(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | list[TokenIds]
    echo: bool = False
    max_tokens: EchoMaxTokens | None = None
    # The legacy endpoint's logprobs: how many alternatives to list (for the echoed prompt's
    # tokens too).
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    # Known, and refused rather than ignored (below).
    suffix: str | None = None
    best_of: int | None = None

    @classmethod
    def weigh(cls, data: dict[str, Any], bounds: BodyBounds) -> None:
        prompt = data.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            return
        if isinstance(prompt[0], list | str):
            if len(prompt) > MAX_CHOICES:
                raise GenerationError(
                    f"prompt holds {len(prompt)} prompts; a request may hold {MAX_CHOICES}",
                    400,
                    "array_above_max_length",
                    "prompt",
                )
            lists = [p for p in prompt if isinstance(p, list)]
        else:
            lists = [prompt]
        for ids in lists:
            if len(ids) > bounds.max_prompt_tokens:
                raise GenerationError(
                    f"the prompt has {len(ids)} tokens, but this model's context limit is "
                    f"{bounds.context_limit} tokens",
                    400,
                    "context_length_exceeded",
                    "prompt",
                )

    @model_validator(mode="after")
    def _nothing_ignored(self) -> CompletionBody:
        if self.suffix:
            raise ParamError("suffix", "inserting text before a suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "is not supported by this server; use n")
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        forms_ok = (isinstance(value, str) and bool(value)) or (
            isinstance(value, list)
            and bool(value)
            and (
                all(isinstance(p, str) and p for p in value)
                or _is_token_ids(value)
                or all(_is_token_ids(p) for p in value)
            )
        )
        if not forms_ok:
            raise ParamError("prompt", f"must be {PROMPT_FORMS}, none of them empty")
        return value

    @model_validator(mode="after")
    def _no_tokens_only_with_echo(self) -> CompletionBody:
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens", "0 is allowed only with echo (the prompt alone)")
        return self

    @model_validator(mode="after")
    def _choices_within_bounds(self) -> CompletionBody:
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ParamError(
                "n", f"{len(self.prompts)} prompts x n={self.n} choices exceed {MAX_CHOICES}"
            )
        return self

    @property
    def prompts(self) -> list[Prompt]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        items: list[Any] = list(self.prompt)
        if all(isinstance(p, int) for p in items):
            return [tuple(items)]
        return [p if isinstance(p, str) else tuple(p) for p in items]

    def to_requests(self, conversation_id: str | None, cache_scope: str) -> list[CompletionRequest]:
        sampling = self.sampling(self.max_tokens, self.logprobs)
        return [
            CompletionRequest(
                prompt=prompt,
                sampling=sampling,
                conversation_id=conversation_id or self.user,
                cache_scope=cache_scope,
                echo=self.echo,
            )
            for prompt in self.prompts
        ]


def usage_body(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
