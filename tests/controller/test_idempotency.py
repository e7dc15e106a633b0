"""Client tokens (claim C11): replay without re-execution, reuse refused, per-principal scope, restarts and
crashes, concurrency, bounded retention.  Uses a real SQLite file in tmp_path; the crash tests start a child
Python process that dies without closing the store."""

from __future__ import annotations

import enum
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule

from controller.idempotency import (
    DATABASE_NAME,
    MAX_CLIENT_TOKEN,
    MAX_RESPONSE,
    Canonical,
    IdempotencyStore,
    InProgress,
    InvalidRequest,
    New,
    NotInProgress,
    Replay,
    StoreError,
    StoreFull,
    StoreLocked,
    TokenKey,
    TokenReused,
    request_fingerprint,
)

ROOT = Path(__file__).resolve().parents[2]
ALICE = "spiffe://controlplane/instance-manager"
BOB = "spiffe://controlplane/volume-attacher"
IID = uuid.UUID("6f1c2a4e-0b7d-4c1e-9a53-2f0d8e6b1c77")
START: dict[str, Canonical] = {"instance_id": IID, "vcpus": 2, "memory_mib": 512, "image_digest": bytes(32)}
FP = request_fingerprint("StartInstance", START)
FP_OTHER = request_fingerprint("StartInstance", {**START, "vcpus": 4})
RESPONSE = b"\x0a\x10" + IID.bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[IdempotencyStore]:
    with IdempotencyStore(tmp_path, wall_clock=clock) as s:
        yield s


def rows(store: IdempotencyStore) -> list[tuple[object, ...]]:
    """The whole table, as the database holds it (white box: the refusal tests compare it)."""
    return list(store._conn.execute("SELECT * FROM tokens ORDER BY principal, client_token"))


def new_key(outcome: object) -> TokenKey:
    assert isinstance(outcome, New), outcome
    return outcome.key


# ---------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------


class Mode(enum.Enum):
    GRACEFUL = 1


def test_the_fingerprint_is_a_sha256_independent_of_key_order() -> None:
    assert len(FP) == 32
    assert request_fingerprint("StartInstance", dict(reversed(list(START.items())))) == FP
    assert request_fingerprint("StopInstance", START) != FP  # the method is part of it


@pytest.mark.parametrize("change", [
    {"vcpus": 3}, {"memory_mib": 513}, {"image_digest": bytes(31) + b"\x01"}, {"instance_id": uuid.uuid4()},
    {"extra": None},
])
def test_any_parameter_change_changes_the_fingerprint(change: dict[str, Canonical]) -> None:
    assert request_fingerprint("StartInstance", {**START, **change}) != FP


def test_the_canonical_form_keeps_types_apart() -> None:
    values: list[object] = [1, "1", True, b"\x01", None, [1], (1,), {"1": 1}, "true", 0, False, "", b"", [], {},
                            uuid.UUID(int=1), str(uuid.UUID(int=1)), [[1]], ["l", [1]]]
    prints = [request_fingerprint("M", {"v": v}) for v in values]  # type: ignore[dict-item]
    # Lists and tuples are the same sequence; everything else differs.
    assert len(set(prints)) == len(values) - 1
    assert request_fingerprint("M", {"v": Mode.GRACEFUL}) == request_fingerprint("M", {"v": 1})
    assert request_fingerprint("M", {"v": 2**80}) != request_fingerprint("M", {"v": 2**80 + 1})


def test_the_fingerprint_refuses_the_token_floats_and_unknown_types() -> None:
    with pytest.raises(TypeError, match="client token"):
        request_fingerprint("StartInstance", {**START, "client_token": "t"})
    for bad in (1.5, object(), {1: "x"}, {"a": [set()]}):
        with pytest.raises(TypeError):
            request_fingerprint("M", {"v": bad})  # type: ignore[dict-item]


