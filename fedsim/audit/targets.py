"""Who and what the audit attacks: the audited rounds, the seeded choice of target clients, the gradient
query's batch, and the attack picked by threat model (``audit.attack: auto``)."""

from __future__ import annotations

import numpy as np

from ..scenario.schema import AuditConfig

AUDIT_STREAM = 6  # of the scenario seed (fedsim/world/build.py lists the others)


def audited_round(server_round: int, every: int, num_rounds: int) -> bool:
    return server_round % every == 0 or server_round == num_rounds


def choose_targets(audit: AuditConfig, candidates: list[int], seed: int, server_round: int) -> list[int]:
    """Partition ids to attack this round: a seeded choice of ``audit.clients`` among the
    candidates, or the listed ids that are among them."""
    if isinstance(audit.clients, list):
        return [pid for pid in audit.clients if pid in candidates]
    rng = np.random.default_rng([seed, AUDIT_STREAM, server_round])
    k = min(audit.clients, len(candidates))
    return sorted(int(candidates[int(i)]) for i in rng.choice(len(candidates), size=k, replace=False))


def query_batch(num_examples: int, batch_size: int, seed: int, server_round: int, partition_id: int) -> np.ndarray:
    """The gradient query's batch: positions in the client's training set (client and auditor
    draw the same ones; they never travel)."""
    rng = np.random.default_rng([seed, AUDIT_STREAM, server_round, partition_id, 1])
    return np.sort(rng.choice(num_examples, size=min(batch_size, num_examples), replace=False))


def auto_attack(threat: str, dropout: float, batch_size: int, local_steps: int) -> str:
    """By threat model and model: iDLG for one image's gradient, IG for batches, DIA with dropout;
    unrolled IG for short multi-step updates, SME for long ones."""
    if threat == "gradient":
        if dropout > 0:
            return "dia"
        return "idlg" if batch_size == 1 else "ig"
    return "ig" if local_steps <= 8 else "sme"
