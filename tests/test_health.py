"""A rank's view of the ring (no ring): its state as rank 0's info reports it, model-step
deadlines that follow the recent steps, the frozen limit, and rank 0's queue, which drops the
requests of clients that left."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

from ringserve.engine.health import STEP_DEADLINE_FACTOR, Health, HealthLimits
from ringserve.engine.leader import Leader
from ringserve.engine.requests import PreparedRequest
from ringserve.ipc.messages import NOT_STARTED, SamplingParams
from ringserve.model.demo import ensure_demo_model

LIMITS = HealthLimits(heartbeat=5.0, step_min=5.0, step_max=300.0, frozen=30.0)


def steps(health: Health, seconds: float, count: int = 3, prefill: bool = False) -> None:
    for _ in range(count):
        with health.model_step(prefill):
            time.sleep(seconds)


def test_a_kind_of_step_not_seen_yet_gets_the_cap() -> None:
    health = Health(LIMITS)
    assert health.step_deadline(prefill=False) == LIMITS.step_max
    assert health.step_deadline(prefill=True) == LIMITS.step_max


def test_decode_steps_get_a_multiple_of_the_slowest_recent_one_with_a_floor() -> None:
    health = Health(LIMITS)
    steps(health, 0.01)
    assert health.step_deadline(prefill=False) == LIMITS.step_min  # 10 x 10 ms is under it
    slow = Health(HealthLimits(heartbeat=5.0, step_min=0.1, step_max=300.0, frozen=30.0))
    steps(slow, 0.02)
    deadline = slow.step_deadline(prefill=False)
    assert STEP_DEADLINE_FACTOR * 0.02 <= deadline < STEP_DEADLINE_FACTOR * 0.2
    # A prefill chunk is not judged by the decode steps: none has been timed yet.
    assert slow.step_deadline(prefill=True) == 300.0


def test_a_decode_step_before_any_is_judged_by_the_prefill_chunks() -> None:
    health = Health(HealthLimits(heartbeat=5.0, step_min=0.1, step_max=300.0, frozen=30.0))
    steps(health, 0.02, count=1, prefill=True)
    assert health.step_deadline(prefill=False) == health.step_deadline(prefill=True) < 1.0


def test_a_stalled_wait_is_reported_then_given_up_after_the_frozen_limit() -> None:
    health = Health(HealthLimits(heartbeat=0.3, step_min=0.3, step_max=0.3, frozen=0.6))
    health.loaded = True
    with health.exchange():
        time.sleep(0.4)
        assert "a rank has not answered" in (health.problem() or "")
        assert health.abandoned() is None  # it may thaw: reported, not yet given up
        time.sleep(0.6)
        assert "a rank has not answered" in (health.abandoned() or "")
    assert health.problem() is None


def test_an_exchange_after_a_failed_action_gets_no_grace() -> None:
    health = Health(HealthLimits(heartbeat=0.3, step_min=0.3, step_max=0.3, frozen=60.0))
    health.loaded = True
    with health.exchange(after_failure=True):
        time.sleep(0.4)
        assert health.abandoned() is not None
        assert health.problem() is None  # the rank leaves, saying the ring lost a rank


def test_the_ring_s_state_follows_loading_waits_and_a_failed_collective() -> None:
    health = Health(HealthLimits(heartbeat=0.05, step_min=10.0, step_max=10.0, frozen=30.0))
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


@pytest.fixture(scope="module")
def leader(tmp_path_factory: pytest.TempPathFactory) -> Leader:
    model = ensure_demo_model(tmp_path_factory.mktemp("models"), "tiny")
    return Leader(load_tokenizer(Path(model)), queue_size=2, max_sequences=1, health=Health(LIMITS))


def request() -> PreparedRequest:
    return PreparedRequest(
        tokens=[1, 2, 3], sampling=SamplingParams(), max_tokens=4, seed=0, conversation_id=None
    )


def test_a_request_whose_client_left_holds_no_place_in_the_queue(leader: Leader) -> None:
    first, second = request(), request()
    leader.submit(first)
    leader.submit(second)
    with pytest.raises(queue.Full):
        leader.submit(request())
    first.cancelled.set()  # its client left
    assert leader.waiting == 1
    third = request()
    leader.submit(third)
    assert first.replies.get_nowait() is None  # closed, never answered
    # The ring is lost: every waiting request is told it never started.
    leader.ring_lost()
    for waiting in (second, third):
        error = waiting.replies.get_nowait()
        assert error is not None and error.kind == "error" and error.code == NOT_STARTED
        assert waiting.replies.get_nowait() is None
    assert leader.waiting == 0
