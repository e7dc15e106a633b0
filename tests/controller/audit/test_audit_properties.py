"""Properties of the audit chain and log (claims C3, C7, C16).

- Any single-byte change anywhere in ``audit.log`` is detected and names the record holding the byte
  (random positions and values; and every position of a small log, exhaustively).
- Any single-byte change of ``audit.head`` is detected.
- Records round-trip through their one canonical encoding.
- Redaction is total: any request shape gives a recordable summary with no key material.
- A model-based state machine: random calls, checkpoints, clean restarts and crashes; the log
  always verifies and always equals the model.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from audit_support import DESCRIBE, PRINCIPAL, START, build_closed_log
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from controller.audit.chain import (
    CONTROLLER_PRINCIPAL,
    MAX_PARAMS,
    PUBLIC_BYTES,
    CallRecord,
    ChainBroken,
    CheckpointRecord,
    Decision,
    Kind,
    Outcome,
    Record,
    decode,
    is_secret_key,
    params_of,
    redact,
    verify,
)
from controller.audit.checkpoint import CheckpointPolicy, CheckpointSigner
from controller.audit.log import HEAD_NAME, LOG_NAME, AuditLog, verify_directory

SIGNER = CheckpointSigner.generate()
_ORIGINALS: dict[str, tuple[bytes, bytes]] = {}


def original(name: str, calls: int) -> tuple[bytes, bytes]:
    """A closed log (its bytes and its head's), built once per shape."""
    if name not in _ORIGINALS:
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch) / "log"
            build_closed_log(directory, SIGNER, calls=calls, every=4)
            _ORIGINALS[name] = ((directory / LOG_NAME).read_bytes(), (directory / HEAD_NAME).read_bytes())
    return _ORIGINALS[name]


def verdict(log: bytes, head: bytes, directory: Path) -> ChainBroken | None:
    (directory / LOG_NAME).write_bytes(log)
    (directory / HEAD_NAME).write_bytes(head)
    for name in (LOG_NAME, HEAD_NAME):
        (directory / name).chmod(0o600)
    try:
        verify_directory(directory, SIGNER.public_key)
    except ChainBroken as exc:
        return exc
    return None


def record_at(data: bytes, position: int) -> int:
    """The sequence of the record whose line holds byte ``position`` (lines are records 1, 2, ...)."""
    return data.count(b"\n", 0, position) + 1


@settings(max_examples=500)
@given(st.data())
def test_any_single_byte_change_of_the_log_names_its_record(data: st.DataObject) -> None:
    log, head = original("medium", 4)
    position = data.draw(st.integers(0, len(log) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != log[position]), label="value")
    changed = log[:position] + bytes([value]) + log[position + 1:]
    with tempfile.TemporaryDirectory() as scratch:
        broken = verdict(changed, head, Path(scratch))
    assert broken is not None
    assert broken.sequence == record_at(log, position), broken


def test_every_byte_of_a_small_log_is_covered(tmp_path: Path) -> None:
    """Exhaustive over positions: flip one bit at each byte of a small log."""
    log, head = original("small", 1)
    assert verdict(log, head, tmp_path) is None
    for position in range(len(log)):
        changed = log[:position] + bytes([log[position] ^ 0x20]) + log[position + 1:]
        broken = verdict(changed, head, tmp_path)
        assert broken is not None and broken.sequence == record_at(log, position), (position, broken)


@given(st.data())
def test_any_single_byte_change_of_the_head_is_detected(data: st.DataObject) -> None:
    log, head = original("medium", 4)
    position = data.draw(st.integers(0, len(head) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != head[position]), label="value")
    with tempfile.TemporaryDirectory() as scratch:
        assert verdict(log, head[:position] + bytes([value]) + head[position + 1:], Path(scratch)) is not None


# --- canonical encoding -----------------------------------------------------------

principals = st.one_of(st.just(""), st.from_regex(r"spiffe://[a-z0-9.-]{1,24}(/[A-Za-z0-9._-]{1,24}){0,4}",
                                                  fullmatch=True))
