"""The agent's pure state: lifecycle table, refusals that change nothing, the event queue."""

from __future__ import annotations

import copy
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hostagent.state import (
    HOLDS_RESOURCES,
    MAX_EVENTS,
    MAX_INSTANCES,
    TRANSITIONS,
    AgentState,
    EventQueue,
    Instance,
    Refusal,
    Refused,
    Step,
    VfAttachment,
    VolumeAttachment,
)
from hostagent.wire.messages import EventKind, EventReason, InstanceState, PciAddress, VolumeSource

DIGEST = bytes(32)
VF = PciAddress(0, 3, 0, 2)


def new(instance_id: uuid.UUID, cpus: tuple[int, ...] = (0, 1)) -> Instance:
    return Instance(instance_id, InstanceState.STARTING, len(cpus), 256, DIGEST, cpus)


def running(state: AgentState, cpus: tuple[int, ...] = (0, 1)) -> uuid.UUID:
    iid = uuid.uuid4()
    state.begin_start(new(iid, cpus))
    state.step(iid, Step.LAUNCHED)
    return iid


def snapshot(state: AgentState) -> tuple[object, ...]:
    return (state.instances(), tuple(state.events.events), state.events.next_cursor, state.events.dropped)


def test_the_transition_table_is_the_documented_lifecycle() -> None:
    assert dict(TRANSITIONS) == {
        (None, Step.BEGIN_START): InstanceState.STARTING,
        (InstanceState.STOPPED, Step.BEGIN_START): InstanceState.STARTING,
        (InstanceState.FAILED, Step.BEGIN_START): InstanceState.STARTING,
        (InstanceState.STARTING, Step.LAUNCHED): InstanceState.RUNNING,
        (InstanceState.STARTING, Step.LAUNCH_FAILED): InstanceState.FAILED,
        (InstanceState.RUNNING, Step.BEGIN_STOP): InstanceState.STOPPING,
        (InstanceState.RUNNING, Step.EXITED): InstanceState.STOPPED,
        (InstanceState.STOPPING, Step.EXITED): InstanceState.STOPPED,
        (InstanceState.STOPPING, Step.STOP_FAILED): InstanceState.RUNNING,
    }


@pytest.mark.parametrize("current", [None, *InstanceState])
@pytest.mark.parametrize("step", list(Step))
def test_every_pair_outside_the_table_is_refused_without_change(current: InstanceState | None, step: Step) -> None:
    state = AgentState()
    iid = uuid.uuid4()
    if current is not None:
        state = AgentState([Instance(iid, current, 2, 256, DIGEST, (0, 1) if current in HOLDS_RESOURCES else ())])
    before = snapshot(state)
    if (current, step) in TRANSITIONS:
        if step is Step.BEGIN_START:
            state.begin_start(new(iid))
        else:
            state.step(iid, step)
        assert state.get(iid).state is TRANSITIONS[(current, step)]
        return
    with pytest.raises(Refused) as info:
        if step is Step.BEGIN_START:
            state.begin_start(new(iid))
        else:
            state.step(iid, step)
    expected = {Step.BEGIN_START: Refusal.INSTANCE_EXISTS}.get(
        step, Refusal.UNKNOWN_INSTANCE if current is None else Refusal.INVALID_STATE)
    assert info.value.refusal is expected
    assert snapshot(state) == before


def test_ending_an_instance_drops_every_resource() -> None:
    state = AgentState()
    iid = running(state)
    state.attach(iid, VolumeAttachment(uuid.uuid4(), VolumeSource.FILE, False), None)
    state.assign(iid, VfAttachment(VF, VF, 0, b"\x02\x00\x00\x00\x00\x01", 0), None)
    state.step(iid, Step.EXITED)
    ended = state.get(iid)
    assert (ended.state, ended.host_cpus, ended.volumes, ended.vfs, ended.vm) == (InstanceState.STOPPED, (), (), (),
                                                                                  None)


def test_device_refusals_change_nothing() -> None:
    state = AgentState()
    iid = running(state)
    other = running(state, (2, 3))
    volume = VolumeAttachment(uuid.uuid4(), VolumeSource.FILE, False)
    state.attach(iid, volume, None)
    before = snapshot(state)
    cases = [
        (lambda: state.attach(other, volume, None), Refusal.VOLUME_ALREADY_ATTACHED),
        (lambda: state.detach(other, volume.volume_id, None), Refusal.VOLUME_NOT_ATTACHED),
        (lambda: state.release(iid, VF, None), Refusal.VF_NOT_ASSIGNED),
        (lambda: state.attach(uuid.uuid4(), volume, None), Refusal.UNKNOWN_INSTANCE),
    ]
    for action, refusal in cases:
        with pytest.raises(Refused) as info:
            action()
        assert info.value.refusal is refusal
        assert snapshot(state) == before


