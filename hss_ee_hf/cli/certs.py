"""`hss-ee certs`: a private CA and the TLS certificates of share servers and clients, made with `cryptography`.

Each operator runs its own CA for its own servers; the user runs one for client certificates (mutual TLS). A run
writes into OUTDIR, reusing the CA already there (`ca.pem`, `ca.key`) so more certificates can be signed by it:

* `ca.pem`, `ca.key`: the CA (created when absent). Give `ca.pem` to the other side; keep `ca.key` offline.
* `server.pem`, `server.key`: with `--server-name` (every name or IP the clients use, in the SAN).
* `client.pem`, `client.key`: with `--client-name` (mutual TLS).

Keys are EC P-256, written mode 0600; nothing is overwritten without `--force`. See docs/deploy.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import InputFileError
from .base import Command


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool) -> None:
    # A key is created 0600 from the start, never readable by others for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(subject: x509.Name, issuer: x509.Name, key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock differences
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def load_or_make_ca(out: Path, common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `out` (`ca.pem`, `ca.key`), created when neither file exists.

    Raises:
        `InputFileError`: only one of the two files exists, or they cannot be read as a certificate and its key.
    """
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as err:
            raise InputFileError(
                f"cannot read the CA in {out} ({err}); remove ca.pem and ca.key to make a new one"
            ) from err
        return cert, key
    if cert_path.exists() or key_path.exists():
        raise InputFileError(f"{out} holds only one of ca.pem and ca.key; restore the other or remove both")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), _name(common_name), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(cert_path, _cert_pem(cert), private=False)
    _write(key_path, _key_pem(key), private=True)
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], names: list[str], server: bool, days: int):
    """A leaf certificate signed by `ca`: for a server, every name (DNS or IP) in its SAN; for a client, CN."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(names[0]), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    )
    if server:
        sans = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


class CertsCommand(Command):
    name = "certs"
    help = "Make a private CA and TLS certificates for share servers (--server-name) and clients (--client-name)."

    def add_arguments(self, p):
        p.add_argument("outdir", help="folder to write into; a CA already there (ca.pem, ca.key) is reused")
        p.add_argument(
            "--server-name",
            action="append",
            default=[],
            metavar="NAME",
            help="DNS name or IP clients use to reach the server (repeat for several; all go in the SAN)",
        )
        p.add_argument("--client-name", metavar="NAME", help="also write a client certificate (mutual TLS) for NAME")
        p.add_argument("--ca-name", help="common name of a new CA (default: unique, naming OUTDIR)")
        p.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
        p.add_argument("--force", action="store_true", help="overwrite existing server/client certificates")

    def run(self, args):
        if not args.server_name and not args.client_name:
            raise InputFileError("nothing to make: pass --server-name NAME (a server) and/or --client-name NAME")
        out = Path(args.outdir)
        out.mkdir(parents=True, exist_ok=True)
        wanted = [("server", args.server_name, True)] if args.server_name else []
        wanted += [("client", [args.client_name], False)] if args.client_name else []
        existing = [f"{out / stem}.pem" for stem, _, _ in wanted if (out / f"{stem}.pem").exists()]
        if existing and not args.force:
            raise InputFileError(f"{', '.join(existing)} exists; pass --force to replace it")
        # Two CAs with one name in a client's trust bundle make TLS pick the wrong one: a new CA's name is unique.
        ca_name = args.ca_name or f"hss-ee private CA {out.resolve().name} {secrets.token_hex(4)}"
        ca = load_or_make_ca(out, ca_name, days=max(args.days, 3650))
        for stem, names, server in wanted:
            cert, key = issue(ca, names, server=server, days=args.days)
            _write(out / f"{stem}.key", _key_pem(key), private=True)
            _write(out / f"{stem}.pem", _cert_pem(cert), private=False)
            print(f"wrote {out / stem}.pem and {out / stem}.key ({', '.join(names)})")
        print(f"CA: {out / 'ca.pem'} (share it); {out / 'ca.key'} signs new certificates (keep it private)")
        return 0