@given(st.dictionaries(st.text(max_size=5), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5) | st.uuids(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8), max_size=4).filter(lambda d: "client_token" not in d))
def test_the_fingerprint_ignores_key_order_and_sees_any_added_key(params: dict[str, Canonical]) -> None:
    first = request_fingerprint("M", params)
    assert first == request_fingerprint("M", dict(sorted(params.items(), reverse=True)))
    assert first != request_fingerprint("M", {**params, "\x00extra": 0})


# ---------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------


def test_a_completed_request_is_replayed_without_executing_again(store: IdempotencyStore) -> None:
    key = new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    assert key == TokenKey(ALICE, "t-1")
    store.complete(key, 0, RESPONSE)
    for _ in range(3):
        assert store.begin(ALICE, "StartInstance", "t-1", FP) == Replay(0, RESPONSE)
    assert len(store) == 1


def test_an_error_result_is_replayed_too(store: IdempotencyStore) -> None:
    key = new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    store.complete(key, 9, b"")  # FAILED_PRECONDITION
    assert store.begin(ALICE, "StartInstance", "t-1", FP) == Replay(9, b"")


def test_a_retry_while_in_progress_is_told_so(store: IdempotencyStore) -> None:
    new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    before = rows(store)
    assert store.begin(ALICE, "StartInstance", "t-1", FP) == InProgress()
    assert rows(store) == before


@pytest.mark.parametrize("finish", ["in_progress", "completed"])
@pytest.mark.parametrize(("method", "fingerprint"), [("StartInstance", FP_OTHER), ("StopInstance", FP),
                                                     ("StopInstance", FP_OTHER)])
def test_the_same_token_with_other_parameters_is_refused_and_changes_nothing(
        store: IdempotencyStore, clock: Clock, finish: str, method: str, fingerprint: bytes) -> None:
    key = new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    if finish == "completed":
        store.complete(key, 0, RESPONSE)
    before = rows(store)
    clock.now += 60
    with pytest.raises(TokenReused, match="t-1"):
        store.begin(ALICE, method, "t-1", fingerprint)
    assert rows(store) == before


def test_tokens_are_scoped_per_principal(store: IdempotencyStore) -> None:
    alice = new_key(store.begin(ALICE, "StartInstance", "shared", FP))
    store.complete(alice, 0, RESPONSE)
    # Bob cannot replay Alice's result, nor is he blocked by her token (with any parameters).
    bob = new_key(store.begin(BOB, "StartInstance", "shared", FP_OTHER))
    assert bob == TokenKey(BOB, "shared")
    assert store.begin(BOB, "StartInstance", "shared", FP_OTHER) == InProgress()
    store.complete(bob, 5, b"bob")
    assert store.begin(ALICE, "StartInstance", "shared", FP) == Replay(0, RESPONSE)
    assert store.begin(BOB, "StartInstance", "shared", FP_OTHER) == Replay(5, b"bob")
    with pytest.raises(TokenReused):
        store.begin(BOB, "StartInstance", "shared", FP)


def test_abandon_lets_the_same_token_run_again(store: IdempotencyStore) -> None:
    key = new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    store.abandon(key)
    assert len(store) == 0
    # Abandoned means forgotten: even other parameters are a new request now.
    assert store.begin(ALICE, "StartInstance", "t-1", FP_OTHER) == New(key)


def test_complete_and_abandon_need_a_token_in_progress(store: IdempotencyStore) -> None:
    key = new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    store.complete(key, 0, RESPONSE)
    before = rows(store)
    with pytest.raises(NotInProgress):
        store.complete(key, 2, b"again")
    with pytest.raises(NotInProgress):
        store.abandon(key)
    with pytest.raises(NotInProgress):
        store.complete(TokenKey(BOB, "t-1"), 0, b"")
    assert rows(store) == before


