"""Metrics and traces through OpenTelemetry (``pip install "resumable-llm-stream[otel]"``).

With ``opentelemetry-api`` installed, the library records the metrics below on the global
``MeterProvider`` and a span per run on the global ``TracerProvider`` (or on the providers
given to :func:`configure`). Without it, nothing is recorded. Nothing is exported
until the application sets up an SDK and an exporter: see docs/howto/observability.md.

Metrics (OpenTelemetry names; Prometheus turns the dots into underscores and adds
``_total`` to counters, ``_seconds`` to the histogram):

* ``resumable_stream.runs.started``: runs started by producers of this process;
* ``resumable_stream.runs.ended`` by ``status``: ``completed``, ``error``, ``cancelled``, or
  ``failed`` (the run could not write its terminal event);
* ``resumable_stream.events.appended`` and ``resumable_stream.entries.appended`` (an entry is
  a batch of events written at once), each once: not again when a storage rollback made
  the producer write it again;
* ``resumable_stream.append.duration`` (histogram, seconds): one append, retries included,
  sampled: at most one append's duration per 10 ms is recorded, across the process (every
  append when they come 10 ms apart or more, about a hundred a second under load);
* ``resumable_stream.consumers.live`` (a gauge: an observable up-down counter): consumers
  following a stream live;
* ``resumable_stream.events.delivered``: events handed to consumers;
* ``resumable_stream.resumes``: consumers started after an offset (``after=``,
  ``Last-Event-ID``);
* ``resumable_stream.reaps`` by ``error``: runs a reader ended, ``producer_lost`` (its
  producer stopped renewing its lease: a process died mid-run) or ``not_started`` (a
  reservation no producer started within its ``start_timeout``);
* ``resumable_stream.transport.errors`` by ``operation``: transport faults met by
  producers and consumers (not :class:`~resumable_stream.TransportClosed`: the application
  closed the transport, as at a shutdown);
* ``resumable_stream.transport.reconnects`` by ``connection``: connections a transport
  re-established.

The three counters of entries and events, and the consumers following live, count in
plain integers that OpenTelemetry reads when it collects (observable instruments): they are
the process's figures since it started, also on a provider configured later, and a
provider reads them while it is the one the library records on. Recording each token on
an SDK instrument would cost more CPU than the library's own work on that token.

The span of a run, ``resumable_stream.run``, lives as long as the run; it links to the span
current when :meth:`~resumable_stream.StreamProducer.start` was called (the request that
started it) and is current in the run's tasks, so the source's own spans (LangGraph, model
calls) nest under it. On the global ``TracerProvider``, runs get spans once the application
has set one (``trace.set_tracer_provider()``, before or after the import); until then the
library makes none, where each would be a no-op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._exceptions import ConfigurationError, TransportClosed, TransportError

if TYPE_CHECKING:
    from ._producer import Run

__all__ = ["configure"]

_SCOPE = "resumable_stream"
_SAMPLE_GAP = 0.01  # seconds between two recorded append durations
_APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

try:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
    from opentelemetry.metrics import Observation as _Observation
except ImportError:  # the otel extra is not installed: nothing is recorded
    _otel_metrics = None  # type: ignore[assignment]
    _otel_trace = None  # type: ignore[assignment]


class _Counts:
    """What the library counts per entry and per event, since the process started."""

    __slots__ = ("delivered", "entries", "events", "live", "next_sample")

    def __init__(self) -> None:
        self.events = self.entries = self.delivered = self.live = 0
        self.next_sample = 0.0  # when the next append's duration is recorded


#: The process's tallies. A consumer adds each entry it hands out to ``delivered`` itself:
#: a call per entry costs more than the addition (about 1% of a paced token's CPU).
counts = _Counts()
_configured: Any = None  # the meter provider given to configure() (None: the global one)


def _provider(given: Any) -> Any:
    """The meter provider recorded on when ``given`` is configured (None: the global one)."""
    return given if given is not None else _otel_metrics.get_meter_provider()


def _read_while_configured(meter_provider: Any, read: Callable[[], int]) -> list[Any]:
    """The callbacks of an observable counter made for ``meter_provider``.

    They report only while the library records on that provider, as its other instruments
    do. A meter keeps the callbacks its instruments were first made with (configure() again
    with the same provider makes none), so they look up what is configured when called.
    """

    def observe(_: Any) -> list[Any]:
        if _provider(_configured) is not _provider(meter_provider):
            return []
        return [_Observation(read())]

    return [observe]


class _Instruments:
    def __init__(self, meter_provider: Any = None, tracer_provider: Any = None) -> None:
        if _otel_metrics is None or _otel_trace is None:  # pragma: no cover - guarded by callers
            raise ConfigurationError("OpenTelemetry is not installed")
        meter = _otel_metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self.tracer = _otel_trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        # On the global provider, runs get spans once the application has set one: until
        # then every span would be a no-op, which still cost about 6% of starting and
        # reading a run (making it, and making it current in the run's tasks).
        self.global_tracer = tracer_provider is None
        counter = meter.create_counter
        self.runs_started = counter("resumable_stream.runs.started", "{run}", "Runs started")
        self.runs_ended = counter("resumable_stream.runs.ended", "{run}", "Runs ended, by status")
        # Entries and events are tallied in plain integers (`counts`) that OpenTelemetry
        # reads when it collects: an SDK instrument's add() costs several microseconds, more
        # than the library's own work on a token (docs/performance.md).
        observe = meter.create_observable_counter
        observe(
            "resumable_stream.events.appended",
            _read_while_configured(meter_provider, lambda: counts.events),
            "{event}",
            "Events written to streams",
        )
        observe(
            "resumable_stream.entries.appended",
            _read_while_configured(meter_provider, lambda: counts.entries),
            "{entry}",
            "Entries (batches) written",
        )
        self.append_duration = meter.create_histogram(
            "resumable_stream.append.duration",
            "s",
            "Time of one append, retries included (sampled: at most one per 10 ms)",
            # Appends take about a millisecond; the SDK's default buckets are for milliseconds.
            explicit_bucket_boundaries_advisory=_APPEND_BUCKETS,
        )
        # Read, not added to: an up-down counter of the provider configured when a consumer
        # started went below 0 on the next one when it stopped after configure().
        meter.create_observable_up_down_counter(
            "resumable_stream.consumers.live",
            _read_while_configured(meter_provider, lambda: counts.live),
            "{consumer}",
            "Consumers following a stream live",
        )
        observe(
            "resumable_stream.events.delivered",
            _read_while_configured(meter_provider, lambda: counts.delivered),
            "{event}",
            "Events handed to consumers",
        )
        self.resumes = counter(
            "resumable_stream.resumes", "{consumer}", "Consumers started after an offset"
        )
        self.reaps = counter(
            "resumable_stream.reaps",
            "{run}",
            "Runs a reader ended, by error: producer_lost or not_started",
        )
        self.transport_errors = counter(
            "resumable_stream.transport.errors", "{error}", "Transport faults met"
        )
        self.reconnects = counter(
            "resumable_stream.transport.reconnects",
            "{connection}",
            "Connections a transport re-established",
        )


_instruments: _Instruments | None = None if _otel_metrics is None else _Instruments()
#: What the global tracer provider is while the application has set none.
_NO_TRACES = (
    () if _otel_trace is None else (_otel_trace.ProxyTracerProvider, _otel_trace.NoOpTracerProvider)
)


def configure(*, meter_provider: Any = None, tracer_provider: Any = None) -> None:
    """Record on these OpenTelemetry providers instead of the global ones.

    ``configure()`` with no argument goes back to the global providers. Raises
    :class:`ConfigurationError` when OpenTelemetry is not installed.
    """
    global _instruments, _configured
    if _otel_metrics is None:
        raise ConfigurationError(
            "metrics and traces need OpenTelemetry: pip install 'resumable-llm-stream[otel]'"
        )
    _configured = meter_provider
    _instruments = _Instruments(meter_provider, tracer_provider)


# --- Recording calls: one line at each call site in the library --------------------------


@contextlib.contextmanager
def run_span(stream_id: str, epoch: int) -> Iterator[Any]:
    """The span of a new run, current while its tasks are created (they inherit it)."""
    i = _instruments
    if i is None or (i.global_tracer and isinstance(_otel_trace.get_tracer_provider(), _NO_TRACES)):
        yield None
        return
    request = _otel_trace.get_current_span().get_span_context()
    span = i.tracer.start_span(
        "resumable_stream.run",
        # A new trace: the run outlives the request, which it links to.
        context=_otel_trace.set_span_in_context(_otel_trace.INVALID_SPAN),
        links=[_otel_trace.Link(request)] if request.is_valid else None,
        attributes={"resumable_stream.stream_id": stream_id, "resumable_stream.epoch": epoch},
    )
    with _otel_trace.use_span(span, end_on_exit=False):
        yield span


def run_started(run: Run, span: Any) -> None:
    """Count a started run; end its span and count its end when its task finishes."""
    i = _instruments
    if i is None:
        return
    i.runs_started.add(1)
    counted = False

    def ended(_: object = None) -> None:
        # Called as the run's task ends (so it is counted when wait() returns), and as
        # its done callback, should the task never have run.
        nonlocal counted
        if counted:
            return
        counted = True
        status = run.status if run.status != "running" else "failed"
        i.runs_ended.add(1, {"status": status})
        if span is not None:
            span.set_attribute("resumable_stream.status", status)
            if status in ("error", "failed"):
                span.set_status(_otel_trace.StatusCode.ERROR, status)
            span.end()

    run._report_end = ended
    run._task.add_done_callback(ended)


clock = time.perf_counter


def appended(events: int, began: float, now: float | None = None) -> None:
    """Count one successful append of an entry of ``events`` events begun at ``began``
    and answered ``now`` (both on :func:`clock`; None: read it).

    Its duration is recorded if none was in the last ``_SAMPLE_GAP`` seconds: every append
    at a low rate, about a hundred a second under load, whatever the number of tokens.
    """
    i = _instruments
    if i is not None:
        tally = counts
        tally.events += events
        tally.entries += 1
        if now is None:
            now = clock()
        if now >= tally.next_sample:
            tally.next_sample = now + _SAMPLE_GAP
            i.append_duration.record(now - began)


def transport_error(operation: str) -> None:
    i = _instruments
    if i is not None:
        i.transport_errors.add(1, {"operation": operation})


def failed(exc: BaseException, operation: str) -> None:
    """Count ``exc`` if it is a transport fault.

    :class:`TransportClosed` is not one: the application closed the transport (a shutdown)
    under the runs and readers still using it.
    """
    if isinstance(exc, TransportError) and not isinstance(exc, TransportClosed):
        transport_error(operation)


def reconnecting(connection: str) -> None:
    i = _instruments
    if i is not None:
        i.reconnects.add(1, {"connection": connection})


def consumer_started(resumed: bool) -> None:
    i = _instruments
    if i is not None and resumed:
        i.resumes.add(1)


def live(change: int) -> None:
    """A consumer started (+1) or stopped (-1) following a stream live."""
    if _instruments is not None:
        counts.live += change


def reaped(error: str) -> None:
    """A reader ended a run with ``error``: ``producer_lost`` or ``not_started``."""
    i = _instruments
    if i is not None:
        i.reaps.add(1, {"error": error})


def delivered(count: int) -> None:
    """``count`` events were handed to a consumer (as ``counts.delivered += count``)."""
    counts.delivered += count
