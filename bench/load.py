"""Sustained mixed load under the shipped rate limits: ``python -m bench load``.

Everything runs for real, as in ``bench/controller.py``: ``passivisor-agent``
and ``passivisor-controller`` in processes of their own, mTLS with the
development PKI, and the clients in this process, each with a channel (a TLS
connection) of its own and the certificate of its role.  Unlike the other
benchmarks, the controller keeps the *shipped* rate limits (per principal 50
calls/s and a burst of 100; per instance 2 mutating calls/s and a burst of
10, ``controller.ratelimit``): a flood is what they are for, so refusals are
part of the load.

Part 1, sim backend (60 s; 10 s with ``--quick``): 64 clients in a fixed mix
of roles (``ROLE_PATTERN``), each doing its role's job on objects of its own:

- instance-manager (24): start, describe, list, stop, describe, list its own
  instance, round and round;
- volume-attacher (16): attach and detach its own plain volume (a file in the
  agent's volume directory) on its own running instance;
- telemetry (8): GetMetrics and PollEvents, each with its own cursor;
- auditor (8): ReadAuditLog in pages of ``AUDIT_PAGE`` records, from the start
  again whenever it reaches the head;
- network-manager (8): AssignVirtualFunction on its own running instance.  The
  host has no SR-IOV device, so each one is answered FAILED_PRECONDITION (the
  agent's PF_NOT_FOUND), which is expected and counted apart.

Outcomes (``classify``).  A call is OK; or *rate-limited*: RESOURCE_EXHAUSTED
carrying the retry hint the limiter sends (``retry-after-ms``), after which
the client sleeps that long plus a little jitter and repeats the same request;
or the expected FAILED_PRECONDITION of a VF; or *unexpected*: anything else,
including a RESOURCE_EXHAUSTED without a retry hint, which comes from the agent
(cores or memory ran out, i.e. something leaked), not from the limiter.  A
client that gets an unexpected answer stops, since it no longer knows the
state of its objects.  Every describe is checked against what its client
believes (state, volumes, no VF), and after the window every instance is read
back the same way; both processes must still run, and exit 0 on SIGTERM.  Any
unexpected error makes ``python -m bench load`` exit non-zero after printing
its results, with one line per kind of error (``check``).

Figures, each beside a baseline measured in the same run on the same processes:

- ``load.p50_<method>``, ``load.p99_<method>`` (ms): latency of admitted calls
  (OK, or the expected refusal) under load, measured in the client from call
  to answer, beside the same call made by *one* client alone just before the
  load starts: one call of each method per round, 10 rounds a second, which
  stays under the shipped limits (a refused baseline call is retried and not
  timed).  Extras: every attempt (``calls``) and the count of each status code
  (``codes``), under load.
- ``load.admitted_per_s``: calls admitted per second under load beside the
  ceiling the rate limits set for the roles in the mix (50/s per principal;
  every call, read-only or not, is charged to its principal): a ratio near 1
  says the limiter, not the host, bounds the load.  Clients are closed loops
  (each waits for its answer before the next call), so the limiter refuses
  only while the host serves faster than its ceiling; on a slower or busier
  host the load is bounded by the host and few calls, or none, are refused.
  Extras: ``cpu_s``, the CPU seconds the controller, the agent, the clients
  (this process) and the whole machine (``machine``: whatever else runs there
  too) used during the window; the calls admitted per principal, and the most
  mutating calls admitted on one instance, beside what their buckets allow in
  the window (``burst + rate * seconds``).  More than that is an unexpected
  error (LIMIT_EXCEEDED): claim C11 checked under concurrency.
- ``load.rss_controller``, ``load.rss_agent`` (MiB): VmRSS (``/proc/PID/status``)
  when the window closes beside when it opened, all clients connected; the
  ratio is the growth.  Sampled every ``RSS_INTERVAL_S``: ``max_mib`` is the
  largest sample and ``mid_mib`` the one nearest the middle of the window.
  Some growth is expected and bounded: connections and thread pools warming
  up, and the idempotency store's SQLite page cache (about 2 MiB) filling.
  One is expected and unbounded: the audit log keeps an 8-byte offset per
  record in memory (``controller/audit/log.py``), and every attempt is
  audited, refusals included.  Growth at the same pace in both halves of the
  window, beyond that, is a leak to look for.

Part 2, qemu backend (60 s; 15 s with ``--quick``; skipped with a message when
QEMU is absent): one instance at a time, over and over, until the time is up:
start, wait for PASSIVISOR-GUEST-READY on its serial console, attach a plain
volume, wait for the guest to report the disk (the first boot writes a marker
into it, every later boot must find that same marker), detach, stop
(graceful), all with the shipped limits.

- ``load.qemu_cycle`` (s): the median cycle of the second half of the loop
  beside that of the first half (with one cycle, that cycle on both sides);
  every cycle and each step's median in the extras.
- ``load.qemu_rss_controller``, ``load.qemu_rss_agent`` (MiB): VmRSS after the
  last cycle beside after the first, the same point of a cycle (the agent
  holds about 2 MiB more from a stop to the next start, which the first cycle
  would otherwise count as growth); ``max_mib`` over the whole loop.

A telemetry client pulls the events after each cycle, as in normal operation
(the agent journals its event queue on every change), and each cycle must
have left exactly STARTED, VOLUME_ATTACHED, VOLUME_DETACHED, STOPPED.

Any gRPC error in the loop is unexpected except a rate-limit refusal (which
it does not reach, at four mutating calls a cycle), and so is a guest that
reports an error or is not ready in ``BOOT_TIMEOUT_S``.

What the figures include.  The 64 clients are threads of this Python process
and share the machine's cores (two, here) with the controller and the agent,
so latency under load also holds the clients' own wait for the GIL and a
core; the baseline client has the machine to itself.  The agent serves one
command at a time (``controller.app.AgentConnection``), and the controller
serves at most 16 calls at once (``build_server``); the others queue, so
latency under load is mostly queueing: 64 clients over the admitted rate.
"""

