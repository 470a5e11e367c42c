"""Light hooks for tests/test_engine_faults.py that Ray actors import by reference: this module
imports only Flower's ClientApp, so an actor that is meant to fail at start-up fails in about a
second instead of first importing torch and fedsim (4-8 s on a loaded 2-core machine)."""

from flwr.clientapp import ClientApp

idle_app = ClientApp()  # never called: its actors die in their start-up


def cannot_start() -> None:
    raise RuntimeError("probe: this actor cannot start")
