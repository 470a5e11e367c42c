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

    def client_step(self) -> dict[str, Any] | None:
        """This defense's client-side step (its settings, with ``name``), carried in the message
        config under ``defenses`` and applied by ``defenses.client``; None: server-side only."""
        return None

    def on_round(self, record: Any) -> None:
        """Read the round's replies (``fedsim.rounds.RoundRecord``) before ``report``."""

    def query_config(self) -> dict[str, Any]:
        """Settings added to the audit's gradient query now (beyond ``train_config``): what the
        client needs to defend its answer as it would defend an upload this round."""
        return {}

    def train_config(self) -> dict[str, Any]:
        """Settings added to every training message's config."""
        return {}

    def report(self) -> dict[str, Any]:
        """This round's privacy figures for metrics.jsonl (epsilon, delta ...)."""
        return {}

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Fields for summary.json from the run's metrics rows (default: the last round's report)."""
        keys = ("epsilon", "delta", "clip_fraction", "update_clip_fraction")
        return {k: rows[-1][k] for k in keys if rows and rows[-1].get(k) is not None}
