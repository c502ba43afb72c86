"""Rank 0's view of the ring, as its info reports it: loading, serving, waiting, broken."""

from __future__ import annotations

import time

from ringserve.engine.health import Health


def test_the_ring_s_state_follows_loading_waits_and_a_failed_collective() -> None:
    health = Health(heartbeat_timeout=0.05, step_timeout=10.0)
    assert (health.state(), health.problem()) == ("loading", "the model is still loading")
    health.loaded = True
    assert (health.state(), health.problem()) == ("serving", None)
    with health.exchange():
        time.sleep(0.1)  # past the heartbeat: a rank is late
        assert health.state() == "waiting"
        assert (health.problem() or "").startswith("a rank has not answered for")
    assert health.state() == "serving"
    with health.model_step():
        time.sleep(0.1)  # a model step may take long
        assert health.state() == "serving"
    health.mark_broken("lost contact with the other ranks")
    assert (health.state(), health.problem()) == ("broken", "lost contact with the other ranks")
