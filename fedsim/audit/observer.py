"""The per-round privacy audit: the server attacks what a client really uploaded.

Threat model (shared/specs/privacy.md): an honest-but-curious server. The attacker gets
only what the server saw: the model it sent, the config it sent, and the decoded upload
(``update`` threat), or one batch gradient the server asked the client for at the current
global model (``gradient`` threat: the worst case for that round; the query changes no
client state and no random stream of training). What each strategy's upload means to an
attacker comes from the strategy (``StrategySpec.observe``); where plain local SGD does not
reproduce it, the row says so (``exact_replay``, ``note``).

Through the upload's transforms the attacker reads the upload as the server does, and each
transform says what that is (the seam of ``defenses.base`` and ``strategies.compression.codec``):
a codec's ``audit_view`` gives what the decoded reply is (this client's own update of this round
or not: an aggregate, a running estimate), where to match it (only the coordinates a sparse reply
carried; the codec's own space, as a sketch's y against S u(x')) and the row's note; a client
defense says whether a replay of plain local SGD reproduces what it sent (``replay_exact``) and
whether it changed what travelled (``perturbs``, I2F's question). This module names none of them.

Under an asynchronous strategy (FedBuff, FedAsync) a server step aggregates updates trained from older
global models: the update threat attacks each against the model its client was sent (``NodeRound.sent``,
not the step's current model), and the gradient threat asks at the current model.

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
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from defenses.client import client_defenses
from strategies import TrainSettings, get_strategy
from strategies.compression import CodecContext, get_codec
from strategies.compression.codec import AuditRequest
from strategies.records import to_numpy, to_torch
from strategies.trainer import EpochShuffleSampler

from ..run.results import _clean, atomic_write
from ..run.rounds import NodeRound, RoundObserver, RoundRecord
from ..scenario.schema import Scenario
from ..world.build import World
from .jobs import AuditJob, run_job
from .query import QUERY_GRADIENT
from .targets import audited_round, auto_attack, choose_targets, query_batch


class AuditObserver(RoundObserver):
    """Builds each audited round's attack jobs on the server and runs them in a worker."""

    state_key = "audit"

    def __init__(self, scenario: Scenario, world: World, grid: Grid, out_dir: str | Path, timeout: float,
                 ground_truth: bool = True, query_config: Callable[[int], dict[str, Any]] | None = None):
        """``ground_truth``: the server process can re-derive clients' data (fedsim's own engines);
        in a deployment it cannot, and the audit saves reconstructions without scores."""
        self.s, self.audit, self.world, self.grid, self.timeout = scenario, scenario.audit, world, grid, timeout
        self.ground_truth = ground_truth
        # The round's settings and the defenses' now (by round), so the answer is defended as an upload would be.
        self.query_config = query_config or (lambda server_round: {})
        self.dir = Path(out_dir)
        (self.dir / "audit").mkdir(parents=True, exist_ok=True)
        self.spec = get_strategy(scenario.strategy.name)
        self.params = scenario.strategy_params()
        self.codec = get_codec(scenario.upload_codec(), scenario.upload_params())  # for its audit_view only
        self.rows: list[dict[str, Any]] = []
        self.node_of: dict[int, int] = {}  # partition id -> node id, as clients' replies state it
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._pending: dict[Future, AuditJob] = {}  # submitted, no row yet: a checkpoint's to resubmit
        self._shadow_cost_said = False  # LiRA's cost is printed once a run
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

    def _model(self, arrays) -> nn.Module:
        model = self.world.new_model()
        model.load_state_dict(to_torch(arrays))
        return model

    def _common(self) -> dict[str, Any]:
        ds = self.world.dataset
        return dict(input_shape=(ds.channels, ds.image_size, ds.image_size), num_classes=ds.num_classes,
                    dropout=self.s.model.dropout)

    def update_job(self, record: RoundRecord, node: NodeRound) -> AuditJob:
        from attacks import Observation

        pid = node.partition_id
        # The model this client trained from: the round's in a synchronous round; under an asynchronous strategy
        # the global model of the moment it was sent work, some server steps before this one.
        arrays_sent = node.sent["arrays"]
        sent = to_numpy(arrays_sent)
        view = self.spec.observe(sent, node.reply, self.params)
        settings = TrainSettings.from_config(node.config, pid)
        n = int(node.reply["metrics"]["num-examples"])
        schedule = EpochShuffleSampler().schedule(n, settings)  # the server knows n and the seed
        model = self._model(arrays_sent)
        names = [name for name, _ in model.named_parameters()]
        support = ((record.codec or self.codec).support(node.wire, arrays_sent)
                   if self.audit.support and node.wire is not None else None)
        if support is not None and not any(support[k].any() for k in names):
            support = None  # only buffers (BatchNorm's statistics) travelled: nothing of the parameters to match
        fraction = (None if support is None else
                    sum(int(support[k].sum()) for k in names) / sum(support[k].size for k in names))
        # What the attacker sees through each transform the upload went through: the defenses' (a replay of
        # plain local SGD leaves them out) and the codec's (what the decoded reply is, where to match it).
        defenses = client_defenses(node.config)
        codec_view = self.codec.audit_view(AuditRequest(
            wire=node.wire, sent=to_torch(arrays_sent),
            ctx=CodecContext(seed=int(node.config.get("codec-seed", 0)), server_round=int(node.config["server-round"])),
            param_names=names, support_fraction=fraction, support_requested=self.audit.support,
            codec_space=self.audit.sketch_space))
        obs = Observation.from_update(model, {k: torch.from_numpy(view.update[k]).float() for k in names},
                                      lr=settings.lr, local_steps=len(schedule), num_samples=n,
                                      local_batch_size=max(len(b) for b in schedule), schedule=schedule,
                                      momentum=settings.momentum, weight_decay=settings.weight_decay,
                                      support=None if support is None else
                                      {k: torch.from_numpy(support[k]) for k in names},
                                      wire=codec_view.wire, wire_map=codec_view.wire_map, **self._common())
        attack = self._attack("update", obs, len(schedule))
        x, y = self._truth(pid, None)
        exact = view.exact and codec_view.exact
        sent_round = int(node.config["server-round"])
        stale = (f"trained from the model sent for step {sent_round}, {record.server_round - sent_round} step(s) "
                 f"before this one (asynchronous)" if sent_round != record.server_round else "")
        note = "; ".join(filter(None, [view.note, codec_view.note, stale]))
        defended = [d.name for d in defenses if not d.replay_exact]
        if defended:  # the replay models plain local SGD, not what the defenses did to the update
            exact, note = False, "; ".join(filter(None, [note, f"the replay leaves out the defenses {', '.join(defended)}"]))
        # The client's model as the server decoded it: the weights sent plus the decoded update.
        decoded = lambda: {k: torch.from_numpy(sent[k] + view.update[k] if k in view.update else sent[k])  # noqa: E731
                           for k in sent}
        return AuditJob(record.server_round, pid, attack, self._config(attack), self.audit.seed, obs, x, y,
                        exact, self._note(note), str(self._png(record.server_round, pid)),
                        perturbed=self._perturbed(node.config, defenses),
                        membership=self._membership(decoded, record.server_round, pid,
                                                    lambda: to_torch(arrays_sent), settings),
                        device=self.s.audit_device())

    def gradient_job(self, record: RoundRecord, pid: int, node_id: int) -> AuditJob:
        from attacks import Observation

        batch = self.audit.batch_size or self.s.train.batch_size
        config = ConfigRecord({**self.query_config(record.server_round), "server-round": record.server_round, "seed": self.s.seed,
                               "audit-batch-size": batch})
        msg = Message(RecordDict({"arrays": record.arrays_sent, "config": config}), dst_node_id=node_id,
                      message_type=f"{MessageType.QUERY}.{QUERY_GRADIENT}")
        reply = next(iter(self.grid.send_and_receive([msg], timeout=self.timeout)))
        if reply.has_error():
            raise RuntimeError(f"audit: client {pid} did not answer the gradient query: {reply.error.reason}")
        used = int(reply.content["fedsim"]["batch-size"])  # fewer than asked when the client holds fewer
        model = self._model(record.arrays_sent)
        obs = Observation.from_gradients(model, to_torch(reply.content["gradients"]), batch_size=used,
                                         **self._common())
        attack = self._attack("gradient", obs, 1)
        x, y = self._truth(pid, lambda n: query_batch(n, batch, self.s.seed, record.server_round, pid))
        return AuditJob(record.server_round, pid, attack, self._config(attack), self.audit.seed, obs, x, y,
                        True, self._note(""), str(self._png(record.server_round, pid)),
                        perturbed=self._perturbed(config, client_defenses(config)),
                        membership=self._membership(lambda: to_torch(record.arrays_sent), record.server_round, pid),
                        device=self.s.audit_device())

    def _membership(self, weights: Callable[[], dict[str, torch.Tensor]], server_round: int, pid: int,
                    sent: Callable[[], dict[str, torch.Tensor]] | None = None, settings: TrainSettings | None = None):
        """The membership attack's case on the attacked model (``weights()``: its state dict;
        ``fedsim.audit.membership``), when asked for and the server holds the ground truth to score it. For
        LiRA (update threat only) also its shadows' setup: from the model the server sent (``sent()``) with
        the target's round ``settings``, on draws from the other clients' training data
        (``fedsim.audit.lira``)."""
        if self.audit.membership == "none" or not self.ground_truth:
            return None
        from .membership import MembershipCase, nonmember_indices

        template = self.world.new_model().state_dict()
        cast = lambda state: {k: v.to(template[k].dtype) for k, v in state.items()}  # noqa: E731  (as load_state_dict)
        x, y = self.world.client_tensors(pid)[:2]
        ds = self.world.dataset
        idx = torch.from_numpy(nonmember_indices(len(ds.y_test), len(y), self.s.seed, server_round, pid))
        shadows = None
        if self.audit.membership == "lira":
            from .lira import shadow_setup

            members = self.world.client_split(pid).train
            pool = torch.from_numpy(np.setdiff1d(np.arange(len(ds.y_train)), members))  # never one of the members
            shadows = shadow_setup(cast(sent()), settings, ds.x_train[pool], ds.y_train[pool], len(y),
                                   self.audit.membership_shadows, self.s.seed, pid)
        return MembershipCase(cast(weights()), (x, y), (ds.x_test[idx], ds.y_test[idx]), shadows)

    def _truth(self, pid: int, batch_of) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The target's true samples (all its training data, or the query's batch), for scoring only."""
        if not self.ground_truth:
            return None, None
        x, y = self.world.client_tensors(pid)[:2]
        if batch_of is None:
            return x, y
        idx = torch.from_numpy(batch_of(len(y)))
        return x[idx], y[idx]

    def _perturbed(self, config, defenses) -> bool:
        """Whether what the client sent differs from its clean upload: a client-side defense that changed it
        (Flower's client clipping included) or a lossy codec."""
        return any(d.perturbs(config) for d in defenses) or self.codec.perturbs

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
            self._log_shadow_cost(self.rows[-1])
            self.rows.sort(key=lambda r: (r["round"], r["client"]))
            atomic_write(self.dir / "audit.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def _log_shadow_cost(self, row: dict[str, Any]) -> None:
        """LiRA's shadows are retrained for every audited round and client: say once what one set cost."""
        if "membership_shadow_s" in row and not self._shadow_cost_said:
            self._shadow_cost_said = True
            print(f"fedsim: LiRA trained {row['membership_shadows']} shadow models in "
                  f"{row['membership_shadow_s']:.1f} s (round {row['round']}, client {row['client']}); it does so for "
                  f"every audited round and client "
                  f"(membership_shadow_s in audit.jsonl)", file=sys.stderr)

    # ------------------------------------------------------------------ checkpoint (fedsim.run.checkpoint)
    def state_dict(self) -> dict[str, Any]:
        """The finished rows and the jobs still in flight, taken together (a job that finishes meanwhile
        is in one or the other, never both), and who is which node."""
        with self._lock:
            return {"rows": list(self.rows), "pending": list(self._pending.values()), "node_of": dict(self.node_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        membership = [r["membership_auc"] for r in self.rows if r.get("membership_auc") is not None]
        return {"audits": len(self.rows), **({"audit_worst_membership_auc": max(membership)} if membership else {}),
                "audit_worst_psnr": worst["psnr"], "audit_worst_psnr_round": worst["round"],
                "audit_worst_psnr_client": worst["client"], "audit_worst_ssim": max(r["ssim"] for r in scored),
                "audit_worst_cw_ssim": max((r["cw_ssim"] for r in scored if r.get("cw_ssim") is not None), default=None)}
