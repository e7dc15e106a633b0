"""Crash-fault harness: a real controller and agent, SIGKILLed at named points, checked against a model.

Real components: a ``passivisor-agent`` process (sim backend, production seccomp filter) on a fabricated
sysfs with eight single-thread cores and one SR-IOV PF with four VFs, whose writes get the kernel's
semantics (``inventory.fakesysfs.FakeKernel``), the sim accepting VF hot-plugs and its VMs holding the NBD
sockets of their encrypted volumes as QEMU does (``faults/inject.py``); a ``passivisor-controller``
process with the development PKI (mTLS on a port of its own), its audit log, idempotency store and host
key; real ``nbdkit`` and ``qemu-img`` for the encrypted volumes.  Both processes are started through
``faults/inject.py``, which can arm one kill point (``faults/points.py``) in one of them.

Theory of operation.  A *run* is (kill point, N, sequence).  The harness restarts the process the point
belongs to with the point armed, then plays the sequence through the gRPC API, each call with a fresh
client token, the way a control plane would: a call that gets no answer (UNAVAILABLE, DEADLINE_EXCEEDED,
ABORTED) is retried with the same token and the same request until it is answered.  The harness also
plays the host's supervisor: a process found dead is started again, unarmed (a dead agent only after
one more call has been made without it, so that the controller is also seen answering while the agent
is away).  Points are counted from the start of the armed process, its own start-up included (the
agent's recovery saves the journal).  When the sequence is over the point is disarmed and the
invariants are checked:

1. every answered operation is in effect, once: after each operation DescribeInstance must match a
   model in which every operation applied exactly once, and the VMM's own device list (the sim VM's
   ``devices.json``) must match DescribeInstance; at the end every mutating call is sent again with its
   token and must get the same answer (the idempotency store kept it);
2. the audit log verifies (``controller.audit.verify_directory``, what ``pvctl audit verify --file``
   runs), no intent is left open, and every answered call has its records: an intent and its outcome
   for a mutating call (the last record of its token carries the code the client saw), a record for a
   read-only call;
3. nothing leaked or lost: sim VM processes, nbdkit processes, VF bindings in sysfs, cores, memory and
   VFs in the agent's metrics, the agent's journal, the controller's ``volume-attachments.json``, and
   the runtime directory hold exactly what the model says; no RECONCILE_MISMATCH event;
4. running guests survive: a survivor instance, started when the host was made and never stopped, keeps
   the very same VM process (pid and start time) through every run, as does every instance between its
   start and its stop.

An answer that differs from the fault-free one is accepted for a retried call only where the design
documents it (``controller/idempotency.py``: a token whose first attempt was interrupted or abandoned is
executed again and the agent refuses the repetition): ALREADY_EXISTS for a start or an attach,
FAILED_PRECONDITION for a stop, a detach or a VF release, each only with the agent's reason for that
refusal and only if the state shows the operation in effect.  These are counted as ``tolerated`` in the
report, never as violations.  Violations of a bug listed in ``KNOWN`` (reported, tracked by a strict
xfail test) are counted apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from faults.inject import BOOT
from faults.points import BY_NAME, POINTS, KillPoint
from inventory.fakesysfs import FakePciHost, write_cpu_tree

from controller import envelope
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.audit import CallRecord, Kind, Outcome, decode, verify_directory
from controller.audit.chain import ChainBroken
from controller.audit.checkpoint import public_key_from_bytes
from controller.devhost import agenthost, controllerhost
from controller.volumetool import create_volume
from hostagent.backend import vf_device_id, volume_device_id
from hostagent.inventory import parse_bdf

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent

CORES = tuple((cpu,) for cpu in range(8))  # single-thread cores: any vCPU count is a whole number of cores
MEMORY_BUDGET_MIB = 4096
PF = "0000:3b:00.0"
VFS = ("0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2", "0000:3b:02.3")
NATIVE_DRIVERS = {PF: "ice", **{vf: "iavf" for vf in VFS}}
VOLUME_SIZE = 4 << 20
CALL_TIMEOUT_S = 30.0
RETRY_PAUSE_S = 0.2
MAX_ATTEMPTS = 150  # 30 s of retries: the controller backs off at most 10 s between agent reconnections
START_TIMEOUT_S = 30.0
AGENT_DOWN_CALLS = 1  # calls made while a dead agent is not yet restarted (see Rig.heal)
SIM_VM_MARK = "passivisor-sim-vm:"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
ROLES = {
    "start": "instance-manager", "stop": "instance-manager", "describe": "instance-manager",
    "list": "instance-manager", "attach": "volume-attacher", "attach_enc": "volume-attacher",
    "detach": "volume-attacher", "assign_vf": "network-manager", "release_vf": "network-manager",
}
# The answer a retried call may get when its first attempt took effect and the token was interrupted
# (re-executed; the agent or the volume server refuses the repetition): see the module docstring.  The
# detail must name that refusal: the same status code for another reason is a violation.
TOLERATED: dict[str, tuple[grpc.StatusCode, tuple[str, ...]]] = {
    "start": (grpc.StatusCode.ALREADY_EXISTS, ("agent refused: INSTANCE_EXISTS",)),
    "attach": (grpc.StatusCode.ALREADY_EXISTS, ("agent refused: VOLUME_ALREADY_ATTACHED",)),
    "attach_enc": (grpc.StatusCode.ALREADY_EXISTS, ("agent refused: VOLUME_ALREADY_ATTACHED",
                                                    "the volume is already attached")),
    "stop": (grpc.StatusCode.FAILED_PRECONDITION, ("agent refused: INVALID_STATE",)),
    "detach": (grpc.StatusCode.FAILED_PRECONDITION, ("agent refused: VOLUME_NOT_ATTACHED",)),
    "release_vf": (grpc.StatusCode.FAILED_PRECONDITION, ("agent refused: VF_NOT_ASSIGNED",)),
}

# Violations of a known, reported product bug, each with the strict-xfail regression test that tracks it.
# The long profile counts them apart; any other violation fails it.
KNOWN: dict[str, str] = {}  # none open: K1 and K2 of docs/reliability.md were fixed


class HarnessError(Exception):
    """The harness itself could not go on (not an invariant violation of the system under test)."""


# --- /proc -------------------------------------------------------------------------------------


def _proc_argv(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def live_processes(match: Callable[[list[bytes]], bool]) -> dict[int, int]:
    """Live (not zombie) processes whose argv matches: pid -> start ticks."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and match(_proc_argv(entry)):
            ticks = _start_ticks(int(entry))
            if ticks is not None:
                found[int(entry)] = ticks
    return found


