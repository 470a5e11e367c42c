"""Starting, joining and stopping Ray for fedsim: a private loopback-only instance (``start_local_ray``,
``stop_local_ray``), or an existing cluster, its address checked within seconds first (``check_ray_address``,
``join_ray``). Shared by the ray engine (``fedsim.engines.ray``) and the sweep (``fedsim.compare.sweep``).

Signals. ``ray.init`` replaces the driver's SIGTERM handler (with ``sys.exit(15)``, then a handler that
stops Ray's processes and exits 1) and its C++ core worker installs a failure handler that prints a stack
dump on SIGTERM. fedsim handles SIGTERM as Ctrl-C (``fedsim.console.sigterm_as_ctrl_c``): a Python handler
the process had before ``ray.init`` is kept through it and put back after (``_keeping_sigterm_handler``).

A killed driver. Ray ties the processes the driver starts (GCS, raylet, log monitor, ...) to it
(``PR_SET_PDEATHSIG``), but not the raylet's own children: after ``kill -9`` of the driver (or the OOM
killer) the dashboard and runtime-env agents lingered about a minute (measured: still there 60 s after
the kill; they notice their raylet is gone within 2 s, then report it to the GCS, which is dead too,
with the 60 s time-out hard-coded in ``ray._private.utils.publish_error_to_driver``), and a worker
starting at that instant may too. So a local instance gets a watchdog (``_WATCHDOG``): a bare Python
process that holds one end of a pipe whose other end only the driver holds. When the driver ends,
however it ends, the kernel closes that end; the watchdog then kills every process of this instance:
those whose environment carries its tag (``SESSION_TAG``, set in the driver's environment while
``ray.init`` starts the raylet, so all its descendants inherit it) and those holding a file open in its
session folder (every Ray process keeps its logs there open; needed because the agents write their
process title over their environment, where the tag may then be gone). Measured with ``kill -9`` of
the driver of a ray run, and of a sweep, once its first round was written: the two agents were left at
5 and 30 s (and 60 s) before; no process at 1 s after. It needs Linux's /proc (elsewhere the watchdog
finds nothing and Ray's own clean-up is all there is); it does not reach a process that dropped both
marks, and a ``kill -9`` of the whole process group kills the watchdog with the rest (as it does every
Ray process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
import warnings

from ..scenario.schema import ScenarioError

# The deadline for asking a Ray address for its cluster id before joining it.
CONNECT_TIMEOUT_S = 3.0
# The environment variable that marks every process of a Ray instance fedsim started (module docstring).
SESSION_TAG = "FEDSIM_RAY_SESSION"

# The watchdog of a local instance (module docstring). argv[1]: SESSION_TAG=<this instance's tag>; its
# stdin: the instance's session folder, once Ray is up. It ignores SIGINT and SIGTERM: those sent to the
# whole process group (Ctrl-C in a terminal) are the driver's to handle, and it ends when the driver does.
# A process is the instance's if its environment holds the tag or it holds a file open in the session
# folder (Ray's processes keep their logs there open): the agents rewrite their process title over their
# environment, which then may no longer show the tag. A pass that found processes is followed by another
# (10 at most), for one forked at that instant; after a clean ``ray.shutdown`` one pass finds none (a few ms).
_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
driver = os.getppid()
sessions = tuple(line for line in sys.stdin.buffer.read().decode().splitlines() if line)  # until EOF
tag = sys.argv[1].encode()

def ours(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        if tag in f.read().split(b"\0"):
            return True
    return bool(sessions) and any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(sessions)
                                  for fd in os.listdir(f"/proc/{pid}/fd"))

for attempt in range(10):  # a process in uninterruptible sleep dies late: bounded
    killed = False
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (os.getpid(), driver):
            continue
        try:
            if ours(name):
                os.kill(int(name), signal.SIGKILL)
                killed = True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    if not killed:
        break
    time.sleep(0.2)
"""
_watchdog: subprocess.Popen | None = None  # the watchdog of the local instance this process runs


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


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """Keep the process's own Python SIGTERM handler through ``ray.init`` (module docstring), if it has one.

    Ray sets its handlers through ``ray._private.utils.set_sigterm_handler``, made a no-op here for the
    call; the core worker's C++ handler is replaced by putting the Python one back afterwards. Without a
    Python handler of the process's own (SIG_DFL: a library user, pytest) Ray's are left as Ray sets
    them. Ray-internal name: if it moves, Ray's handlers run during the call, and ours is back after.
    (A SIGTERM in the instant between the core worker's start and the end of the call still gets the
    stack dump, then our handler: the C++ handler passes the signal on.)"""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if setter is not None:
            ray_utils.set_sigterm_handler = setter
        signal.signal(signal.SIGTERM, previous)


