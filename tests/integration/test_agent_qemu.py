"""End to end with real QEMU guests (TCG), driven over the real agent socket.

Starts ``passivisor-agent`` (qemu backend, seccomp on) and a tiny Linux guest
built from Debian packages (controller/devhost/guest.py).  The guest reports
on its serial console; the tests read the console log the agent keeps.
These are the "Done when" scenarios of the host-agent issue: the lifecycle with
a hot-plugged disk seen from inside the guest and a virtio-rng device, and a
kill -9 of the agent that the guest survives.  The lifecycle test is also the
positive control of the encrypted-volume test (issue 5): the guest's marker
(guest_init.sh, "Marker mode") does reach a raw volume's backing file in plain
text, and comes back when the volume is attached again.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.agentlink import AgentLink
from controller.devhost import agenthost
from controller.devhost.guest import DiskTokenLine, GuestSignal, marker_sector, parse_console_line
from hostagent import process
from hostagent.wire import messages as m

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="QEMU is installed by `make test` (Debian qemu-system-x86)"),
]


def console_line(console: Path, accept: Callable[[str], bool], timeout: float = 90, after: int = 0) -> str:
    """The first console line from byte ``after`` on that ``accept`` takes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists():
            text = console.read_bytes()[after:].decode(errors="replace")
            for line in text.splitlines():
                if accept(line.strip()):
                    return line.strip()
        time.sleep(0.2)
    tail = console.read_text(errors="replace")[-1500:] if console.exists() else "(no console log)"
    raise AssertionError(f"no matching console line within {timeout} s:\n{tail}")


def disks(line: str) -> list[str] | None:
    return line.split()[1:] if line.startswith("PASSIVISOR-DISKS") else None


def disk_token(console: Path, signal: GuestSignal, device: str, after: int) -> DiskTokenLine:
    """The guest's DISK_MARKER or DISK_WROTE line for ``device``; fails at once on a disk ERROR line."""
    def accept(line: str) -> bool:
        parsed = parse_console_line(line)
        return ((isinstance(parsed, DiskTokenLine) and parsed.signal is signal and parsed.device == device)
                or line.startswith(f"PASSIVISOR-ERROR disk {device} "))
    parsed = parse_console_line(console_line(console, accept, after=after, timeout=60))
    assert isinstance(parsed, DiskTokenLine), parsed
    return parsed


@pytest.fixture
def host(tmp_path: Path) -> agenthost.AgentHost:
    return agenthost.prepare(tmp_path / "h", backend="qemu", seccomp=True)


@pytest.fixture
def agent(host: agenthost.AgentHost) -> Iterator[list[object]]:
    children: list[object] = [agenthost.start(host, timeout=60)]
    yield children
    for child in children:
        agenthost.stop(child)  # type: ignore[arg-type]
    for pid in process.find_by_argument(str(host.runtime_dir).encode()):
        ticks = process.start_ticks(pid)
        if ticks is not None:
            process.kill(pid, ticks, signal.SIGKILL)


def connect(host: agenthost.AgentHost) -> AgentLink:
    link = AgentLink(host.socket, host.secret(), timeout=120)
    link.connect()
    return link


