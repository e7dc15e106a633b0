"""The audit log file (claims C3, C7, C16): durability, group commit, crash recovery, tamper evidence.

Every test works on real files in a temporary state directory; "crash images" are copies of
the files taken while a log is open, which is what a restart after a crash finds.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from audit_support import DESCRIBE, PRINCIPAL, START, build_closed_log, populate

from controller.audit.chain import (
    CONTROLLER_PRINCIPAL,
    CallRecord,
    ChainBroken,
    CheckpointRecord,
    Decision,
    Kind,
    Outcome,
    RecordError,
    decode,
    redact,
    verify,
)
from controller.audit.checkpoint import CheckpointPolicy, CheckpointSigner
from controller.audit.log import (
    HEAD_NAME,
    LOG_NAME,
    OPENED_EVENT,
    AuditLog,
    AuditLogError,
    quarantine,
    verify_directory,
)

Opener = Callable[..., AuditLog]


def lines_of(directory: Path) -> list[bytes]:
    return (directory / LOG_NAME).read_bytes().splitlines(keepends=True)


def write_lines(directory: Path, lines: list[bytes]) -> None:
    (directory / LOG_NAME).write_bytes(b"".join(lines))


def crash_image(log: AuditLog, target: Path) -> Path:
    """The files as a crash would leave them now (everything written so far survives)."""
    log.sync()
    target.mkdir()
    for name in (LOG_NAME, HEAD_NAME):
        shutil.copy2(log.directory / name, target / name)
    return target


def everything(log: AuditLog) -> list[CallRecord | CheckpointRecord]:
    records: list[CallRecord | CheckpointRecord] = []
    while page := log.read(len(records) + 1, 1000):
        records.extend(page)
    return records


def seq_of(line: bytes) -> int:
    return int(json.loads(line)["seq"])


def rehash(line: bytes, prev: bytes | None = None, **changes: object) -> bytes:
    """An attacker's edit: change fields, then recompute the record's own hash (no key needed)."""
    document = json.loads(line)
    document.update(changes)
    if prev is not None:
        document["prev"] = prev.hex()
    document.pop("hash")
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    document["hash"] = hashlib.sha256(body).hexdigest()
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def relink(lines: list[bytes], start: int) -> list[bytes]:
    """Recompute every link from ``start`` on, as an attacker without the signing key can."""
    out = lines[:start]
    for line in lines[start:]:
        out.append(rehash(line, prev=decode(out[-1].rstrip(b"\n")).hash))
    return out


def refuses(directory: Path, signer: CheckpointSigner) -> ChainBroken:
    """verify_directory and AuditLog both refuse the directory, with the same verdict, and change nothing."""
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(ChainBroken) as verified:
        verify_directory(directory, signer.public_key)
    with pytest.raises(ChainBroken) as opened:
        AuditLog(directory, signer, durable=False)
    assert (opened.value.sequence, opened.value.reason) == (verified.value.sequence, verified.value.reason)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    return verified.value


# --- appending and reading ----------------------------------------------------


def test_a_new_log_starts_with_a_signed_genesis_and_an_opened_record(open_log: Opener,
                                                                      signer: CheckpointSigner) -> None:
    log = open_log()
    first, opened = log.read(0, 10)
    assert isinstance(first, CheckpointRecord) and first.head_sequence == 0
    assert isinstance(opened, CallRecord) and opened.method == OPENED_EVENT
    assert opened.principal == CONTROLLER_PRINCIPAL
    assert dict(opened.params)["created"] == "true"
    assert log.opened.created and log.opened.records == 0
    assert log.head() == first
    assert (log.directory / HEAD_NAME).read_bytes() == first.encode() + b"\n"
    for name in (LOG_NAME, HEAD_NAME):
        assert (log.directory / name).stat().st_mode & 0o777 == 0o600


def test_append_read_round_trip_and_paging(open_log: Opener, signer: CheckpointSigner) -> None:
    log = open_log()
    intent = log.begin(PRINCIPAL, START, {"instance_id": "i-1", "client_token": "tok"})
    done = log.finish(intent, Outcome.OK, {"state": "RUNNING"})
    read = log.append(PRINCIPAL, DESCRIBE, {"instance_id": "i-1"}, Decision.ALLOWED, Outcome.OK)
    denied = log.append("", START, {}, Decision.DENIED, Outcome.UNAUTHENTICATED)
    assert [intent, done, read, denied] == [3, 4, 5, 6]
    records = log.read(intent, 4)
    assert [r.sequence for r in records] == [3, 4, 5, 6]
    first = records[0]
    assert isinstance(first, CallRecord) and first.pending and dict(first.params) == {
        "instance_id": "i-1", "client_token": "tok"}
    second = records[1]
    assert isinstance(second, CallRecord) and second.kind is Kind.OUTCOME and second.refers_to == 3
    assert (second.principal, second.method, second.outcome) == (PRINCIPAL, START, Outcome.OK)
    assert log.read(0, 2) == log.read(1, 2) == everything(log)[:2]
    assert log.read(5, 1000) == records[2:]
    assert log.read(7, 10) == []
    assert log.last_sequence == 6
    for bad in ((-1, 1), (1, 0), (1, 1001)):
        with pytest.raises(ValueError):
            log.read(*bad)
    verify(everything(log), signer.public_key)


def test_the_file_only_grows_and_a_reopened_chain_continues(open_log: Opener, signer: CheckpointSigner,
                                                            tmp_path: Path) -> None:
    log = open_log()
    populate(log, 2)
    log.close()
    before = (tmp_path / "state" / LOG_NAME).read_bytes()
    assert before.endswith(log.head().encode() + b"\n")  # a clean close leaves no unsigned tail
    again = open_log()
    assert again.opened.records == len(before.splitlines()) and again.opened.unsigned_tail == 0
    populate(again, 1)
    again.close()
    after = (tmp_path / "state" / LOG_NAME).read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    report = verify_directory(tmp_path / "state", signer.public_key)
    assert report.unsigned_tail == 0 and report.open_intents == ()


def test_an_invalid_record_is_refused_and_changes_nothing(open_log: Opener) -> None:
    log = open_log()
    log.sync()
    before = lines_of(log.directory)
    with pytest.raises(RecordError):
        log.append(PRINCIPAL, START, {"envelope": "00112233"}, Decision.ALLOWED, Outcome.PENDING)
    with pytest.raises(RecordError):
        log.append("not a uri", START, {}, Decision.ALLOWED, Outcome.OK)
    with pytest.raises(RecordError):
        log.finish(1, Outcome.OK)  # record 1 is the genesis, not a PENDING call
    log.sync()
    assert lines_of(log.directory) == before
    assert log.append(PRINCIPAL, DESCRIBE, {}, Decision.ALLOWED, Outcome.OK) == len(before) + 1


def test_no_wait_appends_are_sequenced_at_once_and_durable_after_sync(open_log: Opener) -> None:
    log = open_log()
    sequences = [log.append(PRINCIPAL, DESCRIBE, {"n": str(n)}, Decision.ALLOWED, Outcome.OK, wait=False)
                 for n in range(50)]
    assert sequences == list(range(3, 53))
    log.sync()
    assert log.last_sequence >= 52
    assert [dict(r.params)["n"] for r in log.read(3, 50) if isinstance(r, CallRecord)] == [str(n) for n in range(50)]


def test_closed_logs_refuse_everything(open_log: Opener) -> None:
    log = open_log()
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditLogError):
        log.append(PRINCIPAL, DESCRIBE, {}, Decision.ALLOWED, Outcome.OK)
    with pytest.raises(AuditLogError):
        log.read(1, 1)


def test_one_controller_per_log(open_log: Opener) -> None:
    log = open_log()
    with pytest.raises(AuditLogError, match="another controller"):
        open_log()
    with pytest.raises(AuditLogError, match="another controller"):
        quarantine(log.directory)
    log.close()
    open_log().close()


# --- durability and group commit ---------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count fsync(2) calls, each taking 2 ms as a disk write-back would (the real call still runs)."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.002)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_every_acknowledged_record_was_fsynced_first(open_log: Opener, fsyncs: list[int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(durable=True)
    counted = len(fsyncs)
    durable_at_return: list[int] = []
    real_append = AuditLog.append

    def checking(self: AuditLog, *args: object, **kwargs: object) -> int:
        sequence = real_append(self, *args, **kwargs)  # type: ignore[arg-type]
        durable_at_return.append(len(fsyncs))
        return sequence

    monkeypatch.setattr(AuditLog, "append", checking)
    intent = log.begin(PRINCIPAL, START, {})
    assert durable_at_return == [counted + 1]  # the intent's fsync happened before begin() returned
    log.finish(intent, Outcome.OK)
    assert log.stats().fsyncs == len(fsyncs)


def test_group_commit_under_32_threads(open_log: Opener, fsyncs: list[int], signer: CheckpointSigner) -> None:
    log = open_log(durable=True, policy=CheckpointPolicy(every=100_000, interval=3600))
    base_fsyncs, base_sequence = len(fsyncs), log.last_sequence
    threads, per_thread = 32, 25
    sequences: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def client(number: int) -> None:
        try:
            barrier.wait()
            for index in range(per_thread):
                mutating = index % 2 == 0
                principal = f"spiffe://controlplane/client-{number}"
                if mutating:
                    intent = log.begin(principal, START, {"n": str(index)})
                    sequences.append(intent)
                    sequences.append(log.finish(intent, Outcome.OK))
                else:
                    sequences.append(log.append(principal, DESCRIBE, {"n": str(index)}, Decision.ALLOWED,
                                                Outcome.OK))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    records = len(sequences)
    assert sorted(sequences) == list(range(base_sequence + 1, base_sequence + records + 1))
    stored = everything(log)
    assert [r.sequence for r in stored] == list(range(1, base_sequence + records + 1))
    verify(stored, signer.public_key)
    used = len(fsyncs) - base_fsyncs
    print(f"group commit: {records} records, {used} fsyncs, {records / used:.1f} records per fsync")
    assert used * 4 < records, f"{used} fsyncs for {records} records"
    log.close()
    assert verify_directory(log.directory, signer.public_key).open_intents == ()


def test_no_fsync_in_non_durable_mode(open_log: Opener, fsyncs: list[int]) -> None:
    log = open_log(durable=False)
    populate(log, 3)
    log.checkpoint()
    log.close()
    assert fsyncs == [] and log.stats().fsyncs == 0


def test_a_failed_fsync_fails_closed(open_log: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    log = open_log(durable=True)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(AuditLogError, match="I/O error"):
        log.begin(PRINCIPAL, START, {})
    monkeypatch.undo()
    # After a failed fsync the page cache cannot be trusted: the log stays failed.
    with pytest.raises(AuditLogError, match="I/O error"):
        log.append(PRINCIPAL, DESCRIBE, {}, Decision.ALLOWED, Outcome.OK)
    with pytest.raises(AuditLogError):
        log.close()


# --- checkpoints ------------------------------------------------------------------


def test_checkpoints_every_n_records(open_log: Opener, signer: CheckpointSigner) -> None:
    log = open_log(policy=CheckpointPolicy(every=4, interval=3600))
    for n in range(20):
        log.append(PRINCIPAL, DESCRIBE, {"n": str(n)}, Decision.ALLOWED, Outcome.OK)
    records = everything(log)
    positions = [r.sequence for r in records if isinstance(r, CheckpointRecord)]
    assert len(positions) >= 5
    assert all(b - a <= 5 for a, b in itertools.pairwise(positions))
    assert log.head().sequence == positions[-1]


def test_checkpoints_after_an_interval_without_further_records(open_log: Opener) -> None:
    log = open_log(policy=CheckpointPolicy(every=1000, interval=0.05))
    sequence = log.append(PRINCIPAL, DESCRIBE, {}, Decision.ALLOWED, Outcome.OK)
    deadline = time.monotonic() + 5
    while log.head().sequence <= sequence and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.head().sequence == sequence + 1
    assert (log.directory / HEAD_NAME).read_bytes() == log.head().encode() + b"\n"


def test_an_explicit_checkpoint_is_durable_with_the_head_file(open_log: Opener, fsyncs: list[int]) -> None:
    log = open_log(durable=True)
    log.append(PRINCIPAL, DESCRIBE, {}, Decision.ALLOWED, Outcome.OK)
    before = len(fsyncs)
    sequence = log.checkpoint()
    assert len(fsyncs) - before == 3  # the log, the head file, the directory
    assert log.head().sequence == sequence
    assert (log.directory / HEAD_NAME).read_bytes() == log.read(sequence, 1)[0].encode() + b"\n"
    assert log.checkpoint() == sequence  # nothing new to sign


# --- crashes ----------------------------------------------------------------------


def test_a_torn_final_line_is_truncated_and_reported(open_log: Opener, signer: CheckpointSigner,
                                                     tmp_path: Path) -> None:
    log = open_log()
    populate(log, 1)
    image = crash_image(log, tmp_path / "crash")
    intact = (image / LOG_NAME).read_bytes()
    torn = log.read(3, 1)[0].encode()[:40]  # half a line, no newline: an interrupted write
    with (image / LOG_NAME).open("ab") as file:
        file.write(torn)
    assert verify_directory(image, signer.public_key).torn_tail_bytes == len(torn)
    reopened = open_log(image)
    assert reopened.opened.torn_tail_bytes == len(torn)
    reopened.sync()
    assert (image / LOG_NAME).read_bytes().startswith(intact + b"{")  # the torn bytes are gone, not kept
    opened = everything(reopened)[-1]
    assert isinstance(opened, CallRecord) and dict(opened.params)["torn_tail_bytes"] == str(len(torn))
    reopened.close()
    assert verify_directory(image, signer.public_key).torn_tail_bytes == 0


def test_a_call_interrupted_by_a_crash_gets_an_unknown_outcome(open_log: Opener, tmp_path: Path,
                                                               signer: CheckpointSigner) -> None:
    log = open_log()
    intent = log.begin(PRINCIPAL, START, {"instance_id": "i-1"})
    image = crash_image(log, tmp_path / "crash")
    assert verify_directory(image, signer.public_key).open_intents == (intent,)
    reopened = open_log(image)
    assert reopened.opened.closed_intents == (intent,)
    assert reopened.opened.unsigned_tail == 2  # the opened record and the intent were never signed
    outcome, opened = everything(reopened)[-2:]
    assert isinstance(outcome, CallRecord) and outcome.refers_to == intent
    assert outcome.outcome is Outcome.UNKNOWN and outcome.principal == PRINCIPAL
    assert isinstance(opened, CallRecord) and dict(opened.params)["unsigned_tail"] == "2"
    reopened.close()
    assert verify_directory(image, signer.public_key).open_intents == ()


def test_a_head_behind_the_log_is_brought_forward(open_log: Opener, signer: CheckpointSigner,
                                                  tmp_path: Path) -> None:
    """A crash between the checkpoint's fsync in the log and the head file's rename."""
    state = tmp_path / "state"
    lines = build_closed_log(state, signer)
    (state / HEAD_NAME).write_bytes(lines[0])  # the genesis: older than the newest checkpoint
    log = open_log(state)
    assert (state / HEAD_NAME).read_bytes() == lines[-1]
    assert log.head().encode() + b"\n" == lines[-1]


def test_a_crash_while_creating_the_log_is_recovered(open_log: Opener, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOG_NAME).touch(mode=0o600)
    assert open_log(empty).opened.created
    genesis_only = tmp_path / "genesis"
    genesis_only.mkdir()
    source = open_log(tmp_path / "source")
    (genesis_only / LOG_NAME).write_bytes(lines_of(source.directory)[0])
    (genesis_only / LOG_NAME).chmod(0o600)
    assert open_log(genesis_only).opened.records == 1


# --- tampering ----------------------------------------------------------------------


@pytest.fixture
def closed(tmp_path: Path, signer: CheckpointSigner) -> tuple[Path, list[bytes]]:
    directory = tmp_path / "tamper"
    return directory, build_closed_log(directory, signer, calls=4, every=5)


def test_the_untouched_log_verifies(closed: tuple[Path, list[bytes]], signer: CheckpointSigner) -> None:
    directory, lines = closed
    report = verify_directory(directory, signer.public_key)
    assert report.records == len(lines) and report.checkpoints >= 3 and report.unsigned_tail == 0


@pytest.mark.parametrize("index", [0, 3, 7, -2, -1])
def test_a_changed_byte_names_its_record(closed: tuple[Path, list[bytes]], signer: CheckpointSigner,
                                         index: int) -> None:
    directory, lines = closed
    line = bytearray(lines[index])
    position = line.index(b'"time_ms":') + len(b'"time_ms":') + 3
    line[position] = ord("0") + (line[position] - ord("0") + 1) % 10
    lines[index] = bytes(line)
    write_lines(directory, lines)
    broken = refuses(directory, signer)
    assert broken.sequence == seq_of(lines[index]) and "edited" in broken.reason


def test_an_edit_with_its_hash_recomputed_names_the_record(closed: tuple[Path, list[bytes]],
                                                          signer: CheckpointSigner) -> None:
    directory, lines = closed
    lines[4] = rehash(lines[4], params={"instance_id": "i-evil"})
    write_lines(directory, lines)
    assert refuses(directory, signer).sequence == 5


def test_an_edit_rehashed_to_the_end_is_caught_by_the_next_checkpoint(closed: tuple[Path, list[bytes]],
                                                                      signer: CheckpointSigner) -> None:
    directory, lines = closed
    lines[4] = rehash(lines[4], params={"instance_id": "i-evil"})
    lines = relink(lines, 5)
    (directory / HEAD_NAME).write_bytes(lines[-1])
    write_lines(directory, lines)
    checkpoint = next(seq_of(line) for line in lines[5:] if b'"CHECKPOINT"' in line)
    broken = refuses(directory, signer)
    assert broken.sequence == checkpoint and "signature" in broken.reason


def test_a_deleted_record_is_named(closed: tuple[Path, list[bytes]], signer: CheckpointSigner) -> None:
    directory, lines = closed
    del lines[6]
    write_lines(directory, lines)
    broken = refuses(directory, signer)
    assert broken.sequence == 7 and "missing" in broken.reason


def test_swapped_records_are_named(closed: tuple[Path, list[bytes]], signer: CheckpointSigner) -> None:
    directory, lines = closed
    lines[5], lines[8] = lines[8], lines[5]
    write_lines(directory, lines)
    assert refuses(directory, signer).sequence == 6


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_a_cut_tail_is_named_against_the_head_file(closed: tuple[Path, list[bytes]], signer: CheckpointSigner,
                                                   cut: int) -> None:
    directory, lines = closed
    write_lines(directory, lines[:-cut])
    broken = refuses(directory, signer)
    assert broken.sequence == len(lines) - cut + 1 and "tail was cut" in broken.reason


def test_a_log_deleted_under_its_head_is_detected(closed: tuple[Path, list[bytes]],
                                                  signer: CheckpointSigner) -> None:
    directory, _ = closed
    (directory / LOG_NAME).unlink()
    broken = refuses(directory, signer)
    assert broken.sequence == 1 and "tail was cut" in broken.reason


def test_a_deleted_head_file_is_detected(closed: tuple[Path, list[bytes]], signer: CheckpointSigner) -> None:
    directory, _ = closed
    (directory / HEAD_NAME).unlink()
    broken = refuses(directory, signer)
    assert broken.sequence is None and "missing" in broken.reason


def test_a_forged_checkpoint_signature_is_named(closed: tuple[Path, list[bytes]], signer: CheckpointSigner) -> None:
    directory, lines = closed
    index = next(i for i, line in enumerate(lines) if i and b'"CHECKPOINT"' in line)
    record = decode(lines[index].rstrip(b"\n"))
    assert isinstance(record, CheckpointRecord)
    forger = CheckpointSigner.generate()
    lines[index] = rehash(lines[index], sig=forger.sign(record.message()).hex())
    lines = relink(lines, index + 1)
    (directory / HEAD_NAME).write_bytes(lines[-1])
    write_lines(directory, lines)
    broken = refuses(directory, signer)
    assert broken.sequence == record.sequence and "signature" in broken.reason


def test_a_head_file_signed_by_another_key_is_refused(closed: tuple[Path, list[bytes]],
                                                      signer: CheckpointSigner, tmp_path: Path) -> None:
    directory, _ = closed
    other = tmp_path / "other"
    build_closed_log(other, CheckpointSigner.generate())
    shutil.copy2(other / HEAD_NAME, directory / HEAD_NAME)
    assert refuses(directory, signer).sequence is None


def test_what_is_not_detectable_a_cut_after_the_newest_checkpoint(open_log: Opener, signer: CheckpointSigner,
                                                                  tmp_path: Path) -> None:
    """The documented limit: records after the newest checkpoint are covered by hashes only."""
    log = open_log(policy=CheckpointPolicy(every=1000, interval=3600))
    populate(log, 2)
    image = crash_image(log, tmp_path / "crash")
    lines = lines_of(image)
    report = verify_directory(image, signer.public_key)
    assert report.unsigned_tail == len(lines) - report.last_checkpoint  # type: ignore[operator]
    write_lines(image, lines[:-3])
    assert verify_directory(image, signer.public_key).unsigned_tail == report.unsigned_tail - 3
    # ... but the restart says how many unsigned records it found, in the log itself.
    reopened = open_log(image)
    assert reopened.opened.unsigned_tail == report.unsigned_tail - 3


def test_a_refused_log_is_quarantined_and_a_new_chain_starts(closed: tuple[Path, list[bytes]],
                                                             signer: CheckpointSigner, open_log: Opener) -> None:
    directory, lines = closed
    del lines[3]
    write_lines(directory, lines)
    refuses(directory, signer)
    moved = quarantine(directory)
    assert sorted(p.name.split(".broken-")[0] for p in moved) == [HEAD_NAME, LOG_NAME]
    assert [p.read_bytes() for p in moved if p.name.startswith(LOG_NAME)] == [b"".join(lines)]  # evidence kept
    fresh = open_log(directory)
    assert fresh.opened.created and fresh.last_sequence == 2


@pytest.mark.parametrize("problem", ["symlink", "mode"])
def test_unsafe_files_are_refused(tmp_path: Path, signer: CheckpointSigner, problem: str) -> None:
    directory = tmp_path / "unsafe"
    build_closed_log(directory, signer)
    if problem == "symlink":
        (directory / LOG_NAME).rename(directory / "elsewhere")
        (directory / LOG_NAME).symlink_to(directory / "elsewhere")
    else:
        (directory / LOG_NAME).chmod(0o644)
    with pytest.raises(AuditLogError):
        AuditLog(directory, signer, durable=False)


def test_a_line_changed_under_a_running_controller_is_named_on_read(open_log: Opener) -> None:
    log = open_log()
    populate(log, 1)
    log.sync()
    path = log.directory / LOG_NAME
    data = bytearray(path.read_bytes())
    third = data.index(b"\n", data.index(b"\n") + 1) + 1
    data[third + 20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChainBroken) as caught:
        log.read(1, 10)
    assert caught.value.sequence == 3


# --- redaction end to end -------------------------------------------------------------


def test_key_material_never_reaches_the_file(open_log: Opener) -> None:
    data_key, wrapped, secret = os.urandom(32), os.urandom(80), "hunter2-very-secret-passphrase"
    request = {
        "instance_id": "i-1",
        "client_token": "tok-1",
        "volume": {"volume_id": "v-1", "envelope": wrapped},
        "data_key": data_key,
        "key_hex": data_key.hex(),
        "Secret": secret,
        "blob": data_key,  # an innocent name: bytes still appear as their length only
    }
    log = open_log()
    intent = log.begin(PRINCIPAL, "/passivisor.v1.HostController/AttachVolume", redact(request))
    log.finish(intent, Outcome.OK, redact({"plaintext_key": data_key, "volume_id": "v-1"}))
    log.close()
    stored = (log.directory / LOG_NAME).read_bytes() + (log.directory / HEAD_NAME).read_bytes()
    for material in (data_key, wrapped):
        for form in (material, material.hex().encode(), material.hex().upper().encode(),
                     base64.b64encode(material), base64.urlsafe_b64encode(material),
                     base64.b64encode(material).rstrip(b"=")):
            assert form not in stored
    assert secret.encode() not in stored
    assert b'"client_token":"tok-1"' in stored and b'"volume.envelope":"[redacted: 80 bytes]"' in stored
