"""The shipped contract suite (`resumable_stream.testing`) over the library's own transports.

`transport_factory`, `transport` and `peer_transport` come from tests/conftest.py, which
parametrizes them over every transport kind (memory, a real Redis, ...): the fixtures the
kit would make from `make_transport` are replaced by those.
"""

from __future__ import annotations

import pytest

from resumable_stream import Transport
from resumable_stream.testing import TransportContract, TransportFactory


class TestTransportContract(TransportContract):
    @pytest.fixture
    def transport_factory(self, transport_factory: TransportFactory) -> TransportFactory:
        return transport_factory  # tests/conftest.py's, one per transport kind

    @pytest.fixture
    def peer_transport(self, peer_transport: Transport) -> Transport:
        return peer_transport