from __future__ import annotations

import enum
import itertools
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.devhost.guest import DiskTokenLine, GuestSignal, parse_console_line
from controller.ratelimit import DEFAULT_INSTANCE, DEFAULT_PRINCIPAL
from hostagent.backends.console import LogFollower

from .controller import _fake_sysfs
from .harness import Profile, Result

IM, VA, TEL, AUD, NM = "instance-manager", "volume-attacher", "telemetry", "auditor", "network-manager"
# Client i has role ROLE_PATTERN[i % 8]: 64 clients are 24/16/8/8/8, 8 clients 3/2/1/1/1; every role from 5 on.
ROLE_PATTERN = (IM, VA, TEL, AUD, NM, IM, VA, IM)

# Short name (as in the result names) -> HostController method, in the order the results are printed.
METHODS: dict[str, str] = {
    "describe": "DescribeInstance",
    "list": "ListInstances",
    "start": "StartInstance",
    "stop": "StopInstance",
    "attach": "AttachVolume",
    "detach": "DetachVolume",
    "assign_vf": "AssignVirtualFunction",
    "get_metrics": "GetMetrics",
    "poll_events": "PollEvents",
    "read_audit_log": "ReadAuditLog",
}
IM_STEPS = ("start", "describe", "list", "stop", "describe", "list")

CALL_TIMEOUT_S = 30.0  # a call that takes longer ends DEADLINE_EXCEEDED: unexpected, a hang
JITTER_S = 0.01  # added to each retry hint, so that refused clients do not all come back at once
SIM_MEMORY_MIB = 64  # the smallest the API allows
QEMU_MEMORY_MIB = 256
AUDIT_PAGE = 64
POLL_BATCH = 64
BASELINE_PERIOD_S = 0.1  # one baseline round: 4 calls of the instance-manager, 40/s < its 50/s
RSS_INTERVAL_S = 0.5
VOLUME_BYTES = 16 << 20
NO_SRIOV_PF = pb.PciAddress(domain=0, bus=3, device=0, function=0)  # no such device on the sim host
BOOT_TIMEOUT_S = 120.0
DISK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LoadSize:
    clients: int
    sim_seconds: float
    qemu_seconds: float
    baseline_rounds: int


FULL_SIZE = LoadSize(clients=64, sim_seconds=60.0, qemu_seconds=60.0, baseline_rounds=150)
QUICK_SIZE = LoadSize(clients=64, sim_seconds=10.0, qemu_seconds=15.0, baseline_rounds=40)


def size_of(profile: Profile) -> LoadSize:
    return QUICK_SIZE if profile.rounds < 100 else FULL_SIZE


# --- outcomes ------------------------------------------------------------------------


class Verdict(enum.Enum):
    OK = "ok"
    RATE_LIMITED = "rate-limited"  # RESOURCE_EXHAUSTED with the limiter's retry hint
    NO_SRIOV = "no SR-IOV"  # FAILED_PRECONDITION of AssignVirtualFunction: the host has no such PF
    UNEXPECTED = "unexpected"


def retry_after_s(error: Any) -> float | None:
    """The limiter's retry hint (``retry-after-ms`` trailing metadata, grpc_service._abort), or None."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


def classify(method: str, error: Any) -> Verdict:
    """What one answer means for the load: ``error`` is the grpc.RpcError raised, or None."""
    if error is None:
        return Verdict.OK
    code = error.code()
    # The agent's INSUFFICIENT_CORES and INSUFFICIENT_MEMORY are RESOURCE_EXHAUSTED too, without a hint.
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s(error) is not None:
        return Verdict.RATE_LIMITED
    if (code is grpc.StatusCode.FAILED_PRECONDITION and method == "assign_vf"
            and "PF_NOT_FOUND" in (error.details() or "")):
        return Verdict.NO_SRIOV
    return Verdict.UNEXPECTED


@dataclass(frozen=True)
class Unexpected:
    phase: str  # "sim" or "qemu"
    method: str
    code: str
    details: str
    who: str


class Failed(Exception):
    """An unexpected answer, already recorded; the client that got it stops."""


def failure_message(unexpected: list[Unexpected]) -> str:
    groups: Counter[tuple[str, str, str, str]] = Counter()
    first: dict[tuple[str, str, str, str], str] = {}
    for u in unexpected:
        key = (u.phase, u.method, u.code, u.details[:200])
        groups[key] += 1
        first.setdefault(key, u.who)
    lines = [f"bench load: FAILED: {len(unexpected)} unexpected error(s) (only RESOURCE_EXHAUSTED with a retry "
             "hint, from a rate limit, and FAILED_PRECONDITION for a VF on a host without SR-IOV are expected):"]
    for (phase, method, code, details), count in groups.most_common():
        lines.append(f"  {count} x {phase} {method}: {code}: {details} (first: {first[phase, method, code, details]})")
    return "\n".join(lines)


def check(unexpected: list[Unexpected]) -> None:
    """Exit non-zero, listing them, if there was any unexpected error."""
    if unexpected:
        raise SystemExit(failure_message(unexpected))


@dataclass
class Tally:
    """What one client saw: latencies (s) of admitted calls and the status code of every attempt, by method."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    codes: dict[str, Counter[str]] = field(default_factory=dict)

    def record(self, method: str, code: str, seconds: float | None) -> None:
        self.codes.setdefault(method, Counter())[code] += 1
        if seconds is not None:
            self.latencies.setdefault(method, []).append(seconds)

    def merge(self, other: Tally) -> None:
        for method, values in other.latencies.items():
            self.latencies.setdefault(method, []).extend(values)
        for method, counts in other.codes.items():
            self.codes.setdefault(method, Counter()).update(counts)


