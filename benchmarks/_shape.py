"""The shapes of the paced scenarios: which streams run when, and how their readers attach.

A plan is a list of :class:`PlannedStream`, the same for every implementation compared in
one run (the library, the in-process pass-through, vercel's ``resumable-stream`` in Node,
which gets the plan as JSON). Every reader's added latency is its receipt time minus the
later of the token's send time and the moment the reader (re)attached: a token stored
before a reader arrives is replay, not delay.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

Reader = Literal["live", "late", "resume"]


@dataclass(frozen=True, slots=True)
class PlannedStream:
    """One stream of a plan.

    ``start`` is when its first token is due, in seconds after the run's start; ``spread``
    shifts its ticks within one period, as independent clients would be. Its reader is
    ``live`` (attached before the first token), ``late`` (attaches ``attach`` seconds after
    the first token and reads from the start) or ``resume`` (live, drops the connection
    after ``detach_after`` tokens, and comes back ``gap`` seconds later after the last
    offset it read).
    """

    key: str
    start: float
    count: int
    reader: Reader = "live"
    attach: float = 0.0
    detach_after: int = 0
    gap: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def steady(streams: int, rate: float, duration: float) -> list[PlannedStream]:
    """Every stream starts at once (ticks spread over one period) and lasts ``duration``."""
    count = round(rate * duration)
    return [PlannedStream(f"s{i}", (i / streams) / rate, count) for i in range(streams)]


def churn(
    streams: int, rate: float, duration: float, seed: int = 11, prefix: str = ""
) -> list[PlannedStream]:
    """``streams`` slots, each running streams back to back for ``duration`` seconds.

    A slot's first stream is cut short at random, so streams end and new ones start all
    through the run while about ``streams`` are live at any time. Streams last half the
    run on average (0.5-1.5x). Half the readers are live, a quarter attach late (0.1-0.5 s
    after the first token) and a quarter drop their connection part-way and resume after
    their last offset 0.05-0.3 s later.
    """
    rng = random.Random(seed)
    mean = duration / 2
    plan: list[PlannedStream] = []
    for slot in range(streams):
        at, spread, length = 0.0, (slot / streams) / rate, rng.uniform(0.1, 1.0) * mean
        while (count := min(round(length * rate), round((duration - at) * rate))) >= 1:
            key = f"{prefix}c{slot}-{len(plan)}"
            kind = rng.random()
            if count > 2 and kind < 0.25:
                stream = PlannedStream(key, at + spread, count, "late", rng.uniform(0.1, 0.5))
            elif count > 2 and kind < 0.5:
                stream = PlannedStream(
                    key,
                    at + spread,
                    count,
                    "resume",
                    detach_after=rng.randint(1, count - 1),
                    gap=rng.uniform(0.05, 0.3),
                )
            else:
                stream = PlannedStream(key, at + spread, count)
            plan.append(stream)
            at += count / rate
            length = rng.uniform(0.5, 1.5) * mean
    return plan
