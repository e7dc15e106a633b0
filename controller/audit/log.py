"""The audit log file: append-only, fsync'd, group-committed, verified on open (claims C3, C5, C7, C16).

Theory of operation.  ``audit.log`` in the state directory holds one record
per line in the canonical encoding of ``chain.py`` (JSON Lines), opened with
O_APPEND and mode 0600 and never rewritten.  ``audit.head`` holds one line:
the newest checkpoint, replaced atomically (temporary file, fsync, rename,
directory fsync) only *after* the log line it copies is durable, so at any
instant the log reaches at least as far as the head.

Durability.  :meth:`AuditLog.append` returns the record's sequence number once
the record is on disk (fsync).  A mutating call therefore runs::

    intent = log.begin(principal, method, redact(request))   # durable before the call runs
    ... run it ...
    log.finish(intent, Outcome.OK, redact(result))          # its outcome, after

and a read-only or refused call writes one :meth:`AuditLog.append` record.
Every call attempt is recorded (claim C3); the parameters pass through
``chain.redact`` so that key material cannot be recorded (claim C7).

Group commit.  An appender builds its record under the lock, which fixes
its sequence number and hash link, and queues it.  Whoever then finds no
flush under way becomes the *flusher*: it takes everything queued, writes it
with one write(2) and one fsync(2) outside the lock, marks it durable and
wakes the appenders whose records it covered.  While it waits for the disk,
new records queue up; the first of their appenders to wake after the flush
flushes them all, so under concurrency there are far fewer fsyncs than
records.  An appender that waits for its record flushes it itself: no other
thread must be woken and scheduled twice (to take the batch, then to hand
the appender back its answer), which on a busy two-core host costs a
noticeable part of an fsync.  One flush runs at a time (``_flushing``), so
batches reach the file in sequence order.  The writer thread flushes what
nobody waits for (``wait=False``) and writes the checkpoints that fall due
with time.  ``durable=False`` skips every fsync (tests and benchmarks; a
crash may lose acknowledged records).

Checkpoints.  A flush appends a signed checkpoint after
``policy.every`` records or ``policy.interval`` seconds (``checkpoint.py``),
and a final one on :meth:`AuditLog.close`; a new log begins with a genesis
checkpoint.  After writing a batch that holds a checkpoint the flusher
replaces ``audit.head``.

Opening.  The whole chain is read and verified (``chain.Verifier``), and
checked against ``audit.head``; any failure refuses to open with
:class:`chain.ChainBroken` naming the record, and the files are left as they
are (evidence).  To start a new chain an operator moves them aside with
:func:`quarantine`.  Exactly one damage is repaired, the one a crash causes:
a final line with no newline is a write that was interrupted, never
acknowledged (acknowledgement follows the fsync of the whole batch), so it is
truncated.  Then PENDING calls that never got an outcome (the controller
stopped while they ran) are completed with outcome UNKNOWN, and an
``AuditLogOpened`` record states what was found (torn bytes, records after the
last checkpoint, intents closed), so a restart is visible in the log (C16).
Opening reads the whole log (linear time; about 40 000 records a second
here) and keeps one 8-byte file offset per record in memory for paging.
One controller holds the log at a time (flock on the state directory).

What verification detects (``verify_directory``, or an auditor running
``chain.verify`` over pulled records and the signed head):

- any change to a record's bytes: the record itself is named (its stored hash
  or canonical form no longer matches);
- an edited record whose hash was recomputed: named, because the next
  record's ``prev`` no longer matches;
- a removed record: named (sequence gap); reordered records: the first one
  out of place is named;
- a forged or altered checkpoint, or records rewritten and rehashed all the
  way to a checkpoint: the checkpoint is named (its signature fails);
- a cut tail that reaches the newest checkpoint: the first missing record is
  named (``audit.head`` holds that checkpoint); a deleted ``audit.head``.

What it cannot detect, by design:

- a cut, an edit of the last record or forged appended records *after the
  newest checkpoint* (at most ``policy.every`` records or ``policy.interval``
  seconds of them; none after a clean close, which checkpoints).  Records
  found after the last checkpoint on open are reported in the
  ``AuditLogOpened`` record as ``unsigned_tail``;
- a rollback of both files to an older consistent copy, or the deletion of
  both: only an auditor who kept a later checkpoint (``verify(head=...)``)
  sees it, which is why checkpoints are also served by ReadAuditLog (C5);
- anything done by whoever holds the signing key (root on the controller
  host): the chain proves integrity against the log's readers and writers,
  not against the controller itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat
import threading
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import (
    CONTROLLER_PRINCIPAL,
    MAX_LINE_BYTES,
    AuditError,
    ChainBroken,
    ChainBuilder,
    CheckpointRecord,
    Decision,
    Outcome,
    Record,
    RecordError,
    Signer,
    Verifier,
    VerifyReport,
    decode,
)
from .checkpoint import CheckpointPolicy

LOG_NAME = "audit.log"
HEAD_NAME = "audit.head"
MAX_READ_RECORDS = 1000  # ReadAuditLogRequest.max_records
OPENED_EVENT = "AuditLogOpened"
UNKNOWN_NOTE = "the controller stopped before the outcome was recorded"


class AuditLogError(AuditError):
    """The log cannot be opened or written; the controller must not serve calls it cannot audit."""


@dataclass(frozen=True)
class LogStats:
    records: int  # records written by this process, checkpoints included
    batches: int  # write(2) calls of whole batches
    fsyncs: int  # fsync(2) calls, of the log, the head file and the directory
    checkpoints: int


@dataclass(frozen=True)
class OpenReport:
    created: bool
    records: int  # records found on open
    torn_tail_bytes: int  # bytes of an interrupted final line, truncated
    unsigned_tail: int  # records found after the last checkpoint
    closed_intents: tuple[int, ...]  # PENDING calls completed with UNKNOWN


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Scan:
    verifier: Verifier
    offsets: array[int]
    size: int  # bytes of complete lines
    torn: int
    head: CheckpointRecord | None
    log_exists: bool


def _open_regular(path: Path, flags: int) -> int:
    """An fd for the regular file ``path``, refusing symlinks and files others may read or write."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_mode & 0o077:
        os.close(fd)
        raise AuditLogError(f"{path} must be a regular file of mode 0600 (found {status.st_mode:o})")
    return fd