def test_devices_need_a_running_instance() -> None:
    state = AgentState()
    iid = running(state)
    state.step(iid, Step.BEGIN_STOP)
    before = snapshot(state)
    with pytest.raises(Refused) as info:
        state.check_attach(iid, uuid.uuid4())
    assert info.value.refusal is Refusal.INVALID_STATE
    assert snapshot(state) == before


def test_device_counts_are_bounded() -> None:
    state = AgentState()
    iid = running(state)
    for _ in range(16):
        state.attach(iid, VolumeAttachment(uuid.uuid4(), VolumeSource.FILE, True), None)
    for index in range(8):
        address = PciAddress(0, 3, 0, index)
        state.assign(iid, VfAttachment(VF, address, index, bytes([2, 0, 0, 0, 0, index]), 0), None)
    before = snapshot(state)
    for action in (lambda: state.check_attach(iid, uuid.uuid4()),
                   lambda: state.check_assign(iid, VF, b"\x02\x00\x00\x00\x01\x00", 0)):
        with pytest.raises(Refused) as info:
            action()
        assert info.value.refusal is Refusal.TOO_MANY_DEVICES
    assert snapshot(state) == before


def test_stopped_records_make_room_but_live_ones_never_do() -> None:
    state = AgentState()
    ids = [running(state, ()) for _ in range(MAX_INSTANCES)]
    before = snapshot(state)
    with pytest.raises(Refused) as info:
        state.begin_start(new(uuid.uuid4()))
    assert info.value.refusal is Refusal.TOO_MANY_INSTANCES
    assert snapshot(state) == before
    state.step(ids[5], Step.EXITED)
    fresh = uuid.uuid4()
    state.begin_start(new(fresh))
    assert state.find(ids[5]) is None and state.find(fresh) is not None
    assert len(state.instances()) == MAX_INSTANCES


def test_a_new_record_must_start_in_starting() -> None:
    with pytest.raises(ValueError):
        AgentState().begin_start(Instance(uuid.uuid4(), InstanceState.RUNNING, 1, 64, DIGEST))


def test_event_cursors_increase_and_pulling_acknowledges() -> None:
    queue = EventQueue()
    iid = uuid.uuid4()
    for _ in range(5):
        queue.append(1, EventKind.INSTANCE_STARTED, iid, EventReason.REQUESTED)
    batch, cursor = queue.after(0, 2)
    assert [e.cursor for e in batch] == [1, 2] and cursor == 2
    batch, cursor = queue.after(cursor, 64)
    assert [e.cursor for e in batch] == [3, 4, 5] and cursor == 5
    assert [e.cursor for e in queue.events] == [3, 4, 5]  # 1 and 2 were acknowledged
    batch, cursor = queue.after(5, 64)
    assert batch == () and cursor == 5
    queue.after(5, 1)
    assert not queue.events


def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    queue = EventQueue()
    for _ in range(MAX_EVENTS + 3):
        queue.append(1, EventKind.SESSION_REJECTED, None, EventReason.AUTH_FAILED)
    assert queue.dropped == 3
    assert queue.events[0].cursor == 4 and queue.events[-1].cursor == MAX_EVENTS + 3


@pytest.mark.parametrize(("kind", "instance_id"), [
    (EventKind.SESSION_REJECTED, uuid.uuid4()),
    (EventKind.INSTANCE_STARTED, None),
])
def test_events_name_an_instance_only_when_about_one(kind: EventKind, instance_id: uuid.UUID | None) -> None:
    queue = EventQueue()
    with pytest.raises(ValueError):
        queue.append(1, kind, instance_id, EventReason.NONE)
    assert queue.next_cursor == 1 and not queue.events


class LifecycleModel(RuleBasedStateMachine):
    """Random lifecycle steps against a dictionary model: refusals never change anything."""

    def __init__(self) -> None:
        super().__init__()
        self.state = AgentState()
        self.model: dict[uuid.UUID, InstanceState] = {}
        self.ids = [uuid.UUID(int=(i + 1) << 64 | 0x8000_0000_0000_0000 >> 0) for i in range(4)]

    @rule(index=st.integers(0, 3), step=st.sampled_from(list(Step)))
    def apply(self, index: int, step: Step) -> None:
        iid = self.ids[index]
        current = self.model.get(iid)
        before = copy.deepcopy(snapshot(self.state))
        try:
            if step is Step.BEGIN_START:
                self.state.begin_start(new(iid))
            else:
                self.state.step(iid, step)
        except Refused:
            assert (current, step) not in TRANSITIONS
            assert snapshot(self.state) == before
            return
        self.model[iid] = TRANSITIONS[(current, step)]

    @precondition(lambda self: bool(self.model))
    @invariant()
    def matches_the_model(self) -> None:
        assert {i.instance_id: i.state for i in self.state.instances()} == self.model
        for instance in self.state.instances():
            if instance.state not in HOLDS_RESOURCES:
                assert instance.host_cpus == () and instance.volumes == () and instance.vfs == ()