methods = st.from_regex(r"/passivisor\.v1\.HostController/[A-Z][A-Za-z]{2,30}", fullmatch=True)
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=128)
keys = st.from_regex(r"[a-z][a-z0-9_]{0,15}(\.[a-z][a-z0-9_]{0,15}){0,2}", fullmatch=True).filter(
    lambda k: not is_secret_key(k))
param_maps = st.dictionaries(keys, values, max_size=MAX_PARAMS)


@st.composite
def call_records(draw: st.DrawFn) -> CallRecord:
    sequence = draw(st.integers(2, (1 << 63) - 1))
    decision = draw(st.sampled_from(Decision))
    outcomes = [o for o in Outcome if decision is Decision.ALLOWED or o not in (Outcome.OK, Outcome.PENDING)]
    outcome = draw(st.sampled_from(outcomes))
    kind = Kind.OUTCOME if decision is Decision.ALLOWED and outcome is not Outcome.PENDING and draw(
        st.booleans()) else Kind.CALL
    refers_to = draw(st.integers(1, sequence - 1)) if kind is Kind.OUTCOME else None
    return CallRecord(sequence, draw(st.integers(0, (1 << 63) - 1)), kind, draw(principals), draw(methods),
                      params_of(draw(param_maps)), decision, outcome, refers_to, draw(st.binary(min_size=32,
                                                                                              max_size=32)))


@given(call_records())
def test_call_records_round_trip_through_one_encoding(record: CallRecord) -> None:
    line = record.encode()
    assert decode(line) == record
    assert decode(line).encode() == line


@given(st.integers(1, (1 << 63) - 1), st.integers(0, (1 << 63) - 1), st.binary(min_size=32, max_size=32))
def test_checkpoint_records_round_trip(sequence: int, time_ms: int, prev: bytes) -> None:
    record = CheckpointRecord(sequence, time_ms, prev, SIGNER.key_id, SIGNER.sign(b"x"))
    assert decode(record.encode()) == record


# --- redaction ------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
                    st.uuids(), st.lists(st.integers(), max_size=3))
names = st.one_of(st.text(max_size=80), st.sampled_from(["envelope", "data_key", "client_token", "wrapped_dek",
                                                         "Secret", "volume", "x.y"]))
requests = st.recursive(st.dictionaries(names, scalars, max_size=40),
                        lambda inner: st.dictionaries(names, st.one_of(scalars, inner), max_size=8), max_leaves=60)


def secrets_in(value: object) -> list[bytes]:
    """Every bytes value of at least 4 bytes in ``value`` not under a public digest name."""
    found: list[bytes] = []
    if isinstance(value, dict):
        for key, child in value.items():
            if isinstance(child, bytes) and len(child) >= 4 and str(key) not in PUBLIC_BYTES:
                found.append(child)
            found.extend(secrets_in(child))
    return found


@given(requests)
def test_redaction_is_total_and_never_records_bytes(request: dict[object, object]) -> None:
    params = redact(request)
    record = CallRecord(2, 0, Kind.CALL, PRINCIPAL, START, params_of(params), Decision.ALLOWED, Outcome.PENDING,
                        None, bytes(32))  # builds: every key valid, every secret key redacted
    text = record.encode().decode()
    for secret in secrets_in(request):
        assert secret.hex() not in text


@given(st.dictionaries(st.sampled_from(["envelope", "data_key", "api_token", "password", "wrapped",
                                        "volume.private_pem"]), st.text(min_size=8), min_size=1))
def test_secret_strings_never_appear(request: dict[str, str]) -> None:
    params = redact(request)
    for key, value in request.items():
        recorded = params[key.replace(".", "_")]
        assert recorded.startswith("[redacted") and (value not in recorded)


# --- a model-based test of the log -------------------------------------------------------

Entry = tuple[int, Kind, str, str, Outcome, int | None]
CALLERS = ["spiffe://controlplane/instance-manager", "spiffe://controlplane/auditor", ""]


