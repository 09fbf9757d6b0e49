"""GET /metrics of the chat service: the library's metrics, in Prometheus text format."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.examples._chat import ChatServer, ask


def samples(server: ChatServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by name and labels (leaving out the otel_scope_* labels every sample has)."""
    with server.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, labels(sample.labels)): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def labels(found: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in found.items() if not k.startswith("otel_scope_")))


def test_metrics_count_an_answer(chat_servers: Callable[..., ChatServer]) -> None:
    server = chat_servers()
    with server.client() as client:
        _, events = ask(client, "Hello there")
    found = samples(server)
    names = {name for name, _ in found}
    assert all(name.startswith("resumable_stream_") for name in names), names
    assert found[("resumable_stream_runs_started_total", ())] >= 1
    ended = found[("resumable_stream_runs_ended_total", (("status", "completed"),))]
    assert ended >= 1
    assert found[("resumable_stream_events_appended_total", ())] >= len(events)
    assert found[("resumable_stream_events_delivered_total", ())] >= len(events)
    assert found[("resumable_stream_append_duration_seconds_count", ())] >= 1
    assert found[("resumable_stream_consumers_live", ())] == 0
    # Buckets sized for seconds (appends take about a millisecond), not the SDK's default.
    assert ("resumable_stream_append_duration_seconds_bucket", (("le", "0.0005"),)) in found