TestLifecycleModel = LifecycleModel.TestCase


@given(st.lists(st.sampled_from(list(EventKind)), max_size=50), st.integers(0, 60), st.integers(1, 64))
@settings(max_examples=50)
def test_pulls_return_the_unacknowledged_events_in_order(kinds: list[EventKind], after: int, limit: int) -> None:
    queue = EventQueue()
    iid = uuid.uuid4()
    for kind in kinds:
        queue.append(7, kind, None if kind in (EventKind.SESSION_REJECTED, EventKind.AGENT_RESTARTED,
                                                EventKind.RECONCILE_MISMATCH) else iid, EventReason.NONE)
    batch, cursor = queue.after(after, limit)
    expected = [c for c in range(1, len(kinds) + 1) if c > after][:limit]
    assert [e.cursor for e in batch] == expected
    assert cursor == (expected[-1] if expected else max(after, len(kinds)))


def test_an_assignment_is_named_by_pf_and_mac() -> None:
    """The same PF, MAC and VLAN again names the VF already held; the same MAC on another VLAN is refused."""
    state = AgentState()
    iid = running(state)
    mac = b"\x02\x00\x00\x00\x00\x01"
    held = VfAttachment(VF, PciAddress(0, 3, 0, 1), 0, mac, 7)
    state.assign(iid, held, None)
    before = snapshot(state)
    assert state.check_assign(iid, VF, mac, 7) == held
    assert state.check_assign(iid, VF, b"\x02\x00\x00\x00\x00\x02", 7) is None  # another MAC: a new VF
    assert state.check_assign(iid, PciAddress(0, 4, 0, 0), mac, 7) is None  # another PF: a new VF
    with pytest.raises(Refused) as info:
        state.check_assign(iid, VF, mac, 8)
    assert info.value.refusal is Refusal.INVALID_STATE and "VLAN 7" in info.value.detail
    with pytest.raises(Refused) as info:
        state.assign(iid, VfAttachment(VF, PciAddress(0, 3, 0, 2), 1, mac, 7), None)
    assert info.value.refusal is Refusal.INVALID_STATE
    assert snapshot(state) == before


def _numbered(n: int) -> uuid.UUID:
    """The n-th of a family of RFC 9562 UUIDs, increasing with n (in bytes, as the wire orders them)."""
    return uuid.UUID(f"{n:08x}-0000-4000-8000-000000000000")


def test_pages_follow_the_cursor_in_id_order() -> None:
    ids = [_numbered(2 * n + 2) for n in range(150)]  # even numbers: the odd ones name no instance
    state = AgentState(Instance(iid, InstanceState.STOPPED, 1, 64, DIGEST) for iid in reversed(ids))
    before = snapshot(state)
    first, more = state.page(None, 64)
    assert [i.instance_id for i in first] == ids[:64] and more
    second, more = state.page(first[-1].instance_id, 64)
    assert [i.instance_id for i in second] == ids[64:128] and more
    third, more = state.page(second[-1].instance_id, 64)
    assert [i.instance_id for i in third] == ids[128:] and not more
    # A cursor that names no instance (one forgotten between two pages): the walk goes on after it.
    page, more = state.page(_numbered(2 * 99 + 3), 64)
    assert [i.instance_id for i in page] == ids[100:] and not more
    assert state.page(_numbered(1), 64) == (first, True)  # before every id: the same as the nil cursor
    assert state.page(ids[-1], 64) == ((), False)
    assert state.page(uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff"), 64) == ((), False)
    assert snapshot(state) == before  # reading changes nothing


def test_a_page_of_exactly_the_limit_is_the_last_when_nothing_follows() -> None:
    state = AgentState(Instance(_numbered(n + 1), InstanceState.STOPPED, 1, 64, DIGEST) for n in range(64))
    page, more = state.page(None, 64)
    assert len(page) == 64 and not more
    assert state.page(None, 63)[1]


def test_the_bound_is_1024_records_and_the_1025th_start_is_refused() -> None:
    assert MAX_INSTANCES == 1024
    state = AgentState(Instance(_numbered(n + 1), InstanceState.RUNNING, 1, 64, DIGEST) for n in range(1024))
    before = snapshot(state)
    with pytest.raises(Refused) as info:
        state.check_start(uuid.uuid4())
    assert info.value.refusal is Refusal.TOO_MANY_INSTANCES and "1024" in info.value.detail
    assert snapshot(state) == before
