"""The HTTP API, one router per family: chat, threads, compat, service (see app.py)."""
