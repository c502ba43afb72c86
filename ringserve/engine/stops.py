"""Stop strings on streamed text: emit what cannot be the start of a stop, hold back the rest."""

from __future__ import annotations


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
        keep = self._partial_stop_length(pending)
        self.held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.matched else text

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
