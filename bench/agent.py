"""Agent benchmarks: ``python -m bench agent``.

- ``agent.ping``: an authenticated PING through the real agent socket (seal,
  MAC, strict decode on both sides, the agent's service dispatch) beside a raw
  Unix-socket echo of the same number of bytes by a separate process, in the
  same run.  Target ratio <= 3 (issue 3).
- ``agent.start_to_ready``: START_INSTANCE until the agent answers (image
  re-verified and copied, cores allocated, journal written, QEMU up, vCPU
  threads pinned, guest running) beside launching the agent's own QEMU argv by
  hand, with the same two sockets listening, until QMP answers
  ``qmp_capabilities`` and ``cont``.  Target ratio <= 1.2.  Needs QEMU;
  skipped with a message on stderr when it is not installed.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from controller.agentlink import AgentLink
from controller.devhost import agenthost
from controller.devhost.guest import build_guest
from hostagent.backend import LaunchSpec
from hostagent.wire import messages as m

from .harness import Profile, Result, compare

_ECHO_SERVER = textwrap.dedent("""
    import os, socket, sys
    path = sys.argv[1]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    while True:
        size = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
        if size == 0:
            break
        data = conn.recv(size, socket.MSG_WAITALL)
        conn.sendall(data)
""")


def _echo_client(path: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(path)],
                              stdout=subprocess.PIPE)
    assert server.stdout is not None
    server.stdout.readline()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    return server, client


def run(profile: Profile) -> Iterator[Result]:
    with tempfile.TemporaryDirectory(prefix="pv-bench-") as scratch:
        root = Path(scratch)
        host = agenthost.prepare(root / "host", backend="sim")
        agent = agenthost.start(host)
        server, client = _echo_client(root / "echo.sock")
        try:
            link = AgentLink(host.socket, host.secret())
            link.connect()
            frame_size = m.HEADER_SIZE + 8 + m.MAC_SIZE  # PING and PONG carry one u64
            payload = bytes(frame_size)

            def ping(token: int) -> None:
                link.request(m.Ping(token))

            def echo(_: int) -> None:
                client.sendall(len(payload).to_bytes(4, "big") + payload)
                client.recv(frame_size, socket.MSG_WAITALL)

            yield compare("agent.ping", ping, echo, 7, profile=profile, unit="us", target_ratio=3)
            link.close()
        finally:
            client.sendall(bytes(4))
            client.close()
            server.wait(5)
            agenthost.stop(agent)
    yield from _start_to_ready(profile)


def _hand_launch(spec: LaunchSpec, binary: str) -> float:
    """Seconds to launch the agent's QEMU argv by hand until QMP answers (the baseline)."""
    from hostagent.backends import qemu_cmdline as cmdline

    paths = cmdline.RuntimePaths.for_dir(spec.runtime_dir)
    spec.runtime_dir.mkdir(mode=0o700)
    argv = cmdline.build_argv(spec, cmdline.QemuOptions(binary=binary), paths)
    listeners = []
    for path in (paths.monitor, paths.console):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)
    started = time.perf_counter()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        monitor, _ = listeners[0].accept()
        stream = monitor.makefile("rwb")
        stream.readline()  # the QMP greeting
        for command in (b'{"execute": "qmp_capabilities"}\n', b'{"execute": "cont"}\n'):
            stream.write(command)
            stream.flush()
            stream.readline()
        elapsed = time.perf_counter() - started
        monitor.close()
    finally:
        qemu.kill()
        qemu.wait()
        for listener in listeners:
            listener.close()
        shutil.rmtree(spec.runtime_dir, ignore_errors=True)
    return elapsed


def _start_to_ready(profile: Profile) -> Iterator[Result]:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        print("bench agent: agent.start_to_ready skipped: qemu-system-x86_64 is not installed", file=sys.stderr)
        return
    rounds = 5 if profile.rounds < 100 else 15
    with tempfile.TemporaryDirectory(prefix="pv-bench-") as scratch:
        root = Path(scratch)
        host = agenthost.prepare(root / "host", backend="qemu")
        guest = build_guest()
        agent = agenthost.start(host, timeout=60)
        ours: list[float] = []
        baseline: list[float] = []
        try:
            link = AgentLink(host.socket, host.secret(), timeout=120)
            link.connect()
            for index in range(rounds):
                iid = uuid.uuid4()
                started = time.perf_counter()
                answer = link.request(m.StartInstance(iid, 1, 256, host.image_digest, host.image_signature))
                elapsed = time.perf_counter() - started
                if not isinstance(answer, m.InstanceInfo):
                    raise RuntimeError(f"START_INSTANCE failed: {answer}")
                link.request(m.StopInstance(iid, m.StopMode.FORCE, 0))
                spec = LaunchSpec(uuid.uuid4(), 1, 256, (0,), guest.kernel, guest.initramfs, guest.cmdline,
                                  root / f"hand{index}")
                hand = _hand_launch(spec, binary)
                ours.append(elapsed * 1000)
                baseline.append(hand * 1000)
            link.close()
        finally:
            agenthost.stop(agent)
    yield Result("agent.start_to_ready", round(statistics.median(ours), 2), round(statistics.median(baseline), 2),
                 "ms", {"samples": rounds, "target_ratio": 1.2})