def _start_watchdog(tag: str) -> subprocess.Popen | None:
    """The watchdog that kills the processes tagged ``tag`` once this process ends (module docstring).
    Started before the tag is in this process's environment, so it carries none. None without /proc."""
    if not os.path.isdir("/proc"):
        return None
    env = {k: v for k, v in os.environ.items() if k != SESSION_TAG}
    # -I -S: no site-packages, no PYTHON* variables: a bare interpreter starts in milliseconds.
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, f"{SESSION_TAG}={tag}"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _tell_watchdog_the_session() -> None:
    """Hand the watchdog the session folder of the instance just started (Ray-internal: if it moves, the
    watchdog goes by the tag alone)."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    session = getattr(node, "get_session_dir_path", lambda: None)()
    if _watchdog is not None and session:
        try:
            _watchdog.stdin.write(os.path.join(session, "").encode() + b"\n")  # with its "/": no sibling matches
            _watchdog.stdin.flush()
        except OSError:  # the watchdog is gone (killed): the run goes on without it
            pass


def _stop_watchdog() -> None:
    """Close the watchdog's pipe: it kills what is left of the instance (nothing, after ``ray.shutdown``,
    but a worker still exiting) and ends."""
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is None:
        return
    watchdog.stdin.close()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:  # never seen; it must not hold up the exit
        watchdog.kill()
        watchdog.wait()


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a single-machine Ray instance with as little start-up as Ray allows.

    No dashboard, workers' output kept out of the driver's terminal (failures come back
    as error replies), no usage reporting, loopback only. Its processes die with this one
    (the watchdog, module docstring), and an interrupt (Ctrl-C, SIGTERM) while it starts
    stops what was started before it is raised.
    """
    global _watchdog
    import ray

    if ray.is_initialized():  # as ray.init(ignore_reinit_error=True) would: the instance this process has
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bind_ray_to_loopback()
    tag = f"{os.getpid()}-{uuid.uuid4().hex}"
    _watchdog = _start_watchdog(tag)
    before = os.environ.get(SESSION_TAG)
    os.environ[SESSION_TAG] = tag  # inherited by every process the raylet starts, and only by those
    try:
        with warnings.catch_warnings(), _keeping_sigterm_handler():
            warnings.simplefilter("ignore", FutureWarning)  # accelerator env-var notice
            # address="local": a new instance of our own, whatever RAY_ADDRESS or a `ray start`
            # cluster file says (joining a cluster is only ever asked for by engine.ray.address).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, ignore_reinit_error=True)
        _tell_watchdog_the_session()
    except BaseException:  # Ctrl-C or SIGTERM while Ray started, or Ray failing: stop what did start
        stop_local_ray()
        raise
    finally:
        if before is None:
            os.environ.pop(SESSION_TAG, None)
        else:
            os.environ[SESSION_TAG] = before


def stop_local_ray() -> None:
    """``ray.shutdown()`` for a Ray instance this process started, without its one-second stall.

    Ray stops its processes one by one, each with SIGTERM and up to a second's grace. Its
    autoscaler monitor (useless on a fixed single-machine cluster) does not exit on SIGTERM,
    so every shutdown waited out that second (measured: 1.37 s against 0.2-0.3 s without
    the monitor). Killed first here; the rest is Ray's own shutdown. Ray-internal names, so
    if they move this falls back to the plain (slower) shutdown. Then the watchdog goes.
    """
    import ray
    import ray._private.ray_constants as ray_constants
    import ray._private.worker as ray_worker

    try:
        node = getattr(ray_worker, "_global_node", None)
        processes = getattr(node, "all_processes", None) or {}
        for info in processes.get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None), []):
            process = getattr(info, "process", None)
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        ray.shutdown()
    finally:
        _stop_watchdog()


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
    with warnings.catch_warnings(), _keeping_sigterm_handler():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # e.g. a Ray or Python version mismatch
            raise ScenarioError(f"engine.ray.address: cannot join the Ray cluster at {address}: "
                                f"{str(exc).strip().splitlines()[0]}") from None
