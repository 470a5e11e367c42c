"""The vectorized engine: a round's clients trained together in one process with ``torch.func``.

An ``InlineGrid`` whose training messages are not handed to the ClientApp one at a time: the
round's clients are cut into chunks (``engine.vectorized.chunk``), and each chunk trains at once:

- every client's parameters (as its message sent them) stacked along a client axis, the model run
  by ``torch.func.functional_call`` under ``vmap`` over that axis;
- every client's batches from its own seeded sampler (``EpochShuffleSampler``, the schedule the
  inline engine's ``LocalTrainer`` draws), gathered per step into one [clients, batch] index;
- masking: a short last batch is weighted by its real size (padded rows weigh 0), and a client past
  its last step does not move (its parameters and momentum are kept as they are);
- the SGD step ``torch.optim.SGD`` takes (``strategies.sgd``: weight decay, momentum, lr), on the
  gradients of the sum of the clients' losses (clients share no parameter, so each client's slice is
  its own gradient), with what the strategy adds to plain local SGD (its ``VectorRule``,
  ``StrategySpec.vector_rule``: FedProx's proximal term, SCAFFOLD's correction and control variates,
  option I's full local gradient included; FedSpeed's SAM gradient pair, dual and per-client clip;
  FedCE's scores before training).

Each client then goes through the ClientApp's own reply path (``fedsim.run.apps.train_reply``: the
update defenses, the codec with its node's ``Context.state``, the metrics), so replies have exactly the
inline engine's form, and node Contexts are copied and kept as the inline engine keeps them. Every other
message (the audit's gradient queries, evaluation) goes to the ClientApp as on the inline engine.

The result is the inline engine's up to float reduction order (``tests/test_engine_vectorized.py``:
global arrays within 1e-5 relative), the same from run to run.

What it refuses, at validation (``fedsim.scenario.schema._vectorized_refusal``, one line each): a
strategy without a vectorised rule (``StrategySpec.vector_rule``; fedimpro and qfedavg have none),
or hyperparameters its rule says it cannot train (``VectorRule.unsupported``); defenses that run the
local training themselves (DP-SGD) or wrap the whole client call (Flower's client-side clipping mod):
both are per client by construction; models with dropout (each client's masks come from its own seeded
generator, in call order) or buffers (BatchNorm's running statistics change in the forward pass).

``engine.timeout_s`` holds at chunk granularity: a chunk in flight is not stopped (one call trains many
clients), but a chunk that returns after the round's deadline is dropped (its Contexts too) and later
chunks do not run, so their nodes get no reply (a timeout), as the inline engine drops a late call. A
chunk that raises fails each of its clients with an error reply; a client whose reply path raises
(a defense, the codec) fails alone.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from flwr.app import Error, Message, MessageType
from flwr.common.constant import ErrorCode
from torch import nn
from torch.func import functional_call, vmap

from strategies import ClientJob, TrainSettings, get_strategy
from strategies.records import to_torch
from strategies.trainer import EpochShuffleSampler, seed_dropout
from strategies.upload import Upload

from .inline import InlineGrid, context_copy, own_copy

DEFAULT_CHUNK = 32


# ----------------------------------------------------------------------------- training a chunk


class VectorizedClient:
    """One training message on its way through the engine."""

    def __init__(self, mid: str, msg: Message, context):
        self.mid, self.msg, self.context = mid, msg, context
        self.reply: Message | None = None


def _error_reply(exc: BaseException, msg: Message) -> Message:
    """What ``fedsim.engines.inline.call_client`` makes of a ClientApp that raised."""
    last = traceback.extract_tb(exc.__traceback__)[-1]
    reason = f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _group_key(msg: Message) -> tuple:
    """Clients train in one chunk only when every setting the step uses is the same."""
    config = msg.content["config"]
    return tuple(str(config[k]) for k in ("strategy", "strategy-params", "lr", "local-epochs", "batch-size",
                                          "momentum", "weight-decay"))


def train_chunk(clients: list[VectorizedClient]) -> None:
    """Train ``clients`` (one group: same settings) together; set each one's reply."""
    from defenses.client import client_defenses, private_training

    from ..run.apps import _client_setup, train_reply

    config = clients[0].msg.content["config"]
    spec = get_strategy(str(config["strategy"]))
    rule = spec.vector_rule(spec.params.model_validate_json(str(config["strategy-params"])))
    jobs, defenses, schedules = [], [], []
    model, decoded = None, {}
    for c in clients:
        _, model, data = _client_setup(c.context)
        cconfig = c.msg.content["config"]
        d = client_defenses(cconfig)
        if private_training(d, c.context.state) is not None:
            raise RuntimeError("engine vectorized cannot run a defense's private training")
        settings = TrainSettings.from_config(cconfig, data.partition_id)
        sent = _sent_weights(c.msg.content["arrays"], decoded, data.x.device)
        jobs.append(ClientJob(model, data, settings, c.msg.content, c.context.state, sent))
        defenses.append(d)
        schedules.append(EpochShuffleSampler().schedule(data.num_examples, settings))
    names = [n for n, _ in model.named_parameters()]
    if any(set(job.sent) != set(names) for job in jobs):
        raise RuntimeError("engine vectorized trains models whose state is their parameters only")
    weights, steps, losses = train_stacked(model, jobs, schedules, rule, names)
    extras = rule.finish(jobs, weights, steps)
    for i, (c, job) in enumerate(zip(clients, jobs)):
        metrics = {"train_loss": losses[i] / max(steps[i], 1), "local_steps": float(steps[i]), **rule.metrics(i)}
        # its slice of the stacked weights (a view: what follows reads it, or replaces it with a new tensor)
        upload = Upload({k: weights[k][i] for k in job.sent}, job.sent, metrics, extras[i], schedules[i])
        # The inline client leaves the default generator seeded with its seed (nothing drew from it without
        # dropout); whatever runs after training sees the same state here.
        seed_dropout(job.settings.seed, job.device)
        try:
            c.reply = train_reply(c.msg, c.context, upload, defenses[i], job.data)
        except Exception as exc:  # noqa: BLE001 - a failing client is data, as on the inline engine
            c.reply = _error_reply(exc, c.msg)