def test_lifecycle_with_a_hot_plugged_disk_seen_from_the_guest(host: agenthost.AgentHost,
                                                                agent: list[object]) -> None:
    link = connect(host)
    iid, volume = uuid.uuid4(), uuid.uuid4()
    info = link.request(m.StartInstance(iid, 1, 256, host.image_digest, host.image_signature))
    assert isinstance(info, m.InstanceInfo) and info.state is m.InstanceState.RUNNING
    console = host.runtime_dir / iid.hex / "console.log"
    console_line(console, lambda line: line == "PASSIVISOR-GUEST-READY")
    rng = console_line(console, lambda line: line.startswith("PASSIVISOR-RNG"))
    assert "virtio" in rng, rng  # claim C13
    assert disks(console_line(console, lambda line: disks(line) is not None)) == []

    backing = host.volume_dir / str(volume)
    with open(backing, "wb") as file:
        file.truncate(8 << 20)
    mark = console.stat().st_size
    attached = link.request(m.AttachVolume(iid, volume, m.VolumeSource.FILE, False))
    assert attached == m.VolumeStatus(iid, volume, m.VolumeState.ATTACHED)
    console_line(console, lambda line: disks(line) == ["vda"], after=mark, timeout=60)
    # The volume is all zeros, so the guest writes a marker with a fresh token and reads it back.
    wrote = disk_token(console, GuestSignal.DISK_WROTE, "vda", after=mark)
    described = link.request(m.DescribeInstance(iid))
    assert isinstance(described, m.InstanceInfo) and described.volumes == (volume,)

    mark = console.stat().st_size
    assert link.request(m.DetachVolume(iid, volume)) == m.VolumeStatus(iid, volume, m.VolumeState.DETACHED)
    console_line(console, lambda line: disks(line) == [], after=mark, timeout=60)
    # Positive control of the encrypted-volume test's scan: a plain raw volume does show the
    # guest's marker in its backing file, in plain text, at byte 0, and nowhere else.
    data = backing.read_bytes()
    needle = b"PASSIVISOR-MARKER " + wrote.token.encode() + b"\n"
    assert data.find(needle) == 0 and data.count(b"PASSIVISOR-MARKER") == 1
    assert data[:512] == marker_sector(wrote.token) and data[512:] == bytes(len(data) - 512)

    # Attached again (a new appearance to the guest), the volume is read, not written: same token.
    mark = console.stat().st_size
    attached = link.request(m.AttachVolume(iid, volume, m.VolumeSource.FILE, False))
    assert attached == m.VolumeStatus(iid, volume, m.VolumeState.ATTACHED)
    found = disk_token(console, GuestSignal.DISK_MARKER, "vda", after=mark)
    assert found.token == wrote.token
    mark = console.stat().st_size
    assert link.request(m.DetachVolume(iid, volume)) == m.VolumeStatus(iid, volume, m.VolumeState.DETACHED)
    console_line(console, lambda line: disks(line) == [], after=mark, timeout=60)
    assert backing.read_bytes() == data
    log = console.read_text(errors="replace")
    assert "PASSIVISOR-ERROR disk" not in log, log
    assert log.count("PASSIVISOR-DISK-WROTE") == 1 and log.count("PASSIVISOR-DISK-MARKER") == 1, log

    stopped = link.request(m.StopInstance(iid, m.StopMode.GRACEFUL, 30))
    assert isinstance(stopped, m.InstanceInfo) and stopped.state is m.InstanceState.STOPPED
    assert not console.parent.exists()  # scrubbed (claim C12)
    events = link.request(m.GetEvents(0, 64))
    assert isinstance(events, m.Events)
    assert [e.kind for e in events.events if e.instance_id == iid] == [
        m.EventKind.INSTANCE_STARTED, m.EventKind.VOLUME_ATTACHED, m.EventKind.VOLUME_DETACHED,
        m.EventKind.VOLUME_ATTACHED, m.EventKind.VOLUME_DETACHED, m.EventKind.INSTANCE_STOPPED]
    assert find_qemu(host) == []


def find_qemu(host: agenthost.AgentHost) -> list[int]:
    return process.find_by_argument(str(host.runtime_dir).encode())


