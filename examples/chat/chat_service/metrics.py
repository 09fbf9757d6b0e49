"""``GET /metrics``: the library's metrics in Prometheus text format.

resumable_stream records OpenTelemetry metrics (``resumable_stream.telemetry``); this
module points them at an OpenTelemetry ``PrometheusMetricReader`` with a registry of its
own and serves that registry with ``prometheus_client``. Names come out prefixed
``resumable_stream_`` (see docs/howto/observability.md for the list). Serve it on a
network only your Prometheus reaches: it needs no session.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from resumable_stream import telemetry


def metrics_router() -> APIRouter:
    """A router serving ``GET /metrics``; the library records on its registry from now on."""
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(disable_target_info=True, registry=registry)
    telemetry.configure(meter_provider=MeterProvider(metric_readers=[reader]))
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
