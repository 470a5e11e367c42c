"""Secure deployment (issue 14): certificates, a node's own data from --node-config, and a TLS
SuperLink with SuperNode authentication and real SuperNodes on loopback: an unregistered node
is refused, a node with broken data fails every round with its reason recorded, and with every
node registered and healthy the metrics equal the inline engine's. No Flower process is left."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedsim.deploy import certs
from fedsim.deploy.cluster import Cluster
from fedsim.deploy.demo import refused, write_broken_mnist
from fedsim.deploy.node_data import NodeDataError, local_tensors
from fedsim.run.results import read_metrics
from fedsim.world import world_from_text

REPO = Path(__file__).resolve().parents[1]


def _write_idx(path, array):
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
                     + array.astype(np.uint8).tobytes())


def _mnist(root, n_train=30, n_test=6, side=28, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, side, side)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return root


# ----------------------------------------------------------------------------- certificates


def test_certificates_chain_san_and_node_keys(tmp_path):
    out = certs.generate(tmp_path / "c", hosts=("127.0.0.1", "localhost", "fl.example.org"), nodes=["n1"])
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    for private in ("ca.key", "server.key", "n1"):
        assert stat.S_IMODE(os.stat(out / private).st_mode) == 0o600
    key = load_ssh_private_key((out / "n1").read_bytes(), None)  # what flower-supernode loads
    pub = load_ssh_public_key((out / "n1.pub").read_bytes())     # what `flwr supernode register` loads
    assert isinstance(key.curve, ec.SECP384R1) and pub.public_numbers() == key.public_key().public_numbers()


def test_plain_text_only_on_loopback(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        Cluster(tmp_path, tls=False, auth=False, host="10.1.2.3")
    with pytest.raises(ValueError, match="needs TLS"):
        Cluster(tmp_path, tls=False, auth=True)


# ----------------------------------------------------------------------------- a node's own data


def _mnist_world(tmp_path, image_size=None):
    server = _mnist(tmp_path / "server", seed=1)
    scenario = {"name": "n", "seed": 0, "data": {"dataset": "mnist", "root": str(server), "num_clients": 2,
                                                "image_size": image_size},
                "model": {"name": "mlp", "hidden": [8]}, "output": {"plot": False, "progress": False}}
    return world_from_text(yaml.safe_dump(scenario))


def test_node_data_from_its_own_files(tmp_path):
    world = _mnist_world(tmp_path)
    node = _mnist(tmp_path / "node", n_train=40, seed=2)
    x, y, xv, yv = local_tensors(world, str(node), partition_id=1)
    assert x.shape[1:] == (1, 28, 28) and len(x) + len(xv) == 40 and len(xv) == 4  # val_fraction 0.1
    assert local_tensors(world, str(node), 1)[0] is x  # loaded once per process


def test_node_data_errors_carry_the_reason(tmp_path):
    world = _mnist_world(tmp_path)
    with pytest.raises(NodeDataError, match=r"data-path=.*missing.*not a folder"):
        local_tensors(world, str(tmp_path / "missing"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NodeDataError, match="no MNIST IDX files or CIFAR-10"):
        local_tensors(world, str(tmp_path / "empty"), 0)
    with pytest.raises(NodeDataError, match="train-images-idx3-ubyte is truncated"):
        local_tensors(world, str(write_broken_mnist(tmp_path / "broken")), 0)
    with pytest.raises(NodeDataError, match=r"images are 1x16x16, the scenario's model takes 1x28x28"):
        local_tensors(world, str(_mnist(tmp_path / "small", side=16)), 0)


def test_client_app_reads_data_path_from_node_config(tmp_path):
    from flwr.app import Context, RecordDict

    from fedsim.run.apps import _client_setup

    _mnist_world(tmp_path)  # writes the server's files
    node = _mnist(tmp_path / "node", n_train=20, seed=3)
    run_config = {"scenario-yaml": yaml.safe_dump({
        "name": "n", "seed": 0, "data": {"dataset": "mnist", "root": str(tmp_path / "server"), "num_clients": 2,
                                         "image_size": None},
        "model": {"name": "mlp", "hidden": [8]}, "output": {"plot": False, "progress": False}})}
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "data-path": str(node)}, state=RecordDict(),
                  run_config=run_config)
    got_world, _, data = _client_setup(ctx)
    assert data.partition_id == 1 and len(data.y) + len(data.y_val) == 20
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    assert _client_setup(ctx)[2].y.tolist() == got_world.client_tensors(0)[1].tolist()  # unchanged without it


# ----------------------------------------------------------------------------- the deployment


def _deploy(cluster, tmp_path, name):
    return subprocess.run([sys.executable, "-m", "fedsim", "deploy", str(tmp_path / f"{name}.yaml"), "--superlink",
                           "fedsim", "--out", str(tmp_path / f"out-{name}"), "--app", str(REPO), "--timeout", "240"],
                          env=cluster.env, capture_output=True, text=True, timeout=300)


def test_tls_auth_refusal_broken_node_and_inline_equality(tmp_path):
    """~3 min on 2 cores: one TLS SuperLink with SuperNode auth; run 1 with two healthy registered
    nodes (metrics == inline); then, through `fedsim deploy`, a run whose ServerApp fails and one
    adding a registered node with broken data."""
    scenario = {"name": "secure", "seed": 3, "data": {"dataset": "digits", "num_clients": 2},
                "model": {"name": "mlp", "hidden": [16]}, "train": {"rounds": 2},
                "engine": {"timeout_s": 120}, "output": {"plot": False, "progress": False}}
    (tmp_path / "healthy.yaml").write_text(yaml.safe_dump(scenario))
    broken_scenario = {**scenario, "name": "broken", "data": {"dataset": "digits", "num_clients": 3},
                       "train": {"rounds": 1}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken_scenario))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**broken_scenario, "no_such_key": 1}))
    cluster = Cluster(tmp_path / "deploy", tls=True, auth=True)
    try:
        link = cluster.start_superlink()
        assert f"Uvicorn running on https://{cluster.address}" in link.text()
        # `flwr` verifies the SuperLink's certificate: without the CA it refuses to talk to it.
        no_ca = tmp_path / "no-ca"
        no_ca.mkdir()
        (no_ca / "config.toml").write_text(
            f'[superlink]\ndefault = "x"\n[superlink.x]\naddress = "{cluster.address}"\n')
        res = subprocess.run([str(cluster.bin / "flwr"), "supernode", "list", "x"], env={**cluster.env,
                             "FLWR_HOME": str(no_ca), "COLUMNS": "400"}, capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "Connection to the SuperLink is unavailable" in res.stdout + res.stderr
        for name in ("alice", "bob", "carol"):
            cluster.register(name)
        cluster.start_supernode("alice", "partition-id=0")
        cluster.start_supernode("bob", "partition-id=1")
        cluster.start_supernode("mallory", "partition-id=0")  # a valid key, never registered
        cluster.wait_online(["alice", "bob"])
        code, why = refused(cluster, "mallory")
        assert code != 0 and "Failed to activate SuperNode" in why
        assert "No SuperNode found with the given public key" in link.text()

        healthy = cluster.run(tmp_path / "healthy.yaml", tmp_path / "out-healthy")

        broken = write_broken_mnist(tmp_path / "carol-data")
        cluster.start_supernode("carol", f'partition-id=2 data-path="{broken}"')
        cluster.wait_online(["carol"])
        # Item 4 on the same SuperLink: `python -m fedsim deploy` submits, streams `flwr log`, and
        # exits 2 on a scenario key the apps reject (checked before submitting), 0 when it completes.
        bad = _deploy(cluster, tmp_path, "bad")
        ok = _deploy(cluster, tmp_path, "broken")
        failed = tmp_path / "out-broken"
        names = cluster.node_names()
    finally:
        cluster.stop()
    assert cluster.wait_gone() == []  # no Flower process outlives the test

    from fedsim.engines import run_scenario
    from fedsim.scenario import parse_scenario

    run_scenario(parse_scenario(scenario), tmp_path / "inline", progress=False)
    key = lambda rows: [(r["round"], r["accuracy"], r["loss"], r["bytes_up"], r["failures"]) for r in rows]  # noqa
    assert key(read_metrics(healthy)) == key(read_metrics(tmp_path / "inline"))
    assert all("failure_reasons" not in r for r in read_metrics(healthy))

    # A scenario key the apps reject is refused by `fedsim deploy` itself, before anything is submitted.
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "no_such_key" in bad.stderr, bad.stderr
    assert "submitted" not in bad.stdout
    assert ok.returncode == 0 and "completed" in ok.stdout, ok.stdout + ok.stderr

    rows = read_metrics(failed)
    assert [(r["participants"], r["failures"]) for r in rows] == [(2, 1)]
    [(node, reason)] = rows[0]["failure_reasons"].items()
    assert names[node] == "carol"
    assert "NodeDataError" in reason and "train-images-idx3-ubyte is truncated" in reason
    assert json.loads((failed / "summary.json").read_text())["failures_total"] == 1

