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


def test_every_public_function_and_method_has_a_docstring() -> None:
    # Regression: Reservation.to_dict had none, so the API reference showed it bare.
    import importlib
    import inspect

    missing = []
    for module_name in (
        "resumable_stream",
        "resumable_stream.starlette",
        "resumable_stream.fastapi",
        "resumable_stream.ai_sdk",
        "resumable_stream.langgraph_api",
        "resumable_stream.testing",
        "resumable_stream.telemetry",
        "resumable_stream.transports",
    ):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and not inspect.getdoc(obj):
                missing.append(f"{module_name}.{name}")
            if not inspect.isclass(obj):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith(("_", "test_")):  # TransportContract's tests
                    continue
                func = value.fget if isinstance(value, property) else value
                func = getattr(func, "__func__", func)
                if inspect.isfunction(func) and not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{module_name}.{name}.{attr}")
    assert missing == []