def sim_vms(runtime_dir: Path) -> dict[str, tuple[int, int]]:
    """Sim VM processes below ``runtime_dir``: instance hex -> (pid, start ticks)."""
    prefix = f"{SIM_VM_MARK}{runtime_dir}/".encode()
    found: dict[str, tuple[int, int]] = {}
    for pid, ticks in live_processes(lambda argv: bool(argv) and argv[0].startswith(prefix)).items():
        name = _proc_argv(str(pid))[0][len(prefix):].decode()
        if name in found:
            found[name + f"#{pid}"] = (pid, ticks)  # two VMs for one instance: a leak, reported as such
        else:
            found[name] = (pid, ticks)
    return found


def nbdkits(volume_dir: Path) -> dict[str, int]:
    """nbdkit processes serving a file of ``volume_dir``: volume id -> pid."""
    prefix = f"file={volume_dir}/".encode()
    found = {}
    for pid in live_processes(lambda argv: bool(argv) and argv[0].endswith(b"nbdkit")
                              and any(a.startswith(prefix) for a in argv)):
        argument = next(a for a in _proc_argv(str(pid)) if a.startswith(prefix))
        found[argument[len(prefix):].decode()] = pid
    return found


# --- the host ----------------------------------------------------------------------------------


def sparse_copy(source: Path, target: Path, chunk: int = 1 << 16) -> None:
    """Copy a file, leaving its runs of zeros as holes (a LUKS volume is mostly its unused key slots)."""
    with open(source, "rb") as reader, open(target, "xb") as writer:
        while block := reader.read(chunk):
            if block.count(0) == len(block):
                writer.seek(len(block), os.SEEK_CUR)
            else:
                writer.write(block)
        writer.truncate()


def make_volume(path: Path) -> tuple[Path, bytearray]:
    """A LUKS volume with a fresh data key (``qemu-img create`` takes about 2.4 s: made once, copied)."""
    key = bytearray(secrets.token_bytes(envelope.DATA_KEY_SIZE))
    path.parent.mkdir(parents=True, exist_ok=True)
    create_volume(path, VOLUME_SIZE, key)
    return path, key


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    fault: str | None


@dataclass
class Kill:
    """A process found dead and started again by the harness."""

    role: str
    returncode: int
    fired: str | None  # "NAME@N" when it died at the armed kill point


