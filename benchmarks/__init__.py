"""Benchmarks of resumable_stream: ``python -m benchmarks`` (see docs/performance.md)."""
