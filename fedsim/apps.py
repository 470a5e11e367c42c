"""Moved to ``fedsim.run.apps``; this name stays for apps' pyproject files that name
``fedsim.apps:server_app`` / ``fedsim.apps:client_app``."""

from fedsim.run.apps import client_app, server_app  # noqa: F401
