"""Client tokens: a retried call returns the first result without executing again (claim C11).

Pure domain code: no grpc, no sockets, no asyncio.  Persistence is SQLite from
the standard library, one file in the controller's state directory.

Theory of operation.  Every mutating request carries a ``client_token``.  The
service calls :meth:`IdempotencyStore.begin` before it executes a request and
acts on the :data:`Outcome`:

- :class:`New`: the token was not known; it is now recorded IN_PROGRESS under
  ``(principal, client_token)``.  Execute, then :meth:`~IdempotencyStore.complete`
  with the gRPC status code and the serialized response (or
  :meth:`~IdempotencyStore.abandon` when the operation certainly had no
  effect and the client should be free to retry with the same token);
- :class:`Replay`: the same request already completed; answer with the
  stored status code and response bytes, execute nothing;
- :class:`InProgress`: the same request is executing right now (a client
  retried before the first attempt finished).  The service should answer
  ABORTED with a retry hint: the client retries the same call later and gets
  the result;
- :class:`TokenReused` (raised): the token is bound to a different method or
  different parameters.  The service answers **INVALID_ARGUMENT** with a field
  violation on ``client_token``, as proto/passivisor/v1/controller.proto
  promises.  ALREADY_EXISTS was considered (the refusal depends on state, and
  grpc/status.proto reserves INVALID_ARGUMENT for arguments bad "regardless
  of the state of the system"), and rejected: ALREADY_EXISTS is also
  StartInstance's "the instance already runs", which an idempotent client
  reads as success, so a reused token would be mistaken for the success of a
  different request.  The client's fix is a change to its request (a fresh
  token), never a plain retry, which is what INVALID_ARGUMENT says (AWS's
  IdempotentParameterMismatch is a client error for the same reason).

"The same request" means the same principal, client token, method and
request fingerprint (:func:`request_fingerprint`: SHA-256 over the canonical
request parameters, the token itself excluded).  Tokens are scoped per
principal: the key is ``(principal, client_token)``, so one principal can
neither replay nor block another's token.

Durability.  The store survives a controller crash or restart.  A completion
is committed with ``synchronous=FULL`` (the WAL is fsynced) before
``complete`` returns, so a replayed result is never lost once the client could
have seen it.  The IN_PROGRESS record is committed without an fsync: after a
crash every IN_PROGRESS record is from a dead process, its outcome unknown,
and is turned INTERRUPTED when the store is opened; an INTERRUPTED token with
the same request is handed out again as ``New(recovered=True)`` (the agent
re-validates, so re-executing a Start that did happen is refused there, not
repeated), with different parameters it is still refused.  Losing an
IN_PROGRESS record to a power failure therefore changes nothing observable.
The database is opened in exclusive locking mode: a second controller on
the same state directory is refused (:class:`StoreLocked`) instead of
sharing tokens.

Retention (bounded): a record lives ``retention_s`` (default 24 h) after its
last ``begin``; after that the token is new again.  At most ``max_entries``
records (default 200 000) are kept; above that the oldest finished records
are dropped first, and when only IN_PROGRESS records remain, ``begin``
refuses with :class:`StoreFull`.  Size ``max_entries`` for the expected
mutating call rate times the retention (200 000 / 24 h is 2.3 calls/s).
Expiry uses the wall clock, because it must survive restarts.

What is stored: principal, token, method name, the 32-byte fingerprint, the
state, the gRPC status code and the serialized response.  Never request
parameters, so never key material (the wrapped data key of AttachVolume
enters only the fingerprint's hash); the responses are gRPC answers, which
carry no keys.

Invariants (proved by tests/controller/test_idempotency.py):
- for one ``(principal, token)``, at most one ``begin`` returns ``New`` per
  execution, also under concurrency;
- a refusal (``TokenReused``, ``InProgress``, ``Replay``) writes nothing.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

DATABASE_NAME = "idempotency.sqlite3"
SCHEMA_VERSION = 1
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_MAX_ENTRIES = 200_000
PURGE_INTERVAL_S = 60.0

# The .proto makes client_token a canonical UUID (36 characters); this store only needs a bounded key, so it
# accepts any printable ASCII up to 64 characters and leaves the format to the validation layer.
MAX_CLIENT_TOKEN = 64
MAX_PRINCIPAL = 2048  # a SPIFFE ID (policy.MAX_PRINCIPAL_LENGTH)
MAX_METHOD = 128
MAX_RESPONSE = 1 << 20  # a mutating call's answer is a few hundred bytes; this only catches misuse
MAX_STATUS_CODE = 16  # gRPC codes 0 (OK) .. 16 (UNAUTHENTICATED)
FINGERPRINT_SIZE = 32


class IdempotencyError(Exception):
    """Base of this module's errors."""


