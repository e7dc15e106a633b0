"""The audit chain: record model, redaction, canonical encoding, hashing, verification (claims C3, C7, C16).

Theory of operation.  The audit log is a sequence of records numbered from 1
without gaps.  Each record holds the SHA-256 hash of its predecessor's
canonical encoding (``prev``; 32 zero bytes for record 1), so editing,
removing or reordering any record breaks a link that :class:`Verifier` finds.
A hash chain alone cannot show that records were cut from the *end*, nor
resist someone who recomputes every hash after an edit; so the controller
periodically appends a CHECKPOINT record carrying an Ed25519 signature over
the chain head (the sequence number and hash of the record before it), and
keeps the newest checkpoint outside the log as well (``log.py``).  The chain
always begins with such a checkpoint (the genesis, covering zero records),
which binds the log to one signing key from its first line.

Record kinds (they match ``AuditRecordKind`` in ``proto/passivisor/v1/controller.proto``):

- CALL: one call attempt, allowed or refused.  A mutating call is recorded
  *before* it runs with outcome PENDING (the proto's empty outcome);
  read-only and refused calls are recorded once, with their final outcome.
- OUTCOME: the outcome of an earlier PENDING CALL, which ``refers_to`` names;
  principal, method and decision repeat the CALL's so every record reads on
  its own.  Each PENDING CALL is completed at most once.
- CHECKPOINT: the signed chain head.

Canonical encoding.  A record's *body* is a JSON object with sorted keys, no
whitespace, ASCII only and no floats (``json.dumps(..., sort_keys=True,
separators=(",", ":"))``); every string in it is drawn from a restricted
ASCII alphabet, so the encoding needs no escapes and one record has exactly
one encoding.  The record hash is SHA-256 of the body.  The stored line is
the body with one more member, ``"hash"`` (lowercase hex), encoded the same
way.  :func:`decode` is strict: unknown or missing keys, duplicate keys,
wrong types, out-of-range values, a stored hash that does not match the
content, or any byte that differs from the canonical encoding raise
:class:`RecordError`.

The checkpoint signature covers, byte for byte::

    b"passivisor/audit-checkpoint/v1\\n" || u64be(head_sequence) || head_hash (32)
        || u64be(time_ms) || key_id (32, SHA-256 of the raw Ed25519 public key)

where ``head_sequence`` is the checkpoint's own sequence minus one and
``head_hash`` its ``prev``; it is fixed-width so that a verifier in any
language rebuilds it without a JSON library.

Redaction (claims C7, C8).  :func:`redact` turns request fields into the flat
``params`` map of short keys to short strings, and the record model makes key
material unrecordable: a value can only be a short restricted string (never
bytes), bytes are rendered as their length only (except public digests such
as ``image_digest``), and any key whose name contains a denylisted word
(envelope, key, secret, token, password, private, ...) must hold the redacted
marker, or the record cannot be built.  ``client_token`` is the one exception:
it is an idempotency key chosen by the caller to recognise its own retries
(issue 4, section 6), it grants nothing, and logging it lets an auditor tie a
retried call to its first execution.

Invariants that :class:`Verifier` enforces, each failure naming a record:

- sequences are 1, 2, 3, ... in file order (a gap is a removed record, a
  sequence seen too early a reordered one);
- every ``prev`` equals the hash of the record before it;
- record 1 is a checkpoint; every checkpoint is signed by the expected key
  and its signature verifies;
- every OUTCOME completes an open PENDING CALL of the same principal and method;
- (given the signed head) the chain reaches the head and holds it unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import re
import struct
import uuid
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from controller.identity import AUDIT_CHECKPOINT, signed_message

FORMAT_VERSION = 1
HASH_SIZE = 32
SIGNATURE_SIZE = 64
ZERO_HASH = bytes(HASH_SIZE)
MAX_SEQUENCE = (1 << 63) - 1
MAX_TIME_MS = (1 << 63) - 1
MAX_PRINCIPAL = 256
MAX_METHOD = 128
MAX_PARAMS = 32
MAX_KEY = 64
MAX_VALUE = 128
# Every valid record encodes to fewer bytes than this (the longest possible
# record is about 7 KiB; a test builds it).  Reading a line stops here, so a
# corrupt log cannot make the reader buffer without bound.
MAX_LINE_BYTES = 8192

CHECKPOINT_DOMAIN = b"passivisor/audit-checkpoint/v1\n"

#: The principal of records the controller writes about itself (not a caller).
CONTROLLER_PRINCIPAL = "urn:passivisor:controller"
#: Recorded when a caller's certificate carries no URI SAN (the proto's empty principal).
NO_PRINCIPAL = ""

REDACTED = "[redacted]"

# A URI: scheme, ':', then a restricted set of URI characters.  This admits
# SPIFFE IDs (spiffe://controlplane/instance-manager) and URNs and nothing that
# needs escaping in JSON or could be mistaken for markup in a terminal.
_PRINCIPAL = re.compile(r"[a-z][a-z0-9+.-]{0,31}:[A-Za-z0-9._~%/:@+=-]{1,254}")  # and at most MAX_PRINCIPAL
# A gRPC method, full ("/passivisor.v1.HostController/StartInstance") or short
# ("StartInstance"), or an internal event name.
_METHOD = re.compile(r"/?[A-Za-z][A-Za-z0-9_.]{0,126}(/[A-Za-z][A-Za-z0-9_.-]{0,126})?")
_KEY = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
# Printable ASCII without '"' and '\\': no JSON escapes, one encoding.
_VALUE = re.compile(r'[ !#-\[\]-~]*')
_VALUE_CHAR = re.compile(r'[^ !#-\[\]-~]')
_REDACTED_VALUE = re.compile(r"\[redacted(: [0-9]{1,12} (bytes|chars))?\]")
_HEX64 = re.compile(r"[0-9a-f]{64}")

#: A parameter key holding any of these words is secret: its value is never recorded.
DENYLIST = ("envelope", "key", "secret", "token", "password", "passwd", "passphrase", "private", "credential",
            "wrapped", "plaintext", "seed", "psk", "auth", "cookie")
#: Key segments exempt from the denylist.  client_token is an idempotency key, not a secret (module docstring).
ALLOWED_SEGMENTS = frozenset({"client_token"})
#: Bytes fields that are public digests and are recorded in hex; all other bytes appear as their length only.
PUBLIC_BYTES = frozenset({"image_digest", "digest", "fingerprint"})
_MAX_DEPTH = 4


class AuditError(Exception):
    """Base of every error this package raises."""


class RecordError(AuditError):
    """A record that cannot exist: invalid fields, or stored bytes that are not a canonical record."""


class ChainBroken(AuditError):
    """Verification failed.

    ``sequence`` names the first record found edited, removed or reordered (or
    the first record missing from a cut tail); it is None only when no record
    can be named (an unreadable or missing signed head).
    """

    def __init__(self, sequence: int | None, reason: str) -> None:
        where = "audit chain" if sequence is None else f"audit record {sequence}"
        super().__init__(f"{where}: {reason}")
        self.sequence = sequence
        self.reason = reason


class Kind(enum.Enum):
    CALL = "CALL"
    OUTCOME = "OUTCOME"
    CHECKPOINT = "CHECKPOINT"


class Decision(enum.Enum):
    ALLOWED = "ALLOWED"
    DENIED = "DENIED"
    INVALID = "INVALID"
    RATE_LIMITED = "RATE_LIMITED"


class Outcome(enum.Enum):
    """The canonical gRPC status code names, plus PENDING for a call not yet run."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PENDING = "PENDING"


