"""Stop strings on streamed text: emit what cannot be the start of a stop, hold back the rest."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched: str | None = None  # the stop string the text ended at

    def feed(self, text: str) -> str:
        """Text safe to emit now; after a match, everything up to the stop and nothing more."""
        if self.matched:
            return ""
        pending = self.held + text
        found = [(at, stop) for stop in self.stops if (at := pending.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda match: match[0])
            self.held = ""
            return pending[:cut]
        keep = partial_match_length(pending, self.stops)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.matched else text


def partial_match_length(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `markers`.

    Only the last `len(marker) - 1` characters can be such a start, and only where the marker's
    first character stands: the work is bounded by the markers' lengths, not by the text's."""
    best = 0
    for marker in markers:
        window = text[len(text) - min(len(marker) - 1, len(text)) :]
        at = window.find(marker[:1])
        while 0 <= at < len(window) - best:
            if marker.startswith(window[at:]):
                best = len(window) - at
                break
            at = window.find(marker[:1], at + 1)
    return best
