"""Run LLM streams in the background; read them from any offset, in any process.

```python
from resumable_stream import StreamProducer, StreamConsumer, from_url

transport = from_url("memory://")            # or "redis://localhost:6379/0"
run = await StreamProducer(transport).start(graph.astream_events(inputs, version="v2"))
async for event in StreamConsumer(transport, run.stream_id):
    print(event.offset, event.type, event.data)
```
"""

from ._codec import Position, parse_offset
from ._constants import EVENT_SCHEMA_VERSION
from ._consumer import StreamConsumer
from ._events import EVENT_TYPES, TERMINAL_TYPES, Event
from ._exceptions import (
    BackendRefused,
    ConfigurationError,
    EventTooLarge,
    InvalidOffset,
    InvalidStreamId,
    LeaseLost,
    OffsetExpired,
    ResumableStreamError,
    StorageRollback,
    StreamAlreadyRunning,
    StreamNotFound,
    TransportClosed,
    TransportError,
)
from ._ids import check_stream_id, new_stream_id
from ._producer import Run, StreamProducer
from .transports import StreamInfo, Transport, from_url

__version__ = "0.1.0"

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "EVENT_TYPES",
    "TERMINAL_TYPES",
    "BackendRefused",
    "ConfigurationError",
    "Event",
    "EventTooLarge",
    "InvalidOffset",
    "InvalidStreamId",
    "LeaseLost",
    "OffsetExpired",
    "Position",
    "ResumableStreamError",
    "Run",
    "StorageRollback",
    "StreamAlreadyRunning",
    "StreamConsumer",
    "StreamInfo",
    "StreamNotFound",
    "StreamProducer",
    "Transport",
    "TransportClosed",
    "TransportError",
    "__version__",
    "check_stream_id",
    "from_url",
    "new_stream_id",
    "parse_offset",
]
