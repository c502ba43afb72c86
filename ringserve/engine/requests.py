"""A request on rank 0, from the socket thread that prepared it to the loop that serves it."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from ringserve.ipc.messages import Reply, SamplingParams


@dataclass
class PreparedRequest:
    """Tokenized and validated; `replies` carries frames back, `None` closes the stream."""

    tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    seed: int
    conversation_id: str | None
    cache_scope: str = ""
    prompt_text: str | None = None  # the prompt as text, for a request that echoes it
    request_id: int = 0
    received_at: float = field(default_factory=time.monotonic)
    replies: queue.Queue[Reply | None] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def reply(self, message: Reply) -> None:
        self.replies.put(message)

    def close(self) -> None:
        self.replies.put(None)