class AuditLogMachine(RuleBasedStateMachine):
    """The log against a list of the records clients caused; restarts and crashes included."""

    def __init__(self) -> None:
        super().__init__()
        self.scratch = Path(tempfile.mkdtemp())
        self.generation = 0
        self.log = self._open(self.scratch / "0")
        self.model: list[Entry] = []
        self.open: dict[int, tuple[str, str]] = {}

    def _open(self, directory: Path) -> AuditLog:
        directory.mkdir(exist_ok=True)
        return AuditLog(directory, SIGNER, durable=False, policy=CheckpointPolicy(every=3, interval=3600))

    def _restarted(self) -> None:
        """What a restart must add: an UNKNOWN outcome for every call that was running."""
        for intent in sorted(self.open):
            principal, method = self.open.pop(intent)
            found = next(r for r in self._records() if isinstance(r, CallRecord) and r.refers_to == intent)
            self.model.append((found.sequence, Kind.OUTCOME, principal, method, Outcome.UNKNOWN, intent))

    def _records(self) -> list[Record]:
        records: list[Record] = []
        while page := self.log.read(len(records) + 1, 1000):
            records.extend(page)
        return records

    @rule(caller=st.sampled_from(CALLERS[:2]), method=st.sampled_from([START, "/x.Y/StopInstance"]))
    def begin(self, caller: str, method: str) -> None:
        sequence = self.log.begin(caller, method, {"n": str(len(self.model))})
        self.model.append((sequence, Kind.CALL, caller, method, Outcome.PENDING, None))
        self.open[sequence] = (caller, method)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), outcome=st.sampled_from([Outcome.OK, Outcome.FAILED_PRECONDITION, Outcome.UNAVAILABLE]))
    def finish(self, data: st.DataObject, outcome: Outcome) -> None:
        intent = data.draw(st.sampled_from(sorted(self.open)))
        principal, method = self.open.pop(intent)
        sequence = self.log.finish(intent, outcome)
        self.model.append((sequence, Kind.OUTCOME, principal, method, outcome, intent))

    @rule(caller=st.sampled_from(CALLERS), refused=st.sampled_from([
        (Decision.ALLOWED, Outcome.OK), (Decision.DENIED, Outcome.PERMISSION_DENIED),
        (Decision.INVALID, Outcome.INVALID_ARGUMENT), (Decision.RATE_LIMITED, Outcome.RESOURCE_EXHAUSTED)]))
    def call(self, caller: str, refused: tuple[Decision, Outcome]) -> None:
        sequence = self.log.append(caller, DESCRIBE, {"id": str(uuid.uuid4())}, *refused)
        self.model.append((sequence, Kind.CALL, caller, DESCRIBE, refused[1], None))

    @rule()
    def checkpoint(self) -> None:
        sequence = self.log.checkpoint()
        assert self.log.head().sequence == sequence

    @rule()
    def restart(self) -> None:
        directory = self.log.directory
        self.log.close()
        self.log = self._open(directory)
        self._restarted()

    @rule()
    def crash(self) -> None:
        self.log.sync()
        self.generation += 1
        image = self.scratch / str(self.generation)
        image.mkdir()
        for name in (LOG_NAME, HEAD_NAME):
            shutil.copy2(self.log.directory / name, image / name)
        self.log.close()  # the old directory is abandoned as it was at the crash
        self.log = self._open(image)
        self._restarted()

    @invariant()
    def the_log_is_the_model_and_verifies(self) -> None:
        records = self._records()
        report = verify(records, SIGNER.public_key, head=self.log.head())
        assert set(report.open_intents) == set(self.open)
        seen = [(r.sequence, r.kind, r.principal, r.method, r.outcome, r.refers_to) for r in records
                if isinstance(r, CallRecord) and r.principal != CONTROLLER_PRINCIPAL]
        assert seen == self.model

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


TestAuditLogMachine = AuditLogMachine.TestCase
TestAuditLogMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)


@pytest.mark.parametrize("calls", [0, 2])
def test_closed_logs_end_on_a_checkpoint_held_by_the_head(tmp_path: Path, calls: int) -> None:
    lines = build_closed_log(tmp_path / "log", SIGNER, calls=calls)
    assert (tmp_path / "log" / HEAD_NAME).read_bytes() == lines[-1]
    assert isinstance(decode(lines[-1].rstrip(b"\n")), CheckpointRecord)
