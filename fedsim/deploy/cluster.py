"""A SuperLink and SuperNodes as real processes on this machine, and `flwr` pointed at them.

Used by the demo (``fedsim.deploy.demo``) and the deployment tests. Every process is
started in its own process group (a SuperNode spawns SuperExec and ClientApp processes, a
SuperLink its ServerApp processes) and stopped by its PID's group: SIGTERM, then SIGKILL.

TLS is on unless ``tls=False``, which is allowed on 127.0.0.1 only (loopback tests).
With ``auth=True`` the SuperLink runs with ``--enable-supernode-auth``: only SuperNodes whose
public keys were registered (``register``) may connect.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import certs

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what())
        time.sleep(0.3)


def flower_bin() -> Path:
    """The folder holding flower-superlink, flower-supernode and flwr (this interpreter's venv)."""
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if not found:
        raise FileNotFoundError("flower-superlink is not installed next to this Python nor on PATH")
    return Path(found).parent


def _ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            break
    return pids


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    workdir: Path
    tls: bool = True
    auth: bool = True
    host: str = LOOPBACK
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.tls and self.host != LOOPBACK:
            raise ValueError("plain text (tls=False) is for loopback tests only: host must be 127.0.0.1")
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.bin = flower_bin()
        self.certs = self.workdir / "certs"
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        if self.tls and not (self.certs / "server.pem").exists():
            certs.generate(self.certs, hosts=(self.host, "localhost") if self.host != "localhost" else (self.host,))
        tls_line = f'root-certificates = "{self.certs / "ca.crt"}"\n' if self.tls else "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedsim"\n[superlink.fedsim]\naddress = "{self.address}"\n{tls_line}')
        # Flower's executables start each other by name: the venv's bin must be on PATH.
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
                    "PATH": os.pathsep.join([str(self.bin), os.environ.get("PATH", "")])}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, cmd: list[str]) -> Proc:
        log = self.logs / f"{name}.log"
        # Own process group (session): stopping it stops the children Flower spawned.
        popen = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env,
                                 cwd=self.workdir, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def tls_args(self, role: str) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if role == "superlink":
            return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        return ["--root-certificates", str(self.certs / "ca.crt")]

    def start_superlink(self, timeout: float = 60) -> Proc:
        cmd = [str(self.bin / "flower-superlink"), *self.tls_args("superlink"),
               *(["--enable-supernode-auth"] if self.auth else []),
               "--host", self.host, "--port", str(self.port), "--database", str(self.workdir / "state.db")]
        link = self._start("superlink", cmd)
        wait_for(lambda: "Uvicorn running" in link.text() or link.popen.poll() is not None, timeout,
                 lambda: "SuperLink did not start:\n" + link.text()[-2000:])
        if link.popen.poll() is not None:
            raise RuntimeError("SuperLink exited:\n" + link.text()[-2000:])
        return link

    def node_key(self, name: str) -> Path:
        """The node's private key (created on first use); its public key is beside it, NAME.pub."""
        key = self.certs / "nodes" / name
        if not key.exists():
            certs.make_node_key(key.parent, name)
        return key

    def flwr(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "flwr"), *args], cwd=cwd or REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def register(self, name: str) -> str:
        """Register node ``name``'s public key with the SuperLink (``flwr supernode register``)."""
        key = self.node_key(name)
        res = self.flwr("supernode", "register", str(key.with_name(name + ".pub")), "fedsim", "--name", name)
        if res.returncode != 0 or "registered successfully" not in res.stdout:
            raise RuntimeError(f"registering {name} failed:\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def start_supernode(self, name: str, node_config: str) -> Proc:
        """A SuperNode named ``name`` (its key is ``node_key(name)`` when auth is on)."""
        cmd = [str(self.bin / "flower-supernode"), *self.tls_args("supernode"), "--superlink", self.address,
               *(["--auth-supernode-private-key", str(self.node_key(name))] if self.auth else []),
               "--node-config", node_config, "--host", LOOPBACK, "--port", str(free_port())]
        return self._start(name, cmd)

    def wait_online(self, names: list[str], timeout: float = 60) -> None:
        """Until each named SuperNode's log says it was given a node id (it connected)."""
        procs = [p for p in self.procs if p.name in names]
        wait_for(lambda: all("SuperNode ID:" in p.text() for p in procs), timeout,
                 lambda: "SuperNodes not online: "
                 + ", ".join(p.name for p in procs if "SuperNode ID:" not in p.text()))

    def node_names(self) -> dict[str, str]:
        """Node id (as a string, as metrics.jsonl keys failures) -> the name it was started under."""
        names = {}
        for p in self.procs:
            for line in p.text().splitlines():
                if "SuperNode ID:" in line:
                    names[line.rsplit(":", 1)[1].strip()] = p.name
        return names

    def run(self, scenario: Path, out: Path, timeout: float = 300) -> Path:
        """`flwr run . fedsim` with ``scenario``; returns ``out`` once summary.json is written."""
        res = self.flwr("run", ".", "fedsim", "--run-config", f'scenario="{scenario}" out-dir="{out}" progress=false')
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{res.stdout}\n{res.stderr}")
        link = next(p for p in self.procs if p.name == "superlink")
        wait_for(lambda: (Path(out) / "summary.json").exists(), timeout,
                 lambda: "the deployed run did not finish:\n" + link.text()[-3000:])
        return Path(out)

    def stop(self, grace: float = 15) -> None:
        """Stop every process started here, by its PID's process group: SIGTERM, then SIGKILL."""
        for p in reversed(self.procs):  # SuperNodes first, the SuperLink last
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (ServerApp / ClientApp children)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.leftover():  # a child that left its group (matched by our address or folder)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover(self) -> list[int]:
        """PIDs still alive in any process group started here (empty after ``stop``)."""
        groups = {p.pid for p in self.procs}
        # Also a Flower process that left its group, known by our SuperLink's address or our folder.
        marks = [self.address.encode(), str(self.workdir).encode()]
        ours = {os.getpid(), *_ancestors()}  # never this process or what started it
        alive = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) not in ours:
                try:
                    pgid = os.getpgid(int(d.name))
                    state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    argv = (d / "cmdline").read_bytes().split(b"\0")
                except (ProcessLookupError, FileNotFoundError, PermissionError, IndexError):
                    continue
                if state == "Z":
                    continue
                flower = any(Path(a.decode(errors="replace")).name.startswith(("flower-", "flwr")) for a in argv[:2])
                if pgid in groups or (flower and any(m in a for a in argv for m in marks)):
                    alive.append(int(d.name))
        return alive

    def wait_gone(self, timeout: float = 20) -> list[int]:
        """After ``stop``: poll until no process of ours is left (killed ones take a moment to go);
        returns the PIDs still alive at the deadline (empty when all are gone)."""
        deadline = time.monotonic() + timeout
        while (left := self.leftover()) and time.monotonic() < deadline:
            time.sleep(0.3)
        return left

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
