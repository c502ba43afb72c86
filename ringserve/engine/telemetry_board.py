"""Hands a telemetry gather from the loop to the socket threads that asked for it."""

from __future__ import annotations

import threading


class TelemetryBoard:
    """Socket threads ask (and wait); the loop sees `wanted`, gathers in a tick, delivers."""

    def __init__(self) -> None:
        self.wanted = threading.Event()
        self._ready = threading.Condition()
        self._generation = 0
        self._reports: list[bytes] = []

    def request(self, timeout: float) -> list[bytes] | None:
        with self._ready:
            seen = self._generation
            self.wanted.set()
            if not self._ready.wait_for(lambda: self._generation != seen, timeout=timeout):
                return None
            return list(self._reports)

    def deliver(self, reports: list[bytes]) -> None:
        with self._ready:
            self.wanted.clear()
            self._reports = reports
            self._generation += 1
            self._ready.notify_all()
