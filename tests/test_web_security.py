"""The endpoint behind TLS, client certificates and basic auth (--web-config-file).

Certificates are made here with ``cryptography`` (a CA, a server and client
certificates, and a stranger CA); requests go through a real TLS client. The
exporter has no broker: the endpoint must not care.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exporter import cli
from exporter.web import webconfig
from tests.harness import InProcessExporter

NO_BROKER = "redis://127.0.0.1:9/0"  # the discard port: nothing listens there


@dataclass
class Party:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path
    serial: int


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def make_party(
    directory: Path, name: str, issuer: Issuer | None, *, server: bool = False
) -> tuple[Party, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA (no issuer), or a server or client certificate signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = (
            builder.issuer_name(_name(name))
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
        )
        signer = key
    else:
        issuer_cert, signer = issuer
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            builder.issuer_name(issuer_cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
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
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    cert = builder.sign(signer, hashes.SHA256())
    party = Party(directory / f"{name}.crt", directory / f"{name}.key", cert.serial_number)
    party.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    party.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return party, cert, key


@dataclass
class PKI:
    ca: Party
    server: Party
    server2: Party
    client: Party
    stranger: Party
    """A client certificate from a CA the exporter does not trust."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_party(directory, "ca", None)
    server = make_party(directory, "server", (ca_cert, ca_key), server=True)[0]
    server2 = make_party(directory, "server2", (ca_cert, ca_key), server=True)[0]
    client = make_party(directory, "client", (ca_cert, ca_key))[0]
    _, other_cert, other_key = make_party(directory, "other-ca", None)
    stranger = make_party(directory, "stranger", (other_cert, other_key))[0]
    return PKI(ca, server, server2, client, stranger)


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def write_config(path: Path, text: str) -> None:
    """Replace the file whole, as config management tools do."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def tls_section(
    pki: PKI,
    client_auth: str = "NoClientCert",
    *,
    server: Party | None = None,
    min_version: str = "TLS12",
) -> str:
    server = server or pki.server
    ca = f"  client_ca_file: {pki.ca.cert}\n" if client_auth != "NoClientCert" else ""
    return (
        f"tls_server_config:\n  cert_file: {server.cert}\n  key_file: {server.key}\n"
        f"  client_auth_type: {client_auth}\n  min_version: {min_version}\n{ca}"
    )


def client_context(pki: PKI, party: Party | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if party is not None:
        context.load_cert_chain(str(party.cert), str(party.key))
    return context


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    peer_serial: int


def get(
    port: int, path: str, context: ssl.SSLContext | None, auth: tuple[str, str] | None = None
) -> Reply:
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10
        )
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    headers = {}
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        serial = 0
        if context is not None:
            der = connection.sock.getpeercert(binary_form=True)
            serial = x509.load_der_x509_certificate(der).serial_number
        return Reply(response.status, response.headers, response.read(), serial)
    finally:
        connection.close()


@pytest.fixture
def exporters():
    started: list[InProcessExporter] = []

    def start(web_config: Path) -> InProcessExporter:
        exporter = InProcessExporter(
            ["--broker-url", NO_BROKER, "--web-config-file", str(web_config)]
        )
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def test_basic_auth_over_tls(pki: PKI, tmp_path: Path, exporters) -> None:
    path = tmp_path / "web.yml"
    write_config(path, tls_section(pki) + f"basic_auth_users:\n  prom: {bcrypt_hash('s3cret')}\n")
    exporter = exporters(path)
    context = client_context(pki)

    ok = get(exporter.port, "/metrics", context, ("prom", "s3cret"))
    assert ok.status == 200
    assert b"celery_exporter_build_info" in ok.body
    assert ok.peer_serial == pki.server.serial

    for auth in (None, ("prom", "wrong"), ("nobody", "s3cret"), ("prom", "x" * 100)):
        refused = get(exporter.port, "/metrics", context, auth)
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic ")
        assert refused.body == b"unauthorized\n"
    assert get(exporter.port, "/", context).status == 401

    # Probes stay open: liveness answers, readiness tells the truth (no broker here).
    assert get(exporter.port, "/healthz", context).status == 200
    assert get(exporter.port, "/readyz", context).status == 503
    # Plain HTTP on the TLS port gets no answer at all.
    with pytest.raises(OSError):
        get(exporter.port, "/healthz", None)


@pytest.mark.parametrize("client_auth", ["RequireAndVerifyClientCert", "RequireAnyClientCert"])
def test_client_certificate_required(pki: PKI, tmp_path: Path, exporters, client_auth: str) -> None:
    path = tmp_path / "web.yml"
    write_config(path, tls_section(pki, client_auth))
    exporter = exporters(path)

    assert get(exporter.port, "/metrics", client_context(pki, pki.client)).status == 200
    for party in (None, pki.stranger):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(exporter.port, "/metrics", client_context(pki, party))
    # The endpoint survives refused handshakes.
    assert get(exporter.port, "/healthz", client_context(pki, pki.client)).status == 200


def test_client_certificate_verified_if_given(pki: PKI, tmp_path: Path, exporters) -> None:
    path = tmp_path / "web.yml"
    write_config(path, tls_section(pki, "VerifyClientCertIfGiven"))
    exporter = exporters(path)

    assert get(exporter.port, "/metrics", client_context(pki)).status == 200
    assert get(exporter.port, "/metrics", client_context(pki, pki.client)).status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(exporter.port, "/metrics", client_context(pki, pki.stranger))


def test_minimum_tls_version(pki: PKI, tmp_path: Path, exporters) -> None:
    path = tmp_path / "web.yml"
    write_config(path, tls_section(pki, min_version="TLS13"))
    exporter = exporters(path)

    assert get(exporter.port, "/metrics", client_context(pki)).status == 200
    old_client = client_context(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(exporter.port, "/metrics", old_client)


def test_basic_auth_without_tls(tmp_path: Path, exporters) -> None:
    path = tmp_path / "web.yml"
    write_config(path, f"basic_auth_users:\n  prom: {bcrypt_hash('pw')}\n")
    exporter = exporters(path)

    assert get(exporter.port, "/metrics", None).status == 401
    assert get(exporter.port, "/metrics", None, ("prom", "pw")).status == 200
    assert get(exporter.port, "/healthz", None).status == 200


def test_changes_apply_without_restart(
    pki: PKI, tmp_path: Path, exporters, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.servers import wait_for

    path = tmp_path / "web.yml"
    write_config(path, tls_section(pki) + f"basic_auth_users:\n  prom: {bcrypt_hash('old')}\n")
    exporter = exporters(path)
    context = client_context(pki)
    assert get(exporter.port, "/metrics", context, ("prom", "old")).status == 200

    # A new password: the old one is refused and the new one accepted, same process.
    write_config(path, tls_section(pki) + f"basic_auth_users:\n  prom: {bcrypt_hash('new')}\n")
    wait_for(
        lambda: get(exporter.port, "/metrics", context, ("prom", "old")).status == 401,
        10,
        "the old password still works after the change",
    )
    assert get(exporter.port, "/metrics", context, ("prom", "new")).status == 200

    # A new server certificate: new connections are served with it.
    write_config(
        path,
        tls_section(pki, server=pki.server2) + f"basic_auth_users:\n  prom: {bcrypt_hash('new')}\n",
    )
    wait_for(
        lambda: get(exporter.port, "/healthz", context).peer_serial == pki.server2.serial,
        10,
        "the new server certificate is not in use",
    )

    # A broken change is logged once and the configuration in force stays. Files are
    # looked at when connections arrive, so the probe below is what finds the change.
    def reported() -> bool:
        get(exporter.port, "/healthz", context)
        return "keeping the previous configuration" in caplog.text

    with caplog.at_level(logging.ERROR, logger="exporter.web.webconfig"):
        write_config(path, tls_section(pki, "Sometimes"))
        wait_for(reported, 10, "the broken web config was not reported")
        for _ in range(3):
            get(exporter.port, "/healthz", context)
    assert caplog.text.count("keeping the previous configuration") == 1
    assert "tls_server_config.client_auth_type" in caplog.text
    reply = get(exporter.port, "/metrics", context, ("prom", "new"))
    assert (reply.status, reply.peer_serial) == (200, pki.server2.serial)
    assert get(exporter.port, "/metrics", context, ("prom", "old")).status == 401


BAD_CONFIGS = {
    "tls_server_config.client_auth_type": "tls_server_config:\n  cert_file: {cert}\n"
    "  key_file: {key}\n  client_auth_type: Sometimes\n",
    "tls_server_config.cert_file": "tls_server_config:\n  key_file: {key}\n",
    "tls_server_config.key_file": "tls_server_config:\n  cert_file: {cert}\n"
    "  key_file: /nonexistent/server.key\n",
    "tls_server_config.min_version": "tls_server_config:\n  cert_file: {cert}\n"
    "  key_file: {key}\n  min_version: TLS11\n",
    "tls_server_config.client_ca_file": "tls_server_config:\n  cert_file: {cert}\n"
    "  key_file: {key}\n  client_auth_type: RequireAndVerifyClientCert\n",
    "tls_server_config.cipher_suites": "tls_server_config:\n  cert_file: {cert}\n"
    "  key_file: {key}\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
    "basic_auth_users.prom": "basic_auth_users:\n  prom: plaintext\n",
    "http_server_config": "http_server_config:\n  http2: false\n",
    "tls_server_config.cert_file, key_file": "tls_server_config:\n  cert_file: {ca}\n"
    "  key_file: {key}\n",
}


@pytest.mark.parametrize("key", list(BAD_CONFIGS))
def test_a_bad_web_config_stops_the_start(
    pki: PKI, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        BAD_CONFIGS[key].format(cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert)
    )
    status = cli.main(["--broker-url", NO_BROKER, "--web-config-file", str(path)])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1
    assert error.startswith(f"celery-events-exporter: error: web_config_file: {key}:")


def test_verified_credentials_are_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  prom: {bcrypt_hash('pw')}\n")
    config = webconfig.load(str(path))
    checks = []
    real_checkpw = bcrypt.checkpw
    monkeypatch.setattr(
        webconfig.bcrypt, "checkpw", lambda *args: checks.append(1) or real_checkpw(*args)
    )

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    for _ in range(5):
        assert config.authorized(header("prom", "pw"))
    assert len(checks) == 1
    for _ in range(3):  # failures are never cached: each costs a check
        assert not config.authorized(header("prom", "nope"))
    assert len(checks) == 4
    assert not config.authorized("Bearer abc")
    assert not config.authorized("Basic !!!not-base64")
    assert not config.authorized(None)
    assert all(b"pw" not in key for key in config.verified)
