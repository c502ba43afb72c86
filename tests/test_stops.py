"""Stop strings on streamed text: the same matches as a plain search, with what is held back
never longer than the longest stop."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ringserve.engine.stops import StopMatcher, partial_match_length

TEXT = st.text(alphabet="ab=\n", max_size=60)
STOPS = st.lists(st.text(alphabet="ab=\n", min_size=1, max_size=8), min_size=1, max_size=4)


def longest_partial(text: str, markers: list[str]) -> int:
    """The definition, tried at every length."""
    return max(
        (k for m in markers for k in range(1, len(m)) if len(text) >= k and text.endswith(m[:k])),
        default=0,
    )


@given(TEXT, STOPS)
def test_a_partial_match_is_the_longest_end_that_starts_a_marker(
    text: str, markers: list[str]
) -> None:
    assert partial_match_length(text, markers) == longest_partial(text, markers)


@given(st.lists(TEXT, max_size=12), STOPS)
def test_streamed_text_stops_where_the_whole_text_first_holds_a_stop(
    pieces: list[str], stops: list[str]
) -> None:
    matcher = StopMatcher(tuple(stops))
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        assert len(matcher.held) < max(len(s) for s in stops)
    out.append(matcher.flush())
    whole = "".join(pieces)
    found = [(at, stop) for stop in stops if (at := whole.find(stop)) >= 0]
    if found:
        # The earliest stop to end wins as the text streams in; it begins no later than any.
        assert matcher.matched is not None
        assert whole.startswith("".join(out) + matcher.matched)
        assert len("".join(out)) <= min(at + len(stop) for at, stop in found)
    else:
        assert matcher.matched is None and "".join(out) == whole


def test_a_long_run_of_a_stops_first_character_holds_back_only_the_stop_less_one() -> None:
    stop = "=" * 255 + "!"
    matcher = StopMatcher((stop,))
    emitted = sum(len(matcher.feed("=" * 7)) for _ in range(2000))
    assert len(matcher.held) == 255 and emitted == 2000 * 7 - 255
    assert matcher.feed("!") == "" and matcher.matched == stop
