"""A rank that lost the ring leaves it: it tells its clients, says why in its log, and exits.

No rank stays behind in a broken ring: a collective that failed (a peer died) ends the loop,
and a watchdog thread ends a rank whose wait on the others outlasted every limit (a peer frozen,
or gone without closing its connections), which would otherwise busy-wait a core forever
inside the collective. The keeper then restarts the ring. Rank 0 first answers every request:
the ones being generated end with an error that says the ring lost a rank, the waiting ones are
told they never started, so the API can hold them until the ring is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import NoReturn, Protocol

from ringserve.engine.health import Health
from ringserve.engine.leader import Leader
from ringserve.ipc.keeper_report import left_ring_line

log = logging.getLogger(__name__)
# How long rank 0 gives its socket threads to send the last replies.
LINGER_S = 2.0
WATCH_S = 0.5
LEFT_RING_EXIT = 1


class Socket(Protocol):
    def wait_quiet(self, timeout: float) -> None: ...
    def close(self) -> None: ...


class RingExit:
    def __init__(
        self, health: Health, leader: Leader | None = None, socket: Socket | None = None
    ) -> None:
        self.health = health
        self.leader = leader
        self.socket = socket
        self._lock = threading.Lock()

    def leave(self, reason: str) -> NoReturn:
        with self._lock:  # the loop and the watchdog may both get here: one leaves
            log.error("%s", left_ring_line(os.getpid(), reason))
            if self.leader is not None:
                self.health.mark_broken(reason)
                self.leader.ring_lost()
            if self.socket is not None:
                self.socket.wait_quiet(LINGER_S)
                self.socket.close()
            logging.shutdown()
            # Not sys.exit: the main thread may be stuck inside a collective, and MLX's own
            # threads would hold the interpreter's exit.
            os._exit(LEFT_RING_EXIT)

    def watch(self) -> None:
        """Leave when a wait on the other ranks outlasts its limits (a daemon thread)."""

        def watching() -> None:
            while True:
                time.sleep(WATCH_S)
                reason = self.health.abandoned()
                if reason is not None:
                    self.leave(reason)

        threading.Thread(target=watching, name="ring-watchdog", daemon=True).start()
