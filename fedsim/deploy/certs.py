"""Certificates for a TLS SuperLink and keys for SuperNode authentication (``cryptography``).

    python -m fedsim.deploy.certs DIR [--host 127.0.0.1 --host localhost ...] [--node NAME ...]
    python -m fedsim.deploy.certs DIR --node-only --node NAME     (a client's key pair only)

writes into DIR:

    ca.crt, ca.key            a self-signed CA (give ca.crt to every SuperNode and to `flwr`:
                              it is how they verify the SuperLink)
    server.pem, server.key    the SuperLink's certificate, signed by the CA, with the --host
                              names/addresses as subjectAltName (what clients connect to)
    NAME, NAME.pub            per --node: an EC P-384 key pair in OpenSSH format, as Flower's
                              SuperNode authentication wants (`flower-supernode
                              --auth-supernode-private-key NAME`; `flwr supernode register NAME.pub`)

Private keys are written with mode 0600. Keep ca.key off the SuperLink machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, days: int = 365, name: str = "fedsim CA") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _key_pem(key), private=True)
    return cert, key


def make_server_cert(out: Path, ca_cert: x509.Certificate, ca_key, hosts=DEFAULT_HOSTS, days: int = 365) -> Path:
    """The SuperLink's certificate and key (server.pem, server.key), valid for ``hosts``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / "server.key", _key_pem(key), private=True)
    return _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format: (private key path, public key path)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write(out / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), private=True)
    public = _write(out / f"{name}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def generate(out: str | Path, hosts=DEFAULT_HOSTS, nodes=(), days: int = 365) -> Path:
    out = Path(out)
    ca_cert, ca_key = make_ca(out, days)
    make_server_cert(out, ca_cert, ca_key, tuple(hosts), days)
    for name in nodes:
        make_node_key(out, name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedsim.deploy.certs", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write the CA, the SuperLink's certificate and node keys into")
    ap.add_argument("--host", action="append", help="a name or IP the SuperLink is reached at (repeatable; "
                    "default 127.0.0.1 and localhost)")
    ap.add_argument("--node", action="append", default=[], help="write a SuperNode key pair NAME, NAME.pub")
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--node-only", action="store_true",
                    help="write only the --node key pairs (on a client machine: its private key never leaves it)")
    args = ap.parse_args(argv)
    if args.node_only:
        if not args.node:
            ap.error("--node-only needs at least one --node NAME")
        out = Path(args.out)
        for name in args.node:
            make_node_key(out, name)
    else:
        out = generate(args.out, tuple(args.host or DEFAULT_HOSTS), args.node, args.days)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
