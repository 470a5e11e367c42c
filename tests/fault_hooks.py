"""Light hooks for tests/test_engine_faults.py that Ray actors import by reference: this module
imports only Flower's ClientApp, so an actor that is meant to fail at start-up fails in about a
second instead of first importing torch and fedsim (4-8 s on a loaded 2-core machine)."""

import threading
import time

from flwr.clientapp import ClientApp

idle_app = ClientApp()  # never called: its actors die in their start-up


def cannot_start() -> None:
    raise RuntimeError("probe: this actor cannot start")


# ------------------------------------------------------------------ a given-up call that trains on (inline)

SPIN_NODE = 3  # the partition whose round-1 call hangs, training on in its thread
STOP_SPINNING = threading.Event()  # the in-process test ends the spinning call with this
SPIN_THREADS: list[threading.Thread] = []


def register_spinner() -> None:
    """Registers two FedAvg variants (torch and fedsim imported only here):

    - ``faults-spinner``: partition SPIN_NODE's round-1 call keeps training its model in a loop
      (up to 60 s, or until STOP_SPINNING) -- far past engine.timeout_s, still inside torch while
      the next clients train and when the run ends;
    - ``faults-failing``: the same run without the hang: partition SPIN_NODE raises in every round.

    With SPIN_NODE timed out in round 1 and busy after it, both runs aggregate the same three
    healthy clients every round, so their metrics are equal if the late call touches nothing of theirs.
    """
    from strategies import StrategySpec, register_strategy
    from strategies.base import NoParams
    from strategies.fedavg import FedAvgClient, FedAvgStrategy

    class SpinningClient(FedAvgClient):
        def train(self, job):
            if job.data.partition_id == SPIN_NODE and job.settings.server_round == 1:
                SPIN_THREADS.append(threading.current_thread())
                until = time.monotonic() + 60
                while not STOP_SPINNING.is_set() and time.monotonic() < until:
                    try:
                        job.trainer().run()  # in place, on the model object this call was given
                    except RuntimeError:  # a model shared with later calls: "modified by an inplace operation"
                        pass
            return super().train(job)

    class FailingClient(FedAvgClient):
        def train(self, job):
            if job.data.partition_id == SPIN_NODE:
                raise RuntimeError("probe: this client fails")
            return super().train(job)

    for name, client in (("spinner", SpinningClient), ("failing", FailingClient)):
        register_strategy(StrategySpec(name=f"faults-{name}", params=NoParams, client=client,
                                       server=lambda params, settings: FedAvgStrategy(settings)))
