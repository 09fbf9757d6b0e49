from __future__ import annotations

import pytest

from resumable_stream import _recent
from resumable_stream._recent import Recent


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(_recent, "clock", clock)
    return clock


def lookup(cache: Recent[int, str], key: int) -> str:
    """What the hot paths do: the value cached, or made and cached."""
    value = cache.recent.get(key) or cache.get(key)
    if value is None:
        value = f"made {key}"
        cache.put(key, value)
    return value


def test_keys_in_use_stay_however_many_there_are(clock: Clock) -> None:
    # (Issue 11) the caches this replaces were emptied when they held 4,096
    # keys, so with more in use, taking turns, nearly every lookup missed.
    cache: Recent[int, str] = Recent(limit=100_000, period=60.0)
    for _ in range(3):
        for key in range(5_000):
            assert lookup(cache, key) == f"made {key}"
        clock.now += 25.0  # a generation ends every other turn
    made = 0
    for _ in range(4):
        for key in range(5_000):
            if cache.recent.get(key) is None and cache.get(key) is None:
                made += 1
                cache.put(key, f"made {key}")
        clock.now += 25.0
    assert made == 0


def test_keys_left_unused_go_within_two_periods(clock: Clock) -> None:
    cache: Recent[int, str] = Recent(limit=100_000, period=60.0)
    for key in range(6_000):  # status reads of streams long gone
        lookup(cache, key)
    for key in (-1, -2):  # a generation ends at the next key added past its period
        clock.now += 60.0
        lookup(cache, key)
    assert list(cache.recent) == [-2] and list(cache.older) == [-1]


def test_a_generation_holds_at_most_limit_keys(clock: Clock) -> None:
    cache: Recent[int, str] = Recent(limit=8, period=60.0)
    for key in range(100):
        lookup(cache, key)
        assert len(cache.recent) <= 8 and len(cache.older) <= 8
    assert sorted(cache.older) == list(range(88, 96))
    assert sorted(cache.recent) == list(range(96, 100))
    assert cache.get(90) == "made 90"  # moved back into the current generation
    assert 90 in cache.recent and 90 not in cache.older
