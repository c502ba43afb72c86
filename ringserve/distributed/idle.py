"""The idle schedule every rank follows, so no rank waits inside a (busy-waiting) collective.

After each idle op all ranks sleep the same time, which doubles from `first_s` up to `max_s`
and resets on work. Since every rank computes it from the same sequence of ops, they stay in
step without talking about it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IdleBackoff:
    first_s: float = 0.001
    max_s: float = 0.050
    idle_ops: int = 0

    def next_sleep(self) -> float:
        sleep = min(self.max_s, self.first_s * (2**self.idle_ops))
        if sleep < self.max_s:
            self.idle_ops += 1
        return sleep

    def reset(self) -> None:
        self.idle_ops = 0
