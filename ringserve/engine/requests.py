"""A request on rank 0, from the socket thread that prepared it to the loop that serves it."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ringserve.ipc.messages import Reply, SamplingParams


@dataclass(frozen=True)
class AnswerShape:
    """How a chat answer is read, and what its decoding is held to."""

    thinking: bool = False  # it starts inside a think block the template opened
    tools: tuple[dict[str, Any], ...] = ()  # the definitions of the tools it may call
    grammar: str | None = None  # llguidance's, enforced while decoding
    chat: bool = False  # parted into content, reasoning and tool calls (else: text as it is)
    markers: bool = True  # markers in the answer's text part it (not in a JSON answer)


@dataclass
class PreparedRequest:
    """Tokenized and validated; `replies` carries frames back, `None` closes the stream."""

    tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    seed: int
    conversation_id: str | None
    cache_scope: str = ""
    client: str = ""  # who sent it: the batch's free places are shared between clients
    prompt_text: str | None = None  # the prompt as text, for a request that echoes it
    # With the prompt echoed and log probabilities asked for: how many alternatives to list for
    # each prompt token (the prompt is scored as it is prefilled).
    prompt_logprobs: int | None = None
    shape: AnswerShape = field(default_factory=AnswerShape)
    request_id: int = 0
    received_at: float = field(default_factory=time.monotonic)
    replies: queue.Queue[Reply | None] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted: bool = False  # in the batch: its answer is being generated

    def reply(self, message: Reply) -> None:
        self.replies.put(message)

    def close(self) -> None:
        self.replies.put(None)
