"""The per-round privacy audit: the server attacks what a client really uploaded.

Threat model (shared/specs/privacy.md): an honest-but-curious server. The attacker gets
only what the server saw: the model it sent, the config it sent, and the decoded upload
(``update`` threat), or one batch gradient the server asked the client for at the current
global model (``gradient`` threat: the worst case for that round; the query changes no
client state and no random stream of training). What each strategy's upload means to an
attacker comes from the strategy (``StrategySpec.observe``); where plain local SGD does not
reproduce it, the row says so (``exact_replay``, ``note``).

Through an upload codec (issue 11) the attacker reads the upload as the server does:
- top-k, DGC: the reply carries some coordinates only (``RoundRecord.support``); the attack
  matches those only (``Observation.support``; the row's ``support`` is their fraction), not
  the zeros the unsent ones decode to (``audit.support: false`` restores that, for comparison).
  DGC's values are the client's accumulated residual, so earlier rounds' updates are in them;
- sketch (with or without noise): the server holds the round's shared seed, so it knows S.
  The decoded upload is already the de-sketch S^T y (``SketchCodec.decode_vector``), a dense
  but noisy estimate of the update (S^T S is not the identity); by default the attack matches
  in sketch space instead, the simulated update sketched, S u(x'), against the y that
  travelled (``Observation.wire``, ``SketchMap``), where the true batch is an exact solution
  without noise; ``audit.sketch_space: false`` matches the de-sketch;
- sign, TernGrad: the decoded values (per-layer scale times sign / ternary code);
- EF21: ``sent + g_i``, the server's running estimate of the client's update (every round's
  compressed corrections so far), not this round's update;
- countsketch (FetchSGD): every reply decodes to the round's aggregate ``sent + Delta``, so
  the attack sees the aggregate of all the round's clients, not one client's update
  (``exact_replay`` is false).

Ground truth never travels: the auditor re-derives the target's true batch from the seeded
sampler and the client's partition, off the training path, only to score the
reconstruction. Attacks run off the training path while training goes on (a process of
their own on the inline engine, a Ray actor on the ray engine); rows
land in audit.jsonl (and the reconstruction beside the truth in audit/) as each finishes,
and the run waits for the last. Training metrics are the same with the audit on or off.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from defenses.client import client_steps
from strategies import TrainSettings, get_strategy
from strategies.records import to_numpy, to_record, to_torch
from strategies.trainer import EpochShuffleSampler

from .results import _clean, atomic_write
from .rounds import NodeRound, RoundObserver, RoundRecord
from .scenario import AuditConfig, Scenario
from .world import World

AUDIT_STREAM = 6  # of the scenario seed (fedsim/world.py lists the others)
QUERY_GRADIENT = "audit_gradient"  # the ClientApp query action ("query.audit_gradient")


# ----------------------------------------------------------------------------- who and what


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


def batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """d(mean cross-entropy)/d(parameters) on (x, y), dropout active as in training, without
    touching the caller's random streams."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        was = model.training
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        model.train(was)
    return {name: g.detach() for (name, _), g in zip(model.named_parameters(), grads)}


def answer_gradient_query(msg_content: RecordDict, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          partition_id: int) -> RecordDict:
    """The client's side of the gradient threat: one batch gradient at the sent model, through the
    client-side defenses the query's config names (DP-SGD's clipped noisy gradient; clip/prune/noise)."""
    from defenses.client import client_steps, defend_gradient

    cfg = msg_content["config"]
    model.load_state_dict(to_torch(msg_content["arrays"]))
    rnd, seed = int(cfg["server-round"]), int(cfg["seed"])
    idx = torch.from_numpy(query_batch(len(y), int(cfg["audit-batch-size"]), seed, rnd, partition_id))
    grad_seed = int(np.random.default_rng([seed, AUDIT_STREAM, rnd, partition_id, 2]).integers(2**62))
    dp_sgd = next((s for s in client_steps(cfg) if s["name"] == "dp_sgd"), None)
    if dp_sgd is None:
        grads = batch_gradient(model, x[idx], y[idx], seed=grad_seed)
    else:
        from defenses.dp_sgd import private_gradient

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(grad_seed)
            model.train()
            grads = private_gradient(model, x[idx], y[idx], dp_sgd, len(y), int(cfg["batch-size"]),
                                     int(cfg["local-epochs"]), torch.Generator().manual_seed(grad_seed + 1))
    grads = defend_gradient(grads, cfg, partition_id)
    return RecordDict({"gradients": to_record(grads),
                       "fedsim": ConfigRecord({"partition-id": partition_id, "batch-size": len(idx)})})


