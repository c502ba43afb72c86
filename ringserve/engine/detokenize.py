"""Streaming detokenizers whose text is exactly that of the generated tokens.

mlx-lm's BPE and SentencePiece detokenizers drop a leading space from their first token,
which is right for a whole text (the space the tokenizer put before it) and wrong for an
answer: a completion continues its prompt, so " world" after "Hello" keeps its space, and a
client that joins prompt and answer must get back what the model produced.
"""

from __future__ import annotations

import copy

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    StreamingDetokenizer,
    TokenizerWrapper,
)


class UntrimmedBPEDetokenizer(BPEStreamingDetokenizer):
    def _maybe_trim_space(self, current_text: str) -> str:
        return current_text


class ExactDetokenizers:
    """Hands out a fresh exact detokenizer per request (built once: they map the vocabulary)."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        prototype: StreamingDetokenizer = tokenizer.detokenizer
        if isinstance(prototype, BPEStreamingDetokenizer):
            prototype = UntrimmedBPEDetokenizer(tokenizer)
        elif isinstance(prototype, SPMStreamingDetokenizer):
            prototype = SPMStreamingDetokenizer(tokenizer, trim_space=False)
        self._prototype = prototype

    def fresh(self) -> StreamingDetokenizer:
        detokenizer = copy.copy(self._prototype)
        detokenizer.reset()
        return detokenizer
