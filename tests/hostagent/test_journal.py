"""The crash-safe journal: exact round trip, strict reading, atomic replacement (claim C10)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from hostagent.backend import VmRecord, vf_device_id, volume_device_id
from hostagent.journal import FORMAT, MAX_JOURNAL_BYTES, Journal, JournalError, dumps, loads
from hostagent.state import MAX_EVENTS, MAX_INSTANCES, AgentState, Instance, Step, VfAttachment, VolumeAttachment
from hostagent.wire.messages import EventKind, EventReason, InstanceState, PciAddress, VolumeSource

IID = uuid.UUID("4a0f7c52-1d3e-4b6a-9c8d-2e5f6a7b8c9d")


def populated() -> AgentState:
    state = AgentState()
    state.begin_start(Instance(IID, InstanceState.STARTING, 2, 512, bytes(range(32)), (2, 3)))
    vm = VmRecord(IID, 4242, 987654, Path("/run/p/4a0f"), Path("/run/p/4a0f/monitor.sock"), ("vol-x",))
    state.step(IID, Step.LAUNCHED, vm=vm)
    state.attach(IID, VolumeAttachment(uuid.UUID("7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"), VolumeSource.FILE, True), vm)
    pf, vf = PciAddress(0, 3, 0, 0), PciAddress(0, 3, 0, 4)
    state.assign(IID, VfAttachment(pf, vf, 3, b"\x02\x11\x22\x33\x44\x55", 100), vm)
    stopped = uuid.UUID("0b9e1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d")
    state.begin_start(Instance(stopped, InstanceState.STARTING, 2, 256, bytes(32), (4, 5)))
    state.step(stopped, Step.LAUNCH_FAILED)
    state.events.append(1000, EventKind.INSTANCE_STARTED, IID, EventReason.REQUESTED)
    state.events.append(1001, EventKind.SESSION_REJECTED, None, EventReason.AUTH_FAILED)
    state.events.after(1, 64)  # acknowledge the first
    return state


def same(a: AgentState, b: AgentState) -> bool:
    return (a.instances() == b.instances() and tuple(a.events.events) == tuple(b.events.events)
            and a.events.next_cursor == b.events.next_cursor and a.events.dropped == b.events.dropped)


def test_round_trip_is_exact() -> None:
    state = populated()
    assert same(loads(dumps(state)), state)
    assert dumps(loads(dumps(state))) == dumps(state)


def test_save_then_load_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.load().instances() == ()
    journal.save(populated())
    assert same(journal.load(), populated())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert os.stat(tmp_path / "state.json").st_mode & 0o777 == 0o600


def test_a_failed_save_keeps_the_previous_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    journal.save(AgentState())
    before = (tmp_path / "state.json").read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        journal.save(populated())
    monkeypatch.undo()
    assert (tmp_path / "state.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def _mutations() -> list[tuple[str, object]]:
    doc = json.loads(dumps(populated()))
    cases: list[tuple[str, object]] = []

    def case(name: str, edit: object) -> None:
        cases.append((name, edit))

    case("wrong format", lambda d: d.__setitem__("format", "other/v1"))
    case("extra top-level key", lambda d: d.__setitem__("extra", 1))
    case("missing events", lambda d: d.pop("events"))
    case("unknown state", lambda d: d["instances"][1].__setitem__("state", "PAUSED"))
    case("vcpus out of range", lambda d: d["instances"][0].__setitem__("vcpus", 0))
    case("vcpus as a string", lambda d: d["instances"][0].__setitem__("vcpus", "2"))
    case("boolean as int", lambda d: d["instances"][1]["volumes"][0].__setitem__("read_only", 1))
    case("uppercase uuid", lambda d: d["instances"][0].__setitem__("instance_id", str(IID).upper()))
    case("short digest", lambda d: d["instances"][0].__setitem__("image_digest", "00" * 31))
    case("bad pci", lambda d: d["instances"][1]["vfs"][0].__setitem__("vf", "0000:03:20.0"))
    case("extra vm key", lambda d: d["instances"][1]["vm"].__setitem__("cmd", "sh"))
    case("cpu number too high", lambda d: d["instances"][1].__setitem__("host_cpus", [5000]))
    case("duplicate instance", lambda d: d["instances"].append(d["instances"][0]))
    case("cursor behind queue", lambda d: d["events"].__setitem__("next_cursor", 1))
    case("unknown event kind", lambda d: d["events"]["queue"][0].__setitem__("kind", "EXPLODED"))
    del doc
    return cases


@pytest.mark.parametrize(("name", "edit"), _mutations(), ids=[name for name, _ in _mutations()])
def test_corrupt_journals_are_refused_with_a_location(name: str, edit: object) -> None:
    doc = json.loads(dumps(populated()))
    doc["instances"].sort(key=lambda i: i["state"])  # [0] is RUNNING... order by state name
    assert callable(edit)
    edit(doc)
    with pytest.raises(JournalError):
        loads(json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"null", json.dumps({"format": FORMAT}).encode()])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(JournalError):
        loads(data)


def _fullest_state() -> AgentState:
    """MAX_INSTANCES records, each holding every device it may, and a full event queue."""
    state = AgentState()
    pf = PciAddress(0, 3, 0, 0)
    for n in range(MAX_INSTANCES):
        iid = uuid.UUID(int=(n << 96) | (4 << 76) | (2 << 62) | n)
        volumes = tuple(VolumeAttachment(uuid.UUID(int=(n << 64) | (4 << 76) | (2 << 62) | v), VolumeSource.FILE,
                                         False) for v in range(16))
        vfs = tuple(VfAttachment(pf, PciAddress(0xFFFF, n % 256, 31, f), 255, b"\x02\xff\xff\xff\xff\xff", 4095)
                    for f in range(8))
        devices = (*(volume_device_id(v.volume_id) for v in volumes), *(vf_device_id(v.vf) for v in vfs))
        vm = VmRecord(iid, 4194304, 1 << 40, Path(f"/run/passivisor-agent/{iid}"),
                      Path(f"/run/passivisor-agent/{iid}/monitor.sock"), devices)
        cpus = tuple(range(4 * n, 4 * n + 4))  # cores are exclusive: 4096 host CPUs (ids 0..4095) in all
        state.begin_start(Instance(iid, InstanceState.STARTING, 4, 1 << 20, bytes(32), cpus))
        state.step(iid, Step.LAUNCHED, vm=vm, volumes=volumes, vfs=vfs)
    for _ in range(MAX_EVENTS):
        state.events.append((1 << 62), EventKind.RECONCILE_MISMATCH, None, EventReason.PROTOCOL_VIOLATION)
    return state


def test_the_fullest_state_fits_the_journal_and_one_more_record_is_refused() -> None:
    """1024 records fit the read cap with room to spare, so a full host restarts (C10)."""
    data = dumps(_fullest_state())
    assert len(data) < MAX_JOURNAL_BYTES // 2
    assert len(loads(data).instances()) == MAX_INSTANCES
    doc = json.loads(data)
    extra = dict(doc["instances"][0], instance_id=str(uuid.uuid4()), state="STOPPED", host_cpus=[], volumes=[],
                 vfs=[], vm=None)
    doc["instances"].append(extra)
    with pytest.raises(JournalError, match="more than 1024"):
        loads(json.dumps(doc).encode())


def test_an_oversized_journal_is_refused_without_parsing(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b" " * MAX_JOURNAL_BYTES + b"{}")
    with pytest.raises(JournalError, match="larger than"):
        Journal(tmp_path).load()


def test_a_symlinked_journal_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(dumps(AgentState()))
    (tmp_path / "state.json").symlink_to(target)
    with pytest.raises(JournalError, match="cannot open"):
        Journal(tmp_path).load()
