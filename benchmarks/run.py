"""Run the benchmark scenarios against a redis-server started here; print and save figures.

    python -m benchmarks            # every scenario (a few minutes)
    python -m benchmarks --quick    # a short smoke run of every scenario
    python -m benchmarks --only 2b  # one scenario (repeat --only for several)

Writes ``benchmarks/results/latest.json``. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._support import Figure, RedisServer, Result, raise_fd_limit, redis_server

SCENARIOS = ("1", "2", "2b", "2c", "3", "4", "5", "6")
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _table(figures: list[Figure]) -> str:
    rows = [("#", "figure", "value", "target", "", "")]
    for f in figures:
        value = (
            f"{f.value:,}"
            if isinstance(f.value, int) and not isinstance(f.value, bool)
            else (str(f.value))
        )
        target = "" if f.op is None else f"{f.op} {f.target}"
        note = "" if f.note in ("info", "skipped") else f.note  # those say what the row does
        rows.append((f.scenario, f.name, f"{value} {f.unit}".strip(), target, f.verdict, note))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(selected: list[str], quick: bool) -> dict[str, Any]:
    from . import fanout, library, producer_overhead, replay

    results: dict[str, Result] = {}
    timings: dict[str, float] = {}
    with redis_server() as redis:
        http: fanout.HTTPServer | None = None

        def server() -> fanout.HTTPServer:
            nonlocal http
            if http is None:
                http = fanout.HTTPServer(redis)
            return http

        steps: list[tuple[str, Callable[[], Result]]] = [
            ("1", lambda: producer_overhead.producer_overhead(redis, quick)),
            ("2", lambda: library.burst_throughput(redis, quick)),
            ("2b", lambda: library.paced_latency(redis, quick)),
            ("2c", lambda: library.cluster_latency(quick)),
            ("4", lambda: _replay(redis, server, quick)),
            ("5", lambda: replay.storage(redis, quick)),
            ("3", lambda: fanout.live_fanout(server(), quick)),
            (
                "6",
                lambda: fanout.scaling(
                    server(), quick, results["3"].details if "3" in results else None
                ),
            ),
        ]
        try:
            for key, step in steps:
                if key not in selected:
                    continue
                print(f"scenario {key} ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                results[key] = step()
                timings[key] = round(time.perf_counter() - started, 1)
        finally:
            if http is not None:
                http.stop()
    figures = [f for key in SCENARIOS if key in results for f in results[key].figures]
    print(_table(figures))
    failed = [f for f in figures if f.verdict == "FAIL"]
    print(
        f"\n{len(figures) - len(failed)} of {len(figures)} figures pass or are informational"
        f"; {len(failed)} miss their target{' (quick mode: small sizes)' if quick else ''}."
    )
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "scenario_seconds": timings,
        "figures": [f.as_dict() for f in figures],
        "details": {key: result.details for key, result in results.items()},
    }


def _replay(redis: RedisServer, server: Callable[[], Any], quick: bool) -> Result:
    from . import fanout, replay

    library_part = replay.replay(redis, quick)
    http_part = fanout.sse_replay(server(), replay.REPLAY_STREAM, library_part.details["tokens"])
    return Result(
        figures=library_part.figures + http_part.figures,
        details={**library_part.details, **http_part.details},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short smoke version")
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        metavar="N",
        help=f"run only scenario N, one of {', '.join(SCENARIOS)} (repeatable)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    raise_fd_limit()
    report = run(args.only or list(SCENARIOS), args.quick)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"figures written to {args.output}", file=sys.stderr)
    return 0