class TokenReused(IdempotencyError):
    """The token was first used for another method or other parameters.  Maps to INVALID_ARGUMENT (a field
    violation on ``client_token``); see the module docstring for why not ALREADY_EXISTS."""


class InvalidRequest(IdempotencyError):
    """An argument is malformed (a client token out of bounds, a fingerprint of the wrong size)."""


class NotInProgress(IdempotencyError):
    """``complete`` or ``abandon`` of a token that this store does not hold IN_PROGRESS (a caller bug)."""


class StoreFull(IdempotencyError):
    """Every slot holds a request in progress.  Maps to RESOURCE_EXHAUSTED."""


class StoreError(IdempotencyError):
    """The database cannot be used (unreadable, corrupt, of an unknown schema).  Wraps the cause."""


class StoreLocked(StoreError):
    """Another process holds the store (a second controller on the same state directory)."""


@dataclass(frozen=True)
class TokenKey:
    """The handle of one recorded token: what ``complete`` and ``abandon`` take."""

    principal: str
    client_token: str


@dataclass(frozen=True)
class New:
    """Execute the request, then complete (or abandon) ``key``.  ``recovered``: a previous attempt was
    interrupted by a controller crash, its effect is unknown (worth an audit note)."""

    key: TokenKey
    recovered: bool = False


@dataclass(frozen=True)
class Replay:
    """The request already completed: answer with this, execute nothing."""

    status_code: int
    response: bytes


@dataclass(frozen=True)
class InProgress:
    """The same request is executing now."""


Outcome = New | Replay | InProgress


