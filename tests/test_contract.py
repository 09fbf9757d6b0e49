"""The shipped contract suite (`resumable_stream.testing`) over the library's own transports.

tests/conftest.py defines `transport_factory` and `peer_transport`, parametrized over every
transport kind (memory, a real Redis, ...). Setting the kit's fixtures of those names to
None here un-shadows them, so the kit's tests use conftest's (a fixture that re-requests its
own name loses the parametrization before pytest 9).
"""

from __future__ import annotations

from resumable_stream.testing import TransportContract


class TestTransportContract(TransportContract):
    transport_factory = None  # type: ignore[assignment]
    peer_transport = None  # type: ignore[assignment]