Params = tuple[tuple[str, str], ...]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """SHA-256 of the raw public key: GetHostIdentityResponse.signing_public_key hashed."""
    return sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def is_secret_key(key: str) -> bool:
    """True when a parameter named ``key`` may hold key material and must never be recorded."""
    for segment in key.lower().split("."):
        if segment in ALLOWED_SEGMENTS:
            continue
        if any(word in segment for word in DENYLIST):
            return True
    return False


def checkpoint_message(head_sequence: int, head_hash: bytes, time_ms: int, signer_id: bytes) -> bytes:
    """The exact bytes a checkpoint signature covers (module docstring)."""
    return CHECKPOINT_DOMAIN + struct.pack(">Q", head_sequence) + head_hash + struct.pack(">Q", time_ms) + signer_id


def _canonical(document: Mapping[str, object]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _check_common(sequence: object, time_ms: object, prev_hash: object) -> None:
    if type(sequence) is not int or not 1 <= sequence <= MAX_SEQUENCE:
        raise RecordError(f"sequence must be an integer in [1, {MAX_SEQUENCE}]")
    if type(time_ms) is not int or not 0 <= time_ms <= MAX_TIME_MS:
        raise RecordError("time_ms must be a non-negative integer (Unix milliseconds)")
    if type(prev_hash) is not bytes or len(prev_hash) != HASH_SIZE:
        raise RecordError(f"prev_hash must be {HASH_SIZE} bytes")


def check_params(params: object) -> None:
    """Raise RecordError unless ``params`` is a valid, sorted, redacted parameter tuple."""
    if type(params) is not tuple or len(params) > MAX_PARAMS:
        raise RecordError(f"params must be a tuple of at most {MAX_PARAMS} (key, value) pairs")
    previous = ""
    for pair in params:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
            raise RecordError("params must hold (str, str) pairs")
        key, value = pair
        if len(key) > MAX_KEY or not _KEY.fullmatch(key):
            raise RecordError(f"parameter key {key[:MAX_KEY]!r} is not a short dotted snake_case name")
        if key <= previous:
            raise RecordError("parameter keys must be unique and sorted")
        previous = key
        if len(value) > MAX_VALUE or not _VALUE.fullmatch(value):
            raise RecordError(f"parameter {key}: value is not a short printable ASCII string")
        if is_secret_key(key) and not _REDACTED_VALUE.fullmatch(value):
            raise RecordError(f"parameter {key} may hold key material and must be redacted")


def params_of(mapping: Mapping[str, str]) -> Params:
    """The record form of a parameter mapping (sorted pairs); validated when the record is built."""
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class CallRecord:
    """A CALL or OUTCOME record (module docstring)."""

    sequence: int
    time_ms: int
    kind: Kind
    principal: str
    method: str
    params: Params
    decision: Decision
    outcome: Outcome
    refers_to: int | None
    prev_hash: bytes

    def __post_init__(self) -> None:
        _check_common(self.sequence, self.time_ms, self.prev_hash)
        if self.kind not in (Kind.CALL, Kind.OUTCOME):
            raise RecordError("a call record's kind is CALL or OUTCOME")
        if type(self.principal) is not str or not (
                self.principal == NO_PRINCIPAL
                or (len(self.principal) <= MAX_PRINCIPAL and _PRINCIPAL.fullmatch(self.principal))):
            raise RecordError("principal must be empty or a URI of restricted characters (see audit_principal)")
        if type(self.method) is not str or len(self.method) > MAX_METHOD or not _METHOD.fullmatch(self.method):
            raise RecordError("method must be a gRPC method name (see audit_method)")
        check_params(self.params)
        if not isinstance(self.decision, Decision) or not isinstance(self.outcome, Outcome):
            raise RecordError("decision and outcome must be enum members")
        if self.kind is Kind.CALL:
            if self.refers_to is not None:
                raise RecordError("a CALL record refers to no other record")
            if self.decision is not Decision.ALLOWED and self.outcome in (Outcome.OK, Outcome.PENDING):
                raise RecordError(f"a {self.decision.name} call cannot have outcome {self.outcome.name}")
        else:
            if type(self.refers_to) is not int or not 1 <= self.refers_to < self.sequence:
                raise RecordError("an OUTCOME record refers to an earlier record")
            if self.decision is not Decision.ALLOWED or self.outcome is Outcome.PENDING:
                raise RecordError("an OUTCOME completes an ALLOWED call with a final outcome")

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    def body(self) -> dict[str, object]:
        return {
            "v": FORMAT_VERSION,
            "seq": self.sequence,
            "time_ms": self.time_ms,
            "kind": self.kind.value,
            "principal": self.principal,
            "method": self.method,
            "params": dict(self.params),
            "decision": self.decision.value,
            "outcome": self.outcome.value,
            "refers_to": self.refers_to,
            "prev": self.prev_hash.hex(),
        }

    @functools.cached_property
    def hash(self) -> bytes:
        """SHA-256 of the canonical body: the next record's ``prev_hash``."""
        return sha256(_canonical(self.body()))

    def encode(self) -> bytes:
        """The stored line, without its newline."""
        return _canonical({**self.body(), "hash": self.hash.hex()})


@dataclass(frozen=True)
class CheckpointRecord:
    """A signature over the chain head: the ``sequence - 1`` records before it."""

    sequence: int
    time_ms: int
    prev_hash: bytes
    signer_id: bytes
    signature: bytes

    kind = Kind.CHECKPOINT

    def __post_init__(self) -> None:
        _check_common(self.sequence, self.time_ms, self.prev_hash)
        if type(self.signer_id) is not bytes or len(self.signer_id) != HASH_SIZE:
            raise RecordError(f"signer_id must be {HASH_SIZE} bytes")
        if type(self.signature) is not bytes or len(self.signature) != SIGNATURE_SIZE:
            raise RecordError(f"signature must be {SIGNATURE_SIZE} bytes")

    @property
    def head_sequence(self) -> int:
        """The last record the signature covers (0 for the genesis checkpoint)."""
        return self.sequence - 1

    @property
    def head_hash(self) -> bytes:
        return self.prev_hash

    def message(self) -> bytes:
        return checkpoint_message(self.head_sequence, self.head_hash, self.time_ms, self.signer_id)

    def body(self) -> dict[str, object]:
        return {
            "v": FORMAT_VERSION,
            "seq": self.sequence,
            "time_ms": self.time_ms,
            "kind": Kind.CHECKPOINT.value,
            "prev": self.prev_hash.hex(),
            "key_id": self.signer_id.hex(),
            "sig": self.signature.hex(),
        }

    @functools.cached_property
    def hash(self) -> bytes:
        return sha256(_canonical(self.body()))

    def encode(self) -> bytes:
        return _canonical({**self.body(), "hash": self.hash.hex()})

    def verify_signature(self, public_key: Ed25519PublicKey) -> None:
        """Raise ChainBroken naming this checkpoint unless ``public_key`` signed it."""
        if self.signer_id != key_id(public_key):
            raise ChainBroken(self.sequence, "checkpoint signed by another key than the host's audit key")
        try:
            public_key.verify(self.signature, signed_message(AUDIT_CHECKPOINT, self.message()))
        except InvalidSignature:
            raise ChainBroken(self.sequence, (
                "checkpoint signature does not verify: the checkpoint was forged, or records "
                "before it were rewritten and rehashed")) from None


Record = CallRecord | CheckpointRecord


# --- decoding --------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise RecordError("duplicate key")
    return document


def _no_float(text: str) -> object:
    raise RecordError(f"unexpected number {text[:16]!r}")


class _Reader:
    """Typed access to one decoded object; every mistake is a RecordError naming the field."""

    def __init__(self, value: object, *names: str) -> None:
        if not isinstance(value, dict):
            raise RecordError("expected a JSON object")
        if set(value) != set(names):
            raise RecordError(f"keys {sorted(value)} != {sorted(names)}")
        self.value: dict[str, object] = value

    def integer(self, name: str, hi: int) -> int:
        value = self.value[name]
        if type(value) is not int or not 0 <= value <= hi:
            raise RecordError(f"{name}: expected an integer in [0, {hi}]")
        return value

    def string(self, name: str) -> str:
        value = self.value[name]
        if type(value) is not str:
            raise RecordError(f"{name}: expected a string")
        return value

    def hexbytes(self, name: str, size: int) -> bytes:
        text = self.string(name)
        if len(text) != 2 * size or not re.fullmatch(r"[0-9a-f]*", text):
            raise RecordError(f"{name}: expected {size} bytes of lowercase hex")
        return bytes.fromhex(text)

    def enum(self, name: str, enum_type: type[enum.Enum]) -> enum.Enum:
        text = self.string(name)
        try:
            return enum_type(text)
        except ValueError:
            raise RecordError(f"{name}: unknown {enum_type.__name__} {text[:32]!r}") from None

    def params(self, name: str) -> Params:
        value = self.value[name]
        if not isinstance(value, dict):
            raise RecordError(f"{name}: expected an object")
        if not all(type(v) is str for v in value.values()):
            raise RecordError(f"{name}: expected string values")
        return tuple(sorted((str(k), str(v)) for k, v in value.items()))


_CALL_KEYS = ("v", "seq", "time_ms", "kind", "principal", "method", "params", "decision", "outcome", "refers_to",
              "prev", "hash")
_CHECKPOINT_KEYS = ("v", "seq", "time_ms", "kind", "prev", "key_id", "sig", "hash")


def decode(line: bytes) -> Record:
    """The record stored as ``line`` (without its newline); RecordError unless it is exactly canonical."""
    if len(line) >= MAX_LINE_BYTES:
        raise RecordError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        document = json.loads(line.decode("ascii"), object_pairs_hook=_no_duplicates, parse_float=_no_float,
                              parse_constant=_no_float)
    except UnicodeDecodeError:
        raise RecordError("line is not ASCII") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise RecordError(f"not valid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(document, dict):
        raise RecordError("expected a JSON object")
    kind = document.get("kind")
    record: Record
    if kind == Kind.CHECKPOINT.value:
        r = _Reader(document, *_CHECKPOINT_KEYS)
        _check_version(r)
        record = CheckpointRecord(r.integer("seq", MAX_SEQUENCE), r.integer("time_ms", MAX_TIME_MS),
                                  r.hexbytes("prev", HASH_SIZE), r.hexbytes("key_id", HASH_SIZE),
                                  r.hexbytes("sig", SIGNATURE_SIZE))
    elif kind in (Kind.CALL.value, Kind.OUTCOME.value):
        r = _Reader(document, *_CALL_KEYS)
        _check_version(r)
        refers_to = None if r.value["refers_to"] is None else r.integer("refers_to", MAX_SEQUENCE)
        decision = r.enum("decision", Decision)
        outcome = r.enum("outcome", Outcome)
        assert isinstance(decision, Decision) and isinstance(outcome, Outcome)
        record = CallRecord(r.integer("seq", MAX_SEQUENCE), r.integer("time_ms", MAX_TIME_MS), Kind(kind),
                            r.string("principal"), r.string("method"), r.params("params"), decision, outcome,
                            refers_to, r.hexbytes("prev", HASH_SIZE))
    else:
        raise RecordError("kind: expected CALL, OUTCOME or CHECKPOINT")
    if r.hexbytes("hash", HASH_SIZE) != record.hash:
        raise RecordError("the stored hash does not match the record's content: the record was edited")
    if record.encode() != line:
        raise RecordError("the line is not the canonical encoding of its record")
    return record


def _check_version(r: _Reader) -> None:
    if r.integer("v", 255) != FORMAT_VERSION:
        raise RecordError(f"v: unknown format version (this reader knows {FORMAT_VERSION})")


# --- redaction -------------------------------------------------------------


def _clean(text: str, limit: int = MAX_VALUE) -> str:
    text = _VALUE_CHAR.sub("?", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _normal_key(name: object) -> str:
    key = re.sub(r"[^a-z0-9_]", "_", str(name).lower())
    return key if key[:1].isalpha() else "f_" + key


def _redacted(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[redacted: {len(bytes(value))} bytes]"
    if isinstance(value, str):
        return f"[redacted: {len(value)} chars]"
    return REDACTED


def _render(key: str, value: object) -> str:
    """One scalar as a parameter value; never the content of bytes unless they are a public digest."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _clean(str(value.name))
    if isinstance(value, int | float | uuid.UUID):
        return _clean(str(value))
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if key.rsplit(".", 1)[-1] in PUBLIC_BYTES and 2 * len(data) <= MAX_VALUE:
            return data.hex()
        return f"[{len(data)} bytes]"
    if isinstance(value, list | tuple | set | frozenset):
        return f"[{len(value)} items]"
    return _clean(f"[{type(value).__name__}]")


def _children(value: object) -> list[tuple[object, object]] | None:
    if isinstance(value, Mapping):
        return list(value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    return None


def _flatten(value: object, prefix: str, depth: int, out: list[tuple[str, str]], sensitive: Container[str]) -> None:
    for name, child in _children(value) or []:
        key = f"{prefix}{_normal_key(name)}"
        if is_secret_key(key) or is_secret_key(str(name)) or key in sensitive:
            out.append((key, _redacted(child)))
        elif _children(child) is not None and not isinstance(child, str | bytes):
            if depth + 1 < _MAX_DEPTH:
                _flatten(child, key + ".", depth + 1, out, sensitive)
            else:
                out.append((key, "[object]"))
        else:
            out.append((key, _render(key, child)))


def redact(fields: object, *, sensitive: Container[str] = ()) -> dict[str, str]:
    """The parameter summary of a request: a flat map of short keys to short strings, without key material.

    ``fields`` is a mapping or a dataclass instance (a domain command); nested
    mappings and dataclasses become dotted keys.  A field whose name is in the
    denylist (:func:`is_secret_key`) or whose dotted path is in ``sensitive``
    (the proto's ``sensitive`` constraint) appears as its length only; bytes
    appear as their length unless they are a public digest; lists appear as
    their length; strings are cut to ``MAX_VALUE`` characters.  Total: any
    input gives a valid ``params`` map (at most ``MAX_PARAMS`` entries, the
    last one ``omitted`` counting the rest).
    """
    flat: list[tuple[str, str]] = []
    _flatten(fields, "", 0, flat, sensitive)
    out: dict[str, str] = {}
    for index, (raw_key, value) in enumerate(flat):
        if len(out) == MAX_PARAMS - 1 and index < len(flat) - 1:
            out["omitted"] = f"{len(flat) - index} more fields"
            break
        base = raw_key[:MAX_KEY].rstrip("._")
        key, suffix = base, 2
        while key in out:
            key = f"{base[:MAX_KEY - 4].rstrip('._')}_{suffix}"
            suffix += 1
        # The value was redacted above on the full key.  Shortening a key can only
        # remove words, never add one, but stay total: a key that reads as secret
        # after shortening always holds the marker.
        out[key] = value if not is_secret_key(key) or _REDACTED_VALUE.fullmatch(value) else REDACTED
    return out


def audit_principal(unverified_principal: str | None) -> str:
    """The principal as recorded: the URI SAN when it fits the alphabet, else a stable digest of it."""
    if not unverified_principal:
        return NO_PRINCIPAL
    if len(unverified_principal) <= MAX_PRINCIPAL and _PRINCIPAL.fullmatch(unverified_principal):
        return unverified_principal
    digest = sha256(unverified_principal.encode("utf-8", "surrogateescape")).hex()[:32]
    return f"urn:passivisor:unrecordable-principal:{digest}"


def audit_method(unverified_method: str) -> str:
    """The method as recorded: the gRPC method name when it fits the alphabet, else a stable digest of it."""
    if len(unverified_method) <= MAX_METHOD and _METHOD.fullmatch(unverified_method):
        return unverified_method
    digest = sha256(unverified_method.encode("utf-8", "surrogateescape")).hex()[:32]
    return f"/passivisor.unrecordable/m{digest}"


# --- verification ----------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """What a verified chain holds.  Records after the last checkpoint are covered by hashes only."""

    records: int
    last_sequence: int
    head_hash: bytes
    checkpoints: int
    last_checkpoint: int | None
    unsigned_tail: int
    open_intents: tuple[int, ...]
    torn_tail_bytes: int = 0


class Verifier:
    """Streaming verification: feed records in order with :meth:`add`, then :meth:`finish`.

    ``add`` checks one record against everything before it and either accepts
    it or raises :class:`ChainBroken` leaving the verifier unchanged, so the
    same object also guards appends (:class:`ChainBuilder`).
    ``known_sequences`` (optional) lets a gap be told apart from a reordering.
    """

    def __init__(self, public_key: Ed25519PublicKey, *, known_sequences: Container[int] = ()) -> None:
        self.public_key = public_key
        self.signer_id = key_id(public_key)
        self.next_sequence = 1
        self.head_hash = ZERO_HASH
        self.checkpoints = 0
        self.last_checkpoint: CheckpointRecord | None = None
        self.unsigned = 0
        # PENDING CALLs not yet completed: sequence -> (principal, method).
        self.open_intents: dict[int, tuple[str, str]] = {}
        self._checkpoint_hashes: dict[int, bytes] = {}
        self._known = known_sequences

    def add(self, record: Record) -> None:
        expected = self.next_sequence
        if record.sequence != expected:
            if record.sequence > expected and expected not in self._known:
                raise ChainBroken(expected, f"record {expected} is missing (the next record present is "
                                            f"{record.sequence})")
            raise ChainBroken(expected, f"record {expected} is out of order (found {record.sequence} in its place)")
        if record.prev_hash != self.head_hash:
            if expected == 1:
                raise ChainBroken(1, "the first record's prev_hash is not zero")
            raise ChainBroken(expected - 1, f"record {expected - 1} does not hash to the prev_hash of record "
                                            f"{expected}: it was edited (and its own hash recomputed)")
        if isinstance(record, CheckpointRecord):
            record.verify_signature(self.public_key)
        else:
            if expected == 1:
                raise ChainBroken(1, "the chain does not begin with a signed checkpoint")
            if record.kind is Kind.OUTCOME:
                assert record.refers_to is not None
                if self.open_intents.get(record.refers_to) != (record.principal, record.method):
                    raise ChainBroken(expected, f"OUTCOME for record {record.refers_to}, which is not an open "
                                                "PENDING call of the same principal and method")
        # Accepted: only now change state.
        self.next_sequence = expected + 1
        self.head_hash = record.hash
        if isinstance(record, CheckpointRecord):
            self.checkpoints += 1
            self.last_checkpoint = record
            self.unsigned = 0
            self._checkpoint_hashes[record.sequence] = record.hash
        else:
            self.unsigned += 1
            if record.pending:
                self.open_intents[record.sequence] = (record.principal, record.method)
            elif record.refers_to is not None:
                del self.open_intents[record.refers_to]

    def add_line(self, line: bytes) -> Record:
        """Decode and add one stored line (without its newline); a bad line names the expected sequence."""
        try:
            record = decode(line)
        except RecordError as exc:
            raise ChainBroken(self.next_sequence, str(exc)) from None
        self.add(record)
        return record

    def check_head(self, head: CheckpointRecord) -> None:
        """Raise ChainBroken unless the chain so far reaches the signed ``head`` and holds it unchanged."""
        try:
            head.verify_signature(self.public_key)
        except ChainBroken as exc:
            raise ChainBroken(None, f"the signed head is not valid: {exc.reason}") from None
        if head.sequence >= self.next_sequence:
            raise ChainBroken(self.next_sequence, (
                f"records {self.next_sequence}..{head.sequence} are missing: the signed head names checkpoint "
                f"{head.sequence} but the chain ends at {self.next_sequence - 1} (the tail was cut)"))
        if self._checkpoint_hashes.get(head.sequence) != head.hash:
            raise ChainBroken(head.sequence, f"record {head.sequence} is not the checkpoint the signed head holds")

    def report(self) -> VerifyReport:
        return VerifyReport(
            records=self.next_sequence - 1,
            last_sequence=self.next_sequence - 1,
            head_hash=self.head_hash,
            checkpoints=self.checkpoints,
            last_checkpoint=None if self.last_checkpoint is None else self.last_checkpoint.sequence,
            unsigned_tail=self.unsigned,
            open_intents=tuple(sorted(self.open_intents)),
        )

    def finish(self, head: CheckpointRecord | None = None) -> VerifyReport:
        if head is not None:
            self.check_head(head)
        return self.report()


def verify(records: Iterable[Record], public_key: Ed25519PublicKey, *,
           head: CheckpointRecord | None = None) -> VerifyReport:
    """Verify a whole chain from record 1; raise ChainBroken naming the first bad record.

    ``head`` is the newest signed checkpoint known from elsewhere (``audit.head``,
    or one an auditor pulled earlier); without it a cut tail after the last
    checkpoint in ``records`` cannot be seen.
    """
    records = list(records)
    verifier = Verifier(public_key, known_sequences={r.sequence for r in records})
    for record in records:
        verifier.add(record)
    return verifier.finish(head)


def verify_lines(lines: Iterable[bytes], public_key: Ed25519PublicKey, *,
                 head: CheckpointRecord | None = None) -> VerifyReport:
    """Like :func:`verify`, over stored lines (without newlines), decoding each strictly."""
    lines = list(lines)
    known: set[int] = set()
    for line in lines:
        try:
            known.add(decode(line).sequence)
        except RecordError:
            pass
    verifier = Verifier(public_key, known_sequences=known)
    for line in lines:
        verifier.add_line(line)
    return verifier.finish(head)


# --- building --------------------------------------------------------------


class Signer(Protocol):
    """What signs checkpoints: the host's audit signing key (``checkpoint.CheckpointSigner``)."""

    @property
    def public_key(self) -> Ed25519PublicKey: ...

    def sign(self, message: bytes) -> bytes: ...


class ChainBuilder:
    """Makes the next records of a chain; every record it returns has passed :class:`Verifier`.

    Not thread-safe: ``log.AuditLog`` calls it under its lock.  A rejected
    record (RecordError) consumes no sequence number and leaves the chain as it was.
    """

    def __init__(self, signer: Signer, verifier: Verifier | None = None) -> None:
        self.signer = signer
        self.verifier = verifier if verifier is not None else Verifier(signer.public_key)
        if self.verifier.signer_id != key_id(signer.public_key):
            raise AuditError("the chain is verified against another key than the signer's")

    @property
    def next_sequence(self) -> int:
        return self.verifier.next_sequence

    @property
    def unsigned(self) -> int:
        """Records after the last checkpoint."""
        return self.verifier.unsigned

    @property
    def open_intents(self) -> dict[int, tuple[str, str]]:
        return dict(self.verifier.open_intents)

    def _accept(self, record: Record) -> Record:
        try:
            self.verifier.add(record)
        except ChainBroken as exc:
            raise RecordError(exc.reason) from None
        return record

    def call(self, time_ms: int, principal: str, method: str, params: Mapping[str, str], decision: Decision,
             outcome: Outcome) -> CallRecord:
        """A CALL record: PENDING for a mutating call about to run, else the call's final outcome."""
        record = CallRecord(self.next_sequence, time_ms, Kind.CALL, principal, method, params_of(params), decision,
                            outcome, None, self.verifier.head_hash)
        self._accept(record)
        return record

    def outcome(self, time_ms: int, refers_to: int, outcome: Outcome, result: Mapping[str, str]) -> CallRecord:
        """The OUTCOME of the open PENDING call ``refers_to``."""
        intent = self.verifier.open_intents.get(refers_to)
        if intent is None:
            raise RecordError(f"record {refers_to} is not an open PENDING call")
        principal, method = intent
        record = CallRecord(self.next_sequence, time_ms, Kind.OUTCOME, principal, method, params_of(result),
                            Decision.ALLOWED, outcome, refers_to, self.verifier.head_hash)
        self._accept(record)
        return record

    def checkpoint(self, time_ms: int) -> CheckpointRecord:
        """A checkpoint signing everything before it."""
        sequence, head_hash = self.next_sequence, self.verifier.head_hash
        signer_id = self.verifier.signer_id
        if type(time_ms) is not int or not 0 <= time_ms <= MAX_TIME_MS:
            raise RecordError("time_ms must be a non-negative integer (Unix milliseconds)")
        signature = self.signer.sign(checkpoint_message(sequence - 1, head_hash, time_ms, signer_id))
        record = CheckpointRecord(sequence, time_ms, head_hash, signer_id, signature)
        self._accept(record)
        return record
