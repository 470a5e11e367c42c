"""Starting, joining and stopping Ray for fedsim: a private loopback-only instance (``start_local_ray``,
``stop_local_ray``), or an existing cluster, its address checked within seconds first (``check_ray_address``,
``join_ray``). Shared by the ray engine (``fedsim.engines.ray``) and the sweep (``fedsim.compare.sweep``).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

from ..scenario.schema import ScenarioError

# The deadline for asking a Ray address for its cluster id before joining it.
CONNECT_TIMEOUT_S = 3.0


def bind_ray_to_loopback() -> None:
    """Make a Ray instance started by this process listen on 127.0.0.1 only.

    Ray binds its gRPC servers to 0.0.0.0 unless the node address is loopback, and it
    turns ``_node_ip_address="127.0.0.1"`` into the routable address unless multi-node
    clusters are disabled, which Ray's own switch for macOS/Windows
    (``ray_constants.ENABLE_RAY_CLUSTER``) does. Ray-internal, hence here; if an upgrade
    moves it, the AttributeError says so. A single machine never needs more.
    """
    import ray._private.ray_constants as ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise AttributeError("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone; see fedsim/engines/ray_cluster.py")
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a single-machine Ray instance with as little start-up as Ray allows.

    No dashboard, workers' output kept out of the driver's terminal (failures come back
    as error replies), no usage reporting, loopback only.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bind_ray_to_loopback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # accelerator env-var notice
        # address="local": a new instance of our own, whatever RAY_ADDRESS or a `ray start`
        # cluster file says (joining a cluster is only ever asked for by engine.ray.address).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, ignore_reinit_error=True)


def stop_local_ray() -> None:
    """``ray.shutdown()`` for a Ray instance this process started, without its one-second stall.

    Ray stops its processes one by one, each with SIGTERM and up to a second's grace. Its
    autoscaler monitor (useless on a fixed single-machine cluster) does not exit on SIGTERM,
    so every shutdown waited out that second (measured: 1.37 s against 0.2-0.3 s without
    the monitor). Killed first here; the rest is Ray's own shutdown. Ray-internal names, so
    if they move this falls back to the plain (slower) shutdown.
    """
    import ray
    import ray._private.ray_constants as ray_constants
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None), []):
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    ray.shutdown()


def _bootstrap_address(address: str) -> str:
    """The host:port ``ray.init(address=address)`` would connect to (``auto``: RAY_ADDRESS, or the
    cluster ``ray start`` left on this machine; loopback names become the node's address unless
    Ray is bound to loopback). Ray-internal; if it moves, the address as given."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return address
    try:
        resolved = canonicalize_bootstrap_address(address)
    except Exception as exc:  # noqa: BLE001 - Ray's own parse of an address validation let through
        raise ScenarioError(f"engine.ray.address: {address!r}: {str(exc).splitlines()[0]}") from None
    if resolved is None:  # only for auto: nothing in the environment names a cluster
        raise ScenarioError("engine.ray.address: auto found no running Ray cluster (RAY_ADDRESS is unset and "
                            "no `ray start` cluster runs on this machine)")
    return resolved


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Ask the Ray head at ``address`` for its cluster id, within ``timeout`` seconds; returns the
    host:port Ray will join, or raises ScenarioError (one line) saying why it cannot be joined.

    ``ray.init`` retries an address that refuses or stays silent for minutes (measured: 70 s and
    still retrying for 127.0.0.1:1), so the run would hang before round 1. The cluster-id query is
    the first thing Ray's own connect does, here as one gRPC call with a deadline (no proxy). With
    ``RAY_USE_TLS`` the head speaks TLS and the query cannot be made in the clear: a TCP connect
    within the deadline is all that is checked.
    """
    target = _bootstrap_address(address)
    shown = address if target == address else f"{address} ({target})"
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as exc:
            raise ScenarioError(f"engine.ray.address: cannot reach a Ray cluster at {shown}: {exc}") from None
        return target

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return target  # a Ray head that wants a token: ray.init brings it (RAY_AUTH_TOKEN ...)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"no answer within {timeout:g} s"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            why = "something answers there, but not a Ray head (its GCS port, e.g. 6379)"
        else:
            why = (exc.details() or code.name).splitlines()[0]
        raise ScenarioError(f"engine.ray.address: cannot reach a Ray cluster at {shown}: {why}") from None
    finally:
        channel.close()
    return target


def join_ray(address: str) -> None:
    """Connect this process to the Ray cluster at ``address`` (checked first: see ``check_ray_address``)."""
    import ray

    check_ray_address(address)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # e.g. a Ray or Python version mismatch
            raise ScenarioError(f"engine.ray.address: cannot join the Ray cluster at {address}: "
                                f"{str(exc).strip().splitlines()[0]}") from None