@dataclass
class Owned:
    """An instance a client works on, and what the client believes about it."""

    instance_id: str
    volume_id: str | None = None
    exists: bool = False  # started at least once: the agent knows it
    running: bool = False
    attached: bool = False
    known: bool = True  # False once its client stopped on an unexpected answer


class Client:
    """One caller: a stub on its own channel, the calls it makes, and what it saw."""

    def __init__(self, who: str, phase: str, stub: Any, unexpected: list[Unexpected], tally: Tally | None = None,
                 *, seed: int = 0) -> None:
        self.who = who
        self.phase = phase
        self.stub = stub
        self.unexpected = unexpected  # shared by the phase; list.append is atomic
        self.tally = tally  # None: not counted (setup, final check)
        self.deadline = math.inf  # the end of the window; calls are made only before it
        self.rng = random.Random(seed)

    def open(self) -> bool:
        return time.perf_counter() < self.deadline

    def fail(self, method: str, code: str, details: str) -> Failed:
        self.unexpected.append(Unexpected(self.phase, method, code, details, self.who))
        return Failed(f"{self.who}: {method}: {code}: {details}")

    def call(self, method: str, request: Any) -> Any | None:
        """Make the call, repeating it after each rate-limit refusal; raise Failed on an unexpected answer.

        Returns the answer; None for the expected FAILED_PRECONDITION, or when the window closed while the
        call was refused (it then had no effect: a refused call changes nothing).
        """
        rpc = getattr(self.stub, METHODS[method])
        while True:
            started = time.perf_counter()
            try:
                answer = rpc(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                seconds = time.perf_counter() - started
                verdict = classify(method, exc)
                code = exc.code().name if callable(getattr(exc, "code", None)) else "UNKNOWN"
                if verdict is Verdict.RATE_LIMITED:
                    self._record(method, code, None)
                    wait = (retry_after_s(exc) or 0.0) + self.rng.uniform(0, JITTER_S)
                    if time.perf_counter() + wait >= self.deadline:
                        return None
                    time.sleep(wait)
                    continue
                if verdict is Verdict.NO_SRIOV:
                    self._record(method, code, seconds)
                    return None
                self._record(method, code, None)
                raise self.fail(method, code, exc.details() or "") from None
            self._record(method, "OK", time.perf_counter() - started)
            return answer

    def answer(self, method: str, request: Any) -> Any:
        """``call`` for a call that must be answered (no expected refusal, no window to close)."""
        answer = self.call(method, request)
        if answer is None:
            raise self.fail(method, "NO_ANSWER", "refused until the window closed")
        return answer

    def _record(self, method: str, code: str, seconds: float | None) -> None:
        if self.tally is not None:
            self.tally.record(method, code, seconds)

    def expect_state(self, method: str, owned: Owned, info: Any) -> None:
        """Raise Failed unless ``info`` (an InstanceInfo) is what the client believes."""
        state = pb.INSTANCE_STATE_RUNNING if owned.running else pb.INSTANCE_STATE_STOPPED
        volumes = [owned.volume_id] if owned.attached else []
        if info.state != state or list(info.volume_ids) != volumes or len(info.virtual_functions) != 0:
            raise self.fail(method, "STATE_MISMATCH",
                            f"instance {owned.instance_id} is {pb.InstanceState.Name(info.state)} with volumes "
                            f"{list(info.volume_ids)} and {len(info.virtual_functions)} VFs; its client expected "
                            f"{pb.InstanceState.Name(state)} with volumes {volumes} and no VF")


# --- requests --------------------------------------------------------------------------


def _token() -> str:
    return str(uuid.uuid4())


def _start_request(agent: agenthost.AgentHost, instance_id: str, memory_mib: int = SIM_MEMORY_MIB) -> Any:
    return pb.StartInstanceRequest(client_token=_token(), instance_id=instance_id, vcpus=1, memory_mib=memory_mib,
                                   image_digest=agent.image_digest, image_signature=agent.image_signature)


def _stop_request(instance_id: str, timeout_s: int = 5) -> Any:
    return pb.StopInstanceRequest(client_token=_token(), instance_id=instance_id, mode=pb.STOP_MODE_GRACEFUL,
                                  timeout_seconds=timeout_s)


def _attach_request(owned: Owned) -> Any:
    return pb.AttachVolumeRequest(client_token=_token(), instance_id=owned.instance_id, volume_id=owned.volume_id)


def _detach_request(owned: Owned) -> Any:
    return pb.DetachVolumeRequest(client_token=_token(), instance_id=owned.instance_id, volume_id=owned.volume_id)


def _assign_request(owned: Owned) -> Any:
    return pb.AssignVirtualFunctionRequest(client_token=_token(), instance_id=owned.instance_id,
                                           physical_function=NO_SRIOV_PF, mac=bytes.fromhex("020000000001"), vlan=0)


# --- one step of each role, shared by the baseline and the load ----------------------


def _start(client: Client, agent: agenthost.AgentHost, owned: Owned) -> None:
    if client.call("start", _start_request(agent, owned.instance_id)) is not None:
        owned.exists = owned.running = True


def _stop(client: Client, owned: Owned) -> None:
    if client.call("stop", _stop_request(owned.instance_id)) is not None:
        owned.running = False


def _describe(client: Client, owned: Owned) -> None:
    answer = client.call("describe", pb.DescribeInstanceRequest(instance_id=owned.instance_id))
    if answer is not None:
        client.expect_state("describe", owned, answer.instance)


def _toggle_volume(client: Client, owned: Owned) -> None:
    if owned.attached:
        if client.call("detach", _detach_request(owned)) is not None:
            owned.attached = False
    elif client.call("attach", _attach_request(owned)) is not None:
        owned.attached = True


def _assign_vf(client: Client, owned: Owned) -> None:
    if client.call("assign_vf", _assign_request(owned)) is not None:
        raise client.fail("assign_vf", "OK", "a VF was assigned on a host without SR-IOV")


def _poll(client: Client, cursor: int) -> int:
    answer = client.call("poll_events", pb.PollEventsRequest(after_cursor=cursor, max_events=POLL_BATCH))
    return cursor if answer is None else int(answer.next_cursor)


def _read_audit(client: Client, sequence: int) -> int:
    """One page of the audit log from ``sequence``; the next sequence, or 1 again at the head."""
    answer = client.call("read_audit_log", pb.ReadAuditLogRequest(from_sequence=sequence, max_records=AUDIT_PAGE))
    if answer is None or len(answer.records) < AUDIT_PAGE:
        return 1
    return int(answer.next_sequence)


# --- memory ----------------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (``/proc/PID/status``); None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (all its threads) in seconds (``/proc/PID/stat``); None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def machine_cpu_seconds() -> float:
    """CPU time all processes of the machine used since boot, in seconds (``/proc/stat``, every CPU)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """VmRSS of named processes every ``interval`` seconds in a thread, plus named marks taken on demand.

    A mark also takes the processes' CPU time and the whole machine's (``"machine"``: this benchmark and
    whatever else runs there), so that a window's CPU use can be reported beside it.
    """

    def __init__(self, pids: dict[str, int], interval: float = RSS_INTERVAL_S) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}  # (perf_counter, KiB)
        self.marks: dict[str, dict[str, int | None]] = {}
        self.cpu: dict[str, dict[str, float | None]] = {}
        self.times: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> dict[str, int | None]:
        now = time.perf_counter()
        values = {name: vm_rss_kib(pid) for name, pid in self.pids.items()}
        with self._lock:
            for name, value in values.items():
                if value is not None:
                    self.samples[name].append((now, value))
        return values

    def mark(self, label: str) -> None:
        self.cpu[label] = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.cpu[label]["machine"] = machine_cpu_seconds()
        self.times[label] = time.perf_counter()
        self.marks[label] = self.sample()

    def cpu_used(self, name: str) -> float | None:
        """CPU seconds ``name`` used between the start and end marks."""
        start, end = self.cpu.get("start", {}).get(name), self.cpu.get("end", {}).get(name)
        return None if start is None or end is None else round(end - start, 2)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.sample()

    def result(self, name: str, label: str) -> Result | None:
        """``label`` (e.g. "load.rss_agent"): end beside start, in MiB; None if a mark is missing.

        ``mid_mib`` is the sample nearest the middle of the window: growth that is all in the first half
        is warm-up, growth in both halves alike is a leak.
        """
        start, end = self.marks.get("start", {}).get(name), self.marks.get("end", {}).get(name)
        if not start or not end:
            print(f"bench load: no VmRSS of the {name} at the start and end of the window", file=sys.stderr)
            return None
        middle = (self.times["start"] + self.times["end"]) / 2
        with self._lock:
            samples = list(self.samples[name])
        mid = min(samples, key=lambda sample: abs(sample[0] - middle))[1]
        return Result(label, _mib(end), _mib(start), "MiB",
                      {"mid_mib": _mib(mid), "max_mib": _mib(max(kib for _, kib in samples)),
                       "rss_samples": len(samples), "interval_s": self.interval})


def _mib(kib: int) -> float:
    return round(kib / 1024, 2)


# --- figures ---------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return float(f"{seconds * 1000:.4g}")


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (inclusive method: within the range of the values)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def latency_results(load: Tally, baseline: Tally) -> Iterator[Result]:
    for method in METHODS:
        ours, base = load.latencies.get(method, []), baseline.latencies.get(method, [])
        if not ours or not base:
            print(f"bench load: no admitted {method} call {'under load' if not ours else 'in the baseline'}; "
                  "no figure", file=sys.stderr)
            continue
        codes = load.codes.get(method, Counter())
        extra = {"calls": sum(codes.values()), "codes": dict(sorted(codes.items())), "samples": len(ours),
                 "baseline_samples": len(base)}
        yield Result(f"load.p50_{method}", _ms(statistics.median(ours)), _ms(statistics.median(base)), "ms", extra)
        yield Result(f"load.p99_{method}", _ms(percentile(ours, 99)), _ms(percentile(base, 99)), "ms", extra)


# --- processes -------------------------------------------------------------------------


def _prepare_controller(directory: Path, agent: agenthost.AgentHost,
                        policy: Path | None) -> controllerhost.ControllerHost:
    """A development controller with the shipped rate limits, spelled out so that they stay the shipped ones."""
    return controllerhost.prepare(directory, agent, policy=policy,
                                  principal_rate_per_s=DEFAULT_PRINCIPAL.rate_per_s,
                                  principal_burst=DEFAULT_PRINCIPAL.burst,
                                  instance_rate_per_s=DEFAULT_INSTANCE.rate_per_s,
                                  instance_burst=DEFAULT_INSTANCE.burst)


def _channel(host: controllerhost.ControllerHost, endpoint: str, role: str) -> grpc.Channel:
    """An mTLS channel as ``role``, with a TLS connection of its own.

    A local subchannel pool keeps gRPC from sharing one connection between channels to the same
    target, which it may do otherwise: each client is a separate service with its own connection.
    """
    channel = host.channel(endpoint, role, options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)  # the TLS handshake, outside any window
    return channel


def _stub(channel: grpc.Channel) -> Any:
    return pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]


def _stop_process(name: str, process: Any, phase: str, unexpected: list[Unexpected]) -> None:
    """SIGTERM; anything but a clean exit 0 (a crash, or a hang that needed SIGKILL) is unexpected."""
    running = process.poll() is None
    status = agenthost.stop(process)
    if not running:
        unexpected.append(Unexpected(phase, "(process)", "EXITED", f"the {name} died during the run ({status})",
                                     name))
    elif status != 0:
        unexpected.append(Unexpected(phase, "(process)", "EXIT_STATUS",
                                     f"the {name} exited with {status} on SIGTERM", name))


@dataclass
class PhaseReport:
    results: list[Result] = field(default_factory=list)
    unexpected: list[Unexpected] = field(default_factory=list)
    load: Tally = field(default_factory=Tally)  # the load window's calls (for tests)


# --- part 1: sim -----------------------------------------------------------------------


def run_sim(root: Path, *, clients: int, seconds: float, baseline_rounds: int,
            policy: Path | None = None) -> PhaseReport:
    """The mixed load on the sim backend.  ``policy`` replaces the shipped one (tests inject a fault with it)."""
    roles = [ROLE_PATTERN[i % len(ROLE_PATTERN)] for i in range(clients)]
    if not set(ROLE_PATTERN) <= set(roles):
        raise ValueError(f"every role needs a client: at least {len(set(ROLE_PATTERN))} clients")
    report = PhaseReport()
    owned = [Owned(str(uuid.uuid4()), str(uuid.uuid4()) if role == VA else None) for role in roles]
    instances = sum(role in (IM, VA, NM) for role in roles)
    spare = 8  # cores and memory beyond need: a refusal for want of them means something leaked
    root.mkdir(parents=True)
    agent = agenthost.prepare(root / "agent", backend="sim", sysfs_root=_fake_sysfs(root / "sysfs", instances + spare),
                              memory_budget_mib=max(4096, (instances + spare) * SIM_MEMORY_MIB))
    agent_process = agenthost.start(agent)
    try:
        host = _prepare_controller(root / "controller", agent, policy)
        controller_process, endpoint = controllerhost.start(host)
        try:
            _SimRun(agent, host, endpoint, roles, owned, report, {"controller": controller_process.pid,
                                                                 "agent": agent_process.pid}).run(seconds,
                                                                                                   baseline_rounds)
        except Failed:
            pass  # recorded; setup or the baseline could not go on
        finally:
            _stop_process("controller", controller_process, "sim", report.unexpected)
    finally:
        _stop_process("agent", agent_process, "sim", report.unexpected)
        agenthost.discard(agent)  # its runtime directory is outside ``root``, in the temporary directory
    return report


class _SimRun:
    def __init__(self, agent: agenthost.AgentHost, host: controllerhost.ControllerHost, endpoint: str,
                 roles: list[str], owned: list[Owned], report: PhaseReport, pids: dict[str, int]) -> None:
        self.agent, self.host, self.endpoint = agent, host, endpoint
        self.roles, self.owned, self.report, self.pids = roles, owned, report, pids
        self.channels: list[grpc.Channel] = []

    def _client(self, who: str, role: str, tally: Tally | None, seed: int = 0) -> Client:
        channel = _channel(self.host, self.endpoint, role)
        self.channels.append(channel)
        return Client(who, "sim", _stub(channel), self.report.unexpected, tally, seed=seed)

    def _of(self, role: str) -> list[Owned]:
        return [o for o, r in zip(self.owned, self.roles, strict=True) if r == role]

    def run(self, seconds: float, baseline_rounds: int) -> None:
        try:
            self._setup()
            baseline = self._baseline(baseline_rounds)
            self.report.results.extend(self._load(seconds, baseline))
        finally:
            for channel in self.channels:
                channel.close()

    def _setup(self) -> None:
        """Volume files, and the instances that volume-attachers and network-managers work on, running."""
        setup = self._client("setup", IM, None)
        for owned in self._of(VA):
            with open(self.agent.volume_dir / str(owned.volume_id), "wb") as file:
                file.truncate(VOLUME_BYTES)
        for owned in self._of(VA) + self._of(NM):
            _start(setup, self.agent, owned)

    def _baseline(self, rounds: int) -> Tally:
        """One client alone: each round makes one call of every method, with the certificate of its role."""
        tally = Tally()
        clients = {role: self._client(f"{role} (baseline)", role, tally) for role in set(self.roles)}
        managed, volumes, vfs = self._of(IM), self._of(VA), self._of(NM)
        print(f"  sim: baseline, one client, {rounds} rounds of one call per method", file=sys.stderr, flush=True)
        cursor, sequence = 0, 1
        next_round = time.perf_counter()
        for index in range(rounds):
            instance = managed[index % len(managed)]
            _start(clients[IM], self.agent, instance)
            _describe(clients[IM], instance)
            clients[IM].call("list", pb.ListInstancesRequest())
            _stop(clients[IM], instance)
            volume = volumes[index % len(volumes)]
            _toggle_volume(clients[VA], volume)
            _toggle_volume(clients[VA], volume)
            _assign_vf(clients[NM], vfs[index % len(vfs)])
            clients[TEL].call("get_metrics", pb.GetMetricsRequest())
            cursor = _poll(clients[TEL], cursor)
            sequence = _read_audit(clients[AUD], sequence)
            next_round += BASELINE_PERIOD_S
            time.sleep(max(0.0, next_round - time.perf_counter()))
        return tally

    def _load(self, seconds: float, baseline: Tally) -> Iterator[Result]:
        tallies = [Tally() for _ in self.roles]
        clients = [self._client(f"{role}#{index}", role, tallies[index], seed=index)
                   for index, role in enumerate(self.roles)]
        sampler = RssSampler({**self.pids, "clients": os.getpid()})
        window = [0.0, 0.0]

        def open_window() -> None:  # run by the barrier, once, as it releases every client
            sampler.mark("start")
            sampler.start()
            window[0] = time.perf_counter()
            window[1] = window[0] + seconds
            for client in clients:
                client.deadline = window[1]

        go = threading.Barrier(len(clients) + 1, action=open_window)
        threads = [threading.Thread(target=self._client_main, args=(client, role, owned, go),
                                    name=client.who)
                   for client, role, owned in zip(clients, self.roles, self.owned, strict=True)]
        print(f"  sim: load, {len(clients)} clients ({_mix(self.roles)}) for {seconds:g} s", file=sys.stderr,
              flush=True)
        for thread in threads:
            thread.start()
        go.wait()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - window[0]
        sampler.mark("end")
        sampler.stop()
        load = self.report.load
        for tally in tallies:
            load.merge(tally)
        self._final_check()
        yield from latency_results(load, baseline)
        cpu = {name: sampler.cpu_used(name) for name in (*sampler.pids, "machine")}
        limits = _check_limits(tallies, self.roles, elapsed, self.report.unexpected)
        yield _admitted(load, self.roles, elapsed, {**limits, "cpu_s": cpu, "cpus": os.cpu_count()})
        for name in ("controller", "agent"):
            result = sampler.result(name, f"load.rss_{name}")
            if result is not None:
                yield result

    def _client_main(self, client: Client, role: str, owned: Owned, go: threading.Barrier) -> None:
        try:
            go.wait()
            if role == IM:
                for step in itertools.cycle(IM_STEPS):
                    if not client.open():
                        break
                    if step == "start":
                        _start(client, self.agent, owned)
                    elif step == "stop":
                        _stop(client, owned)
                    elif step == "describe":
                        _describe(client, owned)
                    else:
                        client.call("list", pb.ListInstancesRequest())
            elif role == VA:
                while client.open():
                    _toggle_volume(client, owned)
            elif role == NM:
                while client.open():
                    _assign_vf(client, owned)
            elif role == TEL:
                cursor = 0
                while client.open():
                    client.call("get_metrics", pb.GetMetricsRequest())
                    if client.open():
                        cursor = _poll(client, cursor)
            else:
                sequence = 1
                while client.open():
                    sequence = _read_audit(client, sequence)
        except Failed:
            owned.known = False
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # a defect of this benchmark, or of grpc: reported like an unexpected answer
            owned.known = False
            client.unexpected.append(Unexpected("sim", "(client)", type(exc).__name__, str(exc), client.who))

    def _final_check(self) -> None:
        """Every instance, read back after the load, is what its client believes."""
        checker = self._client("final check", IM, None)
        for owned, role in zip(self.owned, self.roles, strict=True):
            if role in (IM, VA, NM) and owned.exists and owned.known:
                try:
                    _describe(checker, owned)
                except Failed:
                    continue  # recorded; check the others


def _mix(roles: list[str]) -> str:
    return ", ".join(f"{count} {role}" for role, count in Counter(roles).items())


MUTATING = ("start", "stop", "attach", "detach", "assign_vf")  # charged to the instance's bucket too


def _check_limits(tallies: list[Tally], roles: list[str], elapsed: float,
                  unexpected: list[Unexpected]) -> dict[str, Any]:
    """Claim C11 under load: no principal, and no instance, was admitted more than its bucket allows.

    ``controller.ratelimit`` promises at most ``burst + t * rate`` admissions in any span of ``t`` seconds;
    every admission here happened within ``elapsed``.  Each role is one principal (one certificate), and
    each instance is mutated by its own client only.  Returns the counts and bounds, for the extras.
    """
    principal_bound = DEFAULT_PRINCIPAL.burst + DEFAULT_PRINCIPAL.rate_per_s * elapsed
    instance_bound = DEFAULT_INSTANCE.burst + DEFAULT_INSTANCE.rate_per_s * elapsed
    by_role: Counter[str] = Counter()
    most_per_instance = 0
    for tally, role in zip(tallies, roles, strict=True):
        by_role[role] += sum(len(values) for values in tally.latencies.values())
        mutated = sum(len(tally.latencies.get(method, [])) for method in MUTATING)
        most_per_instance = max(most_per_instance, mutated)
        if mutated > instance_bound:
            unexpected.append(Unexpected("sim", "(rate limit)", "LIMIT_EXCEEDED",
                                         f"{mutated} mutating calls on one instance admitted in {elapsed:.2f} s; "
                                         f"its bucket allows {instance_bound:.0f}", role))
    for role, admitted in by_role.items():
        if admitted > principal_bound:
            unexpected.append(Unexpected("sim", "(rate limit)", "LIMIT_EXCEEDED",
                                         f"{admitted} calls of {role} admitted in {elapsed:.2f} s; its bucket "
                                         f"allows {principal_bound:.0f}", role))
    return {"admitted_by_principal": dict(by_role), "principal_bound": int(principal_bound),
            "most_per_instance": most_per_instance, "instance_bound": int(instance_bound)}


def _admitted(load: Tally, roles: list[str], elapsed: float, extra: dict[str, Any]) -> Result:
    codes: Counter[str] = Counter()
    for counts in load.codes.values():
        codes.update(counts)
    admitted = sum(len(values) for values in load.latencies.values())
    ceiling = len(set(roles)) * DEFAULT_PRINCIPAL.rate_per_s
    return Result("load.admitted_per_s", round(admitted / elapsed, 1), ceiling, "calls/s",
                  {"calls": sum(codes.values()), "admitted": admitted, "codes": dict(sorted(codes.items())),
                   "clients": len(roles), "seconds": round(elapsed, 2), "mix": dict(Counter(roles)), **extra})


# --- part 2: qemu ----------------------------------------------------------------------


def run_qemu(root: Path, *, seconds: float) -> PhaseReport:
    """The lifecycle loop on the qemu backend, one instance at a time."""
    report = PhaseReport()
    root.mkdir(parents=True)
    agent = agenthost.prepare(root / "agent", backend="qemu")
    agent_process = agenthost.start(agent)
    try:
        host = _prepare_controller(root / "controller", agent, None)
        controller_process, endpoint = controllerhost.start(host)
        try:
            report.results.extend(_qemu_loop(agent, host, endpoint, seconds, report,
                                             {"controller": controller_process.pid, "agent": agent_process.pid}))
        except Failed:
            pass  # recorded
        finally:
            _stop_process("controller", controller_process, "qemu", report.unexpected)
    finally:
        _stop_process("agent", agent_process, "qemu", report.unexpected)
        agenthost.discard(agent)
    return report


def _await_console(client: Client, method: str, follower: LogFollower, want: tuple[GuestSignal, ...],
                   timeout: float) -> Any:
    """The first protocol line of a kind in ``want``; Failed on a PASSIVISOR-ERROR line or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in follower.poll():
            line = parse_console_line(raw.decode(errors="replace"))
            if line is not None and line.signal in want:
                return line
            if line is not None and line.signal is GuestSignal.ERROR:
                raise client.fail(method, "GUEST_ERROR", " ".join(line.words))
        time.sleep(0.05)
    raise client.fail(method, "NO_CONSOLE_LINE", f"no {'/'.join(s.value for s in want)} within {timeout:g} s")


def _qemu_cycle(agent: agenthost.AgentHost, manager: Client, attacher: Client, owned: Owned, console: Path,
                marker: str | None) -> tuple[dict[str, float], str]:
    """One start, ready, attach, disk seen, detach, stop; the time of each step, and the disk's marker."""
    steps: dict[str, float] = {}
    laps = [time.perf_counter()]

    def lap(name: str) -> None:
        laps.append(time.perf_counter())
        steps[name] = laps[-1] - laps[-2]

    follower = LogFollower(console)  # the runtime directory is scrubbed at each stop: a new file each boot
    answer = manager.answer("start", _start_request(agent, owned.instance_id, QEMU_MEMORY_MIB))
    owned.exists = owned.running = True
    if answer.instance.state != pb.INSTANCE_STATE_RUNNING:
        raise manager.fail("start", "STATE_MISMATCH", f"started {pb.InstanceState.Name(answer.instance.state)}")
    lap("start_call")
    _await_console(manager, "start", follower, (GuestSignal.READY,), BOOT_TIMEOUT_S)
    lap("boot")
    attacher.answer("attach", _attach_request(owned))
    owned.attached = True
    lap("attach_call")
    line = _await_console(attacher, "attach", follower, (GuestSignal.DISK_WROTE, GuestSignal.DISK_MARKER),
                          DISK_TIMEOUT_S)
    assert isinstance(line, DiskTokenLine)
    if marker is None and line.signal is GuestSignal.DISK_WROTE:
        marker = line.token
    elif line.signal is not GuestSignal.DISK_MARKER or line.token != marker:
        raise attacher.fail("attach", "MARKER_MISMATCH", f"the guest reported {line.signal.value} {line.token}; "
                                                         f"expected the marker {marker} written by the first boot")
    lap("disk_seen")
    attacher.answer("detach", _detach_request(owned))
    owned.attached = False
    lap("detach_call")
    answer = manager.answer("stop", _stop_request(owned.instance_id, 30))
    owned.running = False
    if answer.instance.state != pb.INSTANCE_STATE_STOPPED:
        raise manager.fail("stop", "STATE_MISMATCH", f"stopped {pb.InstanceState.Name(answer.instance.state)}")
    lap("stop_call")
    steps["cycle"] = laps[-1] - laps[0]
    return steps, marker


# What one cycle must leave in the event stream, in this order, each for the instance, each REQUESTED.
CYCLE_EVENTS = (pb.EVENT_KIND_INSTANCE_STARTED, pb.EVENT_KIND_VOLUME_ATTACHED, pb.EVENT_KIND_VOLUME_DETACHED,
                pb.EVENT_KIND_INSTANCE_STOPPED)


def _drain_events(telemetry: Client, cursor: int) -> tuple[list[Any], int]:
    """Every event after ``cursor`` (acknowledging them, as the telemetry role does) and the new cursor."""
    events: list[Any] = []
    while True:
        answer = telemetry.answer("poll_events", pb.PollEventsRequest(after_cursor=cursor, max_events=POLL_BATCH))
        events.extend(answer.events)
        cursor = int(answer.next_cursor)
        if len(answer.events) < POLL_BATCH:
            return events, cursor


def _expect_cycle_events(telemetry: Client, owned: Owned, cursor: int) -> int:
    events, cursor = _drain_events(telemetry, cursor)
    seen = [(e.kind, e.instance_id, e.reason) for e in events]
    if seen != [(kind, owned.instance_id, pb.EVENT_REASON_REQUESTED) for kind in CYCLE_EVENTS]:
        raise telemetry.fail("poll_events", "EVENTS_MISMATCH", "a cycle left the events " + ", ".join(
            f"{pb.EventKind.Name(kind)}/{pb.EventReason.Name(reason)}/{iid or '-'}" for kind, iid, reason in seen))
    return cursor


def _qemu_loop(agent: agenthost.AgentHost, host: controllerhost.ControllerHost, endpoint: str, seconds: float,
               report: PhaseReport, pids: dict[str, int]) -> Iterator[Result]:
    channels = [_channel(host, endpoint, role) for role in (IM, VA, TEL)]
    try:
        manager = Client("instance-manager", "qemu", _stub(channels[0]), report.unexpected, report.load)
        attacher = Client("volume-attacher", "qemu", _stub(channels[1]), report.unexpected, report.load)
        telemetry = Client("telemetry", "qemu", _stub(channels[2]), report.unexpected, report.load)
        owned = Owned(str(uuid.uuid4()), str(uuid.uuid4()))
        with open(agent.volume_dir / str(owned.volume_id), "wb") as file:
            file.truncate(VOLUME_BYTES)
        console = agent.runtime_dir / uuid.UUID(owned.instance_id).hex / "console.log"
        marker: str | None = None
        cycles: list[dict[str, float]] = []
        _, cursor = _drain_events(telemetry, 0)  # the agent's own start (AGENT_RESTARTED)
        sampler = RssSampler(pids)
        sampler.start()
        deadline = time.perf_counter() + seconds
        print(f"  qemu: start, ready, attach, disk seen, detach, stop, one instance at a time for {seconds:g} s",
              file=sys.stderr, flush=True)
        try:
            while not cycles or time.perf_counter() < deadline:
                steps, marker = _qemu_cycle(agent, manager, attacher, owned, console, marker)
                cursor = _expect_cycle_events(telemetry, owned, cursor)
                if not cycles:
                    # The baseline of the RSS figures: the same point of a cycle as the end.  Between a stop
                    # and the next start the agent holds about 2 MiB more than before its first start.
                    sampler.mark("start")
                cycles.append(steps)
                print(f"  qemu: cycle {len(cycles)}: {steps['cycle']:.1f} s (boot {steps['boot']:.1f} s)",
                      file=sys.stderr, flush=True)
        finally:
            sampler.mark("end")
            sampler.stop()
            if owned.running:  # a cycle failed half-way: leave nothing running
                manager.tally = None
                manager.call("stop", pb.StopInstanceRequest(client_token=_token(), instance_id=owned.instance_id,
                                                            mode=pb.STOP_MODE_FORCE))
        steps_median = {name: round(statistics.median(c[name] for c in cycles), 3) for name in cycles[0]}
        # The second half of the cycles beside the first: slowing down over the repetitions shows, and a cycle
        # that a neighbour on this shared machine slowed down does not decide the figure alone.
        first, second = cycles[:max(1, len(cycles) // 2)], cycles[len(cycles) // 2:]
        yield Result("load.qemu_cycle", round(statistics.median(c["cycle"] for c in second), 2),
                     round(statistics.median(c["cycle"] for c in first), 2), "s",
                     {"cycles": len(cycles), "cycle_s": [round(c["cycle"], 2) for c in cycles],
                      "median_step_s": steps_median, "seconds": seconds})
        for name in ("controller", "agent"):
            result = sampler.result(name, f"load.qemu_rss_{name}")
            if result is not None:
                yield result
    finally:
        for channel in channels:
            channel.close()


# --- entry point -----------------------------------------------------------------------


def run(profile: Profile) -> Iterator[Result]:
    size = size_of(profile)
    unexpected: list[Unexpected] = []
    with tempfile.TemporaryDirectory(prefix="pv-bench-load-") as scratch:
        root = Path(scratch)
        sim = run_sim(root / "sim", clients=size.clients, seconds=size.sim_seconds,
                      baseline_rounds=size.baseline_rounds)
        yield from sim.results
        unexpected += sim.unexpected
        _summary("sim", sim)
        if shutil.which("qemu-system-x86_64") is None:
            print("bench load: QEMU is absent (make deps installs it); the qemu lifecycle loop is skipped",
                  file=sys.stderr)
        else:
            qemu = run_qemu(root / "qemu", seconds=size.qemu_seconds)
            yield from qemu.results
            unexpected += qemu.unexpected
    check(unexpected)


def _summary(phase: str, report: PhaseReport) -> None:
    for method in METHODS:
        codes = report.load.codes.get(method)
        if codes:
            print(f"  {phase}: {method:<15} {', '.join(f'{code} {n}' for code, n in sorted(codes.items()))}",
                  file=sys.stderr)

