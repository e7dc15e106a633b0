"""The development PKI and the principal of a peer (controller/pki.py; issue 4 §2 and §10; claims C3, C11).

Real components: each mTLS test starts a real grpcio server on port 0 (TLS, client certificate required,
trusting the development CA) with one generic method that answers the caller's principal, and calls it
through a real grpcio client.  One test speaks HTTP/2 by hand over Python's ``ssl`` module to offer only
TLS 1.2, which grpcio clients cannot do.

The negative matrix: no client certificate, a certificate from another CA, an expired and a not-yet-valid
certificate, a server certificate used as a client certificate, and a server the client does not trust are
refused at the handshake (UNAVAILABLE on the client) and never reach the method; a certificate with zero
or several URI SANs, and a TLS 1.2 connection, reach it without a principal.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import ssl
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from controller.identity import KeyFileError
from controller.pki import (
    DEFAULT_ROLES,
    SERVER_PRINCIPAL,
    CertificateAuthority,
    Credential,
    PkiExistsError,
    PkiPaths,
    init_pki,
    issue_client_cert,
    load_ca,
    new_ca,
    principal_of,
    role_principal,
    tls_version_of,
)

SERVICE = "passivisor.test.Whoami"
METHOD = f"/{SERVICE}/Principal"
NO_PRINCIPAL = b"<none>"
CALL_TIMEOUT = 10.0


# -- fixtures: the PKI on disk and a real mTLS server --------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki") / "dev")


@pytest.fixture(scope="module")
def ca(pki: PkiPaths) -> CertificateAuthority:
    return load_ca(pki.directory)


@dataclass
class Observed:
    principal: str | None
    auth_context: dict[str, list[bytes]]


@dataclass
class Server:
    port: int
    calls: queue.Queue[Observed]


def _whoami(calls: queue.Queue[Observed]) -> grpc.GenericRpcHandler:
    def principal(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth_context = {name: list(values) for name, values in context.auth_context().items()}
        found = principal_of(auth_context)
        calls.put(Observed(found, auth_context))
        return NO_PRINCIPAL if found is None else found.encode()

    handler = grpc.unary_unary_rpc_method_handler(principal)  # bytes in, bytes out: no serializers
    return grpc.method_handlers_generic_handler(SERVICE, {"Principal": handler})


def start_server(pki: PkiPaths, address: str = "localhost:0") -> tuple[grpc.Server, Server]:
    calls: queue.Queue[Observed] = queue.Queue()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_whoami(calls),))
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_certificate.read_bytes())],
        root_certificates=pki.ca_certificate.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(address, credentials)
    assert port > 0
    server.start()
    return server, Server(port, calls)


@pytest.fixture
def server(pki: PkiPaths) -> Iterator[Server]:
    running, info = start_server(pki)
    yield info
    running.stop(None)


def call(
    port: int,
    root: bytes,
    credential: Credential | None = None,
    *,
    target: str = "localhost",
) -> bytes:
    """One RPC through a fresh channel (a fresh TLS handshake); raises grpc.RpcError."""
    if credential is None:
        credentials = grpc.ssl_channel_credentials(root)
    else:
        credentials = grpc.ssl_channel_credentials(root, credential.private_key_pem(), credential.certificate_pem)
    with grpc.secure_channel(f"{target}:{port}", credentials) as channel:
        response: bytes = channel.unary_unary(METHOD)(b"", timeout=CALL_TIMEOUT)
        return response


def role_credential(pki: PkiPaths, role: str) -> Credential:
    paths = pki.clients[role]
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Credential(x509.load_pem_x509_certificate(paths.certificate.read_bytes()), key)


def assert_refused_at_handshake(server: Server, root: bytes, credential: Credential | None) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(server.port, root, credential)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls.empty()  # the method never ran: nothing to authorize, nothing happened


# -- the PKI on disk -----------------------------------------------------------------------------------------------


def test_init_pki_writes_the_documented_layout_with_exact_modes(pki: PkiPaths) -> None:
    found = {
        str(path.relative_to(pki.directory)): stat.S_IMODE(path.lstat().st_mode) for path in pki.directory.rglob("*")
    }
    expected = {"clients": 0o755, "ca.pem": 0o644, "ca.key": 0o600, "server.pem": 0o644, "server.key": 0o600}
    for role in DEFAULT_ROLES:
        expected[f"clients/{role}.pem"] = 0o644
        expected[f"clients/{role}.key"] = 0o600
    assert found == expected
    assert pki == PkiPaths.of(pki.directory)
    assert all(path.is_file() and not path.is_symlink() for path in pki.directory.rglob("*.*"))


@pytest.mark.parametrize("mask", [0o000, 0o077])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        paths = init_pki(tmp_path / "pki", roles=("auditor",))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.server_certificate.stat().st_mode) == 0o644
    assert stat.S_IMODE(paths.clients["auditor"].key.stat().st_mode) == 0o600


def test_certificates_are_p256_and_carry_the_documented_names(pki: PkiPaths, ca: CertificateAuthority) -> None:
    ca_cert = x509.load_pem_x509_certificate(pki.ca_certificate.read_bytes())
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(pki.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca_cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [SERVER_PRINCIPAL]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    for role in DEFAULT_ROLES:
        client = x509.load_pem_x509_certificate(pki.clients[role].certificate.read_bytes())
        client.verify_directly_issued_by(ca_cert)
        assert principal_of(client) == f"spiffe://controlplane/{role}" == role_principal(role)
        assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
    for certificate in (ca_cert, server):
        public_key = certificate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
        assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)
    assert ca.certificate == ca_cert


def test_init_pki_refuses_an_existing_pki_and_changes_nothing(pki: PkiPaths) -> None:
    before = {path: path.read_bytes() for path in pki.directory.rglob("*.*")}
    with pytest.raises(PkiExistsError):
        init_pki(pki.directory)
    assert {path: path.read_bytes() for path in pki.directory.rglob("*.*")} == before


def test_init_pki_refuses_a_non_empty_directory_a_file_and_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for name in ("busy", "file", "link"):
        with pytest.raises(PkiExistsError):
            init_pki(tmp_path / name)
    assert list((tmp_path / "busy").iterdir()) == [tmp_path / "busy" / "notes.txt"]
    assert list((tmp_path / "empty").iterdir()) == []


def test_init_pki_accepts_an_empty_directory_and_creates_parents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert init_pki(tmp_path / "empty", roles=("auditor",)).ca_certificate.is_file()
    assert init_pki(tmp_path / "a" / "b", roles=("auditor",)).ca_certificate.is_file()


@pytest.mark.parametrize("roles", [(), ("auditor", "auditor"), ("Auditor",), ("../escape",), ("a b",), ("-x",)])
def test_init_pki_rejects_bad_roles_before_creating_anything(tmp_path: Path, roles: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        init_pki(tmp_path / "pki", roles=roles)
    assert list(tmp_path.iterdir()) == []


def test_init_pki_removes_what_it_wrote_when_it_fails_half_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import controller.pki as pki_module

    real = pki_module._create_public_file
    written: list[Path] = []

    def fail_on_the_third(path: Path, data: bytes, *, dir_fd: int | None = None) -> None:
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        real(path, data, dir_fd=dir_fd)
        written.append(path)

    monkeypatch.setattr(pki_module, "_create_public_file", fail_on_the_third)
    (tmp_path / "pki").mkdir()
    with pytest.raises(OSError, match="No space"):
        init_pki(tmp_path / "pki")
    assert list((tmp_path / "pki").iterdir()) == []


def test_load_ca_refuses_a_loose_ca_key(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki", roles=("auditor",))
    paths.ca_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="mode"):
        load_ca(paths.directory)


def test_a_credential_never_shows_its_key() -> None:
    credential = issue_client_cert(new_ca(), role_principal("auditor"))
    pem = credential.private_key_pem()
    body = b"".join(pem.splitlines()[1:-1]).decode()
    assert body[:24] not in repr(credential) and body[:24] not in str(credential)
    assert "private_key" not in repr(credential)


def test_issue_rejects_inverted_or_naive_validity() -> None:
    ca = new_ca()
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(ValueError):
        issue_client_cert(ca, "spiffe://x/y", not_before=now, not_after=now)
    with pytest.raises(ValueError):
        issue_client_cert(ca, "spiffe://x/y", not_before=now.replace(tzinfo=None), not_after=now.replace(tzinfo=None))


def test_a_leaf_never_outlives_its_ca() -> None:
    ca = new_ca(validity_days=2)
    leaf = issue_client_cert(ca, "spiffe://x/y", validity_days=365)
    assert leaf.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


# -- mTLS: accepted ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", DEFAULT_ROLES)
def test_each_role_certificate_is_accepted_and_named_by_its_uri_san(pki: PkiPaths, server: Server, role: str) -> None:
    answer = call(server.port, pki.ca_certificate.read_bytes(), role_credential(pki, role))

    assert answer == f"spiffe://controlplane/{role}".encode()
    assert server.calls.get_nowait().principal == role_principal(role)


def test_the_server_is_reachable_by_its_ip_san(pki: PkiPaths) -> None:
    running, info = start_server(pki, "127.0.0.1:0")
    try:
        answer = call(info.port, pki.ca_certificate.read_bytes(), role_credential(pki, "auditor"), target="127.0.0.1")
    finally:
        running.stop(None)
    assert answer == b"spiffe://controlplane/auditor"


def test_what_grpc_puts_in_the_auth_context(pki: PkiPaths, server: Server) -> None:
    """Pins the grpcio facts that principal_of relies on (documented in controller/pki.py)."""
    credential = role_credential(pki, "telemetry")
    call(server.port, pki.ca_certificate.read_bytes(), credential)
    context = server.calls.get_nowait().auth_context

    assert context["transport_security_type"] == [b"ssl"]
    assert context["security_level"] == [b"TSI_PRIVACY_AND_INTEGRITY"]
    assert context["ssl_tls_version"] == [b"TLSv1.3"]  # what two grpcio peers negotiate
    assert tls_version_of(context) == "TLSv1.3"
    assert context["x509_pem_cert"] == [credential.certificate_pem]  # the leaf, byte for byte
    assert context["x509_subject_alternative_name"] == [b"spiffe://controlplane/telemetry"]
    assert context["peer_uri"] == [b"spiffe://controlplane/telemetry"]
    assert context["x509_common_name"] == [b"telemetry"]


# -- mTLS: refused at the handshake --------------------------------------------------------------------------------


def test_no_client_certificate_is_refused(pki: PkiPaths, server: Server) -> None:
    assert_refused_at_handshake(server, pki.ca_certificate.read_bytes(), None)


def test_a_certificate_from_another_ca_is_refused(pki: PkiPaths, server: Server) -> None:
    impostor = issue_client_cert(new_ca(), role_principal("instance-manager"))  # same principal, wrong issuer
    assert_refused_at_handshake(server, pki.ca_certificate.read_bytes(), impostor)


def test_an_expired_certificate_is_refused(pki: PkiPaths, ca: CertificateAuthority, server: Server) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = issue_client_cert(
        ca,
        role_principal("instance-manager"),
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    assert_refused_at_handshake(server, pki.ca_certificate.read_bytes(), expired)


def test_a_not_yet_valid_certificate_is_refused(pki: PkiPaths, ca: CertificateAuthority, server: Server) -> None:
    now = datetime.datetime.now(datetime.UTC)
    early = issue_client_cert(
        ca,
        role_principal("instance-manager"),
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=30),
    )
    assert_refused_at_handshake(server, pki.ca_certificate.read_bytes(), early)


def test_the_server_certificate_cannot_be_used_as_a_client_certificate(pki: PkiPaths, server: Server) -> None:
    """Its extended key usage is serverAuth only, and BoringSSL enforces it: the controller cannot be a caller."""
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    as_client = Credential(x509.load_pem_x509_certificate(pki.server_certificate.read_bytes()), key)
    assert_refused_at_handshake(server, pki.ca_certificate.read_bytes(), as_client)


def test_the_client_refuses_a_server_it_does_not_trust(pki: PkiPaths, server: Server) -> None:
    """Mutual authentication (claim C11): a client that trusts another CA does not talk to this server."""
    assert_refused_at_handshake(server, new_ca().certificate_pem, role_credential(pki, "auditor"))


def test_ed25519_leaf_certificates_fail_with_grpcio_which_is_why_the_pki_uses_p256(
    pki: PkiPaths, ca: CertificateAuthority, server: Server
) -> None:
    """If this starts to pass, grpcio accepts Ed25519 and the key-type choice in pki.py may be revisited."""
    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed25519 client")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://x/ed")]), critical=False)
        .sign(ca.credential.private_key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    credentials = grpc.ssl_channel_credentials(
        pki.ca_certificate.read_bytes(), pem_key, certificate.public_bytes(serialization.Encoding.PEM)
    )
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(METHOD)(b"", timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls.empty()


# -- mTLS: accepted by TLS, but no principal -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "extra", "dns"),
    [
        pytest.param(None, (), (), id="no-san-at-all"),
        pytest.param(None, (), ("instance-manager.example",), id="dns-san-only"),
        pytest.param("spiffe://controlplane/auditor", ("spiffe://controlplane/instance-manager",), (), id="two-uris"),
        pytest.param("spiffe://controlplane/a b", (), (), id="uri-with-a-space"),
    ],
)
def test_a_certificate_without_a_single_clean_uri_san_has_no_principal(
    pki: PkiPaths,
    ca: CertificateAuthority,
    server: Server,
    uri: str | None,
    extra: tuple[str, ...],
    dns: tuple[str, ...],
) -> None:
    credential = issue_client_cert(ca, uri, extra_uris=extra, dns_names=dns)

    assert call(server.port, pki.ca_certificate.read_bytes(), credential) == NO_PRINCIPAL

    observed = server.calls.get_nowait()
    assert observed.principal is None
    assert observed.auth_context["ssl_tls_version"] == [b"TLSv1.3"]  # TLS itself was fine


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: str, value: str) -> bytes:
    # RFC 7541 §6.2.2: literal header field without indexing, new name, no Huffman coding.
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def test_a_tls12_connection_completes_the_handshake_but_has_no_principal(pki: PkiPaths, server: Server) -> None:
    """grpcio servers cannot refuse TLS 1.2 (no minimum-version option); principal_of refuses it instead.

    grpcio clients always offer TLS 1.3, so this client is Python's ``ssl`` limited to TLS 1.2, speaking
    just enough HTTP/2 (RFC 9113) and gRPC framing to make one call.
    """
    context = ssl.create_default_context(cafile=str(pki.ca_certificate))
    context.load_cert_chain(str(pki.clients["instance-manager"].certificate), str(pki.clients["instance-manager"].key))
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    headers = b"".join(
        _hpack_literal(name, value)
        for name, value in [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", METHOD),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    message = b"\x00" + (0).to_bytes(4, "big")  # one uncompressed, empty gRPC message
    with (
        socket.create_connection(("localhost", server.port), timeout=CALL_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        tls.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _h2_frame(0x4, 0x0, 0, b"")  # SETTINGS
            + _h2_frame(0x4, 0x1, 0, b"")  # SETTINGS ACK for the server's settings, sent ahead
            + _h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _h2_frame(0x0, 0x1, 1, message)  # DATA, END_STREAM
        )
        observed = server.calls.get(timeout=CALL_TIMEOUT)

    assert observed.auth_context["ssl_tls_version"] == [b"TLSv1.2"]
    assert observed.auth_context["x509_pem_cert"] == [pki.clients["instance-manager"].certificate.read_bytes()]
    assert observed.principal is None


# -- principal_of without a network --------------------------------------------------------------------------------


def _context(credential: Credential, **overrides: list[bytes]) -> dict[str, list[bytes]]:
    context = {
        "transport_security_type": [b"ssl"],
        "ssl_tls_version": [b"TLSv1.3"],
        "x509_pem_cert": [credential.certificate_pem],
    }
    context.update(overrides)
    return {name: values for name, values in context.items() if values}


def test_principal_of_accepts_pem_certificate_and_auth_context() -> None:
    credential = issue_client_cert(new_ca(), "spiffe://controlplane/auditor")
    assert principal_of(credential.certificate_pem) == "spiffe://controlplane/auditor"
    assert principal_of(credential.certificate) == "spiffe://controlplane/auditor"
    assert principal_of(_context(credential)) == "spiffe://controlplane/auditor"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"transport_security_type": [b"insecure"]}, id="not-tls"),
        pytest.param({"transport_security_type": []}, id="no-transport-type"),
        pytest.param({"ssl_tls_version": []}, id="tls-version-not-reported"),
        pytest.param({"ssl_tls_version": [b"TLSv1.2"]}, id="tls12"),
        pytest.param({"ssl_tls_version": [b"TLSv1.3", b"TLSv1.3"]}, id="two-versions"),
        pytest.param({"x509_pem_cert": []}, id="no-certificate"),
        pytest.param({"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]}, id="junk"),
    ],
)
def test_principal_of_an_incomplete_or_weak_auth_context_is_none(overrides: dict[str, list[bytes]]) -> None:
    credential = issue_client_cert(new_ca(), "spiffe://controlplane/auditor")
    assert principal_of(_context(credential, **overrides)) is None


def test_principal_of_two_peer_certificates_is_none() -> None:
    credential = issue_client_cert(new_ca(), "spiffe://controlplane/auditor")
    assert principal_of(_context(credential, x509_pem_cert=[credential.certificate_pem] * 2)) is None


def test_principal_of_an_overlong_uri_is_none() -> None:
    ca = new_ca()
    assert principal_of(issue_client_cert(ca, "spiffe://x/" + "a" * 2037).certificate) is not None  # 2048 chars
    assert principal_of(issue_client_cert(ca, "spiffe://x/" + "a" * 2038).certificate) is None


@given(st.binary(max_size=2048))
def test_principal_of_is_total_over_bytes(data: bytes) -> None:
    assert principal_of(data) is None


_values = st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=8), st.integers()), max_size=3)
_names = st.sampled_from(["transport_security_type", "ssl_tls_version", "x509_pem_cert", "peer_uri", "other"])


@given(st.dictionaries(_names, st.one_of(_values, st.binary(max_size=8), st.none()), max_size=5))
def test_principal_of_is_total_over_auth_contexts(context: dict[str, object]) -> None:
    assert principal_of(context) is None  # type: ignore[arg-type]
