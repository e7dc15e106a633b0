"""Crash safety and live update of the host agent (claims C10, C12; issue 3, section 8).

Real components: a ``passivisor-agent`` process with the sim backend (conftest.py), killed with SIGKILL
(its process group: the VMs run in sessions of their own) or stopped with SIGTERM (the live-update
path), then started again with the same agent.toml. The VMs are real ``sleep`` processes, so "the
guest kept running" means the very same process (pid and start time) is still alive, and "stop still
works" means it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from controller.devhost import agenthost
from hostagent.wire import messages as m

if TYPE_CHECKING:
    from integration.conftest import Agent, Client

RESOURCE_METRICS = (m.MetricId.INSTANCES_RUNNING, m.MetricId.CORES_FREE, m.MetricId.MEMORY_FREE_MIB,
                    m.MetricId.VFS_FREE)


def resources(client: Client) -> dict[m.MetricId, int]:
    metrics = client.metrics()
    return {k: metrics[k] for k in RESOURCE_METRICS}


def start_with_volume(agent: Agent, client: Client, *, vcpus: int = 4) -> m.InstanceInfo:
    info = agent.start_instance(client, vcpus=vcpus, memory_mib=256)
    volume = agent.new_volume()
    client.ok(m.AttachVolume(info.instance_id, volume, m.VolumeSource.FILE, False), m.VolumeStatus)
    described = client.ok(m.DescribeInstance(info.instance_id), m.InstanceInfo)
    assert described.volumes == (volume,)
    return described


def take_down(agent: Agent, how: str) -> None:
    if how == "kill-9":
        agent.kill9()
    else:
        assert agent.terminate() == 0
        assert "stopped; running instances were left running" in agent.log()
    assert not agent.alive()


@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_a_restarted_agent_adopts_the_running_vm_and_can_still_stop_it(agent: Agent, how: str) -> None:
    client = agent.client()
    info = start_with_volume(agent, client)
    other = agent.start_instance(client)
    held = resources(client)
    _, cursor = client.drain()  # acknowledged before the crash: must never come back
    pid = agent.vm_pid(info.instance_id)
    start_ticks = agent.journaled_instance(info.instance_id)["vm"]["pid_start_ticks"]

    take_down(agent, how)
    assert agent.process_alive(pid), "the VM died with the agent"
    mark = agent.log_mark()
    agent.start()
    assert "recovered: 2 adopted, 0 ended, 0 mismatches" in agent.log(mark)

    client = agent.client()
    assert client.describe(info.instance_id) == info  # RUNNING, same cores, same volume
    assert client.describe(other.instance_id) == other
    assert resources(client) == held
    vm = agent.journaled_instance(info.instance_id)["vm"]
    assert (vm["pid"], vm["pid_start_ticks"]) == (pid, start_ticks)  # the very same process
    assert agent.vm_pids() == {pid, agent.vm_pid(other.instance_id)}

    pending = client.events(0)  # nothing acknowledged comes back; cursors go on from where they were
    assert [(e.kind, e.reason) for e in pending.events] == [(m.EventKind.AGENT_RESTARTED, m.EventReason.ADOPTED)]
    assert pending.events[0].cursor == cursor + 1

    # The adopted VM is fully manageable: its devices are known, and stop ends it.
    (volume,) = info.volumes
    assert client.request(m.DetachVolume(info.instance_id, volume)) == m.VolumeStatus(
        info.instance_id, volume, m.VolumeState.DETACHED)
    stopped = client.ok(m.StopInstance(info.instance_id, m.StopMode.GRACEFUL, 5), m.InstanceInfo)
    assert (stopped.state, stopped.host_cpus, stopped.volumes) == (m.InstanceState.STOPPED, (), ())
    agent.wait_until(lambda: not agent.process_alive(pid), what="the adopted VM process to end")
    assert not agent.runtime_dir_of(info.instance_id).exists()
    assert resources(client)[m.MetricId.CORES_FREE] == len(agent.cores) - 1
    assert client.describe(other.instance_id) == other


def test_an_adopted_vm_that_exits_on_its_own_is_noticed(agent: Agent) -> None:
    """The exit watcher works for a process the agent did not start (no SIGCHLD, no waitpid)."""
    client = agent.client()
    info = agent.start_instance(client)
    pid = agent.vm_pid(info.instance_id)
    agent.kill9()
    agent.start()
    client = agent.client()
    _, cursor = client.drain()

    os.kill(pid, signal.SIGKILL)

    def exited() -> list[m.Event]:
        return [e for e in client.events(cursor).events if e.kind is m.EventKind.INSTANCE_EXITED]

    (event,) = agent.wait_until(exited, what="an INSTANCE_EXITED event")
    assert event.instance_id == info.instance_id
    described = client.ok(m.DescribeInstance(info.instance_id), m.InstanceInfo)
    assert (described.state, described.host_cpus) == (m.InstanceState.STOPPED, ())
    assert client.metrics()[m.MetricId.CORES_FREE] == len(agent.cores)
    assert not agent.runtime_dir_of(info.instance_id).exists()


def test_a_vm_that_died_while_the_agent_was_down_is_reported_lost(agent: Agent) -> None:
    client = agent.client()
    lost = start_with_volume(agent, client)
    survivor = agent.start_instance(client)
    _, cursor = client.drain()
    lost_pid = agent.vm_pid(lost.instance_id)
    agent.kill9()
    held = agent.hold_runtime_files(lost.instance_id)

    os.kill(lost_pid, signal.SIGKILL)
    agent.wait_until(lambda: not agent.process_alive(lost_pid), what="the VM process to die")
    mark = agent.log_mark()
    agent.start()
    assert "recovered: 1 adopted, 1 ended, 0 mismatches" in agent.log(mark)

    client = agent.client()
    assert client.describe(lost.instance_id) == m.InstanceInfo(
        lost.instance_id, m.InstanceState.STOPPED, lost.vcpus, lost.memory_mib, lost.image_digest, (), (), ())
    assert client.describe(survivor.instance_id) == survivor
    events, _ = client.drain(cursor)
    assert sorted((e.kind, e.instance_id, e.reason) for e in events) == [
        (m.EventKind.INSTANCE_EXITED, lost.instance_id, m.EventReason.LOST),
        (m.EventKind.AGENT_RESTARTED, None, m.EventReason.ADOPTED),
    ]
    metrics = client.metrics()
    assert metrics[m.MetricId.CORES_FREE] == len(agent.cores) - 1  # only the survivor's core is held
    assert metrics[m.MetricId.INSTANCES_RUNNING] == 1
    assert not agent.runtime_dir_of(lost.instance_id).exists()  # scrubbed (claim C12)
    assert held.unlinked() and held.not_zeroed() == []
    assert agent.journaled_instance(lost.instance_id)["vm"] is None
    # Its cores can be used again at once.
    agent.start_instance(client, vcpus=2 * (len(agent.cores) - 1))


CORRUPTIONS = {
    "garbage": lambda good: b"\x00\xffnot a journal\x13\x37" * 7,
    "torn-write": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "wrong-format": lambda good: good.replace(b"passivisor-agent-journal/v1", b"passivisor-agent-journal/v9"),
    "unknown-state": lambda good: good.replace(b'"RUNNING"', b'"DANCING"'),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_journal_stops_the_agent_from_starting_and_is_left_alone(agent: Agent,
                                                                            corrupt: Callable[[bytes], bytes]) -> None:
    client = agent.client()
    info = agent.start_instance(client)
    pid = agent.vm_pid(info.instance_id)
    agent.kill9()
    good = agent.journal_path.read_bytes()
    bad = corrupt(good)
    assert bad != good
    agent.journal_path.write_bytes(bad)
    stat_before = agent.journal_path.stat()

    result = agent.run_foreground()

    assert result.returncode != 0
    assert "cannot start" in result.stderr and str(agent.journal_path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert agent.journal_path.read_bytes() == bad  # untouched: a corrupt journal needs an operator
    stat_after = agent.journal_path.stat()
    assert (stat_after.st_ino, stat_after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)
    assert agent.process_alive(pid)  # and nothing was done to the VM it describes
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, pytest.raises(OSError):
        probe.connect(str(agent.host.socket))  # nobody listens

    # Once the operator restores the journal, the agent starts and adopts the VM: nothing was lost.
    agent.journal_path.write_bytes(good)
    agent.start()
    assert agent.client().describe(info.instance_id) == info


def test_the_journal_on_disk_always_matches_the_last_acknowledged_answer(agent: Agent) -> None:
    """Each acknowledged change is on disk before its answer: kill -9 right after it loses nothing."""
    client = agent.client()
    info = agent.start_instance(client)
    volumes = [agent.new_volume() for _ in range(3)]
    for volume in volumes:
        client.ok(m.AttachVolume(info.instance_id, volume, m.VolumeSource.FILE, True), m.VolumeStatus)
    client.ok(m.DetachVolume(info.instance_id, volumes[1]), m.VolumeStatus)
    agent.kill9()  # no grace: whatever was acknowledged must already be in state.json
    journaled = agent.journaled_instance(info.instance_id)
    assert sorted(v["volume_id"] for v in journaled["volumes"]) == sorted(str(v) for v in (volumes[0], volumes[2]))
    agent.start()
    described = agent.client().describe(info.instance_id)
    assert isinstance(described, m.InstanceInfo)
    assert set(described.volumes) == {volumes[0], volumes[2]}
    assert described.state is m.InstanceState.RUNNING


def rewrite_journaled_instance(agent: Agent, instance_id: uuid.UUID, **changes: object) -> None:
    """Put the journal of a stopped agent into the shape it writes at an earlier point of a command."""
    document = agent.journal()
    (entry,) = [i for i in document["instances"] if i["instance_id"] == str(instance_id)]
    entry.update(changes)
    agent.journal_path.write_bytes(json.dumps(document, sort_keys=True, indent=1).encode())


def test_a_crash_during_start_leaves_no_vm_unaccounted_for(agent: Agent) -> None:
    """Killed after spawning the VM but before journaling it: the journal says STARTING, no VM record.

    That is the state ``_start`` saves before it launches (hostagent/service.py); the VM process exists
    but only its argv names it.  The next agent must find it, kill it and fail the start.
    """
    client = agent.client()
    info = agent.start_instance(client)
    _, cursor = client.drain()
    stray = agent.vm_pid(info.instance_id)
    agent.kill9()
    rewrite_journaled_instance(agent, info.instance_id, state="STARTING", vm=None)

    agent.start()
    agent.wait_until(lambda: not agent.process_alive(stray), what="the stray VM process to be killed")
    client = agent.client()
    described = client.ok(m.DescribeInstance(info.instance_id), m.InstanceInfo)
    assert (described.state, described.host_cpus) == (m.InstanceState.FAILED, ())
    events, _ = client.drain(cursor)
    assert (m.EventKind.INSTANCE_FAILED, info.instance_id, m.EventReason.LOST) in [
        (e.kind, e.instance_id, e.reason) for e in events]
    assert client.metrics()[m.MetricId.CORES_FREE] == len(agent.cores)
    assert not agent.runtime_dir_of(info.instance_id).exists()
    assert not agent.vm_pids()


def test_a_crash_during_stop_is_finished_by_the_next_agent(agent: Agent) -> None:
    """Killed after journaling STOPPING, before the VM ended: the next agent finishes the stop."""
    client = agent.client()
    info = start_with_volume(agent, client)
    bystander = agent.start_instance(client)
    _, cursor = client.drain()
    pid = agent.vm_pid(info.instance_id)
    agent.kill9()
    rewrite_journaled_instance(agent, info.instance_id, state="STOPPING")

    agent.start()
    client = agent.client()
    described = client.ok(m.DescribeInstance(info.instance_id), m.InstanceInfo)
    assert (described.state, described.host_cpus, described.volumes) == (m.InstanceState.STOPPED, (), ())
    assert not agent.process_alive(pid)
    events, _ = client.drain(cursor)
    assert (m.EventKind.INSTANCE_STOPPED, info.instance_id) in [(e.kind, e.instance_id) for e in events]
    assert not agent.runtime_dir_of(info.instance_id).exists()
    assert client.describe(bystander.instance_id) == bystander
    assert client.metrics()[m.MetricId.CORES_FREE] == len(agent.cores) - 1


def test_a_second_agent_on_the_same_state_directory_refuses_to_start(agent: Agent) -> None:
    client = agent.client()
    info = agent.start_instance(client)
    client.close()
    second: subprocess.Popen[bytes] | None = None
    try:
        try:
            second = agenthost.start(agent.host, timeout=20)
        except RuntimeError as exc:
            refusal = str(exc)
        else:
            refusal = ""
        assert second is None, "a second agent started on the same state directory and socket"
        assert str(agent.host.state_dir) in refusal
        assert agent.alive()
        assert agent.client().describe(info.instance_id) == info  # the first one is still the one serving
    finally:
        if second is not None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(10)
