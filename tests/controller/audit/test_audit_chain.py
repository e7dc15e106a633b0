"""The pure audit chain (claims C3, C7, C16): canonical encoding, strict decoding, redaction, verification."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import uuid
from collections.abc import Callable

import grpc
import pytest
from audit_support import DESCRIBE, PRINCIPAL, START
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.audit import chain as c
from controller.audit.chain import (
    MAX_KEY,
    MAX_LINE_BYTES,
    MAX_METHOD,
    MAX_PARAMS,
    MAX_PRINCIPAL,
    MAX_VALUE,
    ZERO_HASH,
    CallRecord,
    ChainBroken,
    ChainBuilder,
    CheckpointRecord,
    Decision,
    Kind,
    Outcome,
    Record,
    RecordError,
    Verifier,
    audit_method,
    audit_principal,
    checkpoint_message,
    decode,
    redact,
    verify,
    verify_lines,
)
from controller.audit.checkpoint import CheckpointSigner
from controller.identity import AUDIT_CHECKPOINT, signed_message

# RFC 8032 section 7.1, TEST 1: an independent key, so the vectors below do not depend on our key handling.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def rfc_signer() -> CheckpointSigner:
    return CheckpointSigner(Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET))


def call(**changes: object) -> CallRecord:
    fields: dict[str, object] = dict(sequence=2, time_ms=1_700_000_000_000, kind=Kind.CALL,
                                     principal=PRINCIPAL, method=START, params=(("instance_id", "i-1"),),
                                     decision=Decision.ALLOWED, outcome=Outcome.OK, refers_to=None,
                                     prev_hash=b"\x11" * 32)
    fields.update(changes)
    return CallRecord(**fields)  # type: ignore[arg-type]


def chain_of(signer: CheckpointSigner, calls: int = 4, every: int = 3) -> list[Record]:
    """Genesis, then mutating calls (intent + outcome) and refusals, a checkpoint every ``every`` records."""
    builder = ChainBuilder(signer)
    records: list[Record] = [builder.checkpoint(1000)]
    for index in range(calls):
        intent = builder.call(1001 + index, PRINCIPAL, START, {"instance_id": f"i-{index}"}, Decision.ALLOWED,
                              Outcome.PENDING)
        records.append(intent)
        records.append(builder.outcome(1002 + index, intent.sequence, Outcome.OK, {}))
        records.append(builder.call(1003 + index, "", DESCRIBE, {}, Decision.DENIED, Outcome.UNAUTHENTICATED))
        if builder.unsigned >= every:
            records.append(builder.checkpoint(1004 + index))
    return records


# --- canonical encoding -----------------------------------------------------


def test_known_answer_call_record() -> None:
    """The encoding is spelled out by hand here, so a change to the format cannot pass unnoticed."""
    record = call()
    body = (b'{"decision":"ALLOWED","kind":"CALL","method":"/passivisor.v1.HostController/StartInstance",'
            b'"outcome":"OK","params":{"instance_id":"i-1"},"prev":"' + b"11" * 32 + b'",'
            b'"principal":"spiffe://controlplane/instance-manager","refers_to":null,"seq":2,'
            b'"time_ms":1700000000000,"v":1}')
    digest = hashlib.sha256(body).digest()
    assert record.hash == digest
    assert record.encode() == body[:1] + b'"decision":"ALLOWED","hash":"' + digest.hex().encode() + b'",' + body[
        len(b'{"decision":"ALLOWED",'):]
    assert decode(record.encode()) == record


def test_known_answer_checkpoint_signature() -> None:
    """The signed message is fixed-width binary; the RFC 8032 public key verifies what our signer made."""
    signer = rfc_signer()
    assert signer.public_bytes() == RFC8032_PUBLIC
    assert signer.key_id == hashlib.sha256(RFC8032_PUBLIC).digest()
    message = checkpoint_message(41, b"\xab" * 32, 1_700_000_000_000, signer.key_id)
    assert message == (b"passivisor/audit-checkpoint/v1\n" + (41).to_bytes(8, "big") + b"\xab" * 32
                       + (1_700_000_000_000).to_bytes(8, "big") + hashlib.sha256(RFC8032_PUBLIC).digest())
    record = CheckpointRecord(42, 1_700_000_000_000, b"\xab" * 32, signer.key_id, signer.sign(message))
    assert (record.head_sequence, record.head_hash) == (41, b"\xab" * 32)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    Ed25519PublicKey.from_public_bytes(RFC8032_PUBLIC).verify(  # raises if wrong
        record.signature, signed_message(AUDIT_CHECKPOINT, message))
    assert decode(record.encode()) == record


def test_every_record_has_one_encoding_and_round_trips(signer: CheckpointSigner) -> None:
    for record in chain_of(signer):
        line = record.encode()
        assert decode(line) == record
        assert decode(line).encode() == line
        document = json.loads(line)
        assert list(document) == sorted(document)
        assert bytes.fromhex(document.pop("hash")) == hashlib.sha256(
            json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).digest()


def test_the_longest_record_fits_the_line_bound() -> None:
    params = tuple((f"k{index:02d}" + "x" * (MAX_KEY - 3), "~" * MAX_VALUE) for index in range(MAX_PARAMS))
    record = call(principal="spiffe://" + "p" * (MAX_PRINCIPAL - 9), method="/" + "M" * (MAX_METHOD - 1),
                  params=params, sequence=c.MAX_SEQUENCE, time_ms=c.MAX_TIME_MS, outcome=Outcome.RESOURCE_EXHAUSTED)
    assert len(record.encode()) < MAX_LINE_BYTES
    assert decode(record.encode()) == record


def test_outcomes_are_the_grpc_status_codes_plus_pending() -> None:
    assert {o.value for o in Outcome} == {code.name for code in grpc.StatusCode} | {"PENDING"}


def test_decisions_and_kinds_match_the_proto_enums() -> None:
    from controller.api.gen.passivisor.v1 import controller_pb2 as pb

    decisions = {n.removeprefix("AUDIT_DECISION_") for n in pb.AuditDecision.keys()} - {"UNSPECIFIED"}
    kinds = {n.removeprefix("AUDIT_RECORD_KIND_") for n in pb.AuditRecordKind.keys()} - {"UNSPECIFIED"}
    assert decisions == {d.value for d in Decision}
    assert kinds == {k.value for k in Kind}


# --- strict decoding ----------------------------------------------------------


def mutate(line: bytes, change: Callable[[dict[str, object]], object], *, rehash: bool = True) -> bytes:
    document = json.loads(line)
    change(document)
    if rehash:
        document.pop("hash")
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        document["hash"] = hashlib.sha256(body).hexdigest()
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


GOOD = call().encode()


@pytest.mark.parametrize(("name", "bad", "message"), [
    ("unknown key", mutate(GOOD, lambda d: d.update(extra=1)), "keys"),
    ("missing key", mutate(GOOD, lambda d: d.pop("refers_to")), "keys"),
    ("sequence as string", mutate(GOOD, lambda d: d.update(seq="2")), "seq"),
    ("sequence as boolean", mutate(GOOD, lambda d: d.update(seq=True)), "seq"),
    ("sequence zero", mutate(GOOD, lambda d: d.update(seq=0)), "sequence"),
    ("negative time", mutate(GOOD, lambda d: d.update(time_ms=-1)), "time_ms"),
    ("float time", GOOD.replace(b'"time_ms":1700000000000', b'"time_ms":1700000000000.0'), "number"),
    ("NaN", GOOD.replace(b'"time_ms":1700000000000', b'"time_ms":NaN'), "number"),
    ("unknown kind", mutate(GOOD, lambda d: d.update(kind="NOTE")), "kind"),
    ("unknown version", mutate(GOOD, lambda d: d.update(v=2)), "version"),
    ("unknown decision", mutate(GOOD, lambda d: d.update(decision="MAYBE")), "Decision"),
    ("unknown outcome", mutate(GOOD, lambda d: d.update(outcome="FINE")), "Outcome"),
    ("uppercase hex", mutate(GOOD, lambda d: d.update(prev="AB" * 32)), "hex"),
    ("short hash", mutate(GOOD, lambda d: d.update(prev="ab" * 31)), "hex"),
    ("non-string parameter", mutate(GOOD, lambda d: d.update(params={"n": 1})), "string values"),
    ("nested parameter", mutate(GOOD, lambda d: d.update(params={"n": {"a": "b"}})), "string values"),
    ("secret parameter", mutate(GOOD, lambda d: d.update(params={"envelope": "00ff"})), "redacted"),
    ("stored hash edited", mutate(GOOD, lambda d: d.update(hash="00" * 32), rehash=False), "edited"),
    ("content edited", mutate(GOOD, lambda d: d.update(method="StopInstance"), rehash=False), "edited"),
    ("whitespace", GOOD.replace(b",", b", ", 1), "canonical"),
    ("escaped character", GOOD.replace(b'"i-1"', b'"i\\u002d1"'), "canonical"),
    ("trailing newline", GOOD + b"\n", "canonical"),
    ("duplicate key", GOOD.replace(b'{"decision":"ALLOWED",', b'{"decision":"ALLOWED","decision":"ALLOWED",'),
     "duplicate"),
    ("not JSON", b"{", "JSON"),
    ("not an object", b"[1]", "object"),
    ("not ASCII", GOOD.replace(b"i-1", "i-\u00e9".encode()), "ASCII"),
    ("too long", b" " * MAX_LINE_BYTES, "longer"),
    ("huge integer", GOOD.replace(b'"seq":2', b'"seq":' + b"9" * 5000), "JSON"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "")
def test_decoding_is_strict(name: str, bad: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        decode(bad)


@pytest.mark.parametrize(("field", "value"), [
    ("principal", "spiffe://cp/has space"),
    ("principal", "spiffe://cp/quote\""),
    ("principal", "no-scheme"),
    ("principal", "spiffe://" + "a" * MAX_PRINCIPAL),
    ("method", "Start Instance"),
    ("method", "/a/b/c"),
    ("method", "M" * (MAX_METHOD + 1)),
    ("params", (("Instance", "x"),)),
    ("params", (("b", "1"), ("a", "2"))),
    ("params", (("a", "1"), ("a", "2"))),
    ("params", (("a", 'quote"'),)),
    ("params", (("a", "back\\slash"),)),
    ("params", (("a", "new\nline"),)),
    ("params", (("a", "x" * (MAX_VALUE + 1)),)),
    ("params", (("k" * (MAX_KEY + 1), "x"),)),
    ("params", tuple((f"k{i:02d}", "x") for i in range(MAX_PARAMS + 1))),
    ("params", (("volume.data_key", "0011"),)),
    ("params", (("private_key_pem", "-----BEGIN"),)),
    ("params", [("a", "b")]),
    ("params", (("a", b"bytes"),)),
    ("prev_hash", b"\x00" * 31),
    ("time_ms", 1.5),
    ("refers_to", 1),
])
def test_invalid_call_records_cannot_be_built(field: str, value: object) -> None:
    changes: dict[str, object] = {field: value}
    with pytest.raises(RecordError):
        call(**changes)


@pytest.mark.parametrize(("decision", "outcome", "kind", "refers_to"), [
    (Decision.DENIED, Outcome.OK, Kind.CALL, None),
    (Decision.DENIED, Outcome.PENDING, Kind.CALL, None),
    (Decision.RATE_LIMITED, Outcome.OK, Kind.CALL, None),
    (Decision.ALLOWED, Outcome.PENDING, Kind.OUTCOME, 1),
    (Decision.INVALID, Outcome.INVALID_ARGUMENT, Kind.OUTCOME, 1),
    (Decision.ALLOWED, Outcome.OK, Kind.OUTCOME, None),
    (Decision.ALLOWED, Outcome.OK, Kind.OUTCOME, 2),
    (Decision.ALLOWED, Outcome.OK, Kind.CHECKPOINT, None),
])
def test_inconsistent_decisions_and_outcomes_are_refused(decision: Decision, outcome: Outcome, kind: Kind,
                                                         refers_to: int | None) -> None:
    with pytest.raises(RecordError):
        call(decision=decision, outcome=outcome, kind=kind, refers_to=refers_to)


def test_redacted_markers_are_the_only_values_a_secret_key_may_hold() -> None:
    for marker in ("[redacted]", "[redacted: 32 bytes]", "[redacted: 7 chars]"):
        call(params=(("envelope", marker),))
    with pytest.raises(RecordError):
        call(params=(("envelope", "[redacted: 32 bytes] 00ff"),))


# --- redaction ------------------------------------------------------------------


class Source(enum.Enum):
    FILE = 1


@dataclasses.dataclass(frozen=True)
class Volume:
    volume_id: uuid.UUID
    source: Source
    envelope: bytes


@dataclasses.dataclass(frozen=True)
class AttachVolume:
    instance_id: str
    client_token: str
    volume: Volume
    read_only: bool
    image_digest: bytes
    labels: tuple[str, ...]


KEY = bytes(range(32))
VOLUME_ID = uuid.UUID("7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6")


def test_redaction_of_a_domain_command_drops_key_material_and_keeps_the_rest() -> None:
    command = AttachVolume("i-1", "tok-1", Volume(VOLUME_ID, Source.FILE, KEY), True, b"\xaa" * 32, ("a", "b"))
    assert redact(command) == {
        "instance_id": "i-1",
        "client_token": "tok-1",  # an idempotency key, not a secret (chain module docstring)
        "volume.volume_id": str(VOLUME_ID),
        "volume.source": "FILE",
        "volume.envelope": "[redacted: 32 bytes]",
        "read_only": "true",
        "image_digest": "aa" * 32,
        "labels": "[2 items]",
    }


@pytest.mark.parametrize("name", ["envelope", "data_key", "KeyMaterial", "secret", "api_token", "password",
                                  "private_pem", "wrapped", "plaintext", "seed", "credentials", "authorization",
                                  "session_cookie", "psk"])
def test_denylisted_names_are_redacted_whatever_their_type(name: str) -> None:
    for value in (KEY, KEY.hex(), 12345, [KEY], {"inner": KEY.hex()}, None):
        params = redact({name: value})
        assert len(params) == 1
        (_, text), = params.items()
        assert text.startswith("[redacted"), (name, value, text)
        assert KEY.hex() not in text and "12345" not in text
        call(params=c.params_of(params))  # and the record accepts it


def test_bytes_appear_as_their_length_unless_a_public_digest() -> None:
    assert redact({"blob": KEY, "image_digest": KEY, "digest": b"\x00" * 65}) == {
        "blob": "[32 bytes]", "image_digest": KEY.hex(), "digest": "[65 bytes]"}


def test_strings_are_cleaned_and_cut() -> None:
    params = redact({"name": 'a"b\\c\nd\u00e9', "long": "x" * 500, "n": 10**200, "f": 1.5})
    assert params["name"] == "a?b?c?d?"
    assert len(params["long"]) == MAX_VALUE and params["long"].endswith("...")
    assert len(params["n"]) == MAX_VALUE
    assert params["f"] == "1.5"


def test_keys_are_normalised_and_collisions_kept_apart() -> None:
    params = redact({"Instance-ID": "a", "instance_id": "b", "9lives": "c", "x" * 100: "d"})
    assert params == {"instance_id": "a", "instance_id_2": "b", "f_9lives": "c", "x" * MAX_KEY: "d"}


def test_too_many_fields_are_counted_not_recorded() -> None:
    params = redact({f"f{i:03d}": str(i) for i in range(100)})
    assert len(params) == MAX_PARAMS
    assert params["omitted"] == f"{100 - MAX_PARAMS + 1} more fields"
    call(params=c.params_of(params))


def test_sensitive_paths_from_the_proto_are_redacted() -> None:
    assert redact({"volume": {"name": "vol"}}, sensitive={"volume.name"}) == {"volume.name": "[redacted: 3 chars]"}


def test_deep_nesting_is_cut() -> None:
    assert redact({"a": {"b": {"c": {"d": {"envelope": KEY}}}}}) == {"a.b.c.d": "[object]"}


def test_unverified_principals_and_methods_become_recordable() -> None:
    assert audit_principal(PRINCIPAL) == PRINCIPAL
    assert audit_principal(None) == audit_principal("") == ""
    odd = audit_principal("spiffe://cp/\u202eevil name")
    assert odd.startswith("urn:passivisor:unrecordable-principal:") and odd == audit_principal(
        "spiffe://cp/\u202eevil name")
    assert audit_method(START) == START
    for method in ("/a b/c", "x" * 500, "", "/pkg.Svc/Method/extra"):
        recorded = audit_method(method)
        assert recorded.startswith("/passivisor.unrecordable/m")
        call(principal=odd, method=recorded)


# --- verification -------------------------------------------------------------


def test_a_built_chain_verifies_and_reports(signer: CheckpointSigner) -> None:
    records = chain_of(signer, calls=4, every=3)
    report = verify(records, signer.public_key, head=records[-1] if isinstance(records[-1], CheckpointRecord)
                    else None)
    assert report.records == report.last_sequence == len(records)
    assert report.head_hash == records[-1].hash
    assert report.checkpoints == sum(isinstance(r, CheckpointRecord) for r in records)
    assert report.open_intents == ()
    assert verify_lines([r.encode() for r in records], signer.public_key) == report


def test_the_empty_chain_verifies(signer: CheckpointSigner) -> None:
    assert verify([], signer.public_key).records == 0


def rehash_from(records: list[Record], start: int) -> list[Record]:
    """What an attacker without the key does after an edit: recompute every later link."""
    out = records[:start]
    for record in records[start:]:
        prev = out[-1].hash if out else ZERO_HASH
        out.append(dataclasses.replace(record, prev_hash=prev))
    return out


def test_an_edited_record_with_its_hash_recomputed_is_named(signer: CheckpointSigner) -> None:
    records = chain_of(signer)
    target = records[3]
    assert isinstance(target, CallRecord)
    records[3] = dataclasses.replace(target, params=(("instance_id", "i-evil"),))
    with pytest.raises(ChainBroken) as caught:
        verify(records, signer.public_key)
    assert caught.value.sequence == 4 and "edited" in caught.value.reason


def test_a_rewrite_rehashed_up_to_a_checkpoint_fails_at_that_checkpoint(signer: CheckpointSigner) -> None:
    records = chain_of(signer, calls=4, every=3)
    first_checkpoint_after = next(r.sequence for r in records[3:] if isinstance(r, CheckpointRecord))
    target = records[2]
    assert isinstance(target, CallRecord) and target.kind is Kind.OUTCOME
    records[2] = dataclasses.replace(target, outcome=Outcome.INTERNAL)
    with pytest.raises(ChainBroken) as caught:
        verify(rehash_from(records, 3), signer.public_key)
    assert caught.value.sequence == first_checkpoint_after
    assert "signature" in caught.value.reason


def test_removed_and_reordered_records_are_named(signer: CheckpointSigner) -> None:
    records = chain_of(signer)
    with pytest.raises(ChainBroken, match="record 5 is missing") as caught:
        verify(records[:4] + records[5:], signer.public_key)
    assert caught.value.sequence == 5
    swapped = [*records[:4], records[5], records[4], *records[6:]]
    with pytest.raises(ChainBroken, match="record 5 is out of order") as caught:
        verify(swapped, signer.public_key)
    assert caught.value.sequence == 5
    with pytest.raises(ChainBroken, match="record 1 is missing"):
        verify(records[1:], signer.public_key)


def test_a_chain_must_start_with_a_signed_genesis(signer: CheckpointSigner) -> None:
    with pytest.raises(ChainBroken) as caught:
        verify([call(sequence=1, prev_hash=ZERO_HASH)], signer.public_key)
    assert caught.value.sequence == 1
    with pytest.raises(ChainBroken, match="not zero"):
        verify([call(sequence=1)], signer.public_key)


def test_forged_checkpoints_are_named(signer: CheckpointSigner) -> None:
    records = chain_of(signer, calls=4, every=3)
    index = next(i for i, r in enumerate(records) if i and isinstance(r, CheckpointRecord))
    target = records[index]
    assert isinstance(target, CheckpointRecord)
    other = CheckpointSigner.generate()
    # 1. Signed by another key, but claiming ours.
    forged = dataclasses.replace(target, signature=other.sign(target.message()))
    # 2. Signed by another key and saying so.
    foreign = dataclasses.replace(target, signer_id=other.key_id, signature=other.sign(
        checkpoint_message(target.head_sequence, target.head_hash, target.time_ms, other.key_id)))
    # 3. A flipped bit in a genuine signature.
    flipped = dataclasses.replace(target, signature=bytes([target.signature[0] ^ 1]) + target.signature[1:])
    for bad in (forged, foreign, flipped):
        records_bad = rehash_from([*records[:index], bad, *records[index + 1:]], index)
        with pytest.raises(ChainBroken) as caught:
            verify(records_bad, signer.public_key)
        assert caught.value.sequence == target.sequence


def test_a_cut_tail_is_named_against_the_signed_head(signer: CheckpointSigner) -> None:
    records = chain_of(signer, calls=4, every=3)
    head = records[-1]
    assert isinstance(head, CheckpointRecord)
    assert verify(records, signer.public_key, head=head).unsigned_tail == 0
    for cut in (1, 3, len(records) - 1):
        with pytest.raises(ChainBroken, match="tail was cut") as caught:
            verify(records[:-cut], signer.public_key, head=head)
        assert caught.value.sequence == len(records) - cut + 1
    # Without the head the cut chain is a valid (shorter) chain: the head is what makes it visible.
    verify(records[:-3], signer.public_key)


def test_a_head_that_is_not_in_the_chain_or_not_signed_is_refused(signer: CheckpointSigner) -> None:
    records = chain_of(signer, calls=4, every=3)
    checkpoints = [r for r in records if isinstance(r, CheckpointRecord)]
    other = ChainBuilder(signer)
    stranger = other.checkpoint(5)  # a genuine checkpoint of another chain
    with pytest.raises(ChainBroken, match="not the checkpoint") as caught:
        verify(records, signer.public_key, head=stranger)
    assert caught.value.sequence == 1
    unsigned = dataclasses.replace(checkpoints[-1], signature=bytes(64))
    with pytest.raises(ChainBroken, match="signed head") as caught:
        verify(records, signer.public_key, head=unsigned)
    assert caught.value.sequence is None


def test_outcomes_must_complete_an_open_intent_of_the_same_caller(signer: CheckpointSigner) -> None:
    builder = ChainBuilder(signer)
    builder.checkpoint(1)
    intent = builder.call(2, PRINCIPAL, START, {}, Decision.ALLOWED, Outcome.PENDING)
    done = builder.call(3, PRINCIPAL, DESCRIBE, {}, Decision.ALLOWED, Outcome.OK)
    before = (builder.next_sequence, builder.verifier.head_hash, builder.open_intents)
    with pytest.raises(RecordError, match="not an open PENDING call"):
        builder.outcome(4, done.sequence, Outcome.OK, {})
    with pytest.raises(RecordError):
        builder.outcome(4, 99, Outcome.OK, {})
    assert (builder.next_sequence, builder.verifier.head_hash, builder.open_intents) == before  # unchanged
    builder.outcome(4, intent.sequence, Outcome.OK, {})
    with pytest.raises(RecordError, match="not an open PENDING call"):
        builder.outcome(5, intent.sequence, Outcome.OK, {})  # only once
    # A forged OUTCOME that changes the caller is refused by the verifier, naming it.
    verifier = Verifier(signer.public_key)
    genesis_builder = ChainBuilder(signer, Verifier(signer.public_key))
    records: list[Record] = [genesis_builder.checkpoint(1),
                             genesis_builder.call(2, PRINCIPAL, START, {}, Decision.ALLOWED, Outcome.PENDING)]
    forged = CallRecord(3, 3, Kind.OUTCOME, "spiffe://controlplane/auditor", START, (), Decision.ALLOWED,
                        Outcome.OK, 2, records[-1].hash)
    for record in records:
        verifier.add(record)
    with pytest.raises(ChainBroken) as caught:
        verifier.add(forged)
    assert caught.value.sequence == 3
    assert verifier.next_sequence == 3  # a refused record changes nothing
    assert verifier.report().open_intents == (2,)


def test_a_builder_refuses_an_invalid_record_without_consuming_a_sequence(signer: CheckpointSigner) -> None:
    builder = ChainBuilder(signer)
    builder.checkpoint(1)
    with pytest.raises(RecordError):
        builder.call(2, PRINCIPAL, START, {"envelope": KEY.hex()}, Decision.ALLOWED, Outcome.PENDING)
    assert builder.next_sequence == 2
    assert builder.call(2, PRINCIPAL, START, redact({"envelope": KEY}), Decision.ALLOWED,
                        Outcome.PENDING).sequence == 2


def test_a_builder_and_a_verifier_must_agree_on_the_key(signer: CheckpointSigner) -> None:
    with pytest.raises(c.AuditError):
        ChainBuilder(signer, Verifier(CheckpointSigner.generate().public_key))
