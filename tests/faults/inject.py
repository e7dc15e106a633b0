"""Launcher of a controller or agent process with one kill point armed (or every point traced).

Run as ``python -c faults.inject.BOOT TESTS_DIR ROLE --config FILE``: it puts ``tests/`` on ``sys.path``,
wraps the production functions named by ``faults.points``, applies the test-host patches of the role,
then runs ``controller.main.main`` or ``hostagent.main.main`` unchanged (the same trick as
``bench/controller.py``'s ``_CONTROLLER``).  Nothing here changes what the production code does, except
dying at the chosen instant.

Environment (set by ``faults.harness``):

- ``PASSIVISOR_FAULT=NAME@N``: on the Nth counted call of kill point NAME (1-based), write
  ``NAME@N`` to ``PASSIVISOR_FAULT_FIRED`` and SIGKILL this process, before (or after) the function runs;
- ``PASSIVISOR_FAULT_TRACE=FILE``: append the name of every kill point of this role to FILE as it is
  passed (the calibration run, to learn how many times each point is hit by a sequence);
- ``PASSIVISOR_FAULT_DISARM=FILE``: once FILE exists, nothing counts or fires any more (the harness
  creates it when the sequence is over, so its invariant checks never trip the point);
- ``PASSIVISOR_FAULT_SYSFS=JSON`` (agent): the fabricated sysfs gets the kernel's write-trigger semantics
  (``inventory.fakesysfs.FakeKernel``), with the native driver of each device from JSON;
- ``PASSIVISOR_FAULT_VFIO=1`` (agent): the sim backend accepts VF hot-plugs (``SimBackend(vfio_available=True)``),
  as it would on a host with VFIO hardware;
- ``PASSIVISOR_FAULT_HOLDER=1`` (agent): each sim VM holds the NBD sockets of its encrypted volumes, as QEMU
  does (see :data:`HOLDER`).

The sim VM that holds descriptors.  The sim backend's VM is ``sleep infinity`` and the agent itself keeps
the NBD socket of an encrypted volume (``SimBackend.held_fds``), so an agent crash would end every nbdkit,
which QEMU, holding the socket in the VM process, does not.  With the holder the VM is a small Python
process (same argv[0] marker, same session, same signals) listening on ``vm.sock`` in its runtime
directory; after the sim plugs an NBD volume the agent hands it a duplicate of the socket (SCM_RIGHTS),
and after an unplug tells it to close it.  Nothing else of the sim changes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from faults.inject import main; sys.exit(main(sys.argv[2:]))"


def _command_frame(this: Any, *args: Any, **kwargs: Any) -> bool:
    """An agent-link send after the handshake (``AgentLink._send``): a command, not a handshake frame."""
    return this._session is not None


def _mutating(this: Any, *args: Any, **kwargs: Any) -> bool:
    return bool(kwargs.get("mutating"))


def _describe_batch(this: Any, batch: Any, *args: Any, **kwargs: Any) -> bool:
    """An audit batch (``AuditLog._write_batch``) that holds the record of a DescribeInstance."""
    return any(getattr(record, "method", None) == "DescribeInstance" for record in batch)


FILTERS: dict[str, Callable[..., bool]] = {"command_frame": _command_frame, "mutating": _mutating,
                                           "describe_batch": _describe_batch}


class _Trigger:
    def __init__(self, role: str) -> None:
        from faults.points import POINTS

        spec = os.environ.get("PASSIVISOR_FAULT", "")
        self.armed, _, count = spec.partition("@")
        self.target = int(count) if count else 0
        self.trace = os.environ.get("PASSIVISOR_FAULT_TRACE")
        self.fired = os.environ.get("PASSIVISOR_FAULT_FIRED")
        self.disarm = os.environ.get("PASSIVISOR_FAULT_DISARM")
        self.counts: dict[str, int] = {}
        if self.armed and self.armed not in {p.name for p in POINTS if p.role == role}:
            raise SystemExit(f"faults: no kill point {self.armed!r} for the {role}")
        self.points = [p for p in POINTS if p.role == role and (self.trace or p.name == self.armed)]
        self.delay = {p.name: p.delay_s for p in POINTS}

    def disarmed(self) -> bool:
        return self.disarm is not None and os.path.exists(self.disarm)

    def hit(self, name: str) -> None:
        if self.disarmed():
            return
        if self.trace is not None:
            with open(self.trace, "a") as trace:
                trace.write(name + "\n")
        if name != self.armed:
            return
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.counts[name] == self.target:
            if self.fired is not None:
                Path(self.fired).write_text(f"{name}@{self.target}\n")
            time.sleep(self.delay[name])
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        for point in self.points:
            module = importlib.import_module(point.module)
            *owners, attribute = point.qualname.split(".")
            owner: Any = module
            for name in owners:
                owner = getattr(owner, name)
            original = inspect.getattr_static(owner, attribute)
            if isinstance(original, (staticmethod, classmethod)):
                raise SystemExit(f"faults: {point.name}: cannot wrap a {type(original).__name__}")
            setattr(owner, attribute, self._wrap(original, point.name, point.when,
                                                 FILTERS[point.only] if point.only else None))

    def _wrap(self, function: Callable[..., Any], name: str, when: str,
              only: Callable[..., bool] | None) -> Callable[..., Any]:
        def counts(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
            return only is None or only(*args, **kwargs)

        if inspect.iscoroutinefunction(function):
            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                counted = counts(args, kwargs)
                if counted and when == "before":
                    self.hit(name)
                result = await function(*args, **kwargs)
                if counted and when == "after":
                    self.hit(name)
                return result
            return async_wrapper

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counted = counts(args, kwargs)
            if counted and when == "before":
                self.hit(name)
            result = function(*args, **kwargs)
            if counted and when == "after":
                self.hit(name)
            return result
        return wrapper


HOLDER = """
import os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(os.path.join(sys.argv[1], "vm.sock"))
listener.listen(8)
held = {}
while True:
    conn, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(conn, 256, 4)
    verb, device = message.decode().split(" ", 1)
    if verb == "hold":
        held[device] = fds[0]
    elif device in held:
        os.close(held.pop(device))
    conn.sendall(b"ok")
    conn.close()
