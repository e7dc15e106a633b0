"""`pvctl dev up DIR` and `pvctl dev down DIR`: a complete development host in one directory.

``up`` provisions the agent (channel secret, image-signing key, a signed
guest image) and the controller (development PKI, host keys, audit log),
starts both in the background, waits until each answers, and writes
``DIR/dev.json``: the endpoint, the CA, one client identity per control-plane
role, the two pids, the agent socket and the state directory, and the signed
image to start.  ``down`` stops the controller, force-stops the instances still
running (through the agent, as the controller would), then stops the agent,
each with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from controller.agentlink import AgentLink, AgentLinkError
from hostagent import process
from hostagent.wire import messages as m

from . import agenthost, controllerhost

DEV_FILE = "dev.json"


class DevError(Exception):
    """The development host cannot be brought up or down; the message says why."""


def _alive(pid: int) -> bool:
    return process.start_ticks(pid) is not None


def up(directory: Path, *, backend: str = "qemu") -> dict[str, Any]:
    directory = directory.absolute()
    existing = directory / DEV_FILE
    if existing.exists():
        state = json.loads(existing.read_text())
        if _alive(state["agent_pid"]) or _alive(state["controller_pid"]):
            raise DevError(f"a development host is already running in {directory} (pvctl dev down {directory})")
    agent = agenthost.prepare(directory / "agent", backend=backend)
    agent_process = agenthost.start(agent, timeout=60)
    try:
        controller = controllerhost.prepare(directory / "controller", agent)
        controller_process, endpoint = controllerhost.start(controller)
    except BaseException:
        agenthost.stop(agent_process)
        raise
    document = {
        "endpoint": endpoint,
        "ca": str(controller.pki.ca_certificate),
        "roles": {role: {"cert": str(paths.certificate), "key": str(paths.key)}
                  for role, paths in controller.pki.clients.items()},
        "agent_pid": agent_process.pid,
        "controller_pid": controller_process.pid,
        "agent_socket": str(agent.socket),
        "state_dir": str(directory),
        "backend": backend,
        "image_digest": agent.image_digest.hex(),
        "image_signature": agent.image_signature.hex(),
        "volume_dir": str(agent.volume_dir),
        "encrypted_volume_dir": str(controller.encrypted_volume_dir),
        "runtime_dir": str(agent.runtime_dir),
        "logs": {"agent": str(agent.log), "controller": str(controller.log)},
    }
    existing.write_text(json.dumps(document, indent=2) + "\n")
    return document


def down(directory: Path) -> dict[str, Any]:
    directory = directory.absolute()
    path = directory / DEV_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise DevError(f"no development host in {directory} ({DEV_FILE} is missing)") from None
    stopped: list[str] = []
    # The controller first: the agent serves one controller session at a time, and this
    # session stops the instances that are still running.
    _terminate(state["controller_pid"])
    agent = agenthost.prepare(directory / "agent", backend=state["backend"]) if _alive(state["agent_pid"]) else None
    if agent is not None:
        try:
            link = AgentLink(agent.socket, agent.secret(), timeout=60)
            link.connect()
            listing = link.request(m.ListInstances(None))
            while isinstance(listing, m.InstanceList):  # one page at a time, each after the last one's end
                for instance in listing.instances:
                    if instance.state in (m.InstanceState.RUNNING, m.InstanceState.STARTING):
                        link.request(m.StopInstance(instance.instance_id, m.StopMode.FORCE, 0))
                        stopped.append(str(instance.instance_id))
                if not listing.more:
                    break
                listing = link.request(m.ListInstances(listing.instances[-1].instance_id))
            link.close()
        except AgentLinkError as exc:
            raise DevError(f"cannot stop the instances: {exc.detail}") from None
    _terminate(state["agent_pid"])
    # The runtime directory lives below the temp dir (short socket paths); it goes unless a VM still runs
    # from it (an agent found dead leaves its VMs running, and they keep their sockets).
    removed = agenthost.remove_runtime_dir(Path(state["runtime_dir"]))
    path.unlink()
    return {"stopped_instances": stopped, "agent_pid": state["agent_pid"], "controller_pid": state["controller_pid"],
            "runtime_dir_removed": removed}


def _terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM (a clean stop), SIGKILL if it does not end in time; reaps it if it is our child."""
    ticks = process.start_ticks(pid)
    if ticks is None:
        return
    process.kill(pid, ticks, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process.start_ticks(pid) is not None and time.monotonic() < deadline:
        process.reap(pid)
        time.sleep(0.05)
    if process.kill(pid, ticks, signal.SIGKILL):
        time.sleep(0.1)
    process.reap(pid)
