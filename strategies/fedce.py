"""FedCE: aggregation weights from client contribution estimates in gradient and data space.

Jiang, Wang, Dou, "Fair Federated Medical Image Segmentation via Client Contribution
Estimation", CVPR 2023. Reference implementation: NVFlare ``research/fed-ce``
(``FedCEAssembler.assemble`` on the server, ``get_minus_model`` in the client learner).

Weights c_i start at 1/N. Every round, over the participants S with updates delta_i:
- gradient space (server): D = sum_j c_j delta_j;  cos_i = cos(delta_i, D - c_i delta_i);
  s_g,i = 1 - mean over the client's rounds so far of cos_i.
- data space (client): the minus model theta_-i = (theta_global - c_i theta_i_last) / (1 - c_i)
  is evaluated on the client's validation split (accuracy v_i);  s_d,i = 1 - mean of v_i
  over its rounds so far. The client keeps theta_i_last and the v_i history in
  ``Context.state`` and reports s_d,i with its upload.
- normalise s_g and s_d to sum 1, clip at 1e-3, combine ``plus`` (s_g + s_d) or ``times``
  (s_g * s_d), normalise, clip at 1e-3 -> a_i; new global = theta + sum_i a_i delta_i.

A client whose update is *unlike* the others' (cos near -1), or whom the others' model
serves badly (low v_i), gets a *larger* weight: FedCE rewards unique contributions
(collaboration fairness), it is not a robust aggregator.

Partial participation (the reference has every client every round):
- the scores are normalised over this round's participants; a_i are their aggregation
  weights; the stored contribution c (all N clients) takes a_i times the participants'
  previous share of c and is renormalised to sum 1. With full participation c = a/sum(a).
- the server tells each client the weight with which its last model entered the global
  (``fedce.weight`` in a per-node ConfigRecord), so the minus model removes exactly that
  contribution when the client trained in the previous round; after a gap it is the
  paper's formula applied to a global that has moved on since.
- round 1, or a client without a last model or validation data, has no s_d: if no
  participant has one, s_g alone decides (the reference uses zeros, which ``times`` cannot);
  otherwise a missing s_d is 0 in ``plus`` (as the reference) and neutral in ``times``.

``consensus: uniform`` reproduces the reference's server, whose consensus direction
always uses 1/N (it never stores the new coefficients); ``current`` (default) is the paper.

``fidelity``: ``paper`` (default) is the rule above. Two modes reproduce NVFlare's code, named
by the version they follow (NVFlare rewrote FedCE in PR #4922, 2026-07-29):

- ``nvflare-2024`` (``reference`` is an accepted alias, the name it had before) follows
  ``research/fed-ce`` as it was before that PR, read at NVFlare commit
  23a97c305915d971d26720e95a663f452ace341f (the parent of #4922; ``FedCEAssembler.assemble``
  in ``jobs/fedce_prostate/app/custom/aggregators/fedce_assembler.py``, unchanged since
  90f8781b, 2023-05-01; ``SupervisedMonaiProstateFedCELearner.train``): the consensus
  coefficient is 1/N for good (``consensus`` uniform; the reference fixes it in round 0 to
  1/(round-0 sites), which is 1/N with every client in every round, and never stores the new
  ones); s_g, s_d and the combination are normalised, then clipped at 1e-3 (``CLIP``); the
  update is sum_i a_i delta_i (not divided by sum a_i, which the clip can push above 1).
- ``nvflare-main`` follows today's ``nvflare/app_opt/pt/fedce.py`` (``FedCEModelAggregator``,
  ``PTFedCEHelper``) with its research client ``research/fed-ce/jobs/fedce_prostate/client.py``,
  read at NVFlare commit f3b7c1bffdfed90338d695a67b52a46d8bc4d28c (2026-08-21; the file last
  changed in 692bf07d, #5014, 2026-08-03). Three rules differ from ``nvflare-2024``: the
  consensus coefficients are the stored weights a_i of each client's last aggregation (1/|S|
  in the first round; a client not yet aggregated gets 1/(K+1), K the clients with a stored
  weight; absent clients keep theirs; not renormalised); s_g = max(0, 1 - mean cos) and every
  normalisation clips at 1e-6 (``EPSILON_MAIN``) *first* and then divides by the sum; the
  update is sum_i a_i delta_i / sum_i a_i. (``consensus`` must be left at ``current``.)

In both, a client records a minus-model score of 0 whenever it has none to compute (NVFlare's
round 0: no last model yet; NVFlare's main client raises instead for a client that joins after
round 0) and keeps that 0 in its mean, so every client reports s_d = 1 - 0 = 1 in its first
round and 1 - mean(0, v_2, ...) after; the minus model uses the weight a_i of the client's last
aggregation, which both versions send back with the global model. Every participant has an s_d,
so the plus and times rules are the reference's. (NVFlare takes cosines over trainable parameters
only; fedsim's models hold no floating buffers, so all floating arrays are the same set.)

Reported in metrics.jsonl every round: ``contribution`` (c of every client, by partition id;
``node-<id>`` for one not yet seen), ``agg_weight`` (a_i of this round's participants), ``s_g``/``s_d``,
and the performance-fairness spread: ``acc_spread`` (std) and ``acc_range`` (max - min)
of the accuracy of the received global model on each participant's *own validation
split*, as reported by the clients (the server never sees client data).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, VectorRule
from .stateful import DeltaStrategy, NDArrays, Reply, flat, load_state, save_state
from .upload import Upload

LAST_MODEL_KEY = "fedce.last_model"
HISTORY_KEY = "fedce.history"
MESSAGE_KEY = "fedce"
CLIP = 1e-3            # nvflare-2024 (and paper): normalise, then clip
EPSILON_MAIN = 1e-6    # nvflare-main: clip, then normalise
NVFLARE_2024 = ("nvflare-2024", "reference")  # "reference": the name nvflare-2024 had before


class FedCEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["plus", "times"] = Field("plus", description="combination of the two scores")
    consensus: Literal["current", "uniform"] = Field(
        "current", description="c in the consensus direction: current weights (paper) or 1/N (reference code)")
    fidelity: Literal["paper", "nvflare-2024", "nvflare-main", "reference"] = Field(
        "paper", description="paper; nvflare-2024 (alias reference): NVFlare's research/fed-ce before PR #4922 "
                             "(consensus 1/N, normalise then clip 1e-3); nvflare-main: today's "
                             "nvflare/app_opt/pt/fedce.py (stored weights, clip 1e-6 then normalise, "
                             "divide by the total weight); both: s_d with a 0 for the first round")

    @model_validator(mode="after")
    def _reference_consensus(self) -> "FedCEParams":
        if self.fidelity in NVFLARE_2024:
            if "consensus" in self.model_fields_set and self.consensus != "uniform":
                raise ValueError(f"fidelity {self.fidelity!r} uses the reference's consensus (consensus 'uniform')")
            self.consensus = "uniform"
        elif self.fidelity == "nvflare-main" and self.consensus != "current":
            raise ValueError("fidelity 'nvflare-main' uses its stored weights as consensus (consensus 'current')")
        return self

    @property
    def nvflare(self) -> str | None:
        """The NVFlare version this mode follows (None for the paper mode)."""
        return "nvflare-2024" if self.fidelity in NVFLARE_2024 else (
            "nvflare-main" if self.fidelity == "nvflare-main" else None)


# ----------------------------------------------------------------------------- pure math


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def gradient_cosines(deltas: list[np.ndarray], c: list[float]) -> list[float]:
    """cos(delta_i, D - c_i delta_i) with D = sum_j c_j delta_j."""
    consensus = sum(ci * d for ci, d in zip(c, deltas))
    return [cosine(d, consensus - ci * d) for ci, d in zip(c, deltas)]


def normalise_clip(x: np.ndarray) -> np.ndarray:
    """Divide by the sum, then clip at ``CLIP`` (paper, nvflare-2024)."""
    total = float(np.sum(x))
    x = x / total if total > 0 else np.full(len(x), 1.0 / len(x))
    return np.clip(x, CLIP, None)


def clip_normalise(x: np.ndarray) -> np.ndarray:
    """Clip at ``EPSILON_MAIN``, then divide by the sum (nvflare-main's ``_normalize``)."""
    x = np.maximum(np.asarray(x, dtype=np.float64), EPSILON_MAIN)
    total = float(np.sum(x))
    return x / total if total > 0 else np.full(len(x), 1.0 / len(x))


def combine(s_g: np.ndarray, s_d: np.ndarray | None, mode: str, norm=normalise_clip) -> np.ndarray:
    """Aggregation weights from the two score vectors (s_d entries NaN where missing);
    ``norm``: ``normalise_clip`` (paper, nvflare-2024) or ``clip_normalise`` (nvflare-main)."""
    g = norm(np.asarray(s_g, dtype=np.float64))
    if s_d is None or np.all(np.isnan(s_d)):
        return norm(g)
    d = np.asarray(s_d, dtype=np.float64)
    if mode == "plus":
        d = norm(np.nan_to_num(d, nan=0.0))
        out = g + d
    else:
        d = np.where(np.isnan(d), np.nanmean(d), d)
        out = g * norm(d)
    return norm(out)


def minus_model(global_sd: dict[str, torch.Tensor], last_sd: dict[str, torch.Tensor],
                weight: float) -> dict[str, torch.Tensor]:
    """theta_-i = (theta_global - c_i * theta_i_last) / (1 - c_i)."""
    return {k: (g - weight * last_sd[k]) / (1.0 - weight) for k, g in global_sd.items()}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    if len(y) == 0:
        return float("nan")
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


# ----------------------------------------------------------------------------- server


class FedCEStrategy(DeltaStrategy):
    def __init__(self, params: FedCEParams, settings: ServerSettings):
        super().__init__(settings)
        self.params = params
        n = settings.num_clients
        self.c: dict[int, float] = {}            # node id -> contribution (default 1/N)
        self.last_weight: dict[int, float] = {}  # node id -> aggregation weight when it last contributed
        self.cos_history: dict[int, list[float]] = {}
        self.partition: dict[int, int] = {}      # node id -> partition id, as clients report it
        self.default_c = 1.0 / n
        self._report: dict[str, Any] = {}

    def coef(self, node: int) -> float:
        return self.c.get(node, self.default_c)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.c:
            self.c = {int(n): self.default_c for n in grid.get_node_ids()}
        out = []
        for msg in super().configure_train(server_round, arrays, config, grid):
            node = msg.metadata.dst_node_id
            content = RecordDict({**msg.content,
                                  MESSAGE_KEY: ConfigRecord({"weight": float(self.last_weight.get(node, 0.0))})})
            out.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return out

    def aggregate(self, server_round: int, global_arrays: NDArrays, replies: list[Reply]) -> NDArrays:
        keys = [k for k, v in global_arrays.items() if np.issubdtype(v.dtype, np.floating)]
        x = flat(global_arrays, keys)
        deltas = [flat(r.arrays, keys) - x for r in replies]
        nodes = [r.node_id for r in replies]
        main = self.params.nvflare == "nvflare-main"
        if main:  # the stored weights of each client's last aggregation (see the docstring)
            unseen = 1.0 / (len(self.last_weight) + 1) if self.last_weight else 1.0 / len(nodes)
            c = [self.last_weight.get(n, unseen) for n in nodes]
        else:
            c = [self.default_c if self.params.consensus == "uniform" else self.coef(n) for n in nodes]
        for n, cos in zip(nodes, gradient_cosines(deltas, c)):
            self.cos_history.setdefault(n, []).append(cos)
        s_g = np.array([1.0 - float(np.mean(self.cos_history[n])) for n in nodes])
        if main:
            s_g = np.maximum(s_g, 0.0)
        s_d = np.array([r.metrics["fedce_sd"] if r.metrics.get("fedce_has_sd", 0.0) > 0 else math.nan
                        for r in replies])
        a = combine(s_g, s_d, self.params.mode, clip_normalise if main else normalise_clip)
        scale = 1.0 / float(np.sum(a)) if main else 1.0  # main divides by the total weight

        share = sum(self.coef(n) for n in nodes)
        for n, ai in zip(nodes, a):
            self.c[n] = float(ai) * share
            self.last_weight[n] = float(ai)
        for r in replies:
            self.partition[r.node_id] = r.partition_id if r.partition_id is not None else r.node_id
        total = sum(self.c.values())
        self.c = {n: v / total for n, v in self.c.items()}

        new = {}
        for k, v in global_arrays.items():
            if k in keys:
                upd = sum(float(ai) * (r.arrays[k].astype(np.float64) - v) for ai, r in zip(a, replies))
                new[k] = (v + scale * upd).astype(v.dtype)
            else:
                new[k] = v
        accs = [r.metrics["val_acc_global"] for r in replies if not math.isnan(r.metrics.get("val_acc_global", math.nan))]
        pid = {n: str(self.partition[n]) for n in nodes}
        self._report = {
            "contribution": self._contribution(),
            "agg_weight": {pid[n]: round(float(ai), 6) for n, ai in zip(nodes, a)},
            "s_g": {pid[n]: round(float(v), 6) for n, v in zip(nodes, s_g)},
            "s_d": {pid[n]: (None if math.isnan(v) else round(float(v), 6)) for n, v in zip(nodes, s_d)},
            "acc_spread": float(np.std(accs)) if accs else None,
            "acc_range": float(np.max(accs) - np.min(accs)) if accs else None,
        }
        return new

    def _contribution(self) -> dict[str, float]:
        """c by partition id; clients not yet seen (partition unknown) by ``node-<id>``."""
        seen = sorted((self.partition[n], v) for n, v in self.c.items() if n in self.partition)
        unseen = sorted((n, v) for n, v in self.c.items() if n not in self.partition)
        return {**{str(p): round(v, 6) for p, v in seen}, **{f"node-{n}": round(v, 6) for n, v in unseen}}

    def round_report(self, server_round: int) -> dict[str, Any]:
        return dict(self._report)


# ----------------------------------------------------------------------------- client


class FedCEClient(ClientAlgorithm):
    params: FedCEParams

    def train(self, job: ClientJob) -> Upload:
        scores = score_before_training(job, self.params)
        trainer = job.trainer()
        metrics = trainer.run()
        save_state(job.state, LAST_MODEL_KEY, job.model.state_dict())
        return job.upload(trainer, {**metrics, **scores})


def score_before_training(job: ClientJob, params: FedCEParams) -> dict[str, float]:
    """What a FedCE client measures before it trains (``job.model`` holding the received global): the
    global's accuracy on its validation split (performance fairness) and its minus model's, whose running
    mean (in ``Context.state``) gives s_d; returns the metrics it reports beside its training metrics."""
    model, data, state = job.model, job.data, job.state
    global_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    acc_global = accuracy(model, data.x_val, data.y_val)
    weight = float(job.content[MESSAGE_KEY]["weight"]) if MESSAGE_KEY in job.content else 0.0
    last = load_state(state, LAST_MODEL_KEY, job.device)
    hist = state.get(HISTORY_KEY)
    v_sum, v_count = (float(hist["v_sum"]), float(hist["v_count"])) if hist is not None else (0.0, 0.0)
    if last is not None and 0.0 < weight < 1.0 and len(data.y_val) > 0:
        model.load_state_dict(minus_model(global_sd, last, weight))
        v_sum += accuracy(model, data.x_val, data.y_val)
        v_count += 1
        model.load_state_dict(global_sd)
    elif params.nvflare:  # NVFlare records 0 when it has no minus model
        v_count += 1
    state[HISTORY_KEY] = ConfigRecord({"v_sum": v_sum, "v_count": v_count})
    return {"fedce_sd": 1.0 - v_sum / v_count if v_count else 0.0,
            "fedce_has_sd": 1.0 if v_count else 0.0,
            "val_acc_global": acc_global}


class FedCEVectorRule(VectorRule):
    """``FedCEClient`` on stacked clients: its local training is plain SGD; before it, each client scores
    the received global and its minus model on its validation split (``score_before_training``, one client
    at a time: evaluation, not training); after it, each keeps its trained model in ``Context.state``."""

    params: FedCEParams

    def start(self, jobs, weights) -> None:
        self.scores = []
        for job in jobs:
            job.model.load_state_dict(job.sent)  # the template holds each client's received global in turn
            self.scores.append(score_before_training(job, self.params))

    def finish(self, jobs, weights, steps):
        for i, job in enumerate(jobs):
            save_state(job.state, LAST_MODEL_KEY, {k: w[i] for k, w in weights.items()})
        return [{} for _ in jobs]

    def metrics(self, i: int) -> dict[str, float]:
        return self.scores[i]


SPEC = StrategySpec(
    name="fedce",
    params=FedCEParams,
    server=lambda params, settings: FedCEStrategy(params, settings),
    client=FedCEClient,
    vector_rule=FedCEVectorRule,
)
