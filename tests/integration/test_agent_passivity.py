"""Passivity of the running agent, checked from outside (claims C1, C6, C15).

Starts the real ``passivisor-agent`` (sim backend, seccomp on, as shipped) and
checks what the kernel and the process itself show: the filter is in force
(``Seccomp: 2``), the agent proved at start-up that socket(AF_INET) fails, no
network library is loaded, and an ``strace -f`` of a whole scenario shows no
connect(2) by the agent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agentlink import AgentLink
from controller.devhost import agenthost
from hostagent.wire import messages as m


def wait_for_log(host: agenthost.AgentHost, pattern: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = host.log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the agent log:\n{host.log.read_text()[-2000:]}")


def scenario(host: agenthost.AgentHost, *, detach: bool = True) -> None:
    """Start an instance, attach and detach a volume, stop it: every kind of work the agent does.

    ``detach=False`` for a real guest that has not booted yet: it cannot release an unplugged
    device, so the instance is stopped with its volume attached instead.
    """
    link = AgentLink(host.socket, host.secret())
    link.connect()
    iid, volume = uuid.uuid4(), uuid.uuid4()
    (host.volume_dir / str(volume)).write_bytes(bytes(4096))
    assert isinstance(link.request(m.StartInstance(iid, 1, 128, host.image_digest, host.image_signature)),
                      m.InstanceInfo)
    assert link.request(m.AttachVolume(iid, volume, m.VolumeSource.FILE, False)).state is m.VolumeState.ATTACHED
    if detach:
        assert link.request(m.DetachVolume(iid, volume)).state is m.VolumeState.DETACHED
    assert link.request(m.StopInstance(iid, m.StopMode.GRACEFUL, 5)).state is m.InstanceState.STOPPED
    link.close()


@pytest.fixture
def host(tmp_path: Path) -> agenthost.AgentHost:
    return agenthost.prepare(tmp_path / "host", backend="sim", seccomp=True)


@pytest.fixture
def agent(host: agenthost.AgentHost) -> Iterator[int]:
    child = agenthost.start(host)
    yield child.pid
    agenthost.stop(child)


def test_the_filter_is_in_force_and_was_verified(host: agenthost.AgentHost, agent: int) -> None:
    status = Path(f"/proc/{agent}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
    wait_for_log(host, r"seccomp filter installed and verified: socket\(AF_INET\) refused \(EAFNOSUPPORT\)")
    scenario(host)  # the sandbox does not get in the way of real work


def test_no_network_module_is_loaded(host: agenthost.AgentHost, agent: int) -> None:
    scenario(host)
    os.kill(agent, signal.SIGUSR1)
    text = wait_for_log(host, r"network modules: ")
    line = next(line for line in text.splitlines() if "loaded modules" in line)
    assert line.endswith("network modules: none"), line
    assert " hostagent.server " in line  # the dump really lists the agent's own modules


def _agent_calls(lines: list[str]) -> tuple[int, list[str]]:
    """The traced calls made by the agent itself: not by children after their execve (QEMU, sleep)."""
    agent_pid = int(lines[0].split()[0])
    exec_pids = {int(line.split()[0]) for line in lines[1:] if " execve(" in line}
    return agent_pid, [line for line in lines if int(line.split()[0]) not in exec_pids]


def _check_no_connect(calls: list[str]) -> None:
    assert any(" socket(AF_UNIX" in line or " socketpair(AF_UNIX" in line for line in calls), \
        "the trace must see the agent's own socket calls"
    connects = [line for line in calls if " connect(" in line]
    assert connects == [], connects
    inet = [line for line in calls if re.search(r" socket(pair)?\(AF_INET", line) and "= -1" not in line]
    assert inet == [], inet


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is installed by `make test` (Debian strace)")
def test_a_traced_scenario_shows_no_connect_by_the_agent(host: agenthost.AgentHost, tmp_path: Path) -> None:
    """``strace -f`` of the agent from its first instruction through a whole scenario (sim backend)."""
    trace = tmp_path / "agent.strace"
    child = agenthost.start(host, wrapper=("strace", "-f", "-qq", "-o", str(trace),
                                           "-e", "trace=connect,socket,socketpair,execve"))
    try:
        scenario(host)
    finally:
        agenthost.stop(child)
    agent_pid, calls = _agent_calls(trace.read_text().splitlines())
    assert any(int(line.split()[0]) == agent_pid for line in calls)
    _check_no_connect(calls)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("strace") is None or shutil.which("qemu-system-x86_64") is None,
                    reason="strace and QEMU are installed by `make test`")
def test_with_real_qemu_only_qemu_connects(tmp_path: Path) -> None:
    """The same with the qemu backend.  strace is attached to the running agent without -f: following
    QEMU as well slows its TCG threads past the scenario's timeouts.  The agent is single-threaded
    (checked), so the trace sees every call it makes; QEMU's own connections to the agent's monitor
    and console sockets are the design (the agent listens, QEMU connects) and are not traced here."""
    host = agenthost.prepare(tmp_path / "host", backend="qemu", seccomp=True)
    child = agenthost.start(host, timeout=60)
    trace = tmp_path / "agent.strace"
    try:
        assert os.listdir(f"/proc/{child.pid}/task") == [str(child.pid)], "the agent must be single-threaded"
        tracer = subprocess.Popen(["strace", "-qq", "-o", str(trace), "-e", "trace=connect,socket,socketpair",
                                   "-p", str(child.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let strace attach
        try:
            scenario(host, detach=False)
        finally:
            tracer.terminate()
            tracer.wait(10)
    finally:
        agenthost.stop(child)
    calls = [f"{child.pid} {line}" for line in trace.read_text().splitlines()]
    _check_no_connect(calls)