@pytest.mark.parametrize("token", ["", "x" * (MAX_CLIENT_TOKEN + 1), "has space", "tab\t", "é", "\x00", "\x7f"])
def test_malformed_client_tokens_are_refused(store: IdempotencyStore, token: str) -> None:
    with pytest.raises(InvalidRequest):
        store.begin(ALICE, "StartInstance", token, FP)
    assert rows(store) == []


def test_other_malformed_arguments_are_refused(store: IdempotencyStore) -> None:
    assert isinstance(store.begin(ALICE, "StartInstance", "x" * MAX_CLIENT_TOKEN, FP), New)
    for principal, method, fingerprint in [("", "M", FP), (ALICE, "", FP), (ALICE, "M", FP[:31]),
                                           (ALICE, "M", FP + b"\x00"), (ALICE, "M", FP.hex())]:
        with pytest.raises(InvalidRequest):
            store.begin(principal, method, "t", fingerprint)  # type: ignore[arg-type]
    key = new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    for code, response in [(-1, b""), (17, b""), (True, b""), (0, "text"), (0, b"x" * (MAX_RESPONSE + 1))]:
        with pytest.raises(InvalidRequest):
            store.complete(key, code, response)  # type: ignore[arg-type]
    assert store.begin(ALICE, "StartInstance", "t-1", FP) == InProgress()


# ---------------------------------------------------------------------------------------------------------
# Restarts and crashes
# ---------------------------------------------------------------------------------------------------------


def test_tokens_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    with IdempotencyStore(tmp_path, wall_clock=clock) as first:
        store_key = new_key(first.begin(ALICE, "StartInstance", "t-1", FP))
        first.complete(store_key, 0, RESPONSE)
    with IdempotencyStore(tmp_path, wall_clock=clock) as second:
        assert second.begin(ALICE, "StartInstance", "t-1", FP) == Replay(0, RESPONSE)
        with pytest.raises(TokenReused):
            second.begin(ALICE, "StartInstance", "t-1", FP_OTHER)
        assert len(second) == 1


def test_a_request_interrupted_by_a_restart_runs_again_with_the_same_parameters_only(
        tmp_path: Path, clock: Clock) -> None:
    with IdempotencyStore(tmp_path, wall_clock=clock) as first:
        new_key(first.begin(ALICE, "StartInstance", "t-1", FP))
    with IdempotencyStore(tmp_path, wall_clock=clock) as second:
        before = rows(second)
        with pytest.raises(TokenReused):
            second.begin(ALICE, "StartInstance", "t-1", FP_OTHER)
        assert rows(second) == before
        outcome = second.begin(ALICE, "StartInstance", "t-1", FP)
        assert outcome == New(TokenKey(ALICE, "t-1"), recovered=True)
        assert second.begin(ALICE, "StartInstance", "t-1", FP) == InProgress()
        second.complete(new_key(outcome), 0, RESPONSE)
        assert second.begin(ALICE, "StartInstance", "t-1", FP) == Replay(0, RESPONSE)


CHILD = """
import os, sys
from pathlib import Path
from controller.idempotency import IdempotencyStore, request_fingerprint
store = IdempotencyStore(Path(sys.argv[1]))
fp = request_fingerprint("StartInstance", {"n": 1})
done = store.begin("spiffe://a/b", "StartInstance", "done", fp)
store.complete(done.key, 0, b"result")
store.begin("spiffe://a/b", "StartInstance", "pending", fp)
if sys.argv[2] == "hold":
    print("open", flush=True)
    sys.stdin.readline()
os._exit(0)  # no close, no commit of anything still open: a crash as far as SQLite can tell
"""


def child(state_dir: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(state_dir), mode], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_completed_token_survives_a_crash_of_the_process(tmp_path: Path) -> None:
    process = child(tmp_path, "crash")
    assert process.wait(timeout=60) == 0
    fp = request_fingerprint("StartInstance", {"n": 1})
    with IdempotencyStore(tmp_path) as store:
        assert store.begin("spiffe://a/b", "StartInstance", "done", fp) == Replay(0, b"result")
        assert store.begin("spiffe://a/b", "StartInstance", "pending", fp) == New(
            TokenKey("spiffe://a/b", "pending"), recovered=True)