def _read_head(path: Path) -> CheckpointRecord | None:
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditLogError(f"cannot open {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_LINE_BYTES + 1)
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        raise ChainBroken(None, f"{path.name} is not one line")
    try:
        head = decode(data[:-1])
    except RecordError as exc:
        raise ChainBroken(None, f"{path.name}: {exc}") from None
    if not isinstance(head, CheckpointRecord):
        raise ChainBroken(None, f"{path.name} does not hold a checkpoint")
    return head


def _scan(directory: Path, public_key: Ed25519PublicKey) -> _Scan:
    """Read and verify both files without changing them; raise ChainBroken naming the first bad record."""
    # The head first: the writer replaces it only after the log holds it, so a
    # log read afterwards reaches at least as far even while a controller runs.
    head = _read_head(directory / HEAD_NAME)
    verifier = Verifier(public_key)
    offsets: array[int] = array("Q")
    size = torn = 0
    log_path = directory / LOG_NAME
    try:
        fd = _open_regular(log_path, os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
    except OSError as exc:
        raise AuditLogError(f"cannot open {log_path}: {exc.strerror}") from None
    if fd >= 0:
        with os.fdopen(fd, "rb") as file:
            while line := file.readline(MAX_LINE_BYTES):  # bounded: a valid line is shorter
                if not line.endswith(b"\n"):
                    if len(line) < MAX_LINE_BYTES and not file.read(1):
                        torn = len(line)  # the interrupted final write (module docstring)
                        break
                    raise ChainBroken(verifier.next_sequence, f"line longer than {MAX_LINE_BYTES} bytes")
                offsets.append(size)
                verifier.add_line(line[:-1])
                size += len(line)
    records = verifier.next_sequence - 1
    if head is not None:
        verifier.check_head(head)
    elif records > 1:  # more than the genesis: a head was written, and is gone
        raise ChainBroken(None, f"{HEAD_NAME} is missing but {LOG_NAME} holds {records} records")
    return _Scan(verifier, offsets, size, torn, head, fd >= 0)


def verify_directory(directory: Path, public_key: Ed25519PublicKey) -> VerifyReport:
    """Verify ``audit.log`` against ``audit.head`` in ``directory``, read-only; raise ChainBroken.

    Safe while a controller appends: a line it is writing shows as ``torn_tail_bytes``.
    """
    scan = _scan(directory, public_key)
    return dataclasses.replace(scan.verifier.report(), torn_tail_bytes=scan.torn)


def quarantine(directory: Path) -> list[Path]:
    """Move ``audit.log`` and ``audit.head`` aside so that a new chain can start; the old ones are kept.

    The operator's repair after the controller refused to open a broken log.
    Refuses while a controller holds the log open.
    """
    lock = _lock_directory(directory)
    try:
        suffix = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = []
        for name in (LOG_NAME, HEAD_NAME):
            source = directory / name
            if source.exists() or source.is_symlink():
                target = directory / f"{name}.broken-{suffix}"
                if target.exists():
                    raise AuditLogError(f"{target} exists")
                os.rename(source, target)
                moved.append(target)
        os.fsync(lock)
        return moved
    finally:
        os.close(lock)


def _lock_directory(directory: Path) -> int:
    """The state directory, locked: one controller per log (flock is released when the process dies)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogError(f"the audit log in {directory} is open in another controller") from None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class AuditLog:
    """The open audit log of one controller.  Thread-safe; see the module docstring."""

    def __init__(self, directory: Path, signer: Signer, *, durable: bool = True,
                 policy: CheckpointPolicy | None = None, clock: Callable[[], int] = _wall_ms) -> None:
        self.directory = directory
        self.durable = durable
        self.policy = policy if policy is not None else CheckpointPolicy()
        self._clock = clock
        self._signer = signer
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here for records
        self._done = threading.Condition(self._lock)  # appenders wait here for durability
        self._pending: list[Record] = []
        self._flushing = False  # a batch is being written and fsynced (by an appender or the writer)
        self._writer_asleep = False  # the writer waits with no deadline or for a flush: wake it after one
        self._failure: str | None = None
        self._closing = False
        self._closed = False
        self._records = self._batches = self._fsyncs = self._checkpoints = 0
        self._fd = self._dir_fd = -1
        try:
            self._dir_fd = _lock_directory(directory)
            self._open()
        except BaseException as exc:
            self._shutdown()
            if isinstance(exc, OSError):
                raise AuditLogError(f"cannot open the audit log in {directory}: {exc}") from exc
            raise

    # --- opening ---

    def _open(self) -> None:
        scan = _scan(self.directory, self._signer.public_key)
        log_path = self.directory / LOG_NAME
        if scan.torn:
            fd = _open_regular(log_path, os.O_WRONLY)
            try:
                os.ftruncate(fd, scan.size)
                self._fsync(fd)
            finally:
                os.close(fd)
        self._fd = _open_regular(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        if not scan.log_exists:
            self._fsync(self._dir_fd)
        self._builder = ChainBuilder(self._signer, scan.verifier)
        self._offsets = scan.offsets
        self._size = scan.size
        self._durable_sequence = scan.verifier.next_sequence - 1
        self._head = scan.verifier.last_checkpoint
        if self._head is not None and self._head != scan.head:
            self._write_head(self._head)  # the log got ahead of the head before a crash
        self._last_checkpoint_time = time.monotonic()
        found = scan.verifier.report()
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()
        if found.records == 0:
            self.checkpoint()  # the genesis: binds the log to the signing key from record 1
        closed = tuple(sorted(self._builder.open_intents))
        for intent in closed:
            self.finish(intent, Outcome.UNKNOWN, {"note": UNKNOWN_NOTE}, wait=False)
        self.opened = OpenReport(created=not scan.log_exists or found.records == 0, records=found.records,
                                 torn_tail_bytes=scan.torn, unsigned_tail=found.unsigned_tail,
                                 closed_intents=closed)
        self.append(CONTROLLER_PRINCIPAL, OPENED_EVENT, {
            "created": "true" if self.opened.created else "false",
            "records": str(found.records),
            "torn_tail_bytes": str(scan.torn),
            "unsigned_tail": str(found.unsigned_tail),
            "closed_intents": str(len(closed)),
        }, Decision.ALLOWED, Outcome.OK)

    # --- appending ---

    def append(self, principal: str, method: str, params: Mapping[str, str], decision: Decision,
               outcome: Outcome, *, wait: bool = True) -> int:
        """Record one call attempt (a CALL record); return its sequence once durable.

        ``params`` comes from ``chain.redact``; ``principal`` and ``method`` from
        ``chain.audit_principal`` / ``audit_method`` when they are unverified
        input.  ``outcome`` PENDING starts a mutating call (prefer :meth:`begin`).
        ``wait=False`` returns at once; the record is sequenced and reaches the
        disk with the next batch (a crash before that loses it).
        Raises RecordError for an invalid record (nothing is written) and
        AuditLogError when the log cannot be written.
        """
        with self._lock:
            self._check_usable()
            record = self._builder.call(self._clock(), principal, method, params, decision, outcome)
            return self._enqueue(record, wait)

    def begin(self, principal: str, method: str, params: Mapping[str, str]) -> int:
        """Record a mutating call before it runs (outcome PENDING); return once durable."""
        return self.append(principal, method, params, Decision.ALLOWED, Outcome.PENDING)

    def finish(self, intent: int, outcome: Outcome, result: Mapping[str, str] | None = None, *,
               wait: bool = True) -> int:
        """Record the outcome of the call :meth:`begin` returned ``intent`` for."""
        with self._lock:
            self._check_usable()
            record = self._builder.outcome(self._clock(), intent, outcome, result or {})
            return self._enqueue(record, wait)

    def checkpoint(self) -> int:
        """Sign the chain head now; return the checkpoint's sequence once it and ``audit.head`` are durable."""
        with self._lock:
            self._check_usable()
            last = self._builder.verifier.last_checkpoint
            if self._builder.unsigned == 0 and last is not None:
                sequence = last.sequence
            else:
                sequence = self._enqueue_checkpoint()
            self._wait(sequence)
            return sequence

    def sync(self) -> None:
        """Wait until every record appended so far is durable."""
        with self._lock:
            self._check_usable()
            self._wait(self._builder.next_sequence - 1)

    def _check_usable(self) -> None:
        if self._closing or self._closed:
            raise AuditLogError("the audit log is closed")
        if self._failure is not None:
            raise AuditLogError(self._failure)

    def _enqueue(self, record: Record, wait: bool) -> int:
        self._pending.append(record)
        if wait:
            self._wait(record.sequence)
        elif not self._flushing:
            self._work.notify()  # nobody waits for this record: the writer flushes it
        return record.sequence

    def _enqueue_checkpoint(self) -> int:
        record = self._builder.checkpoint(self._clock())
        self._pending.append(record)
        self._last_checkpoint_time = time.monotonic()
        return record.sequence

    def _wait(self, sequence: int) -> None:
        """Return once ``sequence`` is durable, flushing it in this thread if no flush is under way."""
        while self._durable_sequence < sequence:
            if self._failure is not None:
                raise AuditLogError(self._failure)
            if self._flushing:
                self._done.wait()  # the flush under way may cover ``sequence``; if not, lead the next one
            else:
                self._flush()  # the record is queued: no batch is in flight that could hold it

    # --- flushing (an appender or the writer thread; one at a time) ---

    def _flush(self) -> None:
        """Write and fsync everything queued, with a checkpoint if one is due.  Called and returns with the lock held.

        The I/O runs without the lock, so appenders keep queueing for the next batch meanwhile.
        A failed write or fsync fails the log closed for good: nothing after it can be made durable in order.
        """
        elapsed = time.monotonic() - self._last_checkpoint_time
        unsigned = self._builder.unsigned
        if unsigned and (self._closing or self.policy.due(unsigned, elapsed)):
            self._enqueue_checkpoint()
        batch, self._pending = self._pending, []
        self._flushing = True
        self._lock.release()
        try:
            self._write_batch(batch)
        except BaseException as exc:
            with self._lock:
                self._failure = f"writing the audit log failed: {exc!r}"
                self._flushing = False
                self._done.notify_all()
                self._work.notify()
            if isinstance(exc, Exception):
                raise AuditLogError(self._failure) from exc
            raise
        finally:
            self._lock.acquire()

    def _run(self) -> None:
        """The writer thread: flushes records nobody waits for and checkpoints that fall due with time."""
        with contextlib.suppress(BaseException):  # a failed flush has set ``_failure`` and woken everyone
            with self._lock:
                while True:
                    if self._failure is not None:
                        return
                    deadline: float | None = None
                    if not self._flushing:
                        elapsed = time.monotonic() - self._last_checkpoint_time
                        unsigned = self._builder.unsigned
                        if self._pending or (unsigned and (self._closing or self.policy.due(unsigned, elapsed))):
                            self._flush()
                            continue
                        if self._closing:
                            return
                        deadline = self.policy.wait(unsigned, elapsed)
                    self._writer_asleep = deadline is None
                    self._work.wait(deadline)
                    self._writer_asleep = False

    def _write_batch(self, batch: list[Record]) -> None:
        lines = [record.encode() + b"\n" for record in batch]
        offsets, position = [], self._size
        for line in lines:
            offsets.append(position)
            position += len(line)
        _write_all(self._fd, b"".join(lines))
        self._fsync(self._fd)
        checkpoints = [record for record in batch if isinstance(record, CheckpointRecord)]
        if checkpoints:
            self._write_head(checkpoints[-1])
        with self._lock:
            self._offsets.extend(offsets)
            self._size = position
            self._durable_sequence = batch[-1].sequence
            self._head = checkpoints[-1] if checkpoints else self._head
            self._records += len(batch)
            self._batches += 1
            self._checkpoints += len(checkpoints)
            self._flushing = False
            self._done.notify_all()
            if self._pending or self._writer_asleep:
                # Records nobody waits for, or a writer that must (re)arm its checkpoint deadline or finish a close.
                self._work.notify()

    def _write_head(self, record: CheckpointRecord) -> None:
        temporary = self.directory / f".{HEAD_NAME}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, record.encode() + b"\n")
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.directory / HEAD_NAME)
        self._fsync(self._dir_fd)

    def _fsync(self, fd: int) -> None:
        if self.durable:
            os.fsync(fd)
            self._fsyncs += 1  # only the one flusher (or the opener, before the writer starts) gets here

    # --- reading ---

    def read(self, from_sequence: int, max_records: int) -> list[Record]:
        """Durable records from ``from_sequence`` on (0 and 1 both mean the start), at most ``max_records``.

        Each line is decoded strictly; a line that changed under the running
        controller raises ChainBroken naming it.
        """
        if type(from_sequence) is not int or from_sequence < 0:
            raise ValueError("from_sequence must be a non-negative integer")
        if type(max_records) is not int or not 1 <= max_records <= MAX_READ_RECORDS:
            raise ValueError(f"max_records must be in [1, {MAX_READ_RECORDS}]")
        first = max(1, from_sequence)
        with self._lock:
            if self._closed:
                raise AuditLogError("the audit log is closed")
            if first > self._durable_sequence:
                return []
            last = min(self._durable_sequence, first + max_records - 1)
            start = self._offsets[first - 1]
            end = self._offsets[last] if last < len(self._offsets) else self._size
            data = os.pread(self._fd, end - start, start)  # under the lock: close() cannot free the fd
        lines = data.split(b"\n")
        if len(lines) != last - first + 2 or lines[-1]:
            raise ChainBroken(first, "the log file changed under the running controller")
        records = []
        for sequence, line in zip(range(first, last + 1), lines, strict=False):
            try:
                record = decode(line)
            except RecordError as exc:
                raise ChainBroken(sequence, f"{exc} (the file changed under the running controller)") from None
            if record.sequence != sequence:
                raise ChainBroken(sequence, "the log file changed under the running controller")
            records.append(record)
        return records

    def head(self) -> CheckpointRecord:
        """The newest durable checkpoint: what ``audit.head`` holds and auditors pass to ``verify(head=...)``."""
        with self._lock:
            assert self._head is not None  # the genesis is written before __init__ returns
            return self._head

    @property
    def last_sequence(self) -> int:
        """The last durable record."""
        with self._lock:
            return self._durable_sequence

    def stats(self) -> LogStats:
        with self._lock:
            return LogStats(self._records, self._batches, self._fsyncs, self._checkpoints)

    # --- closing ---

    def close(self) -> None:
        """Write what is queued and a final checkpoint, then close the files.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._work.notify()
        self._shutdown()
        if self._failure is not None:
            raise AuditLogError(self._failure)

    def _shutdown(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None and writer.is_alive():
            with self._lock:
                self._closing = True
                self._work.notify()
            writer.join()
        with self._lock:
            self._closed = True
            self._done.notify_all()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