class _State(enum.Enum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"


# ---------------------------------------------------------------------------------------------------------
# Fingerprints.  The canonical form is injective: every value is a JSON pair [type tag, payload]; mappings
# are sorted by key; floats are refused (two spellings of one number would fingerprint differently, and no
# request parameter is a float).  Bytes become hex, UUIDs their canonical text, enums their value.
# ---------------------------------------------------------------------------------------------------------

Canonical = (
    str | int | bool | bytes | uuid.UUID | enum.Enum | None | Sequence["Canonical"] | Mapping[str, "Canonical"]
)


def _canonical(value: object, where: str) -> object:
    if value is None:
        return ["n", None]
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, enum.Enum):
        return _canonical(value.value, where)  # the value, not the class name: a rename changes nothing
    if isinstance(value, int):
        return ["i", str(value)]  # as text: JSON readers may round large integers
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, bytes | bytearray | memoryview):
        return ["x", bytes(value).hex()]
    if isinstance(value, uuid.UUID):
        return ["u", str(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: mapping keys must be strings")
        return ["m", [[k, _canonical(value[k], f"{where}.{k}")] for k in sorted(value)]]
    if isinstance(value, list | tuple):
        return ["l", [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]]
    raise TypeError(f"{where}: {type(value).__name__} has no canonical form")


def request_fingerprint(method: str, params: Mapping[str, Canonical]) -> bytes:
    """SHA-256 over the method name and the canonical request parameters.

    ``params`` are the validated request's parameters without the client token (a ``client_token`` key is
    refused, so that a wiring mistake cannot make every retry look like a new request).
    """
    if "client_token" in params:
        raise TypeError("the fingerprint excludes the client token; remove it from params")
    document = ["passivisor.idempotency.v1", method, _canonical(params, "params")]
    text = json.dumps(document, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).digest()


def _check_token(client_token: str) -> None:
    if not isinstance(client_token, str) or not 1 <= len(client_token) <= MAX_CLIENT_TOKEN \
            or not all("!" <= c <= "~" for c in client_token):
        raise InvalidRequest(f"client_token must be 1 to {MAX_CLIENT_TOKEN} printable ASCII characters")


def _check_text(name: str, value: str, limit: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise InvalidRequest(f"{name} must be a string of 1 to {limit} characters")


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tokens (
        principal    TEXT    NOT NULL,
        client_token TEXT    NOT NULL,
        method       TEXT    NOT NULL,
        fingerprint  BLOB    NOT NULL CHECK (length(fingerprint) = 32),
        state        TEXT    NOT NULL CHECK (state IN ('in_progress', 'completed', 'interrupted')),
        status_code  INTEGER,
        response     BLOB,
        touched_at   REAL    NOT NULL,
        PRIMARY KEY (principal, client_token)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS tokens_by_age ON tokens (touched_at)",
)


class IdempotencyStore:
    """The persisted token store.  Thread-safe (one connection behind a lock); one process per file."""

    def __init__(
        self,
        state_dir: Path,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not retention_s > 0:
            raise ValueError("retention_s must be positive")
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError("max_entries must be a positive integer")
        self.path = state_dir / DATABASE_NAME
        self.retention_s = float(retention_s)
        self.max_entries = max_entries
        self._clock = wall_clock
        self._lock = threading.Lock()
        self._conn = self._open()
        self._next_purge = 0.0
        try:
            with self._lock, self._errors():
                self._count = self._scalar("SELECT count(*) FROM tokens")
                self._purge(self._clock())
        except BaseException:
            self._conn.close()
            raise

    # -- opening --------------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            # Created 0600 before SQLite sees it; SQLite gives its -wal file the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            # Exclusive locking mode before WAL: no shared-memory index, and a second process is refused.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot use write-ahead logging (journal mode {mode})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(f"{self.path}: unknown schema version {version}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            # Whatever was in progress belonged to a process that is gone: its outcome is unknown.
            conn.execute("UPDATE tokens SET state = 'interrupted' WHERE state = 'in_progress'")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except StoreError:
            conn.close()
            raise
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc):
                raise StoreLocked(f"{self.path} is in use by another process") from exc
            raise StoreError(f"{self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.path}: {exc}") from exc
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> IdempotencyStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- the API --------------------------------------------------------------------------------------

    def begin(self, principal: str, method: str, client_token: str, fingerprint: bytes) -> Outcome:
        """Look the token up and, if it is new, record it IN_PROGRESS.  See the module docstring."""
        _check_text("principal", principal, MAX_PRINCIPAL)
        _check_text("method", method, MAX_METHOD)
        _check_token(client_token)
        if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_SIZE:
            raise InvalidRequest(f"fingerprint must be {FINGERPRINT_SIZE} bytes (request_fingerprint)")
        key = TokenKey(principal, client_token)
        with self._lock, self._errors():
            now = self._clock()
            row = self._conn.execute(
                "SELECT method, fingerprint, state, status_code, response, touched_at FROM tokens "
                "WHERE principal = ? AND client_token = ?", (principal, client_token)).fetchone()
            if row is not None:
                stored_method, stored_fingerprint, raw_state, status_code, response, touched_at = row
                state = self._state(raw_state)
                if type(touched_at) not in (int, float):
                    raise StoreError(f"{self.path}: corrupt record time {touched_at!r:.40}")
                expired = state is not _State.IN_PROGRESS and touched_at < now - self.retention_s
                if not expired:
                    if stored_method != method or stored_fingerprint != fingerprint:
                        raise TokenReused(f"client token {client_token!r} was first used for {stored_method} "
                                          "with other parameters")
                    if state is _State.IN_PROGRESS:
                        return InProgress()
                    if state is _State.COMPLETED:
                        return self._replay(status_code, response)
                    self._write("UPDATE tokens SET state = 'in_progress', touched_at = ? "
                                "WHERE principal = ? AND client_token = ?", (now, principal, client_token))
                    return New(key, recovered=True)
            # New (or expired, which is the same): make room, then record it.
            if row is None:
                if now >= self._next_purge or self._count >= self.max_entries:
                    self._purge(now)
                if self._count >= self.max_entries:
                    raise StoreFull(f"{self._count} client tokens are in progress")
            self._write("INSERT OR REPLACE INTO tokens (principal, client_token, method, fingerprint, state, "
                        "touched_at) VALUES (?, ?, ?, ?, 'in_progress', ?)",
                        (principal, client_token, method, fingerprint, now))
            if row is None:
                self._count += 1
            return New(key)

    def complete(self, key: TokenKey, status_code: int, response: bytes) -> None:
        """Record the result of ``key``'s execution, durably (fsync) before returning."""
        if type(status_code) is not int or not 0 <= status_code <= MAX_STATUS_CODE:
            raise InvalidRequest(f"status_code must be a gRPC status code (0..{MAX_STATUS_CODE})")
        if not isinstance(response, bytes) or len(response) > MAX_RESPONSE:
            raise InvalidRequest(f"response must be at most {MAX_RESPONSE} bytes")
        with self._lock, self._errors():
            changed = self._write(
                "UPDATE tokens SET state = 'completed', status_code = ?, response = ? "
                "WHERE principal = ? AND client_token = ? AND state = 'in_progress'",
                (status_code, response, key.principal, key.client_token), durable=True)
            if changed != 1:
                raise NotInProgress(f"client token {key.client_token!r} of {key.principal} is not in progress")

    def abandon(self, key: TokenKey) -> None:
        """Forget ``key`` (in progress), for an execution that certainly had no effect: the client may retry
        with the same token and the request runs again."""
        with self._lock, self._errors():
            changed = self._write("DELETE FROM tokens WHERE principal = ? AND client_token = ? "
                                  "AND state = 'in_progress'", (key.principal, key.client_token))
            if changed != 1:
                raise NotInProgress(f"client token {key.client_token!r} of {key.principal} is not in progress")
            self._count -= 1

    def __len__(self) -> int:
        with self._lock:
            return self._count

    # -- internals (called with the lock held) --------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _write(self, sql: str, args: tuple[object, ...], *, durable: bool = False) -> int:
        # Only completions need to reach the disk before we answer (see Durability above).
        self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            changed = self._conn.execute(sql, args).rowcount
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return changed

    def _scalar(self, sql: str, args: tuple[object, ...] = ()) -> int:
        value = self._conn.execute(sql, args).fetchone()[0]
        if type(value) is not int:
            raise StoreError(f"{self.path}: unexpected value {value!r:.40}")
        return value

    def _state(self, raw: object) -> _State:
        try:
            return _State(raw)
        except ValueError:
            raise StoreError(f"{self.path}: corrupt record state {raw!r:.40}") from None

    def _replay(self, status_code: object, response: object) -> Replay:
        if type(status_code) is not int or not 0 <= status_code <= MAX_STATUS_CODE or not isinstance(response, bytes):
            raise StoreError(f"{self.path}: corrupt completed record")
        return Replay(status_code, response)

    def _purge(self, now: float) -> None:
        self._next_purge = now + PURGE_INTERVAL_S
        self._write("DELETE FROM tokens WHERE state != 'in_progress' AND touched_at < ?", (now - self.retention_s,))
        self._count = self._scalar("SELECT count(*) FROM tokens")
        excess = self._count - self.max_entries + 1  # leave room for the record about to be added
        if excess > 0:
            self._write("DELETE FROM tokens WHERE (principal, client_token) IN (SELECT principal, client_token "
                        "FROM tokens WHERE state != 'in_progress' ORDER BY touched_at LIMIT ?)", (excess,))
            self._count = self._scalar("SELECT count(*) FROM tokens")