def test_a_second_process_cannot_open_the_store(tmp_path: Path) -> None:
    process = child(tmp_path, "hold")
    try:
        assert process.stdout is not None and process.stdout.readline() == "open\n"
        with pytest.raises(StoreLocked):
            IdempotencyStore(tmp_path)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=60)
    with IdempotencyStore(tmp_path) as store:  # free again once the holder is gone
        assert len(store) == 2


def test_a_second_store_in_the_same_process_is_refused(store: IdempotencyStore, tmp_path: Path) -> None:
    with pytest.raises(StoreLocked):
        IdempotencyStore(tmp_path)


def test_the_database_file_is_private(store: IdempotencyStore, tmp_path: Path) -> None:
    new_key(store.begin(ALICE, "StartInstance", "t-1", FP))
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_corrupt_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / DATABASE_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        IdempotencyStore(tmp_path)


def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DATABASE_NAME)
    conn.execute("PRAGMA user_version=7")
    conn.close()
    with pytest.raises(StoreError, match="schema version 7"):
        IdempotencyStore(tmp_path)


def test_a_missing_state_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        IdempotencyStore(tmp_path / "absent")


def test_a_closed_store_raises_store_errors(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path)
    store.close()
    with pytest.raises(StoreError):
        store.begin(ALICE, "StartInstance", "t-1", FP)


# ---------------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------------


