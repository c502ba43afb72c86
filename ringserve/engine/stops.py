"""Stop strings on streamed text: emit what cannot be the start of a stop, hold back the rest."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Text safe to emit now; after a match, everything up to the stop and nothing more."""
        if self.matched:
            return ""
        pending = self.held + text
        cut = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            self.held = ""
            return pending[:cut]
        keep = partial_match_length(pending, self.stops)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.matched else text


def partial_match_length(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `markers`."""
    best = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:length]):
                best = length
                break
    return best
