"""The host agent's command set, driven over its real socket (claims C2, C5, C9, C12).

Real components: a ``passivisor-agent`` process with the sim backend (each VM is a real ``sleep``
process in its own session), reached through the controller's ``AgentLink``; see conftest.py. The host
is a fabricated sysfs tree of four cores with two SMT siblings each and no SR-IOV device.

Two halves:

- the lifecycle: start, describe, list, volumes, stop, events, restart of a stopped id, and a guest
  that powers off on its own;
- every rejection path of issue 3, section 4: the typed error code, and proof that nothing changed
  (LIST, DESCRIBE, METRICS, pending events, the journal file byte for byte, the runtime directory and
  the set of VM processes are compared before and after).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hostagent.wire import messages as m

if TYPE_CHECKING:
    from integration.conftest import Agent, Client

NO_PF = m.PciAddress(0, 0x3B, 0, 0)
VF_MAC = bytes.fromhex("020000000001")
STOP_TIMEOUT_S = 5


def stop_command(instance_id: uuid.UUID, mode: m.StopMode = m.StopMode.GRACEFUL) -> m.StopInstance:
    # The wire requires timeout_s 0 for FORCE (docs/wire-format.md, STOP_INSTANCE).
    return m.StopInstance(instance_id, mode, STOP_TIMEOUT_S if mode is m.StopMode.GRACEFUL else 0)


def attach_file(instance_id: uuid.UUID, volume_id: uuid.UUID) -> m.AttachVolume:
    return m.AttachVolume(instance_id, volume_id, m.VolumeSource.FILE, False)


def instance_events(events: Sequence[m.Event], instance_id: uuid.UUID) -> list[tuple[m.EventKind, m.EventReason]]:
    return [(e.kind, e.reason) for e in events if e.instance_id == instance_id]


def core_of(agent: Agent, cpu: int) -> tuple[int, ...]:
    return next(core for core in agent.cores if cpu in core)


# --- lifecycle -----------------------------------------------------------------------


def test_ping_answers_with_the_same_token(client: Client) -> None:
    assert client.request(m.Ping(0xDEADBEEF)) == m.Pong(0xDEADBEEF)


def test_start_runs_an_instance_on_whole_cores_of_its_own(agent: Agent, client: Client) -> None:
    before = client.metrics()
    first = agent.start_instance(client, vcpus=2, memory_mib=256)
    second = agent.start_instance(client, vcpus=4, memory_mib=128)

    assert (first.vcpus, first.memory_mib, first.image_digest) == (2, 256, agent.host.image_digest)
    assert (first.volumes, first.vfs) == ((), ())
    for info in (first, second):
        # Whole physical cores: every SMT sibling of every core it touches (claim C9).
        assert len(info.host_cpus) == info.vcpus
        assert set(info.host_cpus) == {cpu for c in {core_of(agent, cpu) for cpu in info.host_cpus} for cpu in c}
    assert not set(first.host_cpus) & set(second.host_cpus)

    assert client.describe(first.instance_id) == first
    assert client.describe(second.instance_id) == second
    listed = {s.instance_id: s for s in client.listing().instances}
    assert listed == {
        first.instance_id: m.InstanceSummary(first.instance_id, m.InstanceState.RUNNING, 2, 256),
        second.instance_id: m.InstanceSummary(second.instance_id, m.InstanceState.RUNNING, 4, 128),
    }
    after = client.metrics()
    assert after[m.MetricId.CORES_TOTAL] == len(agent.cores)
    assert after[m.MetricId.CORES_FREE] == before[m.MetricId.CORES_FREE] - 3
    assert after[m.MetricId.MEMORY_FREE_MIB] == before[m.MetricId.MEMORY_FREE_MIB] - 384
    assert after[m.MetricId.INSTANCES_RUNNING] == 2

    # Each instance is a live VM process, journaled, named by its own runtime directory.
    pids = {agent.vm_pid(first.instance_id), agent.vm_pid(second.instance_id)}
    assert agent.vm_pids() == pids
    assert agent.journaled_instance(first.instance_id)["host_cpus"] == list(first.host_cpus)
    assert agent.runtime_dir_of(first.instance_id).is_dir()


def test_a_file_volume_attaches_and_detaches(agent: Agent, client: Client) -> None:
    info = agent.start_instance(client)
    volume = agent.new_volume()

    attached = client.request(attach_file(info.instance_id, volume))
    assert attached == m.VolumeStatus(info.instance_id, volume, m.VolumeState.ATTACHED)
    described = client.describe(info.instance_id)
    assert isinstance(described, m.InstanceInfo)
    assert described.volumes == (volume,)
    assert [v["volume_id"] for v in agent.journaled_instance(info.instance_id)["volumes"]] == [str(volume)]

    detached = client.request(m.DetachVolume(info.instance_id, volume))
    assert detached == m.VolumeStatus(info.instance_id, volume, m.VolumeState.DETACHED)
    assert client.describe(info.instance_id) == info
    assert (agent.host.volume_dir / str(volume)).stat().st_size == 1 << 20  # the volume itself is untouched


def test_an_nbd_socket_volume_is_held_until_detach_and_then_closed(agent: Agent, client: Client) -> None:
    info = agent.start_instance(client)
    volume = uuid.uuid4()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        answer = client.request(m.AttachVolume(info.instance_id, volume, m.VolumeSource.NBD_SOCKET, True),
                                [theirs.fileno()])
        assert answer == m.VolumeStatus(info.instance_id, volume, m.VolumeState.ATTACHED)
        theirs.close()
        ours.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ours.recv(1)  # the agent (its VMM) still holds the other end

        assert client.request(m.DetachVolume(info.instance_id, volume)) == m.VolumeStatus(
            info.instance_id, volume, m.VolumeState.DETACHED)
        ours.settimeout(5)
        assert ours.recv(1) == b""  # every copy the agent had is closed


@pytest.mark.parametrize(("mode", "reason"), [(m.StopMode.GRACEFUL, m.EventReason.REQUESTED),
                                              (m.StopMode.FORCE, m.EventReason.FORCED_AFTER_TIMEOUT)])
def test_stop_ends_the_vm_and_releases_everything(agent: Agent, client: Client, mode: m.StopMode,
                                                  reason: m.EventReason) -> None:
    idle = client.metrics()
    info = agent.start_instance(client, vcpus=4, memory_mib=512)
    assert client.ok(attach_file(info.instance_id, agent.new_volume()), m.VolumeStatus)
    pid = agent.vm_pid(info.instance_id)
    runtime_dir = agent.runtime_dir_of(info.instance_id)
    held = agent.hold_runtime_files(info.instance_id)  # kernel and initrd copies, console log, ...

    stopped = client.request(stop_command(info.instance_id, mode))
    expected = m.InstanceInfo(info.instance_id, m.InstanceState.STOPPED, 4, 512, info.image_digest, (), (), ())
    assert stopped == expected
    assert client.describe(info.instance_id) == expected
    assert client.listing().instances == (m.InstanceSummary(info.instance_id, m.InstanceState.STOPPED, 4, 512),)
    assert client.metrics() | {m.MetricId.EVENTS_PENDING: 0} == idle | {m.MetricId.EVENTS_PENDING: 0}
    assert not agent.process_alive(pid)
    assert not agent.vm_pids()
    assert not runtime_dir.exists()  # scrubbed (claim C12): zeroed first, then unlinked
    assert held.unlinked() and held.not_zeroed() == []
    journaled = agent.journaled_instance(info.instance_id)
    assert (journaled["state"], journaled["host_cpus"], journaled["volumes"], journaled["vm"]) == ("STOPPED", [], [],
                                                                                                    None)
    assert instance_events(client.events().events, info.instance_id)[-1] == (m.EventKind.INSTANCE_STOPPED, reason)


def test_events_are_pulled_in_order_and_acknowledged_by_cursor(agent: Agent, client: Client) -> None:
    info = agent.start_instance(client)
    volume = agent.new_volume()
    client.ok(attach_file(info.instance_id, volume), m.VolumeStatus)
    client.ok(m.DetachVolume(info.instance_id, volume), m.VolumeStatus)
    client.ok(stop_command(info.instance_id), m.InstanceInfo)

    # Page through with a small limit: each page continues where the last one ended.
    pulled: list[m.Event] = []
    cursor = 0
    while batch := client.ok(m.GetEvents(cursor, 2), m.Events).events:
        assert len(batch) <= 2
        pulled.extend(batch)
        cursor = batch[-1].cursor
    cursors = [e.cursor for e in pulled]
    assert cursors == list(range(cursors[0], cursors[0] + len(cursors)))
    assert pulled[0].kind is m.EventKind.AGENT_RESTARTED  # start-up recovery ran, with nothing to adopt
    assert instance_events(pulled, info.instance_id) == [
        (m.EventKind.INSTANCE_STARTED, m.EventReason.REQUESTED),
        (m.EventKind.VOLUME_ATTACHED, m.EventReason.REQUESTED),
        (m.EventKind.VOLUME_DETACHED, m.EventReason.REQUESTED),
        (m.EventKind.INSTANCE_STOPPED, m.EventReason.REQUESTED),
    ]
    assert all(a.time_ms <= b.time_ms for a, b in itertools.pairwise(pulled))

    # Pulling after the last cursor returns nothing new, and the cursor stays put.
    again = client.events(cursor)
    assert again == m.Events(cursor, ())
    assert client.events(0) == m.Events(cursor, ())  # acknowledged events are forgotten
    assert client.metrics()[m.MetricId.EVENTS_PENDING] == 0
    assert agent.journal()["events"]["queue"] == []

    # A new event continues the sequence.
    client.ok(m.StartInstance(info.instance_id, 2, 128, agent.host.image_digest, agent.host.image_signature),
              m.InstanceInfo)
    fresh = client.events(cursor).events
    assert [(e.cursor, e.kind) for e in fresh] == [(cursor + 1, m.EventKind.INSTANCE_STARTED)]


def test_a_stopped_instance_starts_again(agent: Agent, client: Client) -> None:
    first = agent.start_instance(client)
    first_pid = agent.vm_pid(first.instance_id)
    client.ok(stop_command(first.instance_id), m.InstanceInfo)

    again = agent.start_instance(client, first.instance_id, vcpus=4, memory_mib=64)
    assert (again.instance_id, again.vcpus, again.memory_mib) == (first.instance_id, 4, 64)
    assert len(again.host_cpus) == 4
    second_pid = agent.vm_pid(first.instance_id)
    assert second_pid != first_pid and agent.vm_pids() == {second_pid}
    assert client.metrics()[m.MetricId.CORES_FREE] == len(agent.cores) - 2
    assert client.listing().instances == (m.InstanceSummary(first.instance_id, m.InstanceState.RUNNING, 4, 64),)


@pytest.mark.parametrize("find_by", ["journal", "proc"])
def test_a_guest_that_powers_off_on_its_own_is_noticed_and_cleaned_up(agent: Agent, client: Client,
                                                                       find_by: str) -> None:
    bystander = agent.start_instance(client)
    info = agent.start_instance(client, vcpus=4)
    client.ok(attach_file(info.instance_id, agent.new_volume()), m.VolumeStatus)
    _, cursor = client.drain()
    runtime_dir = agent.runtime_dir_of(info.instance_id)
    held = agent.hold_runtime_files(info.instance_id)
    if find_by == "journal":
        pid = agent.vm_pid(info.instance_id)
    else:
        # The VM process names its runtime directory in argv[0] (as QEMU's argv does).
        (pid,) = agent.vm_pids() - {agent.vm_pid(bystander.instance_id)}
    os.kill(pid, signal.SIGKILL)

    def stopped() -> m.Message | None:
        answer = client.describe(info.instance_id)
        return answer if isinstance(answer, m.InstanceInfo) and answer.state is m.InstanceState.STOPPED else None

    described = agent.wait_until(stopped, what="DESCRIBE to show STOPPED")
    assert described == m.InstanceInfo(info.instance_id, m.InstanceState.STOPPED, 4, 128, info.image_digest,
                                       (), (), ())
    events, _ = client.drain(cursor)
    assert [(e.kind, e.instance_id) for e in events] == [(m.EventKind.INSTANCE_EXITED, info.instance_id)]
    assert events[0].reason in (m.EventReason.GUEST_POWEROFF, m.EventReason.PROCESS_EXITED)
    metrics = client.metrics()
    assert metrics[m.MetricId.CORES_FREE] == len(agent.cores) - 1
    assert metrics[m.MetricId.INSTANCES_RUNNING] == 1
    assert not runtime_dir.exists()  # scrubbed (claim C12): zeroed first, then unlinked
    assert held.unlinked() and held.not_zeroed() == []
    assert agent.journaled_instance(info.instance_id)["vm"] is None
    # The other instance did not notice anything.
    assert client.describe(bystander.instance_id) == bystander
    assert agent.vm_pids() == {agent.vm_pid(bystander.instance_id)}


# --- rejection paths: a typed error and no change at all ----------------------------------


@dataclass(frozen=True)
class World:
    """A module-wide arrangement that every rejection case runs against and must leave as it was."""

    agent: Agent
    client: Client
    running: uuid.UUID  # RUNNING, holds ``attached``
    other: uuid.UUID  # RUNNING, no devices
    stopped: uuid.UUID  # STOPPED
    attached: uuid.UUID  # a volume attached to ``running``
    spare: uuid.UUID  # a volume file nobody uses
    missing: uuid.UUID  # a volume id without a file
    symlinked: uuid.UUID  # a symlink in the volume directory pointing at a real file elsewhere
    directory: uuid.UUID  # a directory where a volume file should be
    unknown: uuid.UUID  # an instance id the agent never saw

    def ids(self) -> list[uuid.UUID]:
        return [self.running, self.other, self.stopped, self.unknown]


@pytest.fixture(scope="module")
def world(module_agent: Agent) -> Iterator[World]:
    agent = module_agent
    client = agent.client()
    running = agent.start_instance(client).instance_id
    other = agent.start_instance(client).instance_id
    stopped = agent.start_instance(client).instance_id
    client.ok(stop_command(stopped), m.InstanceInfo)
    attached = agent.new_volume()
    client.ok(attach_file(running, attached), m.VolumeStatus)
    outside = agent.host.directory / "not-a-volume"
    outside.write_bytes(b"\0" * 4096)
    symlinked = uuid.uuid4()
    (agent.host.volume_dir / str(symlinked)).symlink_to(outside)
    directory = uuid.uuid4()
    (agent.host.volume_dir / str(directory)).mkdir()
    yield World(agent, client, running, other, stopped, attached, agent.new_volume(), uuid.uuid4(), symlinked,
                directory, uuid.uuid4())
    client.close()


Case = Callable[[World], tuple[m.Message, m.ErrorCode]]


def _flip_last_bit(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


REJECTIONS: dict[str, Case] = {
    # Unknown instance, for every command that names one.
    "describe-unknown": lambda w: (m.DescribeInstance(w.unknown), m.ErrorCode.UNKNOWN_INSTANCE),
    "stop-unknown": lambda w: (stop_command(w.unknown), m.ErrorCode.UNKNOWN_INSTANCE),
    "attach-unknown": lambda w: (attach_file(w.unknown, w.spare), m.ErrorCode.UNKNOWN_INSTANCE),
    "detach-unknown": lambda w: (m.DetachVolume(w.unknown, w.attached), m.ErrorCode.UNKNOWN_INSTANCE),
    "assign-vf-unknown": lambda w: (m.AssignVf(w.unknown, NO_PF, VF_MAC, 0), m.ErrorCode.UNKNOWN_INSTANCE),
    "release-vf-unknown": lambda w: (m.ReleaseVf(w.unknown, NO_PF), m.ErrorCode.UNKNOWN_INSTANCE),
    # Wrong lifecycle state.
    "start-running": lambda w: (w.agent.start_command(w.running), m.ErrorCode.INSTANCE_EXISTS),
    "stop-stopped": lambda w: (stop_command(w.stopped), m.ErrorCode.INVALID_STATE),
    "force-stop-stopped": lambda w: (stop_command(w.stopped, m.StopMode.FORCE), m.ErrorCode.INVALID_STATE),
    "attach-to-stopped": lambda w: (attach_file(w.stopped, w.spare), m.ErrorCode.INVALID_STATE),
    "detach-from-stopped": lambda w: (m.DetachVolume(w.stopped, w.spare), m.ErrorCode.INVALID_STATE),
    "assign-vf-to-stopped": lambda w: (m.AssignVf(w.stopped, NO_PF, VF_MAC, 0), m.ErrorCode.INVALID_STATE),
    "release-vf-of-stopped": lambda w: (m.ReleaseVf(w.stopped, NO_PF), m.ErrorCode.INVALID_STATE),
    # Volumes.
    "attach-missing-file": lambda w: (attach_file(w.running, w.missing), m.ErrorCode.VOLUME_NOT_FOUND),
    "attach-symlink": lambda w: (attach_file(w.running, w.symlinked), m.ErrorCode.VOLUME_NOT_FOUND),
    "attach-directory": lambda w: (attach_file(w.running, w.directory), m.ErrorCode.VOLUME_NOT_FOUND),
    "attach-twice": lambda w: (attach_file(w.running, w.attached), m.ErrorCode.VOLUME_ALREADY_ATTACHED),
    "attach-held-elsewhere": lambda w: (attach_file(w.other, w.attached), m.ErrorCode.VOLUME_ALREADY_ATTACHED),
    "detach-not-attached": lambda w: (m.DetachVolume(w.running, w.spare), m.ErrorCode.VOLUME_NOT_ATTACHED),
    "detach-attached-elsewhere": lambda w: (m.DetachVolume(w.other, w.attached), m.ErrorCode.VOLUME_NOT_ATTACHED),
    # Resources (claim C9): two of four cores and 256 MiB are taken.
    "more-vcpus-than-free": lambda w: (w.agent.start_command(vcpus=6), m.ErrorCode.INSUFFICIENT_CORES),
    "more-vcpus-than-host": lambda w: (w.agent.start_command(vcpus=16), m.ErrorCode.INSUFFICIENT_CORES),
    "vcpus-not-whole-cores": lambda w: (w.agent.start_command(vcpus=3), m.ErrorCode.INSUFFICIENT_CORES),
    "restart-stopped-too-big": lambda w: (w.agent.start_command(w.stopped, vcpus=8), m.ErrorCode.INSUFFICIENT_CORES),
    "more-memory-than-free": lambda w: (w.agent.start_command(memory_mib=w.agent.memory_budget_mib - 256 + 1),
                                        m.ErrorCode.INSUFFICIENT_MEMORY),
    "more-memory-than-budget": lambda w: (w.agent.start_command(memory_mib=4 * w.agent.memory_budget_mib),
                                          m.ErrorCode.INSUFFICIENT_MEMORY),
    # Images (claim C14): the signature is checked first, then the store.
    "unknown-image": lambda w: (_start_with_image(w, digest := os.urandom(32), w.agent.sign(digest)),
                                m.ErrorCode.IMAGE_NOT_FOUND),
    "bad-signature": lambda w: (_start_with_image(w, w.agent.host.image_digest,
                                                  _flip_last_bit(w.agent.host.image_signature)),
                                m.ErrorCode.IMAGE_REJECTED),
    "signature-of-another-image": lambda w: (_start_with_image(w, w.agent.host.image_digest,
                                                               w.agent.sign(os.urandom(32))),
                                             m.ErrorCode.IMAGE_REJECTED),
    "unknown-unsigned-image": lambda w: (_start_with_image(w, os.urandom(32), os.urandom(64)),
                                         m.ErrorCode.IMAGE_REJECTED),
    # SR-IOV: this host has no physical function at all.
    "assign-vf-without-pf": lambda w: (m.AssignVf(w.running, NO_PF, VF_MAC, 7), m.ErrorCode.PF_NOT_FOUND),
    "release-vf-never-assigned": lambda w: (m.ReleaseVf(w.running, m.PciAddress(0, 0x3B, 0x10, 1)),
                                            m.ErrorCode.VF_NOT_ASSIGNED),
}


def _start_with_image(w: World, digest: bytes, signature: bytes) -> m.StartInstance:
    return m.StartInstance(uuid.uuid4(), 2, 128, digest, signature)


def _ids_named_by(message: m.Message) -> list[uuid.UUID]:
    instance_id = getattr(message, "instance_id", None)
    return [instance_id] if isinstance(instance_id, uuid.UUID) else []


@pytest.mark.parametrize("case", REJECTIONS.values(), ids=REJECTIONS.keys())
def test_a_refused_command_answers_its_error_and_changes_nothing(world: World, case: Case) -> None:
    message, code = case(world)
    ids = world.ids() + [i for i in _ids_named_by(message) if i not in world.ids()]
    mark = world.agent.log_mark()
    before = world.agent.observe(world.client, ids)

    assert world.client.request(message) == m.Error(code)

    after = world.agent.observe(world.client, ids)
    assert after == before
    assert f"command {type(message).__name__} refused" in world.agent.log(mark)


def test_an_nbd_descriptor_that_is_not_a_socket_is_refused_and_closed(world: World) -> None:
    volume = uuid.uuid4()
    before = world.agent.observe(world.client, world.ids())
    read_end, write_end = os.pipe()
    try:
        answer = world.client.request(m.AttachVolume(world.running, volume, m.VolumeSource.NBD_SOCKET, False),
                                      [read_end])
        os.close(read_end)
        read_end = -1
        assert answer == m.Error(m.ErrorCode.DEVICE_REJECTED)
        assert world.agent.observe(world.client, world.ids()) == before
        with pytest.raises(BrokenPipeError):  # no copy of the read end is left open in the agent
            os.write(write_end, b"x")
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def test_the_world_is_intact_after_every_rejection(world: World) -> None:
    """Guards the fixture itself: the arrangement the cases compare against is what it claims."""
    states = {s.instance_id: s.state for s in world.client.listing().instances}
    assert states == {world.running: m.InstanceState.RUNNING, world.other: m.InstanceState.RUNNING,
                      world.stopped: m.InstanceState.STOPPED}
    running = world.client.describe(world.running)
    assert isinstance(running, m.InstanceInfo) and running.volumes == (world.attached,)
    assert Path(world.agent.host.volume_dir / str(world.spare)).is_file()
    assert len(world.agent.vm_pids()) == 2
