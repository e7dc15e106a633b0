"""Provision and start a development controller beside a development agent.

``prepare`` creates the development PKI (a CA, the controller's certificate
and one client certificate per control-plane role) and a controller.toml that
points at the agent of an :class:`~controller.devhost.agenthost.AgentHost`;
``start`` launches ``passivisor-controller`` in the background and returns
once it listens, with the port it got.  Used by the end-to-end tests now and
by ``pvctl dev up`` later.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from controller.pki import PkiPaths, init_pki

from .agenthost import AgentHost, stop

READY = re.compile(r"passivisor-controller: ready on (\S+):(\d+)")


@dataclass(frozen=True)
class ControllerHost:
    directory: Path
    config: Path
    pki: PkiPaths
    state_dir: Path
    log: Path
    encrypted_volume_dir: Path  # LUKS volume files named by volume id, served by the controller

    def channel(self, endpoint: str, role: str, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """An mTLS channel to ``endpoint`` as the development client certificate of ``role``."""
        client = self.pki.clients[role]
        credentials = grpc.ssl_channel_credentials(self.pki.ca_certificate.read_bytes(), client.key.read_bytes(),
                                                   client.certificate.read_bytes())
        # The server certificate names localhost; the endpoint is 127.0.0.1:PORT.
        return grpc.secure_channel(endpoint, credentials,
                                   options=[("grpc.ssl_target_name_override", "localhost"), *options])


def prepare(directory: Path, agent: AgentHost, *, principal_rate_per_s: float = 50.0, principal_burst: int = 100,
            instance_rate_per_s: float = 2.0, instance_burst: int = 10, policy: Path | None = None) -> ControllerHost:
    directory = directory.absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki_dir = directory / "pki"
    pki = PkiPaths.of(pki_dir) if (pki_dir / "ca.pem").exists() else init_pki(pki_dir)
    state = directory / "state"
    volumes = directory / "encrypted-volumes"
    volumes.mkdir(mode=0o700, exist_ok=True)
    config = directory / "controller.toml"
    policy_line = f'policy = "{policy}"\n' if policy is not None else ""
    config.write_text(f"""\
[controller]
listen = "127.0.0.1:0"
state_dir = "{state}"
agent_socket = "{agent.socket}"
channel_secret_file = "{agent.secret_file}"
{policy_line}
[tls]
ca = "{pki.ca_certificate}"
certificate = "{pki.server_certificate}"
key = "{pki.server_key}"

[limits]
principal_rate_per_s = {principal_rate_per_s}
principal_burst = {principal_burst}
instance_rate_per_s = {instance_rate_per_s}
instance_burst = {instance_burst}

[volumes]
encrypted_dir = "{volumes}"
""")
    return ControllerHost(directory, config, pki, state, directory / "controller.log", volumes)


def start(host: ControllerHost, *, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start the controller in its own session; return the process and its endpoint (HOST:PORT)."""
    offset = host.log.stat().st_size if host.log.exists() else 0
    with open(host.log, "ab") as log:
        child = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-m", "controller.main", "--config", str(host.config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = host.log.read_bytes()[offset:].decode(errors="replace")
        found = READY.search(text)
        if found:
            return child, f"{found.group(1)}:{found.group(2)}"
        if child.poll() is not None:
            raise RuntimeError(f"passivisor-controller exited with {child.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    stop(child)
    raise RuntimeError("passivisor-controller did not become ready in time")
