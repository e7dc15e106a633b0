"""Development PKI for the controller's mTLS, and the mapping from a peer certificate to a principal.

Theory of operation (issue 4 §2 and §10; claims C3, C11)
--------------------------------------------------------
Every control-plane service reaches the controller over gRPC with TLS 1.3 and a client certificate.  Its
*principal* is the single URI subject-alternative name of that certificate, by convention a SPIFFE ID
such as ``spiffe://controlplane/instance-manager``.  Authorization (the policy) maps principals to methods;
this module only establishes who is calling, and :func:`principal_of` answers ``None`` ("unauthenticated")
whenever the answer is not unambiguous.

:func:`init_pki` (``pvctl pki init DIR``) creates a self-contained development PKI::

    DIR/ca.pem                  development CA certificate (0644): the trust root of both sides
    DIR/ca.key                  CA private key (0600): development only; a production CA key stays offline
    DIR/server.pem              controller certificate (0644): SAN DNS localhost, IP 127.0.0.1 and ::1,
                                URI spiffe://host/controller; extended key usage serverAuth
    DIR/server.key              its private key (0600)
    DIR/clients/<role>.pem      one client certificate per role (0644): SAN URI spiffe://controlplane/<role>;
                                extended key usage clientAuth
    DIR/clients/<role>.key      its private key (0600)

Key type: ECDSA P-256 with SHA-256 signatures everywhere.  Measured against grpcio 1.85 (BoringSSL):
P-256 works for the CA, the server and the client certificates.  Ed25519 *leaf* keys fail the handshake
with ``NO_COMMON_SIGNATURE_ALGORITHMS`` (gRPC's TLS stack does not offer Ed25519 signature schemes),
although an Ed25519 CA may sign P-256 leaves; one key type throughout is the simpler rule.
BoringSSL enforces the extended key usage: a serverAuth-only certificate is refused as a client
certificate and the other way round, so the controller's own certificate cannot act as a caller.

What gRPC shows the server (``ServicerContext.auth_context()``, grpcio 1.85; values are lists of bytes)
-------------------------------------------------------------------------------------------------------
``transport_security_type`` ``[b"ssl"]``; ``security_level`` ``[b"TSI_PRIVACY_AND_INTEGRITY"]``;
``ssl_tls_version`` ``[b"TLSv1.3"]``; ``ssl_session_reused``; ``ssl_requested_server_name`` (the SNI);
``ssl_negotiated_key_exchange_group`` (``X25519MLKEM768`` between two grpcio peers); ``x509_subject``
(``CN=...``); ``x509_common_name``; ``x509_pem_cert`` (the peer's leaf certificate as PEM);
``x509_subject_alternative_name`` (DNS, URI and IP SANs *mixed, without their type*); ``peer_dns``;
``peer_uri`` (URI SANs only); ``peer_spiffe_id`` (only when there is exactly one URI SAN and it is a valid
SPIFFE ID).  Entries without a value are absent, not empty.

:func:`principal_of` parses ``x509_pem_cert`` itself rather than trusting the untyped
``x509_subject_alternative_name`` list, in which a DNS name and a URI cannot be told apart.

TLS 1.3
-------
grpcio's Python API has no minimum-TLS-version option for servers (grpc/grpc#37305), and
``GRPC_SSL_CIPHER_SUITES`` only selects TLS 1.2 cipher suites: a list of TLS 1.3 suites alone makes the
server's port fail to bind.  A grpcio server therefore *completes* a TLS 1.2 handshake with a client that
offers only TLS 1.2 (tested).  The version is observable, though: ``ssl_tls_version``.  So TLS 1.3 is
enforced here: a peer whose auth context does not say ``TLSv1.3`` has no principal and is refused as
unauthenticated by the controller.  A grpcio without ``ssl_tls_version`` therefore fails closed.

Invariants
----------
- :func:`principal_of` is total: any input gives a principal or ``None``, never an exception.
- Private keys are written only by :func:`controller.identity.create_private_file` (mode 0600, ``O_EXCL``);
  they are never printed or logged; :class:`Credential` keeps its key out of ``repr``.
- :func:`init_pki` never overwrites: it refuses a non-empty directory and creates every file with ``O_EXCL``.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.identity import create_private_file, read_private_file

__all__ = [
    "CLIENT_TRUST_DOMAIN",
    "DEFAULT_ROLES",
    "DEFAULT_VALIDITY_DAYS",
    "REQUIRED_TLS_VERSION",
    "SERVER_PRINCIPAL",
    "CertificateAuthority",
    "ClientPaths",
    "Credential",
    "PkiError",
    "PkiExistsError",
    "PkiPaths",
    "init_pki",
    "issue_client_cert",
    "issue_server_cert",
    "load_ca",
    "new_ca",
    "principal_of",
    "role_principal",
    "tls_version_of",
]

DEFAULT_ROLES: tuple[str, ...] = ("instance-manager", "volume-attacher", "network-manager", "telemetry", "auditor")
"""The control-plane roles of the shipped default policy (issue 4 §3)."""

CLIENT_TRUST_DOMAIN = "controlplane"
SERVER_PRINCIPAL = "spiffe://host/controller"
DEFAULT_VALIDITY_DAYS = 365
REQUIRED_TLS_VERSION = "TLSv1.3"

MAX_PRINCIPAL_LENGTH = 2048
"""A principal is copied into every audit record; a longer URI SAN is refused rather than stored."""

_ROLE = re.compile(r"[a-z][a-z0-9-]{0,62}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_PUBLIC_MODE = 0o644
_DIRECTORY_MODE = 0o755
_MAX_KEY_FILE = 16 * 1024


class PkiError(Exception):
    """The PKI cannot be created or loaded.  Messages never contain key material."""


class PkiExistsError(PkiError):
    """The target directory already holds files; a PKI is never overwritten."""


def role_principal(role: str) -> str:
    """The principal (URI SAN) of a control-plane role: ``spiffe://controlplane/<role>``."""
    _check_role(role)
    return f"spiffe://{CLIENT_TRUST_DOMAIN}/{role}"


