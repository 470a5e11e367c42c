"""The defense interface: the server-side seam (wrap the strategy, add message settings, report).

Client-side behaviour follows from what the server sends (as with Flower's own DP mods,
which act on a key in the message config), so the ClientApp needs no scenario copy to
know which defense is on.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy


class Defense:
    def wrap_server(self, strategy: Strategy) -> Strategy:
        """The strategy the server runs (default: unchanged)."""
        return strategy

    def train_config(self) -> dict[str, Any]:
        """Settings added to every training message's config."""
        return {}

    def report(self) -> dict[str, Any]:
        """This round's privacy figures for metrics.jsonl (epsilon, delta ...)."""
        return {}