class Rig:
    """One provisioned host (agent, controller, PKI, sysfs, volumes) and its two processes."""

    def __init__(self, root: Path, volume: tuple[Path, bytearray] | None = None) -> None:
        """``volume``: a LUKS volume file and its data key to copy for every encrypted volume (made if None)."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.sysfs = root / "sysfs"
        write_cpu_tree(self.sysfs, CORES)
        self.pci = FakePciHost(self.sysfs)
        self.pci.add_pf(PF, VFS)
        self.pci.add_driver("vfio-pci")
        self.agent = agenthost.prepare(root / "agent", backend="sim", sysfs_root=self.sysfs,
                                       memory_budget_mib=MEMORY_BUDGET_MIB, seccomp=True)
        self.controller = controllerhost.prepare(root / "controller", self.agent, principal_rate_per_s=1e6,
                                                 principal_burst=1_000_000, instance_rate_per_s=1e6,
                                                 instance_burst=1_000_000)
        self.template, self.key = volume if volume is not None else make_volume(root / "template.luks")
        self.procs: dict[str, Proc] = {}
        self.endpoint = ""
        self._channels: dict[str, grpc.Channel] = {}
        self.kills: list[Kill] = []
        self.calls_while_down = 0
        self.fired_file = {role: root / f"fired-{role}" for role in ("agent", "controller")}
        self.disarm_file = root / "disarm"
        self.trace_file: Path | None = None
        self.host_public = b""
        self.signing_public = b""

    # --- processes ---

    def start(self, role: str, fault: str | None = None) -> None:
        assert role not in self.procs or self.procs[role].popen.poll() is not None, f"the {role} runs"
        config = self.agent.config if role == "agent" else self.controller.config
        log = self.agent.log if role == "agent" else self.controller.log
        env = {k: v for k, v in os.environ.items() if not k.startswith("PASSIVISOR_FAULT")}
        env.update(PASSIVISOR_FAULT_FIRED=str(self.fired_file[role]), PASSIVISOR_FAULT_DISARM=str(self.disarm_file))
        if fault is not None:
            env["PASSIVISOR_FAULT"] = fault
        if self.trace_file is not None:
            env["PASSIVISOR_FAULT_TRACE"] = str(self.trace_file)
        if role == "agent":
            env.update(PASSIVISOR_FAULT_SYSFS=json.dumps(NATIVE_DRIVERS), PASSIVISOR_FAULT_VFIO="1",
                       PASSIVISOR_FAULT_HOLDER="1")
        self.fired_file[role].unlink(missing_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            popen = subprocess.Popen([sys.executable, "-c", BOOT, str(TESTS_DIR), role, "--config", str(config)],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                     env=env, cwd=REPO)
        self.procs[role] = Proc(popen, fault)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = log.read_bytes()[offset:].decode(errors="replace")
            if role == "agent" and agenthost.READY_MARK in text:
                return
            found = controllerhost.READY.search(text) if role == "controller" else None
            if found:
                self._set_endpoint(f"{found.group(1)}:{found.group(2)}")
                return
            if popen.poll() is not None:
                if fault is not None and self.fired_file[role].exists():
                    # Killed at the armed point during its own start-up (e.g. the agent's recovery saves
                    # the journal): a crash like any other; the supervisor starts it again, unarmed.
                    self.kills.append(Kill(role, popen.returncode, self.fired_file[role].read_text().strip()))
                    del self.procs[role]
                    self.start(role)
                    return
                raise HarnessError(f"the {role} exited with {popen.returncode} while starting:\n{text[-3000:]}")
            time.sleep(0.02)
        raise HarnessError(f"the {role} did not become ready in {START_TIMEOUT_S} s")

    def stop(self, role: str) -> None:
        """SIGTERM (graceful: the agent leaves its VMs running, the controller leaves nbdkit running)."""
        proc = self.procs.pop(role, None)
        if proc is not None:
            agenthost.stop(proc.popen, timeout=20)

    def restart(self, role: str, fault: str | None = None) -> None:
        self.stop(role)
        self.start(role, fault)

    def heal(self) -> list[Kill]:
        """Start again every process found dead (the supervisor's job); return what was found.

        A dead agent is left down for one more call first (``AGENT_DOWN_CALLS``): a control plane does not
        wait for the host's supervisor, so the controller must answer correctly while the agent is away.
        """
        found = []
        for role in ("agent", "controller"):
            proc = self.procs.get(role)
            if proc is None or proc.popen.poll() is None:
                continue
            if role == "agent" and self.calls_while_down < AGENT_DOWN_CALLS:
                self.calls_while_down += 1
                continue
            self.calls_while_down = 0
            fired = self.fired_file[role].read_text().strip() if self.fired_file[role].exists() else None
            kill = Kill(role, proc.popen.returncode, fired)
            found.append(kill)
            self.kills.append(kill)
            del self.procs[role]
            self.start(role)
        return found

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for role in ("controller", "agent"):
            proc = self.procs.pop(role, None)
            if proc is not None and proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
        for pid, ticks in live_processes(lambda argv: bool(argv) and (
                argv[0].startswith(f"{SIM_VM_MARK}{self.agent.runtime_dir}/".encode())
                or (argv[0].endswith(b"nbdkit")
                    and any(a.startswith(f"file={self.controller.encrypted_volume_dir}/".encode())
                            for a in argv)))).items():
            from hostagent import process

            process.kill(pid, ticks, signal.SIGKILL)
        shutil.rmtree(self.agent.runtime_dir, ignore_errors=True)  # /tmp/pv-<hash>: agenthost.prepare made it

    # --- gRPC ---

    def _set_endpoint(self, endpoint: str) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self.endpoint = endpoint

    def stub(self, role: str) -> Any:
        channel = self._channels.get(role)
        if channel is None:
            channel = self.controller.channel(self.endpoint, role)
            self._channels[role] = channel
        return pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]


# --- calls ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    response: Any  # the response message when code is OK
    detail: str
    attempts: int
    kills: list[Kill]

    @property
    def retried(self) -> bool:
        return self.attempts > 1 or bool(self.kills)


def call(rig: Rig, role: str, method: str, request: Any) -> Answer:
    """One call as a control plane makes it: retried with the same request until it is answered."""
    kills: list[Kill] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        kills += rig.heal()
        try:
            response = getattr(rig.stub(role), method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() in RETRYABLE:
                time.sleep(RETRY_PAUSE_S)
                continue
            kills += rig.heal()
            return Answer(exc.code(), None, exc.details() or "", attempt, kills)
        kills += rig.heal()
        return Answer(grpc.StatusCode.OK, response, "", attempt, kills)
    raise HarnessError(f"{method} was not answered after {MAX_ATTEMPTS} attempts")


# --- sequences and the model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # a key of ROLES
    instance: str  # a label, bound to a fresh UUID per run
    volume: str | None = None  # a label; "P..." plain, "E..." encrypted

    def __str__(self) -> str:
        return f"{self.kind}({self.instance}{',' + self.volume if self.volume else ''})"


SEQUENCES: dict[str, tuple[Op, ...]] = {
    # Two instances with every kind of device; A gives its devices back one by one, B is stopped with them.
    "full": (
        Op("start", "A"), Op("attach", "A", "P1"), Op("attach_enc", "A", "E1"), Op("assign_vf", "A"),
        Op("start", "B"), Op("attach_enc", "B", "E2"), Op("assign_vf", "B"),
        Op("detach", "A", "P1"), Op("detach", "A", "E1"), Op("release_vf", "A"),
        Op("stop", "A"), Op("stop", "B"),
    ),
    # One instance that detaches and attaches the same encrypted volume again, and takes a VF twice.
    "reattach": (
        Op("start", "C"), Op("attach_enc", "C", "E3"), Op("detach", "C", "E3"), Op("attach_enc", "C", "E3"),
        Op("assign_vf", "C"), Op("release_vf", "C"), Op("assign_vf", "C"), Op("attach", "C", "P2"),
        Op("stop", "C"),
    ),
    # Short ones for the regression tests: one kind of device each.
    "plain": (Op("start", "A"), Op("attach", "A", "P1"), Op("detach", "A", "P1"), Op("stop", "A")),
    "encrypted": (Op("start", "A"), Op("attach_enc", "A", "E1"), Op("detach", "A", "E1"), Op("stop", "A")),
    "vf": (Op("start", "A"), Op("assign_vf", "A"), Op("release_vf", "A"), Op("stop", "A")),
}
LONG_SEQUENCES = ("full", "reattach")


@dataclass
class InstanceModel:
    instance_id: str
    running: bool = False
    volumes: set[str] = field(default_factory=set)
    encrypted: set[str] = field(default_factory=set)  # volume ids
    vfs: list[str] = field(default_factory=list)  # BDFs
    vm: tuple[int, int] | None = None  # (pid, start ticks) of its VM while running


@dataclass
class Record:
    """One call of the sequence (or a describe) and what the client got."""

    op: str
    method: str
    role: str
    request: Any
    answer: Answer
    mutating: bool
    instance_id: str | None


@dataclass
class RunResult:
    point: str | None
    n: int
    sequence: str
    fired: list[str] = field(default_factory=list)  # "NAME@N" of the kills at the armed point
    killed_during: list[str] = field(default_factory=list)  # the operations during which a process was killed
    other_kills: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # violations of a bug in KNOWN, "kind: text"
    tolerated: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.point or 'no fault'}@{self.n} on {self.sequence}"


class Runner:
    """Plays one run on a rig and checks the invariants; see the module docstring."""

    def __init__(self, rig: Rig, survivor: InstanceModel, sequence: str, point: KillPoint | None, n: int) -> None:
        self.rig = rig
        self.survivor = survivor
        self.ops = SEQUENCES[sequence]
        self.point = point
        self.n = n
        self.result = RunResult(point.name if point else None, n, sequence)
        self.ids = {label: str(uuid.uuid4()) for label in {o.instance for o in self.ops}}
        self.volume_ids = {o.volume: str(uuid.uuid4()) for o in self.ops if o.volume}
        self.model = {label: InstanceModel(iid) for label, iid in self.ids.items()}
        self.records: list[Record] = []
        self.kills_before = len(rig.kills)
        self.macs = iter(bytes([0x02, 0, 0, 0, 0, i]) for i in range(1, 256))

    def violation(self, text: str, known: str | None = None) -> None:
        if known is not None:
            assert known in KNOWN
            self.result.known.append(f"{known}: {text}")
        else:
            self.result.violations.append(text)

    # --- the run ---

    def run(self) -> RunResult:
        started = time.monotonic()
        rig = self.rig
        rig.disarm_file.unlink(missing_ok=True)
        kills_before = self.kills_before = len(rig.kills)
        self._provision()
        if self.point is not None:
            rig.restart(self.point.role, f"{self.point.name}@{self.n}")
        for op in self.ops:
            self._play(op)
        rig.disarm_file.touch()
        kills = rig.kills[kills_before:]
        self.result.fired = [k.fired for k in kills if k.fired]
        self.result.other_kills = [f"{k.role} exited with {k.returncode}" for k in kills if not k.fired]
        for text in self.result.other_kills:
            self.violation(f"a process died without a kill point: {text}")
        if self.point is not None and not self.result.fired:
            # Not reached (this sequence passes the point fewer times): leave no armed process behind.
            rig.restart(self.point.role)
        self._check_end()
        self._unprovision()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _volume_path(self, label: str) -> Path:
        directory = self.rig.agent.volume_dir if label.startswith("P") else self.rig.controller.encrypted_volume_dir
        return directory / self.volume_ids[label]

    def _provision(self) -> None:
        for label in self.volume_ids:
            path = self._volume_path(label)
            if label.startswith("P"):
                path.touch(mode=0o600)
                os.truncate(path, 1 << 20)
            else:
                sparse_copy(self.rig.template, path)

    def _unprovision(self) -> None:
        """The run's volume files go once it is checked (the long profile makes about a thousand)."""
        for label in self.volume_ids:
            self._volume_path(label).unlink(missing_ok=True)

    def _request(self, op: Op) -> tuple[str, Any]:
        iid = self.ids[op.instance]
        token = str(uuid.uuid4())
        vid = self.volume_ids.get(op.volume or "", "")
        model = self.model[op.instance]
        if op.kind == "start":
            return "StartInstance", pb.StartInstanceRequest(
                client_token=token, instance_id=iid, vcpus=1, memory_mib=64,
                image_digest=self.rig.agent.image_digest, image_signature=self.rig.agent.image_signature)
        if op.kind == "stop":
            return "StopInstance", pb.StopInstanceRequest(client_token=token, instance_id=iid,
                                                          mode=pb.STOP_MODE_GRACEFUL, timeout_seconds=5)
        if op.kind == "attach":
            return "AttachVolume", pb.AttachVolumeRequest(client_token=token, instance_id=iid, volume_id=vid)
        if op.kind == "attach_enc":
            sealed = envelope.wrap(self.rig.key, self.rig.host_public, uuid.UUID(iid), uuid.UUID(vid))
            return "AttachVolume", pb.AttachVolumeRequest(client_token=token, instance_id=iid, volume_id=vid,
                                                          envelope=sealed)
        if op.kind == "detach":
            return "DetachVolume", pb.DetachVolumeRequest(client_token=token, instance_id=iid, volume_id=vid)
        if op.kind == "assign_vf":
            pf = parse_bdf(PF)
            return "AssignVirtualFunction", pb.AssignVirtualFunctionRequest(
                client_token=token, instance_id=iid, mac=next(self.macs), vlan=0,
                physical_function=pb.PciAddress(domain=pf.domain, bus=pf.bus, device=pf.device,
                                                function=pf.function))
        if op.kind == "release_vf":
            vf = parse_bdf(model.vfs[0]) if model.vfs else parse_bdf(VFS[0])
            return "ReleaseVirtualFunction", pb.ReleaseVirtualFunctionRequest(
                client_token=token, instance_id=iid,
                virtual_function=pb.PciAddress(domain=vf.domain, bus=vf.bus, device=vf.device, function=vf.function))
        raise AssertionError(op.kind)

    def _play(self, op: Op) -> None:
        method, request = self._request(op)
        role = ROLES[op.kind]
        answer = call(self.rig, role, method, request)
        self.records.append(Record(str(op), method, role, request, answer, True, self.ids[op.instance]))
        self.result.killed_during += [str(op) for kill in answer.kills]
        model = self.model[op.instance]
        vid = self.volume_ids.get(op.volume or "", "")
        ok = answer.code is grpc.StatusCode.OK
        code, reasons = TOLERATED.get(op.kind, (None, ()))
        tolerated = answer.retried and answer.code is code and any(r in answer.detail for r in reasons)
        if not ok and not tolerated:
            self.violation(f"{op}: answered {answer.code.name} ({answer.detail}) after {answer.attempts} "
                           f"attempt(s){self._kills_text(answer)}")
        elif tolerated:
            self.result.tolerated.append(f"{op}: retry answered {answer.code.name}")
        if ok or tolerated:
            if op.kind == "start":
                model.running = True
            elif op.kind == "stop":
                model.running, model.volumes, model.encrypted, model.vfs = False, set(), set(), []
            elif op.kind in ("attach", "attach_enc"):
                model.volumes.add(vid)
                if op.kind == "attach_enc":
                    model.encrypted.add(vid)
            elif op.kind == "detach":
                model.volumes.discard(vid)
                model.encrypted.discard(vid)
            elif op.kind == "assign_vf":
                address = answer.response.virtual_function
                model.vfs.append(f"{address.domain:04x}:{address.bus:02x}:{address.device:02x}.{address.function:x}")
            elif op.kind == "release_vf" and model.vfs:
                model.vfs.pop(0)
        self._compare(op, model, answer)

    @staticmethod
    def _kills_text(answer: Answer) -> str:
        return "".join(f"; {k.role} killed ({k.fired or k.returncode})" for k in answer.kills)

    # --- the checks after each operation ---

    def _describe(self, model: InstanceModel) -> Any:
        request = pb.DescribeInstanceRequest(instance_id=model.instance_id)
        answer = call(self.rig, "instance-manager", "DescribeInstance", request)
        self.records.append(Record("describe", "DescribeInstance", "instance-manager", request, answer, False,
                                   model.instance_id))
        self.result.killed_during += ["describe" for kill in answer.kills]
        if answer.code is not grpc.StatusCode.OK:
            self.violation(f"describe {model.instance_id}: {answer.code.name} {answer.detail}")
            return None
        return answer.response.instance

    def _compare(self, op: Op | str, model: InstanceModel, answer: Answer | None = None) -> None:
        info = self._describe(model)
        if info is None:
            return
        expected_state = pb.INSTANCE_STATE_RUNNING if model.running else pb.INSTANCE_STATE_STOPPED
        seen_vfs = sorted(f"{v.domain:04x}:{v.bus:02x}:{v.device:02x}.{v.function:x}" for v in info.virtual_functions)
        seen = (pb.InstanceState.Name(info.state), sorted(info.volume_ids), seen_vfs)
        wanted = (pb.InstanceState.Name(expected_state), sorted(model.volumes), sorted(model.vfs))
        if seen != wanted:
            self.violation(f"after {op}: DescribeInstance says {seen}, the model {wanted}")
            # Go on from what the host says, so that later operations are judged on their own.
            model.running = info.state == pb.INSTANCE_STATE_RUNNING
            model.volumes = set(info.volume_ids)
            model.vfs = seen_vfs
        vms = sim_vms(self.rig.agent.runtime_dir)
        vm = vms.get(uuid.UUID(model.instance_id).hex)
        if model.running:
            if vm is None:
                self.violation(f"after {op}: {model.instance_id} is RUNNING but has no VM process")
            elif model.vm is None:
                model.vm = vm
            elif model.vm != vm:
                self.violation(f"after {op}: the VM of {model.instance_id} changed from {model.vm} to {vm} "
                               "(a running guest did not survive)")
                model.vm = vm
            self._compare_devices(op, model)
        else:
            if vm is not None:
                self.violation(f"after {op}: {model.instance_id} is stopped but its VM process {vm[0]} runs")
            model.vm = None
        self._check_vf_bindings(op)
        self._check_nbdkits(op)

    def _compare_devices(self, op: Op | str, model: InstanceModel) -> None:
        """The VMM's own device list (the sim's devices.json) against the model."""
        path = self.rig.agent.runtime_dir / uuid.UUID(model.instance_id).hex / "devices.json"
        try:
            devices = sorted(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            self.violation(f"after {op}: cannot read the VMM devices of {model.instance_id}: {exc}")
            return
        wanted = sorted([volume_device_id(uuid.UUID(v)) for v in model.volumes]
                        + [vf_device_id(parse_bdf(v)) for v in model.vfs])
        if devices != wanted:
            self.violation(f"after {op}: the VMM of {model.instance_id} has devices {devices}, "
                           f"the agent's state {wanted}")

    def _all_models(self) -> list[InstanceModel]:
        return [self.survivor, *self.model.values()]

    def _check_vf_bindings(self, op: Op | str) -> None:
        held = {vf for model in self._all_models() if model.running for vf in model.vfs}
        for vf in VFS:
            state = (self.rig.pci.driver_of(vf), self.rig.pci.override_of(vf))
            wanted = ("vfio-pci", "vfio-pci") if vf in held else ("iavf", None)
            if state != wanted:
                self.violation(f"after {op}: VF {vf} is (driver, override) {state}, expected {wanted}")

    def _check_nbdkits(self, op: Op | str) -> None:
        attached = {vid for model in self._all_models() if model.running for vid in model.encrypted}
        deadline = time.monotonic() + 3  # an nbdkit whose client hung up exits within milliseconds
        while True:
            running = nbdkits(self.rig.controller.encrypted_volume_dir)
            if set(running) == attached or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for vid, pid in running.items():
            if vid not in attached:
                self.violation(f"after {op}: nbdkit {pid} serves volume {vid}, which is not attached (leak)")
        for vid in attached:
            if vid not in running:
                said = [line.split(": ", 1)[-1] for line in self.rig.controller.log.read_text(errors="replace")
                        .splitlines() if vid in line][-2:]
                self.violation(f"after {op}: encrypted volume {vid} is attached but no nbdkit serves it (lost); "
                               f"the controller's log about it: {said}")

    # --- the checks at the end of a run ---

    def _check_end(self) -> None:
        self._compare("the end of the run", self.survivor)
        self._check_host()
        self._check_replays()
        self._check_audit()
        self._check_events()

    def _check_host(self) -> None:
        rig = self.rig
        models = self._all_models()
        running = [m for m in models if m.running]
        vms = sim_vms(rig.agent.runtime_dir)
        wanted_vms = {uuid.UUID(m.instance_id).hex for m in running}
        if set(vms) != wanted_vms:
            self.violation(f"sim VM processes {sorted(vms)} != running instances {sorted(wanted_vms)}")
        entries = sorted(p.name for p in rig.agent.runtime_dir.iterdir())
        if entries != sorted(wanted_vms):
            self.violation(f"runtime directory holds {entries}, expected {sorted(wanted_vms)} (leaked or lost files)")
        journal = json.loads((rig.agent.state_dir / "state.json").read_text())
        holding = sorted(i["instance_id"] for i in journal["instances"]
                         if i["state"] in ("STARTING", "RUNNING", "STOPPING"))
        if holding != sorted(m.instance_id for m in running):
            self.violation(f"the agent journal holds resources for {holding}")
        volume_state = rig.controller.state_dir / "volume-attachments.json"
        recorded = json.loads(volume_state.read_text())["attachments"] if volume_state.exists() else []
        served = nbdkits(rig.controller.encrypted_volume_dir)
        if sorted(r["volume_id"] for r in recorded) != sorted(served):
            self.violation(f"volume-attachments.json lists {[r['volume_id'] for r in recorded]}, "
                           f"nbdkit serves {sorted(served)}")
        metrics = self._agent_metrics()
        if metrics is not None:
            wanted = {
                "instances_running": len(running),
                "cores_free": len(CORES) - len(running),  # one single-thread core each
                "memory_free_mib": MEMORY_BUDGET_MIB - 64 * len(running),  # 64 MiB each
                "vfs_free": len(VFS) - sum(len(m.vfs) for m in running),
            }
            seen = {k: metrics.get(k) for k in wanted}
            if seen != wanted:
                self.violation(f"agent metrics {seen} != {wanted}")

    def _agent_metrics(self) -> dict[str, int] | None:
        for _ in range(50):
            answer = call(self.rig, "telemetry", "GetMetrics", pb.GetMetricsRequest())
            if answer.code is not grpc.StatusCode.OK:
                self.violation(f"GetMetrics: {answer.code.name} {answer.detail}")
                return None
            text = answer.response.text
            if re.search(r"^passivisor_agent_link_up 1\.0$", text, re.M):
                return {name: int(float(value)) for name, value in
                        re.findall(r'^passivisor_agent\{metric="([a-z_]+)"\} (\S+)$', text, re.M)}
            time.sleep(RETRY_PAUSE_S)
        self.violation("GetMetrics: the agent link never came up")
        return None

    def _check_replays(self) -> None:
        """Every mutating call, sent again with its token, gets the answer the client already got."""
        for record in [r for r in self.records if r.mutating]:
            again = call(self.rig, record.role, record.method, record.request)
            first = record.answer
            if again.code is not first.code or (first.code is grpc.StatusCode.OK and again.response != first.response):
                self.violation(f"{record.op} sent again with its token: {again.code.name} {again.detail!r}, "
                               f"first answered {first.code.name} {first.detail!r}")
            record.answer = again if again.code is first.code else first

    def _check_audit(self) -> None:
        # Read-only calls, refusals and replays are recorded without waiting for the disk (the group commit
        # writes them a moment later; controller/grpc_service.py, _record).  A new mutating call makes its
        # intent durable before it runs, and with it every record before: after this one the file holds
        # every record of the calls above.  (It is refused by the agent: the instance does not exist.)
        call(self.rig, "instance-manager", "StopInstance", pb.StopInstanceRequest(
            client_token=str(uuid.uuid4()), instance_id=str(uuid.uuid4()), mode=pb.STOP_MODE_FORCE))
        directory = self.rig.controller.state_dir / "audit"
        try:
            report = verify_directory(directory, public_key_from_bytes(self.rig.signing_public))
        except ChainBroken as broken:
            self.violation(f"the audit chain does not verify: {broken}")
            return
        if report.open_intents:
            self.violation(f"audit intents without an outcome: {list(report.open_intents)}")
        records = [decode(line) for line in (directory / "audit.log").read_bytes().splitlines() if line]
        calls = [r for r in records if isinstance(r, CallRecord)]
        by_sequence = {r.sequence: r for r in calls}
        for record in self.records:
            if record.mutating:
                self._check_audit_of_call(record, calls, by_sequence)
        describes: dict[str, int] = {}
        for record in self.records:
            if not record.mutating and record.answer.code is grpc.StatusCode.OK and record.instance_id:
                describes[record.instance_id] = describes.get(record.instance_id, 0) + 1
        for iid, count in describes.items():
            logged = sum(1 for r in calls if r.method == "DescribeInstance" and r.outcome is Outcome.OK
                         and dict(r.params).get("instance_id") == iid)
            if logged < count:
                self.violation(f"{count} answered DescribeInstance of {iid}, {logged} audit records")

    def _check_audit_of_call(self, record: Record, calls: list[CallRecord],
                             by_sequence: dict[int, CallRecord]) -> None:
        token = record.request.client_token
        mine = [r for r in calls if r.kind is Kind.CALL and dict(r.params).get("client_token") == token]
        intents = [r for r in mine if r.outcome is Outcome.PENDING]
        outcomes = {r.refers_to: r for r in calls if r.kind is Kind.OUTCOME and r.refers_to in
                    {i.sequence for i in intents}}
        if not intents:
            self.violation(f"{record.op}: no audit intent for token {token}")
            return
        missing = [i.sequence for i in intents if i.sequence not in outcomes]
        if missing:
            self.violation(f"{record.op}: audit intents {missing} have no outcome")
        finals = sorted([*outcomes.values(), *[r for r in mine if r.outcome is not Outcome.PENDING]],
                        key=lambda r: r.sequence)
        last = finals[-1].outcome.value if finals else None
        if last != record.answer.code.name:
            self.violation(f"{record.op}: the last audit outcome of token {token} is {last}, the client got "
                           f"{record.answer.code.name}")
        if record.method != by_sequence[intents[0].sequence].method:
            self.violation(f"{record.op}: audit intent names {by_sequence[intents[0].sequence].method}")

    def _check_events(self) -> None:
        cursor = 0
        while True:
            answer = call(self.rig, "telemetry", "PollEvents", pb.PollEventsRequest(after_cursor=cursor,
                                                                                    max_events=64))
            if answer.code is not grpc.StatusCode.OK:
                self.violation(f"PollEvents: {answer.code.name} {answer.detail}")
                return
            for event in answer.response.events:
                if event.kind == pb.EVENT_KIND_RECONCILE_MISMATCH:
                    self.violation(f"the agent reported RECONCILE_MISMATCH (event {event.cursor}); see its log")
            if not answer.response.events:
                return
            cursor = answer.response.next_cursor


# --- the host for a series of runs ---------------------------------------------------------------


@contextlib.contextmanager
def host(root: Path, volume: tuple[Path, bytearray] | None = None) -> Iterator[tuple[Rig, InstanceModel]]:
    """A started rig with its survivor instance (a plain volume, never stopped)."""
    rig = Rig(root, volume)
    try:
        rig.start("agent")
        rig.start("controller")
        identity = call(rig, "volume-attacher", "GetHostIdentity", pb.GetHostIdentityRequest()).response
        rig.host_public, rig.signing_public = identity.public_key, identity.signing_public_key
        survivor = InstanceModel(str(uuid.uuid4()))
        started = call(rig, "instance-manager", "StartInstance", pb.StartInstanceRequest(
            client_token=str(uuid.uuid4()), instance_id=survivor.instance_id, vcpus=1, memory_mib=64,
            image_digest=rig.agent.image_digest, image_signature=rig.agent.image_signature))
        disk = str(uuid.uuid4())
        (rig.agent.volume_dir / disk).touch(mode=0o600)
        attached = call(rig, "volume-attacher", "AttachVolume", pb.AttachVolumeRequest(
            client_token=str(uuid.uuid4()), instance_id=survivor.instance_id, volume_id=disk))
        if started.code is not grpc.StatusCode.OK or attached.code is not grpc.StatusCode.OK:
            raise HarnessError(f"the survivor did not start: {started.detail} {attached.detail}")
        survivor.running, survivor.volumes = True, {disk}
        survivor.vm = sim_vms(rig.agent.runtime_dir)[uuid.UUID(survivor.instance_id).hex]
        yield rig, survivor
    finally:
        rig.close()


def calibrate(root: Path, sequence: str, volume: tuple[Path, bytearray] | None = None) -> dict[str, int]:
    """How many times the sequence passes each kill point (both processes traced, nothing fires)."""
    with host(root, volume) as (rig, survivor):
        rig.trace_file = root / "trace"
        rig.trace_file.write_text("")  # start-up counts too: a run restarts the armed process the same way
        rig.restart("agent")
        rig.restart("controller")
        result = Runner(rig, survivor, sequence, None, 0).run()
        if result.violations:
            raise HarnessError(f"the fault-free run of {sequence} breaks invariants: {result.violations}")
        counts: dict[str, int] = {}
        for line in rig.trace_file.read_text().splitlines():
            counts[line] = counts.get(line, 0) + 1
        rig.trace_file = None
    return counts


@dataclass(frozen=True)
class Plan:
    point: str
    n: int
    sequence: str


def plan_all(counts: dict[str, dict[str, int]]) -> list[Plan]:
    """Every (point, N) the calibration saw, for every sequence: the long profile."""
    return [Plan(point.name, n, sequence) for sequence, seen in counts.items() for point in POINTS
            for n in range(1, seen.get(point.name, 0) + 1)]


@dataclass
class Report:
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fired(self) -> int:
        return sum(1 for r in self.runs if r.fired)

    @property
    def violations(self) -> list[str]:
        return [f"[{r.label}] {v}" for r in self.runs for v in r.violations]

    @property
    def known(self) -> list[str]:
        return [f"[{r.label}] {v}" for r in self.runs for v in r.known]

    def summary(self) -> str:
        tolerated = sum(len(r.tolerated) for r in self.runs)
        not_reached = [r.label for r in self.runs if r.point and not r.fired]
        lines = [f"faults: runs={len(self.runs)} kill_points_fired={self.fired} not_reached={len(not_reached)} "
                 f"violations={len(self.violations)} runs_with_violations={sum(1 for r in self.runs if r.violations)} "
                 f"known_bug_violations={len(self.known)} tolerated_answers={tolerated} "
                 f"wall_time_s={self.seconds:.0f}"]
        lines += [f"  violation {v}" for v in self.violations]
        lines += [f"  known bug {v}" for v in self.known]
        lines += [f"  known bug {kind}: {text}" for kind, text in KNOWN.items()
                  if any(v.startswith(kind) for r in self.runs for v in r.known)]
        return "\n".join(lines)


def execute(root: Path, plans: list[Plan], *, log: Callable[[str], None] = lambda line: None,
            fresh_host_every: int = 40, volume: tuple[Path, bytearray] | None = None) -> Report:
    """Run every plan, on hosts made fresh after a violation and every ``fresh_host_every`` runs."""
    report = Report()
    started = time.monotonic()
    volume = volume if volume is not None else make_volume(root / "template.luks")
    index = 0
    generation = 0
    while index < len(plans):
        generation += 1
        directory = root / f"host{generation}"
        violated = False
        with host(directory, volume) as (rig, survivor):
            for _ in range(fresh_host_every):
                if index >= len(plans):
                    break
                plan = plans[index]
                index += 1
                result = Runner(rig, survivor, plan.sequence, BY_NAME[plan.point], plan.n).run()
                report.runs.append(result)
                log(f"{index}/{len(plans)} {result.label}: fired={result.fired or '-'} "
                    f"violations={len(result.violations)} known={len(result.known)} "
                    f"tolerated={len(result.tolerated)} {result.seconds:.1f}s"
                    + "".join(f"\n    {v}" for v in [*result.violations, *result.known]))
                if result.violations or result.known:
                    violated = True  # the host's files are kept as evidence; the next run gets a fresh one
                    log(f"    evidence: {directory}")
                    break
        if not violated:
            shutil.rmtree(directory, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report
