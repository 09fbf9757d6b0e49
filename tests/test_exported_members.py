import resumable_stream


def test_all_public_names_are_exported_and_sorted() -> None:
    exported = resumable_stream.__all__
    assert exported == sorted(exported, key=lambda name: (not name.isupper(), name))
    public = {name for name in dir(resumable_stream) if not name.startswith("_")}
    modules = {"transports", "starlette", "fastapi", "ai_sdk", "langgraph_api"}
    modules |= {"testing", "telemetry"}
    assert public - modules == set(exported) - {"__version__"}
    for name in exported:
        assert getattr(resumable_stream, name) is not None