def _sent_weights(record, decoded: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights a message sent, on ``device``, decoded (and copied there) once for every message that
    carries the same arrays (a round's messages share their Array objects; the tensors are only read)."""
    key = tuple(id(a) for a in record.values())
    if key not in decoded:
        decoded[key] = (record, to_torch(record, device))  # the record kept: its Arrays' ids stay theirs
    return decoded[key][1]


def train_stacked(model: nn.Module, jobs: list[ClientJob], schedules: list[list[torch.Tensor]], rule,
                  names: list[str]) -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """Local SGD of every job at once: (stacked trained parameters, each client's steps, its loss sum)."""
    s = jobs[0].settings
    n_clients, batch = len(jobs), s.batch_size
    steps = [len(sched) for sched in schedules]
    k_max = max(steps, default=0)
    # In the model's own dtypes, as load_state_dict casts them on the inline engine (a server may send
    # float64 arrays: Flower's FedAdam does).
    dtypes = dict((n, p.dtype) for n, p in model.named_parameters())
    if all(job.sent is jobs[0].sent for job in jobs):  # one model sent to all (the usual round): a broadcast
        # view until the first step writes each client's own copy (reading one copy is cache-friendly)
        weights = {k: jobs[0].sent[k].to(dtypes[k]).expand(n_clients, *jobs[0].sent[k].shape) for k in names}
    else:
        weights = {k: torch.stack([job.sent[k].to(dtypes[k]) for job in jobs]) for k in names}
    shared = {k for k, w in weights.items() if w.stride(0) == 0 or n_clients == 1}  # never written in place
    rule.start(jobs, weights)
    device = jobs[0].device
    loss_sum = torch.zeros(n_clients, dtype=torch.float64, device=device)
    if k_max == 0:
        return weights, steps, loss_sum.tolist()
    # Every client's data in one tensor; each step's batches as indices into it ([step, client, row]).
    x_all = torch.cat([job.data.x for job in jobs])
    y_all = torch.cat([job.data.y for job in jobs])
    index = torch.zeros(k_max, n_clients, batch, dtype=torch.long)
    real = torch.zeros(k_max, n_clients, batch, dtype=torch.bool)  # padded rows: False
    offset = 0
    for i, (job, sched) in enumerate(zip(jobs, schedules)):
        if sched:  # [step, row], a short batch padded with -1
            rows = nn.utils.rnn.pad_sequence(sched, batch_first=True, padding_value=-1)
            index[: len(sched), i, : rows.shape[1]] = rows.clamp(min=0) + offset
            real[: len(sched), i, : rows.shape[1]] = rows >= 0
        offset += job.data.num_examples
    index[~real] = 0  # any row (weight 0)
    index, real = index.to(device), real.to(device)  # built from the CPU schedules, copied once
    # each real row weighs 1/(its batch's size): cross_entropy's mean over the rows the batch has
    row_weight = real / real.sum(-1, keepdim=True).clamp(min=1)
    active = (torch.arange(k_max).unsqueeze(1) < torch.tensor(steps).unsqueeze(0)).to(device)  # [step, client]
    lr, momentum, weight_decay = s.lr, s.momentum, s.weight_decay
    buffers: dict[str, torch.Tensor] = {}
    model.train()
    forward = vmap(lambda p, x: functional_call(model, p, (x,)))
    for t in range(k_max):
        idx = index[t]
        x, y = x_all[idx], y_all[idx]  # [client, row, ...]

        def loss_of(params, x=x, y=y, w=row_weight[t]) -> torch.Tensor:  # [client]
            per_row = nn.functional.cross_entropy(forward(params, x).flatten(0, 1), y.flatten(), reduction="none")
            return (per_row.view(n_clients, batch) * w).sum(1)

        loss, grads = rule.gradients(loss_of, weights)
        grads = rule.before_step(grads, weights)
        mask = active[t]
        every = bool(mask.all())  # the usual case: no client has finished yet
        with torch.no_grad():
            for k in names:
                w, g = weights[k], grads[k]  # w: updated in place once it is the chunk's own
                if weight_decay != 0:
                    g = g.add(w, alpha=weight_decay)
                if momentum != 0:
                    buf = buffers.get(k)
                    if buf is None:
                        buf = buffers[k] = g.clone()
                    elif every:
                        buf.mul_(momentum).add_(g)
                    else:
                        buf.copy_(torch.where(_expand(mask, w), buf.mul(momentum).add(g), buf))
                    g = buf
                if every and k not in shared:
                    w.add_(g, alpha=-lr)
                elif every:
                    weights[k] = w.add(g, alpha=-lr)
                    shared.discard(k)
                else:  # a finished client does not move
                    weights[k] = torch.where(_expand(mask, w), w.add(g, alpha=-lr), w)
                    shared.discard(k)
            loss_sum += torch.where(mask, loss.double(), 0.0)
    return weights, steps, loss_sum.tolist()


def _even_parts(items: list, most: int) -> list[list]:
    """``items`` cut into as few parts of at most ``most`` as can be, of sizes that differ by at most one."""
    parts = -(-len(items) // most)
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- the Grid


class VectorizedGrid(InlineGrid):
    """The inline engine's Grid, with a round's training messages trained together in chunks."""

    def __init__(self, client_app, num_nodes: int, run_config: dict, run_id: int = 1, chunk: int = DEFAULT_CHUNK):
        super().__init__(client_app, num_nodes, run_config, run_id)
        self.chunk = chunk

    def _deliver(self, messages: Iterable[Message], deadline: float | None) -> list[str]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN
                 and m.metadata.dst_node_id not in self._hung]
        if not train:
            return super()._deliver(messages, deadline)
        chosen = {id(m) for m in train}
        clients = [VectorizedClient(self.assign_id(m), own_copy(m),
                                    context_copy(self.contexts[m.metadata.dst_node_id])) for m in train]
        others = iter(super()._deliver([m for m in messages if id(m) not in chosen], deadline))
        if deadline is None or time.monotonic() <= deadline:
            for part in train_in_chunks(clients, self.chunk):
                if deadline is not None and time.monotonic() > deadline:
                    # returned too late: dropped, Contexts included, as the inline engine drops a late call;
                    # the chunks not started never run (their nodes get no reply: a timeout)
                    break
                for c in part:  # as the inline engine keeps a returned call's Context
                    self.contexts[c.context.node_id] = c.context
                    self._replies[c.mid] = c.reply
        ids = {id(m): c.mid for m, c in zip(train, clients)}
        return [ids[id(m)] if id(m) in ids else next(others) for m in messages]


def train_in_chunks(clients: list[VectorizedClient], chunk: int) -> Iterator[list[VectorizedClient]]:
    """Train ``clients`` in chunks of at most ``chunk`` clients whose step settings are the same, yielding
    each chunk once its clients' replies are set (a chunk that raises fails each of its clients).
    The vectorized Grid's rounds and, with ``engine.ray.vectorized``, each Ray actor's share of one."""
    groups: dict[tuple, list[VectorizedClient]] = {}
    for c in clients:
        groups.setdefault(_group_key(c.msg), []).append(c)
    for part in (part for group in groups.values() for part in _even_parts(group, chunk)):
        try:
            train_chunk(part)
        except Exception as exc:  # noqa: BLE001 - the chunk's clients fail, the round goes on
            for c in part:
                c.reply = _error_reply(exc, c.msg)
        yield part
