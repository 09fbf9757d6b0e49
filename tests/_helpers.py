"""Small helpers shared by the core tests: the contract kit's own (resumable_stream.testing)."""

from __future__ import annotations

from resumable_stream.testing import collect, eventually, joined, text_of, tokens

__all__ = ["collect", "eventually", "joined", "text_of", "tokens"]