def test_the_guest_survives_a_kill_9_of_the_agent(host: agenthost.AgentHost, agent: list[object]) -> None:
    link = connect(host)
    iid = uuid.uuid4()
    info = link.request(m.StartInstance(iid, 1, 256, host.image_digest, host.image_signature))
    assert isinstance(info, m.InstanceInfo)
    console = host.runtime_dir / iid.hex / "console.log"
    console_line(console, lambda line: line == "PASSIVISOR-GUEST-READY")
    [qemu] = find_qemu(host)
    ticks = process.start_ticks(qemu)
    link.close()

    first = agent[0]
    os.killpg(first.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    first.wait()  # type: ignore[attr-defined]
    assert process.start_ticks(qemu) == ticks  # the guest did not notice

    agent.append(agenthost.start(host, timeout=60))
    link = connect(host)
    assert link.request(m.DescribeInstance(iid)) == info  # same cores, same state
    # The guest kept running and the console came back: a fresh DISKS line
    # (printed every 5 s) arrives after the restart.
    mark = console.stat().st_size
    console_line(console, lambda line: disks(line) is not None, after=mark, timeout=30)
    stopped = link.request(m.StopInstance(iid, m.StopMode.GRACEFUL, 30))
    assert isinstance(stopped, m.InstanceInfo) and stopped.state is m.InstanceState.STOPPED
    assert process.start_ticks(qemu) is None


def test_qemu_runs_as_the_unprivileged_user_and_still_gets_its_volume(host: agenthost.AgentHost,
                                                                      agent: list[object]) -> None:
    """Claim C15 through the real agent (seccomp on): QEMU runs as ``passivisor-qemu``, not as root, and a
    volume file that only root may open reaches the guest all the same (the agent passes it open)."""
    if os.geteuid() != 0:
        pytest.skip("the agent can start QEMU as another user only as root")
    try:
        entry = pwd.getpwnam(agenthost.QEMU_USER)
    except KeyError:
        pytest.fail(f"no system user {agenthost.QEMU_USER}: `make deps` (as root) creates it; without it QEMU "
                    "runs as root")
    assert f'user = "{agenthost.QEMU_USER}"' in host.config.read_text()
    assert f"QEMU runs as {agenthost.QEMU_USER} (uid {entry.pw_uid}, gid {entry.pw_gid}" in host.log.read_text()
    link = connect(host)
    iid, volume = uuid.uuid4(), uuid.uuid4()
    info = link.request(m.StartInstance(iid, 1, 256, host.image_digest, host.image_signature))
    assert isinstance(info, m.InstanceInfo) and info.state is m.InstanceState.RUNNING
    console = host.runtime_dir / iid.hex / "console.log"
    console_line(console, lambda line: line == "PASSIVISOR-GUEST-READY")
    [qemu] = find_qemu(host)
    status = dict(line.split(":", 1) for line in Path(f"/proc/{qemu}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(entry.pw_uid)] * 4  # real, effective, saved, filesystem
    assert status["Gid"].split() == [str(entry.pw_gid)] * 4
    assert status["Groups"].split() == [str(g) for g in os.getgrouplist(entry.pw_name, entry.pw_gid)
                                        if g != entry.pw_gid]  # fmt: skip
    assert int(status["CapEff"], 16) == 0

    path = host.volume_dir / str(volume)
    with open(path, "wb") as file:
        file.truncate(8 << 20)
    path.chmod(0o600)  # root's, in the agent's 0700 volume directory: QEMU's user cannot open it by name
    mark = console.stat().st_size
    assert link.request(m.AttachVolume(iid, volume, m.VolumeSource.FILE, False)) == m.VolumeStatus(
        iid, volume, m.VolumeState.ATTACHED)
    console_line(console, lambda line: disks(line) == ["vda"], after=mark, timeout=60)
    mark = console.stat().st_size
    assert link.request(m.DetachVolume(iid, volume)) == m.VolumeStatus(iid, volume, m.VolumeState.DETACHED)
    console_line(console, lambda line: disks(line) == [], after=mark, timeout=60)
    stopped = link.request(m.StopInstance(iid, m.StopMode.GRACEFUL, 30))
    assert isinstance(stopped, m.InstanceInfo) and stopped.state is m.InstanceState.STOPPED
    assert find_qemu(host) == []
