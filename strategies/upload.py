"""What a client algorithm hands over at the end of its round, before it travels.

An ``Upload`` is the client's side of the round as data: the weights the strategy asks
for (the local model for FedAvg, FedSpeed's corrected model ...), the state it started
from, extra records (control variates, feature statistics), metrics, and the batch
schedule its trainer used. Defenses and codecs transform it; the codec turns it into
the records that travel. The schedule never travels (it is the client's; an auditor
recomputes it from the seeded sampler).

``weights`` is kept beside ``sent`` rather than as a delta: the identity codec sends the
local weights exactly as trained (``sent + (weights - sent)`` can differ from ``weights``
in the last float bit), and Flower's FedAvg and its DP wrappers expect whole models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Upload:
    weights: dict[str, torch.Tensor]
    sent: dict[str, torch.Tensor]
    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)  # record name -> Flower record (ArrayRecord, ...)
    schedule: list[torch.Tensor] = field(default_factory=list)

    def delta(self) -> dict[str, torch.Tensor]:
        """``weights - sent`` for every floating-point entry (the update an attacker inverts)."""
        return {k: w - self.sent[k] for k, w in self.weights.items() if w.is_floating_point()}