def auto_attack(threat: str, dropout: float, batch_size: int, local_steps: int) -> str:
    """By threat model and model: iDLG for one image's gradient, IG for batches, DIA with dropout;
    unrolled IG for short multi-step updates, SME for long ones."""
    if threat == "gradient":
        if dropout > 0:
            return "dia"
        return "idlg" if batch_size == 1 else "ig"
    return "ig" if local_steps <= 8 else "sme"


class SketchMap:
    """The round's sparse JL sketch S as a differentiable map of the flat upload (``SparseJL.apply`` without its
    in-place chunks, so that autograd goes through it); picklable (it travels to the attack's worker)."""

    def __init__(self, seed: int, d: int, m: int, blocks: int):
        from strategies.compression.sketch import SparseJL

        jl = SparseJL(seed, d, m, blocks)
        self.seed, self.d, self.width, self.blocks, self.scale = jl.seed, d, jl.width, jl.blocks, jl.scale
        self._codes = None

    def __getstate__(self):
        return {**self.__dict__, "_codes": None}  # redrawn from the seed in the worker

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        from strategies.compression.hashing import signed_hashes

        if self._codes is None:
            self._codes = signed_hashes(self.seed, self.d, self.width, self.blocks)
        rows = []
        for codes in self._codes:
            both = flat.new_zeros(2 * self.width).index_add(0, codes, flat)
            rows.append(both[0::2] - both[1::2])
        return torch.cat(rows) * self.scale


# ----------------------------------------------------------------------------- jobs (run in the worker)


@dataclass
class AuditJob:
    server_round: int
    partition_id: int
    attack: str
    attack_config: dict[str, Any]
    seed: int
    observation: Any                  # attacks.Observation: only what the server saw
    true_images: torch.Tensor | None  # the scorer's side (None: the server has no ground truth)
    true_labels: torch.Tensor | None
    exact_replay: bool
    note: str
    png: str
    perturbed: bool = False           # a defense or a lossy codec changed what travelled: I2F predicts its effect


def run_job(job: AuditJob) -> dict[str, Any]:
    """Attack, score, save the picture; returns the audit.jsonl row."""
    from attacks import build_attack
    from attacks.cli import save_grid
    from attacks.metrics import evaluate

    torch.set_num_threads(1)
    rec = build_attack(job.attack, seed=job.seed, **job.attack_config).reconstruct(job.observation)
    if job.true_images is None:
        scores = dict.fromkeys(("psnr", "psnr_max", "ssim", "cw_ssim", "label_accuracy", "success_rate"))
        save_grid(Path(job.png), None, rec.images)
    else:
        scores = evaluate(rec.images, job.true_images, rec.hard_labels(), job.true_labels)
        save_grid(Path(job.png), job.true_images, rec.images[np.asarray(scores["matching"])])
    from attacks.i2f import MAX_INPUTS, predicted_psnr

    i2f_psnr = None
    if job.perturbed and job.true_images is not None and job.true_images.numel() <= MAX_INPUTS:
        # What the defense or codec moved the reconstruction by, predicted from the perturbation
        # (what travelled minus the clean upload recomputed at the true batch).
        i2f_psnr = predicted_psnr(job.observation, job.true_images, job.true_labels)
    return {"round": job.server_round, "client": job.partition_id, "attack": job.attack,
            "threat": job.observation.threat, "images": int(rec.images.shape[0]),
            "psnr": scores["psnr"], "psnr_max": scores["psnr_max"], "ssim": scores["ssim"],
            "cw_ssim": scores["cw_ssim"],
            "label_accuracy": scores["label_accuracy"], "success_rate": scores["success_rate"],
            "iterations": int(rec.iterations), "stopped": rec.stopped, "wall_s": rec.wall_s, "exact_replay": job.exact_replay,
            "i2f_psnr": i2f_psnr, "support": job.observation.support_fraction(), "note": job.note,
            "reconstruction": str(Path(job.png).name)}