# --------------------------------------------------------------------------------------------------------------
# Certificates in memory


@dataclass(frozen=True)
class Credential:
    """A certificate and its private key, in memory.  ``repr`` never shows the key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, the form ``grpc.ssl_*_credentials`` take.  Never print or log it."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, certificate_path: Path, key_path: Path) -> None:
        """Write the key (0600) and the certificate (0644) to two new files; neither may exist."""
        create_private_file(Path(key_path), self.private_key_pem())
        try:
            _create_public_file(Path(certificate_path), self.certificate_pem)
        except BaseException:
            Path(key_path).unlink(missing_ok=True)
            raise


class CertificateAuthority:
    """A signing CA.  Issued leaves are ECDSA P-256 certificates signed with ECDSA-SHA256."""

    def __init__(self, credential: Credential) -> None:
        try:
            constraints = credential.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise PkiError("the certificate is not a CA certificate") from None
        if not constraints.ca:
            raise PkiError("the certificate is not a CA certificate")
        if credential.certificate.public_key() != credential.private_key.public_key():
            raise PkiError("the CA private key does not match the CA certificate")
        self._credential = credential

    @property
    def certificate(self) -> x509.Certificate:
        return self._credential.certificate

    @property
    def certificate_pem(self) -> bytes:
        return self._credential.certificate_pem

    @property
    def credential(self) -> Credential:
        return self._credential

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.certificate.subject.rfc4514_string()!r})"

    def issue(
        self,
        common_name: str,
        *,
        usage: x509.ObjectIdentifier,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        validity_days: int = DEFAULT_VALIDITY_DAYS,
    ) -> Credential:
        """Issue a leaf certificate for a new P-256 key.

        ``usage`` is the extended key usage (``ExtendedKeyUsageOID.SERVER_AUTH`` or ``CLIENT_AUTH``).  Without
        explicit bounds the certificate is valid from a few minutes ago (clock skew) for ``validity_days``,
        and never beyond the CA's own expiry.  Explicit bounds are taken as given, so that tests can make an
        expired or a not-yet-valid certificate.
        """
        now = _now()
        start = now - _CLOCK_SKEW if not_before is None else not_before
        if not_after is None:
            end = min(
                start + _CLOCK_SKEW + datetime.timedelta(days=validity_days), self.certificate.not_valid_after_utc
            )
        else:
            end = not_after
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("certificate validity bounds must be timezone-aware")
        if not start < end:
            raise ValueError("not_before must precede not_after")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
        names += [x509.DNSName(_check_dns_name(name)) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        key = ec.generate_private_key(ec.SECP256R1())
        ca_key_id = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(leaf=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Credential(builder.sign(self._credential.private_key, hashes.SHA256()), key)


def new_ca(
    common_name: str = "passivisor development CA", *, validity_days: int = DEFAULT_VALIDITY_DAYS
) -> CertificateAuthority:
    """A new self-signed CA in memory (also "a certificate from another CA" in the negative tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "passivisor"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start = _now() - _CLOCK_SKEW
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _CLOCK_SKEW + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(leaf=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(Credential(certificate, key))


def issue_server_cert(
    ca: CertificateAuthority,
    *,
    server_names: Sequence[str] = ("localhost",),
    server_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    principal_uri: str = SERVER_PRINCIPAL,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
) -> Credential:
    """The controller's certificate: DNS and IP SANs for the client's host-name check, and its own URI SAN."""
    return ca.issue(
        "passivisor controller",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        uris=[principal_uri],
        dns_names=server_names,
        ip_addresses=server_addresses,
        validity_days=validity_days,
    )


def issue_client_cert(
    ca: CertificateAuthority,
    principal_uri: str | None,
    *,
    extra_uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
) -> Credential:
    """A client certificate whose URI SAN is ``principal_uri``.

    For the negative tests: ``principal_uri=None`` makes a certificate without a URI SAN, ``extra_uris`` one
    with several, and a past ``not_after`` an expired one.
    """
    uris = ([] if principal_uri is None else [principal_uri]) + list(extra_uris)
    # The common name is informative only (the principal is the URI SAN); X.509 caps it at 64 characters.
    common_name = principal_uri.rsplit("/", 1)[-1] if principal_uri else ""
    if not 0 < len(common_name.encode()) <= 64:
        common_name = "passivisor client"
    return ca.issue(
        common_name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        uris=uris,
        dns_names=dns_names,
        not_before=not_before,
        not_after=not_after,
        validity_days=validity_days,
    )


# --------------------------------------------------------------------------------------------------------------
# The development PKI on disk


@dataclass(frozen=True)
class ClientPaths:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class PkiPaths:
    """Where :func:`init_pki` puts each file (see the layout in the module docstring)."""

    directory: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    clients: Mapping[str, ClientPaths]

    @classmethod
    def of(cls, directory: Path, roles: Iterable[str] = DEFAULT_ROLES) -> PkiPaths:
        """The layout for ``directory``, computed without touching the file system."""
        directory = Path(directory)
        clients = directory / "clients"
        return cls(
            directory=directory,
            ca_certificate=directory / "ca.pem",
            ca_key=directory / "ca.key",
            server_certificate=directory / "server.pem",
            server_key=directory / "server.key",
            clients={
                role: ClientPaths(clients / f"{_check_role(role)}.pem", clients / f"{role}.key") for role in roles
            },
        )


def init_pki(
    directory: Path,
    roles: Sequence[str] = DEFAULT_ROLES,
    *,
    server_names: Sequence[str] = ("localhost",),
    server_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    validity_days: int = DEFAULT_VALIDITY_DAYS,
) -> PkiPaths:
    """Create a development CA, the controller's certificate and one client certificate per role.

    ``directory`` must not exist (it is created, with its parents) or be an empty directory; anything else
    raises :class:`PkiExistsError`.  If creation fails half-way, the files already written are removed.
    """
    roles = tuple(roles)
    if not roles or len(set(roles)) != len(roles):
        raise ValueError("roles must be a non-empty list of distinct names")
    paths = PkiPaths.of(directory, roles)  # validates the role names
    if validity_days < 1:
        raise ValueError("validity_days must be at least 1")
    for name in server_names:
        _check_dns_name(name)
    for address in server_addresses:
        ipaddress.ip_address(address)

    # Everything is generated in memory first, so that a bad argument fails before a file exists.
    ca = new_ca(validity_days=validity_days)
    server = issue_server_cert(
        ca, server_names=server_names, server_addresses=server_addresses, validity_days=validity_days
    )
    clients = {role: issue_client_cert(ca, role_principal(role), validity_days=validity_days) for role in roles}

    directory_fd = _open_empty_directory(paths.directory)
    created: list[tuple[int, str]] = []
    clients_fd = -1
    try:
        os.mkdir("clients", _DIRECTORY_MODE, dir_fd=directory_fd)
        created.append((directory_fd, "clients"))
        clients_fd = os.open(
            "clients", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd
        )
        os.fchmod(clients_fd, _DIRECTORY_MODE)
        files: list[tuple[int, str, Credential]] = [
            (directory_fd, "ca", ca.credential),
            (directory_fd, "server", server),
            *((clients_fd, role, credential) for role, credential in clients.items()),
        ]
        for fd, stem, credential in files:
            create_private_file(Path(f"{stem}.key"), credential.private_key_pem(), dir_fd=fd)
            created.append((fd, f"{stem}.key"))
            _create_public_file(Path(f"{stem}.pem"), credential.certificate_pem, dir_fd=fd)
            created.append((fd, f"{stem}.pem"))
        os.fsync(clients_fd)
        os.fsync(directory_fd)
    except BaseException:
        for fd, name in reversed(created):
            try:
                if name == "clients":
                    os.rmdir(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                pass  # best effort: the original error is the one to report
        raise
    finally:
        if clients_fd >= 0:
            os.close(clients_fd)
        os.close(directory_fd)
    return paths


def load_ca(directory: Path) -> CertificateAuthority:
    """Load the development CA of :func:`init_pki` (to issue more certificates from it).

    ``ca.key`` must pass :func:`controller.identity.read_private_file` (0600, owned, not a link).
    """
    paths = PkiPaths.of(directory, ())
    try:
        certificate = x509.load_pem_x509_certificate(paths.ca_certificate.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read {paths.ca_certificate}: {exc.strerror}") from None
    except ValueError:
        raise PkiError(f"{paths.ca_certificate} is not a PEM certificate") from None
    data = read_private_file(paths.ca_key, max_size=_MAX_KEY_FILE)
    try:
        key = serialization.load_pem_private_key(bytes(data), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # TypeError: an encrypted key.  The message never repeats the file's content.
        raise PkiError(f"{paths.ca_key} is not an unencrypted PEM private key") from None
    finally:
        data[:] = bytes(len(data))
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{paths.ca_key} is not an ECDSA P-256 key")
    return CertificateAuthority(Credential(certificate, key))


# --------------------------------------------------------------------------------------------------------------
# From a peer to a principal

AuthContext = Mapping[str, Sequence[bytes]]
"""What ``grpc.ServicerContext.auth_context()`` returns: property name -> list of values."""


def principal_of(peer: AuthContext | bytes | x509.Certificate) -> str | None:
    """The caller's principal: the single URI SAN of its certificate, or ``None`` (unauthenticated).

    ``peer`` is a gRPC auth context (the server's view of an mTLS connection), a PEM certificate, or a
    parsed certificate.  For an auth context, ``None`` also when the transport is not TLS, when the TLS
    version is not 1.3 (see the module docstring) or when the context does not hold exactly one peer
    certificate.  For every input, ``None`` when the certificate has zero or several URI SANs, or a URI that
    is empty, longer than :data:`MAX_PRINCIPAL_LENGTH` or not printable ASCII.

    This function does not verify the certificate: it names the peer that the TLS handshake has already
    verified against the CA.  It never raises.
    """
    try:
        if isinstance(peer, x509.Certificate):
            return _single_uri(peer)
        if isinstance(peer, bytes | bytearray):
            return _single_uri(x509.load_pem_x509_certificate(bytes(peer)))
        if not isinstance(peer, Mapping):
            return None
        if _only_value(peer, "transport_security_type") != b"ssl":
            return None
        if tls_version_of(peer) != REQUIRED_TLS_VERSION:
            return None
        pem = _only_value(peer, "x509_pem_cert")
        if pem is None:
            return None
        return _principal_of_pem(pem)
    except Exception:  # total by contract, and fail closed: whatever a malformed input raises means "no principal"
        return None


@functools.lru_cache(maxsize=1024)
def _principal_of_pem(pem: bytes) -> str | None:
    """The principal of a peer certificate the TLS handshake verified, memoized by its exact PEM bytes.

    A pure function of its argument (no clock, no CA), so a cached answer is the answer: the chain and
    validity were checked by the handshake that produced ``pem``.  Parsing the certificate was a tenth of an
    authorized call's cost; a control plane has a handful of client certificates, and the bound keeps a
    flood of distinct ones from growing the cache.
    """
    return _single_uri(x509.load_pem_x509_certificate(pem))


def tls_version_of(auth_context: AuthContext) -> str | None:
    """The negotiated TLS version (``"TLSv1.3"``) from a gRPC auth context, or ``None`` if not reported."""
    value = _only_value(auth_context, "ssl_tls_version")
    if value is None or not value.isascii():
        return None
    return value.decode("ascii")


def _only_value(auth_context: AuthContext, name: str) -> bytes | None:
    values = auth_context.get(name)
    if values is None or isinstance(values, bytes | str) or len(values) != 1:
        return None
    value = values[0]
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def _single_uri(certificate: x509.Certificate) -> str | None:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    uri = uris[0]
    # Printable ASCII without spaces: the principal goes into audit records and log lines verbatim.
    if not 0 < len(uri) <= MAX_PRINCIPAL_LENGTH or not all("!" <= character <= "~" for character in uri):
        return None
    return uri


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


def _check_role(role: str) -> str:
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        raise ValueError(
            f"a role name is 1 to 63 lowercase letters, digits and dashes, starting with a letter: {role!r}"
        )
    return role


def _check_dns_name(name: str) -> str:
    if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
        raise ValueError(f"not a DNS name: {name!r}")
    return name


def _open_empty_directory(directory: Path) -> int:
    try:
        directory.mkdir(mode=_DIRECTORY_MODE, parents=True)
    except FileExistsError:
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode):
            raise PkiExistsError(f"{directory} exists and is not a directory") from None
        if any(directory.iterdir()):
            raise PkiExistsError(f"{directory} is not empty; refusing to overwrite a PKI") from None
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PkiError(f"cannot open {directory}: {exc.strerror}") from None


def _create_public_file(path: Path, data: bytes, *, dir_fd: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _PUBLIC_MODE, dir_fd=dir_fd)
    try:
        os.fchmod(fd, _PUBLIC_MODE)  # exactly 0644, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path, dir_fd=dir_fd)
        raise
    os.close(fd)
