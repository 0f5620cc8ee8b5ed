"""TLS, mutual TLS and bearer tokens between a client and a share server (DESIGN.md §7).

A CA, a server certificate (SAN 127.0.0.1 and localhost) and client certificates are generated at test time
with `cryptography`; everything runs on loopback.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hss_ee_hf.cli.args import (
    add_client_security_args,
    add_server_security_args,
    client_config_from_args,
    server_security_from_args,
)
from hss_ee_hf.errors import TransportError
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.server.security import HSSEEServerSecurity
from hss_ee_hf.transport.config import TOKEN_ENV, HSSEEClientConfig, SecurityConfigError
from hss_ee_hf.transport.grpc_client import GrpcTransport

FINGERPRINT = "ab" * 32
TOKEN = "s3cret-token-for-tests"
HIDDEN = 32
# Short deadlines and few, quick retries: a refused handshake is retried as UNAVAILABLE.
FAST = dict(timeout=5.0, retries=1, initial_backoff=0.01)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("hss-ee test CA")
    server, server_key = _leaf("share-server", ca, ca_key, server=True)
    client, client_key = _leaf("client", ca, ca_key, server=False)
    rogue_ca, rogue_ca_key = _ca("rogue CA")
    rogue, rogue_key = _leaf("rogue-client", rogue_ca, rogue_ca_key, server=False)
    return Pki(
        ca=_write_cert(ca, d / "ca.pem"),
        server_cert=_write_cert(server, d / "server.pem"),
        server_key=_write_key(server_key, d / "server.key"),
        client_cert=_write_cert(client, d / "client.pem"),
        client_key=_write_key(client_key, d / "client.key"),
        rogue_cert=_write_cert(rogue, d / "rogue.pem"),
        rogue_key=_write_key(rogue_key, d / "rogue.key"),
    )


@pytest.fixture(scope="module")
def engine(tiny_ee_checkpoint: Path) -> StageEngine:
    return StageEngine(tiny_ee_checkpoint, max_rows=64)


def _serve(engine: StageEngine, security: HSSEEServerSecurity) -> Iterator[str]:
    server, port = start_server(engine, "127.0.0.1", 0, max_workers=4, security=security)
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def tls_endpoint(engine: StageEngine, pki: Pki) -> Iterator[str]:
    """A TLS server (no client certificates) that requires the bearer token."""
    yield from _serve(engine, HSSEEServerSecurity(tls_cert=pki.server_cert, tls_key=pki.server_key, tokens=[TOKEN]))


@pytest.fixture(scope="module")
def mtls_endpoint(engine: StageEngine, pki: Pki) -> Iterator[str]:
    """A mutual-TLS server: clients must present a certificate signed by the test CA."""
    yield from _serve(
        engine, HSSEEServerSecurity(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    )


def _other_spelling(endpoint: str) -> str:
    host, port = endpoint.rsplit(":", 1)
    return f"{'localhost' if host == '127.0.0.1' else '127.0.0.1'}:{port}"


def _run(endpoint: str, config: HSSEEClientConfig) -> None:
    """One exact stage call through `endpoint` used as both parties."""
    x = torch.arange(2 * HIDDEN, dtype=torch.int64).view(2, HIDDEN)
    shares = share(x)
    # The same server under a second spelling: a client refuses one address in both pools (pools.py).
    with GrpcTransport((endpoint, _other_spelling(endpoint)), config=config) as transport:
        y_a, y_b = transport.run_stage(FINGERPRINT, "layers.0.qkv", shares, out_features=64)
    assert y_a.shape == (2, 64) and y_b.shape == (2, 64)


def _refused(endpoint: str, config: HSSEEClientConfig) -> TransportError:
    with pytest.raises(TransportError) as info:
        _run(endpoint, config)
    assert info.value.endpoint in (endpoint, _other_spelling(endpoint))  # either party may be named first
    return info.value


def test_tls_with_the_right_token_works(tls_endpoint: str, pki: Pki):
    _run(tls_endpoint, HSSEEClientConfig(tls_ca_cert=pki.ca, token=TOKEN, **FAST))


def test_tls_matches_the_plaintext_result(tls_endpoint: str, pki: Pki, engine: StageEngine):
    x = torch.randint(-(2**40), 2**40, (3, HIDDEN), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    with GrpcTransport(
        (tls_endpoint, _other_spelling(tls_endpoint)), config=HSSEEClientConfig(tls_ca_cert=pki.ca, token=TOKEN)
    ) as t:
        y_a, y_b = t.run_stage(FINGERPRINT, "layers.0.qkv", share(x), out_features=64)
    expected = torch.frombuffer(
        bytearray(engine.compute(FINGERPRINT, "layers.0.qkv", 3, share=x.numpy().tobytes())), dtype=torch.int64
    ).view(3, 64)
    assert torch.equal(y_a + y_b, expected)


def test_connecting_by_dns_name_works(tls_endpoint: str, pki: Pki):
    port = tls_endpoint.rsplit(":", 1)[1]
    _run(f"localhost:{port}", HSSEEClientConfig(tls_ca_cert=pki.ca, token=TOKEN, **FAST))


@pytest.mark.parametrize("token", ["wrong-token", TOKEN + "x", TOKEN[:-1], None])
def test_a_missing_or_wrong_token_is_refused(tls_endpoint: str, pki: Pki, token: str | None):
    err = _refused(tls_endpoint, HSSEEClientConfig(tls_ca_cert=pki.ca, token=token, **FAST))
    assert "UNAUTHENTICATED" in str(err) and "bearer token" in str(err)
    assert "wrong-token" not in str(err) and TOKEN not in str(err)  # neither token is echoed


def test_token_file_and_rotation(engine: StageEngine, tmp_path: Path):
    """A server file may list several tokens (rotation); a client reads its token from a file."""
    server_tokens = tmp_path / "tokens.txt"
    server_tokens.write_text("# accepted tokens\nold-token\n\nnew-token\n", encoding="utf-8")
    server_tokens.chmod(0o600)
    client_token = tmp_path / "client-token.txt"
    client_token.write_text("new-token\n", encoding="utf-8")
    for endpoint in _serve(engine, HSSEEServerSecurity(token_file=server_tokens)):
        _run(endpoint, HSSEEClientConfig(token_file=client_token, **FAST))
        _run(endpoint, HSSEEClientConfig(token="old-token", **FAST))
        assert "UNAUTHENTICATED" in str(_refused(endpoint, HSSEEClientConfig(token="older-token", **FAST)))


def test_health_needs_no_token(tls_endpoint: str, pki: Pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(tls_endpoint, credentials) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_with_a_client_certificate_works(mtls_endpoint: str, pki: Pki):
    _run(
        mtls_endpoint,
        HSSEEClientConfig(tls_ca_cert=pki.ca, tls_client_cert=pki.client_cert, tls_client_key=pki.client_key, **FAST),
    )


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_endpoint: str, pki: Pki):
    err = _refused(mtls_endpoint, HSSEEClientConfig(tls_ca_cert=pki.ca, **FAST))
    assert "UNAVAILABLE" in str(err) and "client certificate" in str(err) and "--tls-cert" in str(err)


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_endpoint: str, pki: Pki):
    _refused(
        mtls_endpoint,
        HSSEEClientConfig(tls_ca_cert=pki.ca, tls_client_cert=pki.rogue_cert, tls_client_key=pki.rogue_key, **FAST),
    )


def test_plaintext_to_a_tls_server_fails_clearly(tls_endpoint: str):
    err = _refused(tls_endpoint, HSSEEClientConfig(token=TOKEN, **FAST))
    message = str(err)
    assert "UNAVAILABLE" in message and "requires TLS" in message and "--tls-ca" in message


def test_tls_to_a_plaintext_server_fails_clearly(engine: StageEngine, pki: Pki):
    for endpoint in _serve(engine, HSSEEServerSecurity()):
        err = _refused(endpoint, HSSEEClientConfig(tls_ca_cert=pki.ca, **FAST))
        assert "UNAVAILABLE" in str(err) and "does not speak TLS" in str(err)


def test_a_server_certificate_from_an_unknown_ca_is_refused(tls_endpoint: str, pki: Pki):
    err = _refused(tls_endpoint, HSSEEClientConfig(tls_ca_cert=pki.rogue_cert, token=TOKEN, **FAST))
    assert "not signed by the CA" in str(err)


def test_incomplete_settings_fail_with_what_to_do(pki: Pki, tmp_path: Path):
    with pytest.raises(SecurityConfigError, match="--tls-cert` and `--tls-key"):
        HSSEEServerSecurity(tls_cert=pki.server_cert)
    with pytest.raises(SecurityConfigError, match="mutual TLS"):
        HSSEEServerSecurity(tls_client_ca=pki.ca)
    with pytest.raises(SecurityConfigError, match="client certificate and its key"):
        HSSEEClientConfig(tls_client_cert=pki.client_cert)
    with pytest.raises(SecurityConfigError, match="cannot read the CA certificate"):
        HSSEEClientConfig(tls_ca_cert=tmp_path / "missing.pem").channel_credentials()
    with pytest.raises(SecurityConfigError, match="cannot read the token file"):
        HSSEEServerSecurity(token_file=tmp_path / "missing-tokens")
    empty = tmp_path / "empty-tokens"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(SecurityConfigError, match="holds no token|is empty"):
        HSSEEClientConfig(token_file=empty)


def test_reprs_never_show_a_token(pki: Pki):
    client = HSSEEClientConfig(tls_ca_cert=pki.ca, token=TOKEN)
    server = HSSEEServerSecurity(tls_cert=pki.server_cert, tls_key=pki.server_key, tokens=[TOKEN])
    with GrpcTransport(("127.0.0.1:1", "127.0.0.1:2"), config=client) as transport:
        shown = repr(client) + repr(server) + repr(transport) + str(server.interceptors())
    assert TOKEN not in shown and "<secret>" in shown


def test_argparse_helpers_build_the_configs(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    server_parser = argparse.ArgumentParser()
    add_server_security_args(server_parser)
    assert server_security_from_args(server_parser.parse_args([])) is None
    security = server_security_from_args(
        server_parser.parse_args(
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
            + ["--token-file", str(token_file)]
        )
    )
    assert security.uses_tls and security.requires_token and security.tls_client_ca == str(pki.ca)

    client_parser = argparse.ArgumentParser()
    client_parser.add_argument("--timeout", type=float, default=60.0)
    add_client_security_args(client_parser)
    config = client_config_from_args(
        client_parser.parse_args(["--tls-ca", str(pki.ca), "--token-file", str(token_file), "--timeout", "7"])
    )
    assert config.uses_tls and config.has_token and config.timeout == 7.0
    assert config.call_metadata() == (("authorization", f"Bearer {TOKEN}"),)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    config = client_config_from_args(client_parser.parse_args(["--retries", "2"]))
    assert not config.uses_tls and config.retries == 2 and config.call_metadata()[0][1] == "Bearer from-env"