# ----------------------------------------------------------------------------- the observer


class AuditObserver(RoundObserver):
    """Builds each audited round's attack jobs on the server and runs them in a worker."""

    def __init__(self, scenario: Scenario, world: World, grid: Grid, out_dir: str | Path, timeout: float,
                 ground_truth: bool = True, query_config: Callable[[], dict[str, Any]] | None = None):
        """``ground_truth``: the server process can re-derive clients' data (fedsim's own engines);
        in a deployment it cannot, and the audit saves reconstructions without scores."""
        self.s, self.audit, self.world, self.grid, self.timeout = scenario, scenario.audit, world, grid, timeout
        self.ground_truth = ground_truth
        self.query_config = query_config or dict  # the defenses' settings now, so the answer is defended
        self.dir = Path(out_dir)
        (self.dir / "audit").mkdir(parents=True, exist_ok=True)
        self.spec = get_strategy(scenario.strategy.name)
        self.params = scenario.strategy_params()
        self.rows: list[dict[str, Any]] = []
        self.node_of: dict[int, int] = {}  # partition id -> node id, as clients' replies state it
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._pending: dict[Future, AuditJob] = {}  # submitted, no row yet: a checkpoint's to resubmit
        atomic_write(self.dir / "audit.jsonl", "")
        # Off the training path: the engine's own way (a Ray actor on the ray engine), else one
        # process of its own, spawned, not forked (the server may hold Ray's or Flower's threads).
        engine_executor = getattr(grid, "audit_executor", None)
        self.pool = (engine_executor() if engine_executor is not None else
                     ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")))

    # ------------------------------------------------------------------ building jobs
    def on_round(self, record: RoundRecord) -> None:
        nodes = {n.partition_id: n for n in record.replies if n.partition_id is not None}
        self.node_of.update({pid: n.node_id for pid, n in nodes.items()})
        if not audited_round(record.server_round, self.audit.every, self.s.train.rounds):
            return
        if self.audit.threat == "update":
            targets = choose_targets(self.audit, sorted(nodes), self.s.seed, record.server_round)
            jobs = [self.update_job(record, nodes[pid]) for pid in targets]
        else:  # any client the server has heard from can be asked, not only this round's participants
            targets = choose_targets(self.audit, sorted(self.node_of), self.s.seed, record.server_round)
            jobs = [self.gradient_job(record, pid, self.node_of[pid]) for pid in targets]
        for job in jobs:
            self._submit(job)

    def _submit(self, job: AuditJob) -> None:
        future = self.pool.submit(run_job, job)
        with self._lock:  # before the callback can run (it may run at once, in this thread)
            self._pending[future] = job
        future.add_done_callback(self._finished)
        self._futures.append(future)

    def _model(self, record: RoundRecord) -> nn.Module:
        model = self.world.new_model()
        model.load_state_dict(to_torch(record.arrays_sent))
        return model

    def _common(self) -> dict[str, Any]:
        ds = self.world.dataset
        return dict(input_shape=(ds.channels, ds.image_size, ds.image_size), num_classes=ds.num_classes,
                    dropout=self.s.model.dropout)

    def update_job(self, record: RoundRecord, node: NodeRound) -> AuditJob:
        from attacks import Observation

        pid = node.partition_id
        sent = to_numpy(record.arrays_sent)
        view = self.spec.observe(sent, node.reply, self.params)
        settings = TrainSettings.from_config(node.config, pid)
        n = int(node.reply["metrics"]["num-examples"])
        schedule = EpochShuffleSampler().schedule(n, settings)  # the server knows n and the seed
        model = self._model(record)
        names = [name for name, _ in model.named_parameters()]
        wire, wire_map = self._sketch_wire(record, node, model) if self.audit.sketch_space else (None, None)
        support = record.support(node) if self.audit.support else None
        if support is not None and not any(support[k].any() for k in names):
            support = None  # only buffers (BatchNorm's statistics) travelled: nothing of the parameters to match
        obs = Observation.from_update(model, {k: torch.from_numpy(view.update[k]).float() for k in names},
                                      lr=settings.lr, local_steps=len(schedule), num_samples=n,
                                      local_batch_size=max(len(b) for b in schedule), schedule=schedule,
                                      momentum=settings.momentum, weight_decay=settings.weight_decay,
                                      support=None if support is None else
                                      {k: torch.from_numpy(support[k]) for k in names},
                                      wire=wire, wire_map=wire_map, **self._common())
        attack = self._attack("update", obs, len(schedule))
        x, y = self._truth(pid, None)
        exact, note = view.exact, view.note
        codec_exact, codec_note = self._codec_view(obs)
        exact = exact and codec_exact
        note = "; ".join(filter(None, [note, codec_note]))
        defended = [s["name"] for s in client_steps(node.config) if s["name"] != "dp_user"]
        if defended:  # the replay models plain local SGD, not what the defenses did to the update
            exact, note = False, "; ".join(filter(None, [note, f"the replay leaves out the defenses {', '.join(defended)}"]))
        return AuditJob(record.server_round, pid, attack, self._config(attack), self.audit.seed, obs, x, y,
                        exact, self._note(note), str(self._png(record.server_round, pid)),
                        perturbed=self._perturbed(node.config))

    def gradient_job(self, record: RoundRecord, pid: int, node_id: int) -> AuditJob:
        from attacks import Observation

        batch = self.audit.batch_size or self.s.train.batch_size
        config = ConfigRecord({**self.query_config(), "server-round": record.server_round, "seed": self.s.seed,
                               "audit-batch-size": batch})
        msg = Message(RecordDict({"arrays": record.arrays_sent, "config": config}), dst_node_id=node_id,
                      message_type=f"{MessageType.QUERY}.{QUERY_GRADIENT}")
        reply = next(iter(self.grid.send_and_receive([msg], timeout=self.timeout)))
        if reply.has_error():
            raise RuntimeError(f"audit: client {pid} did not answer the gradient query: {reply.error.reason}")
        used = int(reply.content["fedsim"]["batch-size"])  # fewer than asked when the client holds fewer
        model = self._model(record)
        obs = Observation.from_gradients(model, to_torch(reply.content["gradients"]), batch_size=used,
                                         **self._common())
        attack = self._attack("gradient", obs, 1)
        x, y = self._truth(pid, lambda n: query_batch(n, batch, self.s.seed, record.server_round, pid))
        return AuditJob(record.server_round, pid, attack, self._config(attack), self.audit.seed, obs, x, y,
                        True, self._note(""), str(self._png(record.server_round, pid)),
                        perturbed=self._perturbed(config))

    def _truth(self, pid: int, batch_of) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The target's true samples (all its training data, or the query's batch), for scoring only."""
        if not self.ground_truth:
            return None, None
        x, y = self.world.client_tensors(pid)[:2]
        if batch_of is None:
            return x, y
        idx = torch.from_numpy(batch_of(len(y)))
        return x[idx], y[idx]

    def _codec_view(self, obs) -> tuple[bool, str]:
        """(whether one client's update is what the attack sees, what the attack matched) for the update
        threat through the upload codec (module docstring)."""
        codec = self.s.upload_codec()
        if codec == "none":
            return True, ""
        fraction = obs.support_fraction()
        if codec in ("topk", "dgc"):
            if fraction is None:
                why = "audit.support: false" if not self.audit.support else "no parameter coordinate travelled"
                return True, f"{codec}: the decoded upload, unsent coordinates matched as 0 ({why})"
            extra = " (DGC: the client's accumulated residual)" if codec == "dgc" else ""
            return True, f"{codec}: only the {100 * fraction:.3g}% of coordinates the reply carried are matched{extra}"
        if codec == "sketch":
            noisy = " and noise" if self.s.upload_params().noise is not None else ""
            if obs.wire is not None:
                return True, f"sketch{noisy}: matched in sketch space, S u(x') against the y that travelled (S from " \
                             "the round's shared seed)"
            return True, f"sketch{noisy}: the de-sketch S^T y with the round's shared seed"
        if codec in ("sign", "terngrad"):
            return True, f"{codec}: the decoded values"
        if codec == "ef21":
            return True, "ef21: the server's estimate sent + g_i of the client's update"
        if codec == "countsketch":
            return False, "countsketch: every reply decodes to the round's aggregate: the attack sees the aggregate, " \
                          "not one client's update"
        return True, f"{codec}: the decoded upload"

    def _sketch_wire(self, record: RoundRecord, node: NodeRound, model: nn.Module):
        """(y, S) of a sketched reply: the sketch that travelled and the round's sketch, rebuilt from the shared
        seed as the server's decoder does; (None, None) for other codecs, or when the float entries the codec
        flattened are not exactly the model's parameters (BatchNorm's buffers)."""
        if self.s.upload_codec() != "sketch" or node.wire is None:
            return None, None
        from strategies.compression import CodecContext
        from strategies.compression.codec import PAYLOAD, float_keys
        from strategies.compression.sketch import ROUND_STREAM, sketch_size

        sent = to_torch(record.arrays_sent)
        keys = float_keys(sent)
        if keys != [name for name, _ in model.named_parameters()]:
            return None, None
        d = sum(sent[k].numel() for k in keys)
        p = self.s.upload_params()
        ctx = CodecContext(seed=int(node.config.get("codec-seed", 0)), server_round=record.server_round)
        sketch_map = SketchMap(ctx.round_seed(ROUND_STREAM), d, sketch_size(d, p.ratio), p.blocks)
        return to_torch(node.wire[PAYLOAD])["sketch"].float(), sketch_map

    def _perturbed(self, config) -> bool:
        """Whether what the client sent differs from its clean upload: a client-side defense (Flower's
        client clipping included) or a lossy codec (every codec but ``none``)."""
        from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

        return bool(client_steps(config)) or KEY_CLIPPING_NORM in config or self.s.upload_codec() != "none"

    def _note(self, note: str) -> str:
        if self.ground_truth:
            return note
        missing = "no ground truth at the server (deployment): reconstruction saved, not scored"
        return f"{note}; {missing}" if note else missing

    def _attack(self, threat: str, obs, local_steps: int) -> str:
        if self.audit.attack != "auto":
            return self.audit.attack
        return auto_attack(threat, self.s.model.dropout, obs.batch_size, local_steps)

    def _config(self, attack: str) -> dict[str, Any]:
        return dict(self.audit.attack_config)  # for auto too: the settings of whichever attack it picks

    def _png(self, server_round: int, pid: int) -> Path:
        return self.dir / "audit" / f"round-{server_round}-client-{pid}.png"

    # ------------------------------------------------------------------ results
    def _finished(self, future: Future) -> None:
        if future.exception() is not None:
            return  # raised again in close(); a checkpoint keeps the job pending
        with self._lock:
            self._pending.pop(future, None)
            self.rows.append(_clean(future.result()))
            self.rows.sort(key=lambda r: (r["round"], r["client"]))
            atomic_write(self.dir / "audit.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    # ------------------------------------------------------------------ checkpoint (fedsim.checkpoint)
    def checkpoint_state(self) -> dict[str, Any]:
        """The finished rows and the jobs still in flight, taken together (a job that finishes meanwhile
        is in one or the other, never both), and who is which node."""
        with self._lock:
            return {"rows": list(self.rows), "pending": list(self._pending.values()), "node_of": dict(self.node_of)}

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: its rows (audit.jsonl rewritten to them: rows of later rounds,
        written before the kill, are redone with those rounds) and its unfinished jobs, submitted again
        (attacks are seeded: the rows are those the jobs would have given)."""
        self.node_of.update(state["node_of"])
        with self._lock:
            self.rows = list(state["rows"])
            atomic_write(self.dir / "audit.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        for job in state["pending"]:
            self._submit(job)

    def close(self) -> None:
        """Wait for the last audit; an attack that failed is an error naming it."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def summary(self) -> dict[str, Any]:
        scored = [r for r in self.rows if r.get("psnr") is not None]
        if not scored:
            return {"audits": len(self.rows)}
        worst = max(scored, key=lambda r: r["psnr"])
        return {"audits": len(self.rows), "audit_worst_psnr": worst["psnr"], "audit_worst_psnr_round": worst["round"],
                "audit_worst_psnr_client": worst["client"], "audit_worst_ssim": max(r["ssim"] for r in scored),
                "audit_worst_cw_ssim": max((r["cw_ssim"] for r in scored if r.get("cw_ssim") is not None), default=None)}
