"""Agent benchmarks: ``python -m bench agent``.

- ``agent.ping``: an authenticated PING through the real agent socket (seal,
  MAC, strict decode on both sides, the agent's service dispatch) beside a raw
  Unix-socket echo of the same number of bytes by a separate process, in the
  same run.  Target ratio <= 3 (issue 3).
- The start of an instance until its guest is ready moved to ``bench/start.py``
  (``start.start_to_ready``, the figure of issue 7: the StartInstance gRPC call until the guest's
  console says it is ready), with ``start.start_to_qmp_ready`` beside it: what this module measured
  before, START_INSTANCE until QEMU runs the guest, now through the controller too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

from controller.agentlink import AgentLink
from controller.devhost import agenthost
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

