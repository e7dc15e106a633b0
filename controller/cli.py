"""pvctl: the command-line client of the controller's gRPC API (issue 4 §10; claims C2, C3, C5, C7, C16).

Theory of operation
-------------------
One subcommand per RPC of ``proto/passivisor/v1/controller.proto`` (``start``, ``stop``, ``attach``, ``detach``,
``assign-vf``, ``release-vf``, ``describe``, ``list``, ``identity``, ``audit read``, ``metrics``, ``events``),
plus some that work without a controller: ``pki init DIR`` (the development PKI of :mod:`controller.pki`),
``audit verify`` (which also verifies a log file offline), and ``volume create`` / ``volume wrap`` (an encrypted
volume file and the envelope of its key, :mod:`controller.volumetool`; they call GetHostIdentity only when the
host's public key is not given).  A run is three steps, each in one place:

1. *Parse*: argparse with strict value types (canonical UUIDs, exact hex lengths, MAC and PCI formats), then the
   request message is checked against the constraints the .proto declares (:mod:`controller.api.constraints`),
   the same rules the controller enforces (claim C2: both sides validate; the server stays the authority).
   Anything wrong is a usage error: exit status 2 before any connection is made.
2. *Call*: a gRPC channel with mutual TLS (the CA, the client certificate and its key), one deadline per call.
3. *Print*: human-readable lines by default, or exactly one JSON document with ``--json`` (protobuf's JSON
   mapping with the .proto field names; ``events --follow --json`` prints one document per line instead).

Errors are exactly one line on stderr, ``pvctl: <WHAT>: <details>``, where WHAT is the gRPC status code name
for a failed call (exit status 1), ``usage`` for bad arguments or unusable local files (exit status 2), and the
subcommand for a local failure (``pki init``, ``audit verify``; exit status 1).  Field violations and retry hints
the controller attaches to a status (``google.rpc.BadRequest`` and ``google.rpc.RetryInfo`` in
``grpc-status-details-bin``, or a ``BadRequest`` in ``passivisor-field-violations-bin``) are appended to that line.

Mutating calls carry a client token (idempotency, issue 4 §6).  pvctl generates a fresh one unless
``--client-token`` is given, and shows it on success and on failure, so that a caller who does not know whether
a call ran can retry it with the same token and get the first result instead of a second execution.

Connection options: ``--endpoint HOST:PORT --ca FILE --cert FILE --key FILE``, or ``--dev DIR`` which reads
``DIR/dev.json`` as ``pvctl dev up`` writes it (``endpoint``, ``ca``, ``roles``: role -> ``cert``, ``key``;
relative paths are relative to DIR).  With ``--dev`` and no ``--role``, pvctl takes the first role (in the order
of :data:`controller.pki.DEFAULT_ROLES`) that the shipped default policy allows every method of the subcommand.

Invariants
----------
- Nothing secret is printed: private keys are read only to build the channel credentials, and ``attach`` sends
  the volume envelope (key material, claim C8) and never shows it, not even its length.  ``volume create`` and
  ``volume wrap`` never show the data key; the envelope they write is shown only by ``--json`` (as
  ``envelope_base64``), since only the host it is wrapped to can open it.
- Every text that comes from the server is printed with control characters replaced, so an answer cannot
  rewrite the operator's terminal; an error line is always a single line.
- pvctl never retries a mutating call by itself; read-only paging (``audit verify``, ``events --follow``)
  waits out a rate-limit refusal that carries a short retry hint.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from controller import volumetool
from controller.api import constraints
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.api.rpc_status import RPC, STATUS_DETAILS_KEY, decode_status
from controller.audit.chain import (
    MAX_LINE_BYTES,
    ChainBroken,
    CheckpointRecord,
    RecordError,
    Verifier,
    VerifyReport,
    decode,
)
from controller.audit.checkpoint import SigningKeyError, public_key_from_bytes
from controller.identity import KeyFileError, read_private_file
from controller.pki import DEFAULT_ROLES, PkiError, PkiPaths, init_pki, role_principal
from controller.policy import Method, load_default

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "FIELD_VIOLATIONS_KEY",
    "STATUS_DETAILS_KEY",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "pvctl"
DEFAULT_DEADLINE = 30.0
MAX_DEADLINE = 3600.0
DEFAULT_STOP_TIMEOUT = 30
# A graceful stop may take its whole ACPI timeout; without an explicit --timeout the deadline leaves this margin.
STOP_DEADLINE_MARGIN = 30.0
DEV_FILE = "dev.json"
MAX_LOCAL_FILE = 1 << 20  # certificates, dev.json, public keys: a few KiB; refuse to read more
MAX_ENVELOPE = 1024  # AttachVolumeRequest.envelope max_len
AUDIT_PAGE = 1000  # ReadAuditLogRequest.max_records max
VERIFY_PAGE = AUDIT_PAGE  # page size of the audit verify walk
EVENTS_PAGE = 64  # PollEventsRequest.max_events max
LIST_PAGE = 256  # ListInstancesRequest.page_size max
# A page of 1000 audit records is at most about 1000 * (8 KiB line + its decoded view); gRPC's default 4 MiB
# receive limit could refuse a legitimate page, and an unbounded one would let a server exhaust memory.
MAX_RECEIVE_BYTES = 32 << 20
MAX_RETRY_WAIT = 10.0  # the longest rate-limit retry hint that paging waits out
MAX_RETRIES = 5
MAX_ERROR_LINE = 2000
MAX_VIOLATIONS_SHOWN = 16

FIELD_VIOLATIONS_KEY = "passivisor-field-violations-bin"
"""Trailing metadata of a serialized ``google.rpc.BadRequest``, for a server without grpcio-status."""

HELP_EPILOG = """\
exit status: 0 success; 1 the call or the local operation failed (one line on stderr: pvctl: CODE: details);
2 usage error (bad arguments or unusable local files).
connection: --endpoint HOST:PORT --ca FILE --cert FILE --key FILE, or --dev DIR [--role ROLE].
"""


# --------------------------------------------------------------------------------------------------------------
# Errors


class UsageError(Exception):
    """Bad arguments or an unusable local file: exit status 2, nothing was sent."""


class CommandFailed(Exception):
    """A local operation failed (``what`` names it): exit status 1."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