"""
SIM_VM_MARK = "passivisor-sim-vm:"


class _HolderSubprocess:
    """Stands in for the ``subprocess`` module inside the sim backend: its VM becomes the holder."""

    def __init__(self) -> None:
        import subprocess

        self._subprocess = subprocess

    def __getattr__(self, name: str) -> Any:
        return getattr(self._subprocess, name)

    def Popen(self, args: list[str], **kwargs: Any) -> Any:
        if args[0].startswith(SIM_VM_MARK) and args[1:] == ["infinity"]:
            runtime_dir = args[0][len(SIM_VM_MARK):]
            args = [args[0], "-c", HOLDER, runtime_dir]
            kwargs["executable"] = sys.executable
        return self._subprocess.Popen(args, **kwargs)


def _tell_vm(runtime_dir: Path, verb: str, device: str, fd: int | None = None) -> None:
    import socket
    import time

    deadline = time.monotonic() + 5
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        while True:
            try:
                conn.connect(str(runtime_dir / "vm.sock"))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # the VM process is still starting
        socket.send_fds(conn, [f"{verb} {device}".encode()], [] if fd is None else [fd])
        conn.settimeout(5)
        conn.recv(2)


def _patch_holder() -> None:
    from hostagent.backend import volume_device_id
    from hostagent.backends import sim

    sim.subprocess = _HolderSubprocess()  # type: ignore[assignment,attr-defined]
    attach, detach = sim.SimBackend.attach_volume, sim.SimBackend.detach_volume

    async def attach_volume(self: Any, handle: Any, volume: Any) -> None:
        await attach(self, handle, volume)
        if volume.socket_fd is not None:
            _tell_vm(handle.record.runtime_dir, "hold", volume_device_id(volume.volume_id), volume.socket_fd)

    async def detach_volume(self: Any, handle: Any, volume_id: Any) -> None:
        await detach(self, handle, volume_id)
        _tell_vm(handle.record.runtime_dir, "drop", volume_device_id(volume_id))

    sim.SimBackend.attach_volume = attach_volume  # type: ignore[method-assign]
    sim.SimBackend.detach_volume = detach_volume  # type: ignore[method-assign]


def _patch_agent_host() -> None:
    """The test host's hardware: sysfs writes with kernel semantics, and VFIO for the sim backend."""
    native = os.environ.get("PASSIVISOR_FAULT_SYSFS")
    if native is not None:
        from inventory.fakesysfs import FakeKernel, FakePciHost

        from hostagent.inventory import sriov

        drivers = json.loads(native)

        def host_sysfs(root: Path) -> FakeKernel:
            return FakeKernel(FakePciHost(Path(root), native_driver=dict(drivers)))

        sriov.HostSysfs = host_sysfs  # type: ignore[assignment,misc]  # what hostagent.main constructs
    if os.environ.get("PASSIVISOR_FAULT_VFIO") == "1":
        from hostagent.backends.sim import SimBackend

        SimBackend.__init__ = functools.partialmethod(  # type: ignore[assignment,method-assign]
            SimBackend.__init__, vfio_available=True)
    if os.environ.get("PASSIVISOR_FAULT_HOLDER") == "1":
        _patch_holder()


def main(argv: list[str]) -> int:
    role, rest = argv[0], argv[1:]
    if role == "agent":
        _patch_agent_host()  # first: the FakeKernel.write kill point wraps the class the agent will use
    _Trigger(role).install()
    if role == "agent":
        from hostagent import main as agent_main

        return agent_main.main(rest)
    if role == "controller":
        from controller import main as controller_main

        return controller_main.main(rest)
    raise SystemExit(f"faults: unknown role {role!r}")