def test_concurrent_begins_of_one_token_yield_exactly_one_new(store: IdempotencyStore) -> None:
    threads_per_round = 8
    for round_ in range(25):
        token = f"race-{round_}"
        barrier = threading.Barrier(threads_per_round)
        outcomes: list[object] = []

        def attempt(token: str, barrier: threading.Barrier, outcomes: list[object]) -> None:
            barrier.wait()
            outcomes.append(store.begin(ALICE, "StartInstance", token, FP))  # list.append is atomic

        threads = [threading.Thread(target=attempt, args=(token, barrier, outcomes))
                   for _ in range(threads_per_round)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(isinstance(o, New) for o in outcomes) == 1
        assert sum(isinstance(o, InProgress) for o in outcomes) == threads_per_round - 1


# ---------------------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------------------


def test_tokens_expire_after_the_retention(tmp_path: Path, clock: Clock) -> None:
    with IdempotencyStore(tmp_path, retention_s=3600, wall_clock=clock) as store:
        store.complete(new_key(store.begin(ALICE, "StartInstance", "t-1", FP)), 0, RESPONSE)
        clock.now += 3600
        assert store.begin(ALICE, "StartInstance", "t-1", FP) == Replay(0, RESPONSE)
        clock.now += 1
        # Expired: the token is new again, whatever the parameters.
        assert store.begin(ALICE, "StartInstance", "t-1", FP_OTHER) == New(TokenKey(ALICE, "t-1"))
        assert len(store) == 1


def test_expired_tokens_are_purged(tmp_path: Path, clock: Clock) -> None:
    with IdempotencyStore(tmp_path, retention_s=10, wall_clock=clock) as store:
        for n in range(5):
            store.complete(new_key(store.begin(ALICE, "StartInstance", f"t-{n}", FP)), 0, b"")
        assert len(store) == 5
        clock.now += 120  # past the retention and the purge interval
        new_key(store.begin(ALICE, "StartInstance", "fresh", FP))
        assert len(store) == 1
    clock.now += 20
    with IdempotencyStore(tmp_path, retention_s=10, wall_clock=clock) as store:
        assert len(store) == 0  # opening purges too: the interrupted record expired


def test_the_number_of_records_is_capped_oldest_finished_first(tmp_path: Path, clock: Clock) -> None:
    with IdempotencyStore(tmp_path, max_entries=3, wall_clock=clock) as store:
        for n in range(3):
            clock.now += 1
            store.complete(new_key(store.begin(ALICE, "StartInstance", f"t-{n}", FP)), 0, b"")
        clock.now += 1
        new_key(store.begin(ALICE, "StartInstance", "t-3", FP))
        assert len(store) == 3
        tokens = {row[1] for row in rows(store)}
        assert tokens == {"t-1", "t-2", "t-3"}


def test_a_store_full_of_requests_in_progress_refuses_new_tokens(tmp_path: Path, clock: Clock) -> None:
    with IdempotencyStore(tmp_path, max_entries=2, wall_clock=clock) as store:
        first = new_key(store.begin(ALICE, "StartInstance", "a", FP))
        new_key(store.begin(ALICE, "StartInstance", "b", FP))
        before = rows(store)
        with pytest.raises(StoreFull):
            store.begin(ALICE, "StartInstance", "c", FP)
        assert rows(store) == before
        assert store.begin(ALICE, "StartInstance", "a", FP) == InProgress()  # known tokens still answer
        store.complete(first, 0, b"")
        new_key(store.begin(ALICE, "StartInstance", "c", FP))


def test_store_parameters_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        IdempotencyStore(tmp_path, retention_s=0)
    with pytest.raises(ValueError):
        IdempotencyStore(tmp_path, max_entries=0)


# ---------------------------------------------------------------------------------------------------------
# A model: random begins, completions, abandons and restarts, from two principals
# ---------------------------------------------------------------------------------------------------------


class StoreModel(RuleBasedStateMachine):
    """Reference: a dict (principal, token) -> [fingerprint, state, result]."""

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="idem-model-"))
        self.store = IdempotencyStore(self.dir)
        self.model: dict[tuple[str, str], list[object]] = {}

    @rule(target=keys, principal=st.sampled_from([ALICE, BOB]), token=st.sampled_from(["a", "b", "c"]),
          fingerprint=st.sampled_from([FP, FP_OTHER]))
    def begin(self, principal: str, token: str, fingerprint: bytes) -> TokenKey:
        expected = self.model.get((principal, token))
        try:
            outcome = self.store.begin(principal, "StartInstance", token, fingerprint)
        except TokenReused:
            assert expected is not None and expected[0] != fingerprint
            return TokenKey(principal, token)
        if expected is None:
            assert outcome == New(TokenKey(principal, token))
            self.model[(principal, token)] = [fingerprint, "in_progress", None]
        else:
            assert expected[0] == fingerprint
            if expected[1] == "in_progress":
                assert outcome == InProgress()
            elif expected[1] == "completed":
                assert outcome == Replay(*expected[2])  # type: ignore[misc]
            else:
                assert outcome == New(TokenKey(principal, token), recovered=True)
                expected[1] = "in_progress"
        return TokenKey(principal, token)

    @rule(key=keys, code=st.integers(0, 16), response=st.binary(max_size=8))
    def complete(self, key: TokenKey, code: int, response: bytes) -> None:
        expected = self.model.get((key.principal, key.client_token))
        if expected is not None and expected[1] == "in_progress":
            self.store.complete(key, code, response)
            expected[1:] = ["completed", (code, response)]
        else:
            with pytest.raises(NotInProgress):
                self.store.complete(key, code, response)

    @rule(key=keys)
    def abandon(self, key: TokenKey) -> None:
        expected = self.model.get((key.principal, key.client_token))
        if expected is not None and expected[1] == "in_progress":
            self.store.abandon(key)
            del self.model[(key.principal, key.client_token)]
        else:
            with pytest.raises(NotInProgress):
                self.store.abandon(key)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = IdempotencyStore(self.dir)
        for expected in self.model.values():
            if expected[1] == "in_progress":
                expected[1] = "interrupted"
        assert len(self.store) == len(self.model)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
