"""Start and attach through the controller beside QEMU driven by hand: ``python -m bench start``.

Everything runs for real: the sandboxed ``passivisor-agent`` (qemu backend, TCG), the controller
(``passivisor-controller``, mTLS with the development PKI, rate limits raised out of the way) and
the development guest (``controller/devhost/guest_init.sh``, marker mode), whose serial console
says when it is ready and which disks it sees.  The baseline is the same QEMU command line
(``hostagent.backends.qemu_cmdline.build_argv`` with the agent's settings: TCG, the default CPU
model and hot-plug ports, 1 vCPU, 256 MiB, the same kernel, initramfs and command line) launched by
this process, with the monitor and console sockets listening first, as the agent does.

Each round is one boot per side, one after the other, in alternating order (ours then the hand
launch, then the hand launch then ours; ``harness.py``, point 2), so that a burst of load on this
shared machine does not land on one side only.  Only one guest runs at a time.  The median round of
each side is reported; every round is printed on stderr.

- ``start.start_to_ready`` (the figure of issue 7): from the StartInstance call (as the
  instance-manager) until the guest's console prints ``PASSIVISOR-GUEST-READY``, beside starting
  QEMU by hand, sending ``qmp_capabilities`` and ``cont`` (the command line has ``-S``), until the
  same line arrives on the console socket.  Ours includes the controller (authorization,
  validation, audit, idempotency), the agent (image re-verified and copied, cores allocated,
  journal written, QMP negotiated, vCPU threads pinned), and the console path through the agent
  into its console log, which this process polls every ``POLL_S``.  Target ratio <= 1.1.
- ``start.start_to_qmp_ready``: the same start until the StartInstance answer (the agent answers
  once QEMU runs its vCPUs: QMP negotiated, pinned, ``cont`` done), beside the hand launch until
  QEMU answered ``cont``.  The guest's boot is not in it, so this shows the pipeline's own cost,
  which the boot hides in the figure above.  No target of its own.
- ``start.attach_to_visible``: on the guest just booted, once its disk loop runs (its first
  ``PASSIVISOR-DISKS`` line), from the AttachVolume call (as the volume-attacher; a plain raw
  volume file in the agent's volume directory) until a ``PASSIVISOR-DISKS`` line lists ``vda``,
  beside the QMP commands the agent's qemu backend sends for a raw volume
  (``hostagent/backends/qemu.py``, ``attach_volume``): ``add-fd`` (the volume's descriptor with
  SCM_RIGHTS), ``blockdev-add`` (raw over ``/dev/fdset/N``), ``remove-fd`` and ``device_add
  virtio-blk-pci`` on the first root port, sent by hand over the same monitor, until the same line.
  The guest scans its disks every 0.1 s (guest_init.sh), which both sides wait for alike.  The
  encrypted path (nbdkit) is not in this figure: ``bench volume`` measures what it costs.
  Target ratio <= 1.2.

What ours does and the hand launch does not: the agent runs QEMU as the unprivileged
``passivisor-qemu`` user when it exists (claim C15); it checks which root port is free
(``qom-list``, ``qom-get``) before ``device_add``.  The hand launch runs QEMU as this process's
user, on the host CPUs the agent gave ours (the agent pins every QEMU thread to them, C9; the hand
launch sets the same affinity before exec, as ``taskset -c`` would).  Needs QEMU; skipped with a
message on stderr when it is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.devhost.guest import GuestConsoleLine, GuestImage, GuestSignal, build_guest, parse_console_line
from hostagent.backend import LaunchSpec
from hostagent.backends import qemu_cmdline as cmdline
from hostagent.backends.console import LogFollower

from .harness import Profile, Result

CALL_TIMEOUT_S = 60.0
BOOT_TIMEOUT_S = 120.0  # TCG boots the guest in 2 to 6 s here; far more means something hangs
DISK_TIMEOUT_S = 30.0
POLL_S = 0.005  # how often ours polls the agent's console log: a small part of a ~0.1 s figure
MEMORY_MIB = 256
VOLUME_BYTES = 16 << 20
DISK = "vda"  # the first virtio disk of a guest that has none
QMP_READ_LIMIT = 1 << 20  # a QMP answer here is a few hundred bytes; a longer line is a broken monitor


@dataclass(frozen=True)
class Sizes:
    rounds: int  # boots per side


QUICK_SIZES = Sizes(rounds=3)
FULL_SIZES = Sizes(rounds=11)


def sizes_of(profile: Profile) -> Sizes:
    return QUICK_SIZES if profile.rounds < 100 else FULL_SIZES


@dataclass(frozen=True)
class Round:
    """Seconds taken by one side in one round."""

    qmp_ready: float  # start until QEMU runs the vCPUs (ours: the StartInstance answer)
    ready: float  # start until PASSIVISOR-GUEST-READY
    visible: float  # attach until a PASSIVISOR-DISKS line lists the disk
    attached: float  # attach until the AttachVolume answer (ours) or the device_add answer (by hand)
    cores: tuple[int, ...]  # the host CPUs QEMU ran on (ours: the agent's allocation; by hand: the same)


# --- the guest's console ---------------------------------------------------------------


def _matches(line: GuestConsoleLine | None, want: GuestSignal, accept: Callable[[GuestConsoleLine], bool]) -> bool:
    if line is not None and line.signal is GuestSignal.ERROR:
        raise RuntimeError(f"the guest reported: {' '.join(line.words)}")
    return line is not None and line.signal is want and accept(line)


def _any(_: GuestConsoleLine) -> bool:
    return True


def _lists_disk(line: GuestConsoleLine) -> bool:
    return DISK in line.words


class LogConsole:
    """The console as ours sees it: the agent's console log of the instance, polled."""

    def __init__(self, path: Path) -> None:
        self._follower = LogFollower(path)

    def wait(self, want: GuestSignal, accept: Callable[[GuestConsoleLine], bool] = _any,
             timeout: float = BOOT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for raw in self._follower.poll():
                if _matches(parse_console_line(raw.decode(errors="replace")), want, accept):
                    return
            time.sleep(POLL_S)
        raise RuntimeError(f"no {want.value} line in {self._follower.path} within {timeout:g} s")


class SocketConsole:
    """The console as the hand launch sees it: QEMU's serial chardev connected to our socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def wait(self, want: GuestSignal, accept: Callable[[GuestConsoleLine], bool] = _any,
             timeout: float = BOOT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\n")
                if _matches(parse_console_line(raw.decode(errors="replace")), want, accept):
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"no {want.value} line on the console socket within {timeout:g} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise RuntimeError(f"the console closed before a {want.value} line")
            self._buffer += chunk


# --- QMP by hand --------------------------------------------------------------------------


class HandQmp:
    """A minimal synchronous QMP client: one command at a time, events skipped (QMP spec, 2.2 to 2.4)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.settimeout(timeout)
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._read()  # the greeting

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline(QMP_READ_LIMIT)
        if not line.endswith(b"\n"):
            raise RuntimeError(f"QMP: the monitor closed or sent an overlong line: {line[:80]!r}")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise RuntimeError(f"QMP: not an object: {line[:80]!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fd: int | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\n"
        if fd is None:
            self._sock.sendall(data)
        else:  # QEMU takes a descriptor that arrives with any bytes of the command that claims it
            sent = socket.send_fds(self._sock, [data], [fd])
            self._sock.sendall(data[sent:])
        while True:
            answer = self._read()
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")
            # anything else is an asynchronous event: not an answer


# --- one side's round --------------------------------------------------------------------


def _hand_round(binary: str, guest: GuestImage, directory: Path, volume: Path, cores: tuple[int, ...]) -> Round:
    """Launch the agent's QEMU command line by hand on ``cores``, wait for the guest, hot-plug the volume by hand.

    The agent pins every QEMU thread to the instance's cores; the hand launch runs on the same cores
    (as ``taskset -c``), so that both guests boot on the same CPU, whatever else the machine runs.
    """
    spec = LaunchSpec(uuid.uuid4(), 1, MEMORY_MIB, (0,), guest.kernel, guest.initramfs, guest.cmdline, directory)
    options = cmdline.QemuOptions(binary=binary, accel=cmdline.Accel.TCG)
    paths = cmdline.RuntimePaths.for_dir(directory)
    directory.mkdir(mode=0o700)
    argv = cmdline.build_argv(spec, options, paths)
    listeners: list[socket.socket] = []
    for path in (paths.monitor, paths.console):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(BOOT_TIMEOUT_S)
        listeners.append(listener)
    connections: list[socket.socket] = []
    started = time.perf_counter()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    try:
        monitor, _ = listeners[0].accept()
        connections.append(monitor)
        qmp = HandQmp(monitor, CALL_TIMEOUT_S)
        qmp.execute("qmp_capabilities")
        qmp.execute("cont")
        qmp_ready = time.perf_counter() - started
        serial, _ = listeners[1].accept()  # QEMU connected it at start-up; nothing written is lost
        connections.append(serial)
        console = SocketConsole(serial)
        console.wait(GuestSignal.READY)
        ready = time.perf_counter() - started
        console.wait(GuestSignal.DISKS)  # the disk loop runs: what ours waits for too
        attach_started = time.perf_counter()
        fd = os.open(volume, os.O_RDWR | os.O_CLOEXEC)
        try:
            volume_id = uuid.uuid4()
            device = cmdline.volume_device_id(volume_id)
            node = cmdline.volume_node_name(volume_id)
            fdset = qmp.execute("add-fd", {"opaque": device}, fd=fd)["fdset-id"]
            qmp.execute("blockdev-add", {"driver": "raw", "node-name": node, "read-only": False,
                                         "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"}})
            qmp.execute("remove-fd", {"fdset-id": fdset})
            qmp.execute("device_add", {"driver": "virtio-blk-pci", "id": device, "drive": node,
                                       "bus": cmdline.root_port_ids(options.hotplug_ports)[0],
                                       "serial": volume_id.hex[:20]})
            attached = time.perf_counter() - attach_started
        finally:
            os.close(fd)
        console.wait(GuestSignal.DISKS, _lists_disk, DISK_TIMEOUT_S)
        visible = time.perf_counter() - attach_started
    finally:
        qemu.kill()
        qemu.wait()
        for sock in connections + listeners:
            sock.close()
        shutil.rmtree(directory, ignore_errors=True)
    return Round(qmp_ready, ready, visible, attached, cores)


def _token() -> str:
    return str(uuid.uuid4())


def _our_round(agent: agenthost.AgentHost, manager: Any, attacher: Any) -> Round:
    """StartInstance until the guest is ready, then AttachVolume until it sees the disk; then stop it."""
    iid, vid = uuid.uuid4(), uuid.uuid4()
    volume = agent.volume_dir / str(vid)
    with open(volume, "wb") as file:
        file.truncate(VOLUME_BYTES)
    console = LogConsole(agent.runtime_dir / iid.hex / cmdline.CONSOLE_LOG)
    started = time.perf_counter()
    answer = manager.StartInstance(pb.StartInstanceRequest(
        client_token=_token(), instance_id=str(iid), vcpus=1, memory_mib=MEMORY_MIB,
        image_digest=agent.image_digest, image_signature=agent.image_signature), timeout=CALL_TIMEOUT_S)
    try:
        qmp_ready = time.perf_counter() - started
        console.wait(GuestSignal.READY)
        ready = time.perf_counter() - started
        console.wait(GuestSignal.DISKS)
        attach_started = time.perf_counter()
        attacher.AttachVolume(pb.AttachVolumeRequest(client_token=_token(), instance_id=str(iid),
                                                     volume_id=str(vid)), timeout=CALL_TIMEOUT_S)
        attached = time.perf_counter() - attach_started
        console.wait(GuestSignal.DISKS, _lists_disk, DISK_TIMEOUT_S)
        visible = time.perf_counter() - attach_started
    finally:
        # A forced stop: the next round's boot should not share the machine with this guest's power-down.
        manager.StopInstance(pb.StopInstanceRequest(client_token=_token(), instance_id=str(iid),
                                                    mode=pb.STOP_MODE_FORCE), timeout=CALL_TIMEOUT_S)
        volume.unlink()
    return Round(qmp_ready, ready, visible, attached, tuple(answer.instance.host_cpus))


# --- entry point ---------------------------------------------------------------------------


def run(profile: Profile) -> Iterator[Result]:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        print("bench start: qemu-system-x86_64 is not installed (make deps installs it); skipped", file=sys.stderr)
        return
    rounds = sizes_of(profile).rounds
    with tempfile.TemporaryDirectory(prefix="pv-bench-start-") as scratch:
        root = Path(scratch)
        guest = build_guest()
        agent = agenthost.prepare(root / "agent", backend="qemu")
        agent_process = agenthost.start(agent, timeout=60)
        try:
            controller = controllerhost.prepare(root / "controller", agent, principal_rate_per_s=1e6,
                                                principal_burst=1_000_000, instance_rate_per_s=1e6,
                                                instance_burst=1_000_000)
            controller_process, endpoint = controllerhost.start(controller)
            try:
                samples = _measure(agent, controller, endpoint, binary, guest, root, rounds)
            finally:
                agenthost.stop(controller_process)
        finally:
            agenthost.stop(agent_process)
            agenthost.discard(agent)
    yield _result("start.start_to_ready", samples, "ready", target_ratio=1.1)
    yield _result("start.start_to_qmp_ready", samples, "qmp_ready")
    yield _result("start.attach_to_visible", samples, "visible", target_ratio=1.2, volume="raw file",
                  guest_disk_poll_s=0.1, ours_attach_call_ms=_median_ms(samples["ours"], "attached"),
                  baseline_qmp_ms=_median_ms(samples["hand"], "attached"))


def _measure(agent: agenthost.AgentHost, controller: controllerhost.ControllerHost, endpoint: str, binary: str,
             guest: GuestImage, root: Path, rounds: int) -> dict[str, list[Round]]:
    samples: dict[str, list[Round]] = {"ours": [], "hand": []}
    with contextlib.ExitStack() as stack:
        channels = [stack.enter_context(controller.channel(endpoint, role))
                    for role in ("instance-manager", "volume-attacher")]
        manager, attacher = (pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]
                             for channel in channels)
        manager.ListInstances(pb.ListInstancesRequest(), timeout=CALL_TIMEOUT_S)  # TLS up, agent link up
        attacher.GetHostIdentity(pb.GetHostIdentityRequest(), timeout=CALL_TIMEOUT_S)
        for round_no in range(rounds):
            for side in ("ours", "hand") if round_no % 2 == 0 else ("hand", "ours"):
                if side == "ours":
                    sample = _our_round(agent, manager, attacher)
                else:
                    # A new volume each round, as for ours: the guest writes its marker on each (marker mode).
                    hand_volume = root / f"hand{round_no}.raw"
                    with open(hand_volume, "wb") as file:
                        file.truncate(VOLUME_BYTES)
                    # The cores the agent gave ours (it allocates the lowest free ones: the same each round).
                    cores = samples["ours"][-1].cores if samples["ours"] else (0,)
                    sample = _hand_round(binary, guest, root / f"hand{round_no}", hand_volume, cores)
                    hand_volume.unlink()
                samples[side].append(sample)
                print(f"  round {round_no + 1}/{rounds} {side:4} on CPUs {sample.cores}: "
                      f"qmp ready {sample.qmp_ready * 1000:7.1f} ms"
                      f"  guest ready {sample.ready * 1000:7.1f} ms  disk visible {sample.visible * 1000:7.1f} ms"
                      f" (attached {sample.attached * 1000:6.1f} ms)",
                      file=sys.stderr, flush=True)
    return samples


def _median_ms(rounds: list[Round], field: str) -> float:
    return round(statistics.median(float(getattr(r, field)) for r in rounds) * 1000, 1)


def _result(name: str, samples: dict[str, list[Round]], field: str, **extra: Any) -> Result:
    return Result(name, _median_ms(samples["ours"], field), _median_ms(samples["hand"], field), "ms",
                  {"samples": len(samples["ours"]), **extra})