class RpcFailure(Exception):
    """A call answered with a non-OK status, decoded for one error line: exit status 1."""

    def __init__(self, code: grpc.StatusCode, details: str, violations: Sequence[tuple[str, str]] = (),
                 retry_after: float | None = None, client_token: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.violations = tuple(violations)
        self.retry_after = retry_after
        self.client_token = client_token

    def detail(self) -> str:
        """Everything after the code on the error line."""
        parts = [_one_line(self.details) or "(no details)"]
        if self.violations:
            shown = [f"{_one_line(path) or '(request)'}: {_one_line(description)}"
                     for path, description in self.violations[:MAX_VIOLATIONS_SHOWN]]
            more = len(self.violations) - len(shown)
            parts.append("field violations: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else ""))
        if self.retry_after is not None:
            parts.append(f"retry after {self.retry_after:.3f} s")
        if self.client_token is not None:
            parts.append(f"client token {self.client_token} (retry with --client-token {self.client_token} "
                         "to get the first result instead of a second execution)")
        return "; ".join(parts)


def _metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> bytes | None:
    for name, value in metadata or ():
        if name == key and isinstance(value, bytes):
            return value
    return None


def _violations_of(bad_request: Any) -> list[tuple[str, str]]:
    return [(str(v.field), str(v.description)) for v in bad_request.field_violations]


def decode_failure(error: grpc.RpcError, *, client_token: str | None = None) -> RpcFailure:
    """The status of a failed call with the details the server attached; malformed details are ignored."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or ""
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    raw_status = _metadata_value(trailing, STATUS_DETAILS_KEY)
    if raw_status is not None:
        violations, retry_after = decode_status(raw_status, code.value[0])
    raw_violations = _metadata_value(trailing, FIELD_VIOLATIONS_KEY)
    if raw_violations is not None and not violations:
        try:
            violations = _violations_of(RPC["BadRequest"].FromString(raw_violations))
        except DecodeError:
            pass
    return RpcFailure(code, details, tuple(violations), retry_after, client_token)


# --------------------------------------------------------------------------------------------------------------
# Argument types: strict, with messages that say what is expected


def _contract_pattern(message: Any, field_name: str) -> re.Pattern[str]:
    constraint = constraints.constraint_of(message.DESCRIPTOR.fields_by_name[field_name])
    return re.compile(constraint.pattern)


# The UUID rule of the .proto itself (lowercase 8-4-4-4-12, RFC 9562 variant), read from the descriptor.
_UUID = _contract_pattern(pb.StartInstanceRequest, "instance_id")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_HEX = re.compile(r"[0-9a-fA-F]*")
_PCI = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


def canonical_uuid(text: str) -> str:
    """A canonical UUID string as the .proto requires; a near miss gets the canonical spelling as a hint."""
    if _UUID.fullmatch(text):
        return text
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{_printable(text[:64])!r} is not a UUID (lowercase 8-4-4-4-12 hex)") from None
    if _UUID.fullmatch(str(parsed)):
        raise argparse.ArgumentTypeError(f"{_printable(text[:64])!r} is not in canonical form; use {parsed}")
    raise argparse.ArgumentTypeError(
        f"{parsed} is not an RFC 9562 UUID (the first digit of the fourth group must be 8, 9, a or b)")


def decimal(text: str) -> int:
    """A non-negative decimal integer: digits only (no sign, underscores, spaces or 0x)."""
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{_printable(text[:32])!r} is not a non-negative decimal integer")
    return int(text)


def _hex_bytes(size: int, what: str) -> Callable[[str], bytes]:
    def parse(text: str) -> bytes:
        if len(text) != 2 * size or not _HEX.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{what} is {size} bytes: expected {2 * size} hex digits, got {len(text)} characters"
                + ("" if _HEX.fullmatch(text) else " that are not all hex digits"))
        return bytes.fromhex(text)

    parse.__name__ = what  # argparse names the type in some messages
    return parse


image_digest = _hex_bytes(32, "an image digest (SHA-256)")
image_signature = _hex_bytes(64, "an image signature (Ed25519)")
host_public_key_hex = _hex_bytes(32, "an X25519 public key")


def volume_size(text: str) -> int:
    """``N[K|M|G|T]``, 1M..1T, whole 512-byte sectors (:func:`controller.volumetool.parse_size`)."""
    try:
        return volumetool.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pci_address(text: str) -> pb.PciAddress:
    """``dddd:bb:dd.f`` in hex (case-insensitive): domain, bus, device 00..1f, function 0..7."""
    found = _PCI.fullmatch(text)
    if found is None:
        raise argparse.ArgumentTypeError(
            f"{_printable(text[:32])!r} is not a PCI address: expected dddd:bb:dd.f in hex (e.g. 0000:03:00.0)")
    domain, bus, device, function = (int(part, 16) for part in found.groups())
    if device > 0x1F:
        raise argparse.ArgumentTypeError(f"{text}: the PCI device number is 00..1f, got {device:02x}")
    return pb.PciAddress(domain=domain, bus=bus, device=device, function=function)


def mac_address(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff``: six hex octets, unicast and not all zero (as the controller and agent check)."""
    if not _MAC.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{_printable(text[:32])!r} is not a MAC address: expected six hex octets, aa:bb:cc:dd:ee:ff")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address; a virtual function needs a unicast one")
    if not any(mac):
        raise argparse.ArgumentTypeError(f"{text} is all zero")
    return mac


def endpoint(text: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 literal), port 1..65535."""
    found = _HOST_PORT.fullmatch(text)
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        raise argparse.ArgumentTypeError(f"{_printable(text[:64])!r} is not HOST:PORT with a port in 1..65535")
    return text


def deadline_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_DEADLINE:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"{_printable(text[:32])!r} is not a number of seconds in (0, {MAX_DEADLINE:g}]")
    return value


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = decimal(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


# --------------------------------------------------------------------------------------------------------------
# Output helpers

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _printable(text: str) -> str:
    """Server- or user-supplied text made safe for a terminal: anything but printable ASCII becomes '?'."""
    return _NOT_PRINTABLE.sub("?", text)


def _one_line(text: str) -> str:
    line = _printable(" ".join(text.split()))
    return line if len(line) <= MAX_ERROR_LINE else line[: MAX_ERROR_LINE - 3] + "..."


def _enum_name(enum_type: Any, value: int, prefix: str) -> str:
    try:
        name = str(enum_type.Name(value))
    except ValueError:
        return f"UNKNOWN({value})"  # answers may gain enum values later (controller.proto conventions)
    return name.removeprefix(prefix)


def _time(timestamp: Timestamp) -> str:
    try:
        moment: datetime.datetime = timestamp.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):
        return f"{timestamp.seconds}s"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_pci(address: pb.PciAddress) -> str:
    return f"{address.domain:04x}:{address.bus:02x}:{address.device:02x}.{address.function:x}"


def _to_dict(message: Message) -> dict[str, Any]:
    document: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                         always_print_fields_with_no_presence=True)
    return document


def instance_lines(instance: pb.InstanceInfo) -> list[str]:
    cpus = ",".join(str(cpu) for cpu in instance.host_cpus) or "-"
    volumes = " ".join(_printable(v) for v in instance.volume_ids) or "-"
    functions = " ".join(format_pci(vf) for vf in instance.virtual_functions) or "-"
    return [
        f"instance   {_printable(instance.instance_id)}",
        f"state      {_enum_name(pb.InstanceState, instance.state, 'INSTANCE_STATE_')}",
        f"vcpus      {instance.vcpus}",
        f"memory     {instance.memory_mib} MiB",
        f"image      sha256:{instance.image_digest.hex()}",
        f"host_cpus  {cpus}",
        f"volumes    {volumes}",
        f"vfs        {functions}",
    ]


def audit_record_line(record: pb.AuditRecord) -> str:
    kind = _enum_name(pb.AuditRecordKind, record.kind, "AUDIT_RECORD_KIND_")
    head = f"{record.sequence} {_time(record.time)} {kind}"
    if record.kind == pb.AUDIT_RECORD_KIND_CHECKPOINT:
        checkpoint = record.checkpoint
        return f"{head} head={checkpoint.head_sequence} head_hash={checkpoint.head_hash.hex()[:16]}"
    decision = _enum_name(pb.AuditDecision, record.decision, "AUDIT_DECISION_")
    fields = [head, _printable(record.principal) or "-", _printable(record.method), decision,
              _printable(record.outcome) or "PENDING"]
    if record.refers_to:
        fields.append(f"refers_to={record.refers_to}")
    fields += [f"{_printable(key)}={_printable(record.parameters[key])}" for key in sorted(record.parameters)]
    return " ".join(fields)


def event_line(event: pb.Event) -> str:
    return " ".join([
        str(event.cursor), _time(event.time), _enum_name(pb.EventKind, event.kind, "EVENT_KIND_"),
        _printable(event.instance_id) or "-", _enum_name(pb.EventReason, event.reason, "EVENT_REASON_"),
    ])


# --------------------------------------------------------------------------------------------------------------
# Connection


@dataclass(frozen=True)
class Connection:
    """Where and as whom to connect.  ``repr`` never shows the private key."""

    endpoint: str
    ca: bytes
    certificate: bytes
    key: bytes = field(repr=False)
    server_name: str | None = None


def _read_local(path: Path, what: str, limit: int = MAX_LOCAL_FILE) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes")
    return data


def _read_key(path: Path) -> bytes:
    # The client key is checked as the controller checks its own (0600, owned by us, not a link), so a key that
    # others can read is refused rather than used.  The content never appears in a message.
    try:
        data = read_private_file(path, max_size=64 * 1024)
    except KeyFileError as exc:
        raise UsageError(f"client key: {exc}") from None
    try:
        return bytes(data)
    finally:
        data[:] = bytes(len(data))


@dataclass(frozen=True)
class DevHost:
    """What ``pvctl dev up`` saved in ``DIR/dev.json`` (the fields pvctl uses)."""

    endpoint: str
    ca: Path
    roles: Mapping[str, tuple[Path, Path]]  # role -> (certificate, key)


def load_dev(directory: Path) -> DevHost:
    path = directory / DEV_FILE
    try:
        document = json.loads(_read_local(path, "dev host file"))
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON") from None

    def text(value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}: {where} must be a non-empty string")
        return value

    if not isinstance(document, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    roles = document.get("roles")
    if not isinstance(roles, dict):
        raise UsageError(f"{path}: roles must be an object of role -> {{cert, key}}")
    parsed: dict[str, tuple[Path, Path]] = {}
    for role, entry in roles.items():
        if not isinstance(entry, dict):
            raise UsageError(f"{path}: roles.{_printable(str(role))} must be an object with cert and key")
        parsed[str(role)] = (directory / text(entry.get("cert"), f"roles.{role}.cert"),
                             directory / text(entry.get("key"), f"roles.{role}.key"))
    address = text(document.get("endpoint"), "endpoint")
    try:
        endpoint(address)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{path}: endpoint: {exc}") from None
    return DevHost(address, directory / text(document.get("ca"), "ca"), parsed)


def default_role(methods: Sequence[Method], available: Iterable[str]) -> str | None:
    """The first role (DEFAULT_ROLES order, then the others by name) the shipped policy allows ``methods``."""
    policy = load_default()
    names = set(available)
    ordered = [r for r in DEFAULT_ROLES if r in names] + sorted(names - set(DEFAULT_ROLES))
    for role in ordered:
        try:
            principal = role_principal(role)
        except ValueError:
            continue
        if all(policy.authorize_method(principal, method).allowed for method in methods):
            return role
    return None


def resolve_connection(args: argparse.Namespace, methods: Sequence[Method]) -> Connection:
    """The connection from explicit options, falling back to ``--dev DIR`` for whatever is not given."""
    address: str | None = args.endpoint
    ca_path: Path | None = args.ca
    cert_path: Path | None = args.cert
    key_path: Path | None = args.key
    if args.dev is not None:
        dev = load_dev(args.dev)
        address = address or dev.endpoint
        ca_path = ca_path or dev.ca
        if cert_path is None and key_path is None:
            role = args.role or default_role(methods, dev.roles)
            if role is None:
                raise UsageError("no role in the dev host may call "
                                 + ", ".join(m.value for m in methods) + "; choose one with --role")
            if role not in dev.roles:
                raise UsageError(f"role {_printable(role)!r} is not in {args.dev / DEV_FILE} "
                                 f"(it has: {', '.join(sorted(dev.roles)) or 'none'})")
            cert_path, key_path = dev.roles[role]
    elif args.role is not None:
        raise UsageError("--role chooses an identity of --dev DIR; without --dev give --cert and --key")
    missing = [name for name, value in (("--endpoint", address), ("--ca", ca_path), ("--cert", cert_path),
                                        ("--key", key_path)) if value is None]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or give --dev DIR)")
    assert address is not None and ca_path is not None and cert_path is not None and key_path is not None
    return Connection(address, _read_local(ca_path, "CA certificate"),
                      _read_local(cert_path, "client certificate"), _read_key(key_path), args.server_name)


def open_channel(connection: Connection) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(connection.ca, connection.key, connection.certificate)
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
    if connection.server_name:
        options.append(("grpc.ssl_target_name_override", connection.server_name))
    return grpc.secure_channel(connection.endpoint, credentials, options=options)


# --------------------------------------------------------------------------------------------------------------
# A run


@dataclass
class Session:
    """One invocation: its arguments, output stream, and (opened on first use) its channel."""

    args: argparse.Namespace
    command: Command
    out: TextIO
    _channel: grpc.Channel | None = None
    _stub: pb_grpc.HostControllerStub | None = None

    @property
    def as_json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def print(self, line: str = "") -> None:
        self.out.write(line + "\n")

    def print_json(self, document: object, *, compact: bool = False) -> None:
        if compact:
            self.out.write(json.dumps(document, separators=(",", ":")) + "\n")
        else:
            self.out.write(json.dumps(document, indent=2) + "\n")
        self.out.flush()

    def stub(self) -> pb_grpc.HostControllerStub:
        if self._stub is None:
            self._channel = open_channel(resolve_connection(self.args, self.command.methods))
            self._stub = pb_grpc.HostControllerStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def call(self, method: Method, request: Message, *, client_token: str | None = None,
             deadline: float | None = None, wait_out_rate_limits: bool = False) -> Any:
        """Call ``method``; a non-OK status becomes :class:`RpcFailure`."""
        rpc = getattr(self.stub(), method.value)
        timeout = deadline if deadline is not None else (self.args.deadline or DEFAULT_DEADLINE)
        for attempt in range(MAX_RETRIES + 1):
            try:
                return rpc(request, timeout=timeout)
            except grpc.RpcError as error:
                failure = decode_failure(error, client_token=client_token)
            # Only read-only paging waits out a refusal, and only one whose hint is short (claim C11: the
            # controller's rate limits are respected, never hammered).
            retry = (wait_out_rate_limits and failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                     and failure.retry_after is not None and failure.retry_after <= MAX_RETRY_WAIT)
            if not retry or attempt == MAX_RETRIES:
                raise failure
            assert failure.retry_after is not None
            time.sleep(failure.retry_after)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None


@dataclass(frozen=True)
class Command:
    """A subcommand: the methods it may call (for the default --dev role) and what it does."""

    name: str
    methods: tuple[Method, ...]
    run: Callable[[Session], int]
    # Request field paths -> the argument that sets them, for client-side violations.
    arguments: Mapping[str, str] = field(default_factory=dict)


def check_request(command: Command, request: Message) -> None:
    """Refuse a request that breaks the .proto's constraints before anything is sent (claim C2)."""
    problems = constraints.validate(request)
    if problems:
        # A "required" scalar is one left at its zero value, which proto3 cannot tell from an absent one.
        shown = "; ".join(
            f"{command.arguments.get(p.field, p.field) or 'request'}: "
            + ("must not be zero or empty" if p.rule == "required" else p.description)
            for p in problems)
        raise UsageError(f"{command.name}: {shown}")


def _token(args: argparse.Namespace) -> str:
    token: str | None = args.client_token
    return token if token is not None else str(uuid.uuid4())


def _mutating_result(session: Session, token: str, response: Message, lines: list[str]) -> int:
    if session.as_json:
        session.print_json({"client_token": token, **_to_dict(response)})
    else:
        session.print(f"client_token {token}")
        for line in lines:
            session.print(line)
    return EXIT_OK


# --- instance lifecycle ---


def run_start(session: Session) -> int:
    args = session.args
    token = _token(args)
    request = pb.StartInstanceRequest(client_token=token, instance_id=args.instance_id, vcpus=args.vcpus,
                                      memory_mib=args.memory_mib, image_digest=args.image_digest,
                                      image_signature=args.image_signature)
    check_request(session.command, request)
    response = session.call(Method.START_INSTANCE, request, client_token=token)
    return _mutating_result(session, token, response, instance_lines(response.instance))


def run_stop(session: Session) -> int:
    args = session.args
    token = _token(args)
    if args.force:
        mode, seconds = pb.STOP_MODE_FORCE, 0
    else:
        mode = pb.STOP_MODE_GRACEFUL
        seconds = DEFAULT_STOP_TIMEOUT if args.stop_timeout is None else args.stop_timeout
    request = pb.StopInstanceRequest(client_token=token, instance_id=args.instance_id, mode=mode,
                                     timeout_seconds=seconds)
    check_request(session.command, request)
    # The call may last the whole ACPI timeout; unless the caller chose a deadline, leave room for it.
    deadline = args.deadline or max(DEFAULT_DEADLINE, seconds + STOP_DEADLINE_MARGIN)
    response = session.call(Method.STOP_INSTANCE, request, client_token=token, deadline=deadline)
    return _mutating_result(session, token, response, instance_lines(response.instance))


def run_describe(session: Session) -> int:
    request = pb.DescribeInstanceRequest(instance_id=session.args.instance_id)
    check_request(session.command, request)
    response = session.call(Method.DESCRIBE_INSTANCE, request)
    if session.as_json:
        session.print_json(_to_dict(response))
    else:
        for line in instance_lines(response.instance):
            session.print(line)
    return EXIT_OK


def listed_instances(session: Session) -> list[Any]:
    """Every instance the host knows, walking ListInstances page by page until next_page_token is empty.

    A page after the first waits out a short rate limit, as the audit walk does, so a long listing does not
    fail half-way.  Each token must sort after the one before (it is the id of the last instance of its
    page, and pages are ordered by id): a server that does not move forward is refused, not followed.
    """
    instances: list[Any] = []
    token = ""
    while True:
        response = session.call(Method.LIST_INSTANCES, pb.ListInstancesRequest(page_size=LIST_PAGE, page_token=token),
                                wait_out_rate_limits=bool(token))
        instances.extend(response.instances)
        if not response.next_page_token:
            return instances
        if response.next_page_token <= token:
            raise CommandFailed("list", f"ListInstances answered next_page_token "
                                        f"{_printable(response.next_page_token[:64])!r}, which does not move forward")
        token = response.next_page_token


def run_list(session: Session) -> int:
    instances = listed_instances(session)
    if session.as_json:
        session.print_json({"instances": [_to_dict(summary) for summary in instances]})
        return EXIT_OK
    if not instances:
        session.print("(no instances)")
    for summary in instances:
        state = _enum_name(pb.InstanceState, summary.state, "INSTANCE_STATE_")
        session.print(f"{_printable(summary.instance_id)} {state} vcpus={summary.vcpus} "
                      f"memory_mib={summary.memory_mib}")
    return EXIT_OK


# --- volumes and virtual functions ---


def _read_envelope(path: Path) -> bytes:
    # Key material (claim C8): read, sent, never shown.  The size limit is the .proto's max_len.
    data = _read_local(path, "envelope file", MAX_ENVELOPE)
    if not data:
        raise UsageError(f"envelope file {path} is empty (omit --envelope-file for an unencrypted volume)")
    return data


def run_attach(session: Session) -> int:
    args = session.args
    token = _token(args)
    envelope = _read_envelope(args.envelope_file) if args.envelope_file is not None else b""
    request = pb.AttachVolumeRequest(client_token=token, instance_id=args.instance_id, volume_id=args.volume_id,
                                     read_only=args.read_only, envelope=envelope)
    check_request(session.command, request)
    response = session.call(Method.ATTACH_VOLUME, request, client_token=token)
    return _mutating_result(session, token, response, [_volume_line(response)])


def run_detach(session: Session) -> int:
    args = session.args
    token = _token(args)
    request = pb.DetachVolumeRequest(client_token=token, instance_id=args.instance_id, volume_id=args.volume_id)
    check_request(session.command, request)
    response = session.call(Method.DETACH_VOLUME, request, client_token=token)
    return _mutating_result(session, token, response, [_volume_line(response)])


def _volume_line(response: pb.AttachVolumeResponse | pb.DetachVolumeResponse) -> str:
    state = _enum_name(pb.VolumeState, response.state, "VOLUME_STATE_")
    return f"volume {_printable(response.volume_id)} {state} instance {_printable(response.instance_id)}"


def _function_line(response: pb.AssignVirtualFunctionResponse | pb.ReleaseVirtualFunctionResponse) -> str:
    state = _enum_name(pb.VirtualFunctionState, response.state, "VIRTUAL_FUNCTION_STATE_")
    return (f"virtual_function {format_pci(response.virtual_function)} vf_index={response.vf_index} {state} "
            f"instance {_printable(response.instance_id)}")


def run_assign_vf(session: Session) -> int:
    args = session.args
    token = _token(args)
    request = pb.AssignVirtualFunctionRequest(client_token=token, instance_id=args.instance_id,
                                              physical_function=args.pf, mac=args.mac, vlan=args.vlan)
    check_request(session.command, request)
    response = session.call(Method.ASSIGN_VIRTUAL_FUNCTION, request, client_token=token)
    return _mutating_result(session, token, response, [_function_line(response)])


def run_release_vf(session: Session) -> int:
    args = session.args
    token = _token(args)
    request = pb.ReleaseVirtualFunctionRequest(client_token=token, instance_id=args.instance_id,
                                               virtual_function=args.vf)
    check_request(session.command, request)
    response = session.call(Method.RELEASE_VIRTUAL_FUNCTION, request, client_token=token)
    return _mutating_result(session, token, response, [_function_line(response)])


# --- identity, telemetry ---


def run_identity(session: Session) -> int:
    response = session.call(Method.GET_HOST_IDENTITY, pb.GetHostIdentityRequest())
    # The fingerprint is what operators compare out of band; pvctl computes it itself rather than trusting it.
    if len(response.public_key) != 32 or hashlib.sha256(response.public_key).digest() != response.fingerprint:
        raise CommandFailed("identity", "the controller's fingerprint is not the SHA-256 of its 32-byte public key")
    if session.as_json:
        session.print_json(_to_dict(response))
        return EXIT_OK
    session.print(f"public_key          {response.public_key.hex()}")
    session.print(f"fingerprint         {response.fingerprint.hex()}")
    session.print(f"signing_public_key  {response.signing_public_key.hex()}")
    session.print(f"signing_fingerprint {hashlib.sha256(response.signing_public_key).hexdigest()}")
    return EXIT_OK


def run_metrics(session: Session) -> int:
    response = session.call(Method.GET_METRICS, pb.GetMetricsRequest())
    if session.as_json:
        session.print_json(_to_dict(response))
    else:
        # The Prometheus text format is line-based; control characters other than newlines are replaced.
        for line in response.text.splitlines():
            session.print(_printable(line))
    return EXIT_OK


def run_events(session: Session) -> int:
    args = session.args
    cursor: int = args.after
    while True:
        request = pb.PollEventsRequest(after_cursor=cursor, max_events=args.max)
        check_request(session.command, request)
        response = session.call(Method.POLL_EVENTS, request, wait_out_rate_limits=args.follow)
        if not args.follow:
            if session.as_json:
                session.print_json(_to_dict(response))
            else:
                for event in response.events:
                    session.print(event_line(event))
                session.print(f"next_cursor {response.next_cursor}")
            return EXIT_OK
        for event in response.events:
            if session.as_json:
                session.print_json(_to_dict(event), compact=True)  # JSON Lines: one document per event
            else:
                session.print(event_line(event))
                session.out.flush()
        # A cursor never moves backwards (Event.cursor is strictly increasing); a server that says otherwise
        # would make pvctl print events twice.
        cursor = max(cursor, response.next_cursor)
        if len(response.events) < args.max:
            time.sleep(args.poll_interval)


# --- audit ---


def run_audit_read(session: Session) -> int:
    args = session.args
    request = pb.ReadAuditLogRequest(from_sequence=args.from_sequence, max_records=args.max)
    check_request(session.command, request)
    response = session.call(Method.READ_AUDIT_LOG, request)
    if session.as_json:
        session.print_json(_to_dict(response))
        return EXIT_OK
    for record in response.records:
        session.print(audit_record_line(record))
    session.print(f"next_sequence {response.next_sequence}")
    return EXIT_OK


def _strip_newline(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\n") else line


def pulled_audit_lines(session: Session) -> Iterator[bytes]:
    """Every record of the controller's log, as stored, paging ReadAuditLog from the start to the head.

    Reading the audit log is itself audited, so the log grows by one record per
    page read: a page shorter than asked for is the head at the time of that
    call, and the walk stops there (waiting for an empty page would never end).
    """
    sequence = 1
    while True:
        request = pb.ReadAuditLogRequest(from_sequence=sequence, max_records=VERIFY_PAGE)
        response = session.call(Method.READ_AUDIT_LOG, request, wait_out_rate_limits=True)
        for record in response.records:
            yield _strip_newline(record.encoded)
        if len(response.records) < VERIFY_PAGE:
            return
        if response.next_sequence <= sequence:
            # The verifier names missing records itself; this only stops a server that would loop forever.
            raise CommandFailed("audit verify", f"ReadAuditLog from {sequence} answered next_sequence "
                                                f"{response.next_sequence}, which does not move forward")
        sequence = response.next_sequence


@dataclass
class _FileLines:
    lines: list[bytes]
    torn: int = 0


def file_audit_lines(path: Path) -> _FileLines:
    """The lines of an audit log file, read with the log's own bound; an interrupted last line is set aside."""
    result = _FileLines([])
    try:
        with open(path, "rb") as file:
            while line := file.readline(MAX_LINE_BYTES):
                if not line.endswith(b"\n"):
                    if len(line) < MAX_LINE_BYTES and not file.read(1):
                        result.torn = len(line)  # a write the controller never acknowledged (audit/log.py)
                        break
                    raise ChainBroken(len(result.lines) + 1, f"line longer than {MAX_LINE_BYTES} bytes")
                result.lines.append(line[:-1])
    except OSError as exc:
        raise UsageError(f"cannot read audit log {path}: {exc.strerror}") from None
    return result


def read_public_key_file(path: Path) -> bytes:
    text = _read_local(path, "public key file", 4096).decode("ascii", "replace").strip()
    if len(text) != 64 or not _HEX.fullmatch(text):
        raise UsageError(f"public key file {path} must hold the Ed25519 public key as 64 hex digits")
    return bytes.fromhex(text)


def verify_chain(lines: Sequence[bytes], public_key: Ed25519PublicKey,
                           head: bytes | None = None) -> VerifyReport:
    """Verify a whole chain; raise ChainBroken naming the first bad record.  An empty chain is broken too."""
    known: set[int] = set()
    for line in lines:
        try:
            known.add(decode(line).sequence)
        except RecordError:
            pass  # the verifier names this line when it reaches it
    verifier = Verifier(public_key, known_sequences=known)
    for line in lines:
        verifier.add_line(line)
    if not lines:
        raise ChainBroken(1, "the log holds no records; a log always begins with a signed checkpoint")
    signed_head = None
    if head is not None:
        try:
            record = decode(_strip_newline(head))
        except RecordError as exc:
            raise ChainBroken(None, f"the signed head is not a record: {exc}") from None
        if not isinstance(record, CheckpointRecord):
            raise ChainBroken(None, "the signed head is not a checkpoint")
        signed_head = record
    return verifier.finish(signed_head)


def run_audit_verify(session: Session) -> int:
    args = session.args
    head = _read_local(args.head, "signed head file", MAX_LINE_BYTES) if args.head is not None else None
    torn = 0
    try:
        if args.file is not None:
            if args.public_key is None:
                raise UsageError("audit verify --file needs --public-key HEXFILE (the host's signing key)")
            raw_key, key_source = read_public_key_file(args.public_key), f"pinned ({args.public_key})"
            found = file_audit_lines(args.file)
            lines, torn = found.lines, found.torn
        else:
            if args.public_key is not None:
                raw_key, key_source = read_public_key_file(args.public_key), f"pinned ({args.public_key})"
            else:
                identity = session.call(Method.GET_HOST_IDENTITY, pb.GetHostIdentityRequest(),
                                        wait_out_rate_limits=True)
                raw_key, key_source = identity.signing_public_key, "GetHostIdentity"
            lines = list(pulled_audit_lines(session))
        try:
            public_key = public_key_from_bytes(raw_key)
        except (SigningKeyError, ValueError) as exc:
            raise CommandFailed("audit verify", f"the signing public key is not usable: {exc}") from None
        report = verify_chain(lines, public_key, head)
    except ChainBroken as broken:
        if session.as_json:
            session.print_json({"ok": False, "sequence": broken.sequence, "reason": broken.reason})
        raise CommandFailed("audit verify", str(broken)) from None
    fingerprint = hashlib.sha256(raw_key).hexdigest()
    if session.as_json:
        session.print_json({
            "ok": True, "records": report.records, "last_sequence": report.last_sequence,
            "head_hash": report.head_hash.hex(), "checkpoints": report.checkpoints,
            "last_checkpoint": report.last_checkpoint, "unsigned_tail": report.unsigned_tail,
            "open_intents": list(report.open_intents), "torn_tail_bytes": torn,
            "signed_head_checked": head is not None, "signing_key_fingerprint": fingerprint,
            "signing_key_source": key_source,
        })
        return EXIT_OK
    session.print(f"audit chain OK: {report.records} records, last checkpoint at {report.last_checkpoint}")
    session.print(f"signing key sha256:{fingerprint} ({key_source})")
    if report.unsigned_tail:
        session.print(f"note: {report.unsigned_tail} records after the last checkpoint are covered by hashes only"
                      + ("" if head is not None else "; give --head to also detect a cut tail"))
    if report.open_intents:
        session.print("note: calls without a recorded outcome yet: "
                      + ", ".join(str(s) for s in report.open_intents))
    if torn:
        session.print(f"note: an interrupted last line of {torn} bytes was not verified")
    return EXIT_OK


# --- encrypted volumes (local; GetHostIdentity only without --host-public-key) ---

_CONNECTION_OPTIONS = {"endpoint": "--endpoint", "ca": "--ca", "cert": "--cert", "key": "--key", "dev": "--dev",
                       "role": "--role", "server_name": "--server-name"}


def host_public_key(session: Session) -> tuple[bytes, str]:
    """The host's raw X25519 public key and where it came from: ``--host-public-key``, or GetHostIdentity."""
    args = session.args
    if args.host_public_key is not None:
        given = [option for name, option in _CONNECTION_OPTIONS.items() if getattr(args, name, None) is not None]
        if given:
            raise UsageError(f"{session.command.name}: --host-public-key and {', '.join(given)}: give the host's "
                             "public key or the connection to fetch it, not both")
        return bytes(args.host_public_key), "--host-public-key"
    try:
        response = session.call(Method.GET_HOST_IDENTITY, pb.GetHostIdentityRequest())
    except RpcFailure as failure:
        raise RpcFailure(failure.code, f"GetHostIdentity: {failure.details}", failure.violations,
                         failure.retry_after) from None
    # As in ``identity``: pvctl computes the fingerprint itself rather than trusting the one it was sent.
    if len(response.public_key) != 32 or hashlib.sha256(response.public_key).digest() != response.fingerprint:
        raise CommandFailed(session.command.name,
                            "the controller's fingerprint is not the SHA-256 of its 32-byte public key")
    return bytes(response.public_key), "GetHostIdentity"


def _volume_failure(what: str, exc: volumetool.VolumeToolError) -> Exception:
    # Refused inputs or outputs (nothing was changed) are usage errors; a failed qemu-img or write is not.
    if isinstance(exc, volumetool.UnusablePath):
        return UsageError(f"{what}: {exc}")
    return CommandFailed(what, str(exc))


def _volume_result(session: Session, fields: list[tuple[str, str | int | None]], wrapped: bytes) -> int:
    if session.as_json:
        session.print_json({**dict(fields), "envelope_base64": base64.b64encode(wrapped).decode("ascii")})
        return EXIT_OK
    width = max(len(name) for name, _ in fields) + 2
    for name, value in fields:
        if value is not None:
            session.print(f"{name:<{width}}{_printable(str(value))}")
    return EXIT_OK


def run_volume_create(session: Session) -> int:
    args = session.args
    try:
        # Before asking the controller anything: an existing output is refused at once.
        volumetool.check_new_paths(args.out, args.envelope_out, args.key_out)
        volumetool.find_qemu_img()
    except volumetool.VolumeToolError as exc:
        raise _volume_failure("volume create", exc) from None
    public, source = host_public_key(session)
    try:
        created = volumetool.create_encrypted_volume(
            path=args.out, size=args.size, volume_id=uuid.UUID(args.volume_id),
            instance_id=uuid.UUID(args.instance_id), host_public=public, envelope_path=args.envelope_out,
            key_path=args.key_out, iter_time_ms=args.iter_time_ms)
    except volumetool.VolumeToolError as exc:
        raise _volume_failure("volume create", exc) from None
    return _volume_result(session, [
        ("volume_path", str(created.path)), ("size_bytes", created.size), ("volume_id", args.volume_id),
        ("instance_id", args.instance_id), ("host_fingerprint", hashlib.sha256(public).hexdigest()),
        ("host_key_source", source), ("envelope_file", str(created.envelope_path)),
        ("key_file", None if created.key_path is None else str(created.key_path)),
    ], created.envelope)


def run_volume_wrap(session: Session) -> int:
    args = session.args
    try:
        volumetool.check_new_paths(args.envelope_out)
    except volumetool.VolumeToolError as exc:
        raise _volume_failure("volume wrap", exc) from None
    public, source = host_public_key(session)
    try:
        wrapped = volumetool.wrap_key_file(key_path=args.key_file, volume_id=uuid.UUID(args.volume_id),
                                           instance_id=uuid.UUID(args.instance_id), host_public=public,
                                           envelope_path=args.envelope_out)
    except volumetool.VolumeToolError as exc:
        raise _volume_failure("volume wrap", exc) from None
    return _volume_result(session, [
        ("key_file", str(args.key_file)), ("volume_id", args.volume_id), ("instance_id", args.instance_id),
        ("host_fingerprint", hashlib.sha256(public).hexdigest()), ("host_key_source", source),
        ("envelope_file", str(args.envelope_out)),
    ], wrapped)


# --- pki ---


def run_dev_up(session: Session) -> int:
    from controller.devhost import devup

    try:
        document = devup.up(session.args.directory, backend=session.args.backend)
    except (devup.DevError, RuntimeError, OSError) as exc:
        raise CommandFailed("dev up", _one_line(str(exc))) from None
    session.print_json(document)  # the contract: one JSON object, whatever --json says
    return EXIT_OK


def run_dev_down(session: Session) -> int:
    from controller.devhost import devup

    try:
        document = devup.down(session.args.directory)
    except (devup.DevError, OSError) as exc:
        raise CommandFailed("dev down", _one_line(str(exc))) from None
    if session.as_json:
        session.print_json(document)
    else:
        session.print(f"stopped the controller (pid {document['controller_pid']}) and the agent "
                      f"(pid {document['agent_pid']}); instances stopped: {len(document['stopped_instances'])}")
        if not document["runtime_dir_removed"]:
            session.print("kept the runtime directory: a VM process still uses it")
    return EXIT_OK


def run_pki_init(session: Session) -> int:
    try:
        paths: PkiPaths = init_pki(session.args.directory)
    except (PkiError, OSError, ValueError) as exc:
        raise CommandFailed("pki init", _one_line(str(exc))) from None
    document = {
        "directory": str(paths.directory),
        "ca": str(paths.ca_certificate),
        "ca_key": str(paths.ca_key),
        "server": {"cert": str(paths.server_certificate), "key": str(paths.server_key)},
        "roles": {role: {"cert": str(c.certificate), "key": str(c.key)} for role, c in paths.clients.items()},
    }
    if session.as_json:
        session.print_json(document)
        return EXIT_OK
    session.print(f"ca          {paths.ca_certificate}")
    session.print(f"ca_key      {paths.ca_key}")
    session.print(f"server      {paths.server_certificate} {paths.server_key}")
    for role, client in paths.clients.items():
        session.print(f"role        {role} {client.certificate} {client.key}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a usage error becomes :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix(PROG).strip()  # "start", "audit verify", or "" for pvctl itself
        raise UsageError(f"{where}: {message}" if where else message)


_UUID_HELP = "canonical UUID (lowercase 8-4-4-4-12)"
_TOKEN_ARGS = {"client_token": "--client-token", "instance_id": "INSTANCE_ID"}


def _command(parser: argparse.ArgumentParser, name: str, methods: tuple[Method, ...], run: Callable[[Session], int],
             **arguments: str) -> None:
    parser.set_defaults(command=Command(name, methods, run, arguments))


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The connection options and --json, before the subcommand (``top``) or after it.

    After the subcommand their default is SUPPRESS, so that an option given before it is not reset.  The
    deadline (--timeout) is accepted before the subcommand only: ``stop --timeout`` is the ACPI timeout.
    """
    default: Any = None if top else argparse.SUPPRESS
    connection = parser.add_argument_group("connection (mutual TLS)")
    connection.add_argument("--endpoint", type=endpoint, default=default, metavar="HOST:PORT",
                            help="the controller's address")
    connection.add_argument("--ca", type=Path, default=default, metavar="FILE",
                            help="CA certificate (PEM) that signed the server's")
    connection.add_argument("--cert", type=Path, default=default, metavar="FILE", help="client certificate (PEM)")
    connection.add_argument("--key", type=Path, default=default, metavar="FILE",
                            help="client private key (PEM, mode 0600)")
    connection.add_argument("--dev", type=Path, default=default, metavar="DIR",
                            help=f"read the connection from DIR/{DEV_FILE}")
    connection.add_argument("--role", default=default, metavar="ROLE",
                            help="with --dev: the client identity (default: the first role the default policy "
                                 "allows the subcommand)")
    connection.add_argument("--server-name", default=default, metavar="NAME",
                            help="expect this name in the server certificate (default: the endpoint's host)")
    if top:
        parser.add_argument("--timeout", dest="deadline", type=deadline_seconds, metavar="SECONDS",
                            help=f"deadline of each call (default {DEFAULT_DEADLINE:g}; stop: its ACPI timeout + "
                                 f"{STOP_DEADLINE_MARGIN:g})")
    parser.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="print exactly one JSON document on stdout")


def _add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client-token", type=canonical_uuid, metavar="UUID",
                        help="idempotency token (default: a fresh one, printed so the call can be retried)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Client of the passivisor controller's gRPC API.", epilog=HELP_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        child = commands.add_parser(name, help=help_text, description=help_text)
        _add_global_options(child, top=False)
        return child

    start = sub("start", "StartInstance: launch an instance from a signed image")
    start.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    start.add_argument("--vcpus", type=decimal, required=True, metavar="N", help="vCPUs, 1..128")
    start.add_argument("--memory-mib", type=decimal, required=True, metavar="M", help="guest memory, 64..1048576 MiB")
    start.add_argument("--image-digest", type=image_digest, required=True, metavar="HEX", help="SHA-256, 64 hex")
    start.add_argument("--image-signature", type=image_signature, required=True, metavar="HEX",
                       help="Ed25519 signature, 128 hex")
    _add_token(start)
    _command(start, "start", (Method.START_INSTANCE,), run_start, vcpus="--vcpus", memory_mib="--memory-mib",
             image_digest="--image-digest", image_signature="--image-signature", **_TOKEN_ARGS)

    stop = sub("stop", "StopInstance: ACPI power-down with a timeout, or --force to quit at once")
    stop.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    how = stop.add_mutually_exclusive_group()
    how.add_argument("--force", action="store_true", help="quit at once")
    how.add_argument("--timeout", dest="stop_timeout", type=_bounded(1, 600), metavar="S",
                     help=f"seconds to wait for the guest, 1..600 (default {DEFAULT_STOP_TIMEOUT})")
    _add_token(stop)
    _command(stop, "stop", (Method.STOP_INSTANCE,), run_stop, timeout_seconds="--timeout", **_TOKEN_ARGS)

    attach = sub("attach", "AttachVolume: hot-plug a volume into a running instance")
    attach.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    attach.add_argument("volume_id", type=canonical_uuid, metavar="VOLUME_ID", help=_UUID_HELP)
    attach.add_argument("--read-only", action="store_true", help="attach read-only")
    attach.add_argument("--envelope-file", type=Path, metavar="FILE",
                        help=f"the volume's data key wrapped to the host key (at most {MAX_ENVELOPE} bytes)")
    _add_token(attach)
    _command(attach, "attach", (Method.ATTACH_VOLUME,), run_attach, volume_id="VOLUME_ID",
             envelope="--envelope-file", **_TOKEN_ARGS)

    detach = sub("detach", "DetachVolume: unplug a volume")
    detach.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    detach.add_argument("volume_id", type=canonical_uuid, metavar="VOLUME_ID", help=_UUID_HELP)
    _add_token(detach)
    _command(detach, "detach", (Method.DETACH_VOLUME,), run_detach, volume_id="VOLUME_ID", **_TOKEN_ARGS)

    assign = sub("assign-vf", "AssignVirtualFunction: plug a free SR-IOV VF of a physical function")
    assign.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    assign.add_argument("--pf", type=pci_address, required=True, metavar="DDDD:BB:DD.F", help="physical function")
    assign.add_argument("--mac", type=mac_address, required=True, metavar="MAC", help="aa:bb:cc:dd:ee:ff, unicast")
    assign.add_argument("--vlan", type=_bounded(0, 4095), default=0, metavar="N", help="802.1Q VLAN id, 0 untagged")
    _add_token(assign)
    _command(assign, "assign-vf", (Method.ASSIGN_VIRTUAL_FUNCTION,), run_assign_vf, physical_function="--pf",
             mac="--mac", vlan="--vlan", **_TOKEN_ARGS)

    release = sub("release-vf", "ReleaseVirtualFunction: unplug a VF and return it to the pool")
    release.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    release.add_argument("--vf", type=pci_address, required=True, metavar="DDDD:BB:DD.F", help="virtual function")
    _add_token(release)
    _command(release, "release-vf", (Method.RELEASE_VIRTUAL_FUNCTION,), run_release_vf, virtual_function="--vf",
             **_TOKEN_ARGS)

    describe = sub("describe", "DescribeInstance: one instance and the host resources it holds")
    describe.add_argument("instance_id", type=canonical_uuid, metavar="INSTANCE_ID", help=_UUID_HELP)
    _command(describe, "describe", (Method.DESCRIBE_INSTANCE,), run_describe, instance_id="INSTANCE_ID")

    _command(sub("list", "ListInstances: every instance the host knows"), "list", (Method.LIST_INSTANCES,),
             run_list)
    _command(sub("identity", "GetHostIdentity: the host's public keys and fingerprints"), "identity",
             (Method.GET_HOST_IDENTITY,), run_identity)
    _command(sub("metrics", "GetMetrics: the Prometheus text exposition"), "metrics", (Method.GET_METRICS,),
             run_metrics)

    events = sub("events", "PollEvents: events after a cursor")
    events.add_argument("--after", type=decimal, default=0, metavar="N", help="events after this cursor (default 0)")
    events.add_argument("--max", type=_bounded(1, EVENTS_PAGE), default=EVENTS_PAGE, metavar="N",
                        help=f"at most N events per call, 1..{EVENTS_PAGE}")
    events.add_argument("--follow", action="store_true",
                        help="keep polling (with --json: one JSON document per event and line)")
    events.add_argument("--poll-interval", type=deadline_seconds, default=1.0, metavar="SECONDS",
                        help="with --follow: the pause after a call that returned less than --max events")
    _command(events, "events", (Method.POLL_EVENTS,), run_events, after_cursor="--after", max_events="--max")

    audit = sub("audit", "the hash-chained audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    audit_commands.required = True
    read = audit_commands.add_parser("read", help="ReadAuditLog: records from a sequence number on")
    _add_global_options(read, top=False)
    read.add_argument("--from", dest="from_sequence", type=decimal, default=1, metavar="N",
                      help="first sequence number (default 1)")
    read.add_argument("--max", type=_bounded(1, AUDIT_PAGE), default=100, metavar="N",
                      help=f"at most N records, 1..{AUDIT_PAGE} (default 100)")
    _command(read, "audit read", (Method.READ_AUDIT_LOG,), run_audit_read, from_sequence="--from",
             max_records="--max")
    verify = audit_commands.add_parser("verify", help="verify the whole chain; names the first bad record")
    _add_global_options(verify, top=False)
    verify.add_argument("--file", type=Path, metavar="FILE", help="verify this audit.log offline instead")
    verify.add_argument("--public-key", type=Path, metavar="HEXFILE",
                        help="pin the Ed25519 signing public key (64 hex digits); required with --file")
    verify.add_argument("--head", type=Path, metavar="FILE",
                        help="a signed head (audit.head) to check the chain against: detects a cut tail")
    _command(verify, "audit verify", (Method.READ_AUDIT_LOG, Method.GET_HOST_IDENTITY), run_audit_verify)

    volume = sub("volume", "encrypted volumes: a new LUKS volume file and the envelope of its key")
    volume_commands = volume.add_subparsers(dest="volume_command", metavar="ACTION", parser_class=_Parser)
    volume_commands.required = True
    iter_time_help = (
        f"LUKS PBKDF2 time per unlock, {volumetool.MIN_ITER_TIME_MS}..{volumetool.MAX_ITER_TIME_MS} ms (default "
        f"{volumetool.DEFAULT_ITER_TIME_MS}).  The passphrase is a full-entropy 256-bit random key, so stretching "
        "adds no security and only slows every attach (each unlock runs PBKDF2 twice)")
    create_help = ("create a LUKS volume file with a fresh random data key, and the envelope of that key "
                   "wrapped to the host key for one instance (for attach --envelope-file)")
    create = volume_commands.add_parser("create", help=create_help, description=create_help)
    _add_global_options(create, top=False)
    create.add_argument("--volume-id", type=canonical_uuid, required=True, metavar="UUID", help=_UUID_HELP)
    create.add_argument("--instance-id", type=canonical_uuid, required=True, metavar="UUID",
                        help="the instance the envelope is for; " + _UUID_HELP)
    create.add_argument("--size", type=volume_size, required=True, metavar="SIZE",
                        help="N with an optional K, M, G or T suffix (binary units), 1M..1T")
    create.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="the new volume file (mode 0600; must not exist)")
    create.add_argument("--envelope-out", type=Path, required=True, metavar="FILE",
                        help="the new envelope file: raw bytes, as attach --envelope-file reads them")
    create.add_argument("--key-out", type=Path, metavar="FILE",
                        help="also keep the raw 32-byte data key in this new file (mode 0600), to re-wrap it "
                             "later with volume wrap; without it the key exists only inside the envelope")
    create.add_argument("--host-public-key", type=host_public_key_hex, metavar="HEX",
                        help="the host's X25519 public key, 64 hex digits (default: ask GetHostIdentity over "
                             "the connection options)")
    create.add_argument("--iter-time-ms", type=_bounded(volumetool.MIN_ITER_TIME_MS, volumetool.MAX_ITER_TIME_MS),
                        default=volumetool.DEFAULT_ITER_TIME_MS, metavar="N", help=iter_time_help)
    _command(create, "volume create", (Method.GET_HOST_IDENTITY,), run_volume_create)
    wrap_help = "wrap a volume's data key (a --key-out file) again, for another instance or another host"
    wrap = volume_commands.add_parser("wrap", help=wrap_help, description=wrap_help)
    _add_global_options(wrap, top=False)
    wrap.add_argument("--key-file", type=Path, required=True, metavar="FILE",
                      help="the data key: exactly 32 raw bytes, a regular file of mode 0600 owned by you")
    wrap.add_argument("--volume-id", type=canonical_uuid, required=True, metavar="UUID", help=_UUID_HELP)
    wrap.add_argument("--instance-id", type=canonical_uuid, required=True, metavar="UUID",
                      help="the instance the envelope is for; " + _UUID_HELP)
    wrap.add_argument("--envelope-out", type=Path, required=True, metavar="FILE",
                      help="the new envelope file: raw bytes, as attach --envelope-file reads them")
    wrap.add_argument("--host-public-key", type=host_public_key_hex, metavar="HEX",
                      help="the host's X25519 public key, 64 hex digits (default: ask GetHostIdentity over the "
                           "connection options)")
    _command(wrap, "volume wrap", (Method.GET_HOST_IDENTITY,), run_volume_wrap)

    pki = sub("pki", "the development PKI")
    pki_commands = pki.add_subparsers(dest="pki_command", metavar="ACTION", parser_class=_Parser)
    pki_commands.required = True
    init = pki_commands.add_parser("init", help="create a CA, a server certificate and one client "
                                               "certificate per default role in DIR")
    _add_global_options(init, top=False)
    init.add_argument("directory", type=Path, metavar="DIR", help="a new or empty directory")
    _command(init, "pki init", (), run_pki_init)

    dev = sub("dev", "a complete development host (agent, controller, PKI) in one directory")
    dev_commands = dev.add_subparsers(dest="dev_command", metavar="ACTION", parser_class=_Parser)
    dev_commands.required = True
    dev_up = dev_commands.add_parser("up", help="provision and start an agent and a controller in DIR; print "
                                                "and save DIR/dev.json")
    _add_global_options(dev_up, top=False)
    dev_up.add_argument("directory", type=Path, metavar="DIR")
    dev_up.add_argument("--backend", choices=("qemu", "sim"), default="qemu")
    _command(dev_up, "dev up", (), run_dev_up)
    dev_down = dev_commands.add_parser("down", help="stop the instances, the controller and the agent of DIR")
    _add_global_options(dev_down, top=False)
    dev_down.add_argument("directory", type=Path, metavar="DIR")
    _command(dev_down, "dev down", (), run_dev_down)
    return parser


# --------------------------------------------------------------------------------------------------------------
# Entry point


def _error(stream: TextIO, what: str, detail: str) -> None:
    stream.write(_one_line(f"{PROG}: {what}: {detail}") + "\n")
    stream.flush()


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run pvctl; return its exit status (0 success, 1 failed call or operation, 2 usage error)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        _error(err, "usage", str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    session = Session(args, args.command, out)
    try:
        return session.command.run(session)
    except UsageError as exc:
        _error(err, "usage", str(exc))
        return EXIT_USAGE
    except RpcFailure as failure:
        _error(err, failure.code.name, failure.detail())
        return EXIT_FAILED
    except CommandFailed as exc:
        _error(err, exc.what, exc.detail)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _discard(out)
        return EXIT_FAILED
    finally:
        session.close()
        try:
            out.flush()
        except BrokenPipeError:
            _discard(out)


def _discard(out: TextIO) -> None:
    """The reader of stdout went away (``pvctl ... | head``): stop quietly, as other command-line tools do.

    Later writes, including the interpreter's final flush, go to /dev/null instead of raising again.
    """
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
