"""Scale benchmarks (issue 7, item 6): ``python -m bench scale [--quick]``.

Everything runs for real, as in ``bench/controller.py``: sim-backend agents
(``passivisor-agent``) and controllers (``passivisor-controller``) in
processes of their own, mTLS with the development PKI, the clients in this
process, the real ``AuditLog`` and its verifier.  The controllers' rate
limits are raised out of the way (a benchmark is not a flood to be refused);
everything else is the shipped configuration and default policy.  Each
figure has a baseline from the same run; ``ratio`` = ours / baseline.

Part 1, many instances (target 1,000; 200 with ``--quick``).  Two hosts run
side by side: a *small* one (agent and controller) holding
``baseline_instances`` (10) running instances, and a *big* one whose agent
sees a fabricated sysfs tree of ``target + 2`` single-thread cores and a
memory budget of ``target + 2`` instances (sim VMs are ``sleep`` processes and
pin nothing), so neither cores nor memory refuse a start.  The big host's
instances are started one StartInstance at a time (1 vCPU, 64 MiB) through
its controller, up to each count of ``ScaleSize.instances`` in turn, stopping
early at the first refusal.  A refusal is a limit of the product, not of the
benchmark: it is reported (``limit`` in the extras: the count reached, the
status and details, and the agent's constant) and the figures are measured
at the count reached.  The agent keeps at most ``hostagent.state.MAX_INSTANCES``
(1024) instance records, so the target of 1,000 is within the bound; one
INSTANCE_LIST frame carries ``MAX_LISTED_INSTANCES`` (64) of them, and the
agent and the API page (LIST_INSTANCES with a cursor, ListInstances with
``page_size`` and ``page_token``).

- ``scale.describe`` and ``scale.list`` (us): DescribeInstance (of every
  instance in turn) and ListInstances per-call latency on the big host at the
  count reached (``ours``) beside the small host at 10 (``baseline``), measured
  interleaved by ``harness.compare`` (batches of 20 ms).  A flat per-call
  latency gives a ratio near 1 for Describe; ``scale.list`` is one walk of
  every page (``LIST_PAGE_SIZE`` = 256 instances per ListInstances call, each
  call reading up to 4 agent pages of 64), so its cost grows with the count
  by design.  Extras:
  ``latency_us_at``, the median of ``calls`` sequential calls on the big host
  at each count on the way up (not interleaved, so noisier).
- ``scale.rss_agent`` and ``scale.rss_controller`` (MiB): VmRSS
  (``/proc/PID/status``) of the big host's agent and controller at the count
  reached beside before its first instance (the agent link up, one
  ListInstances answered); ``per_instance_kib`` = growth / count.  The
  agent's extras also hold the sim VMs: each is one ``sleep infinity``
  process (``hostagent/backends/sim.py``); their VmRSS summed (which counts
  the libc pages they all share once per process) and their PSS summed
  (``/proc/PID/smaps_rollup``, shared pages split between their users).

Part 2, the audit log (1,000,000 records; 60,000 with ``--quick``), in a
controller state directory whose host identity key signs the checkpoints, as
``controller.main`` opens it.  The log is built through the real API: one
thread appends a realistic mix (per call set: a StartInstance intent and its
outcome, a DescribeInstance, a refused call; the parameters a real call
records), with ``durable=False`` and ``wait=False`` (records are sequenced,
hashed and chained under the lock, and the log's writer thread group-commits
whatever is queued with one write(2), without fsync) and the shipped
checkpoint policy (a signed checkpoint every 1000 records or 10 s).

- ``scale.audit_append_build`` (us/record): the build, timed in batches of
  ``audit_batch`` records (each batch's appends plus ``sync()``, so the writer's
  write(2) of the batch is included), in CPU time of this process (the
  appending thread and the log's writer thread: what appending costs,
  whatever else the shared machine runs meanwhile; wall time in the extras):
  the last batch, when the log holds about N records (``ours``), beside the
  first batch (``baseline``).  Not interleaved (they are a build apart).
- ``scale.audit_append`` (us per append), the shipped settings: ``append`` with
  ``durable=True`` and ``wait=True`` (each call returns once its record is
  fsync'd; one appender, so one fsync per record) to the log holding N
  records, reopened as the controller opens it (``ours``), beside a log
  holding a handful (``baseline``), interleaved by ``harness.compare``.
- ``scale.audit_verify`` (us/record): ``verify_directory`` (the real
  verifier: every line decoded strictly, every hash and link checked, every
  checkpoint signature verified, the chain checked against ``audit.head``)
  over the whole log of N records (``ours``) beside a copy of the same log
  taken when it held N/10 (``baseline``: the mean of one verification just
  before and one just after the long one), each as CPU time of the verifying
  thread per record; ratio near 1 = linear.  Wall seconds in the extras.
- ``scale.audit_open`` (s): ``AuditLog(directory, signer)`` with the shipped
  settings (it verifies the whole chain and keeps one 8-byte offset per
  record) over N records (``ours``) beside over an empty log (``baseline``:
  the genesis checkpoint and a few records; median of 3 opens), wall time;
  the CPU time per record in the extras.
- ``scale.controller_restart`` (s): ``passivisor-controller`` from its start
  to its ready line (``controllerhost.start`` polls its log every 50 ms) on
  the state directory holding the log of N records
  (``ours``) beside on a state directory started once before, whose log is
  empty (``baseline``; order empty, full, empty, and the median of the two
  empty ones).  The controller needs no agent to become ready (it connects
  on the first call).  Extras: its VmRSS once ready, each way.

Part 3, agent restart with 50 running instances (live update, claim C10):
one agent starts 50 sim instances over the agent channel (an ``AgentLink``,
as the controller speaks to it), another holds none.  Each round stops
(SIGTERM: the agent detaches and the VMs keep running) and starts each
agent again, in alternating order, and times from its ``Popen`` until a
ListInstances over a new agent-channel session is answered (connecting is
retried every 5 ms; the agent binds its socket before it adopts the VMs from
its journal and accepts only after).  After every restart of the full agent
all 50 instances, and only they, must be listed RUNNING, and its log must say
it adopted 50.  ``scale.agent_restart`` (s): the median restart with 50
instances (``ours``) beside with none (``baseline``).  Both include the
interpreter's start and the agent's imports and checks, a few tenths of a
second here, which is most of either figure.

What the figures include.  The machine has two cores shared with other work,
and the agents, controllers and clients all share them: latencies include
scheduling, and a restart includes the Python interpreter's start and
imports (most of the empty baseline).  Nothing here changes how the product
behaves, and temporary directories, processes and sim VMs are removed at the
end, also on failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
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

import grpc

from controller import identity
from controller.agentlink import AgentLink, AgentLinkError
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.audit import AuditLog, CheckpointSigner, Decision, Outcome, verify_directory
from controller.devhost import agenthost, controllerhost
from hostagent import process
from hostagent.state import MAX_INSTANCES
from hostagent.wire import messages as m

from .controller import _fake_sysfs
from .harness import Profile, Result, compare
from .load import vm_rss_kib

LIST_PAGE_SIZE = 256  # ListInstancesRequest.page_size max: the fewest calls for a whole listing
ROLE = "instance-manager"  # the shipped policy lets it Start, Describe and List
MEMORY_MIB = 64  # the smallest the API allows
CALL_TIMEOUT_S = 30.0
COMPARE_BATCH_NS = 20_000_000  # a call takes a millisecond or two (its audit record is fsync'd): 10+ per batch
PROGRESS_EVERY = 50  # instances started between two progress lines
AGENT_POLL_S = 0.005
RESTART_TIMEOUT_S = 60.0
CONTROLLER_TIMEOUT_S = 1800.0  # opening a log of a million records takes a minute or two here
RECOVERED = re.compile(r"recovered: (\d+) adopted, (\d+) ended, (\d+) mismatches")

PRINCIPAL = "spiffe://controlplane/instance-manager"
REFUSED = "spiffe://controlplane/telemetry"
START = "/passivisor.v1.HostController/StartInstance"
DESCRIBE = "/passivisor.v1.HostController/DescribeInstance"


@dataclass(frozen=True)
class ScaleSize:
    instances: tuple[int, ...]  # counts read on the way up on the big host; the last one is the target
    baseline_instances: int  # instances on the small host
    calls: int  # sequential calls per method at each count (the latency_us_at extras)
    audit_records: int
    audit_batch: int  # records per timed batch of the build
    restart_instances: int
    restart_rounds: int  # each round restarts both agents once


FULL_SIZE = ScaleSize(instances=(10, 100, 500, 1000), baseline_instances=10, calls=200, audit_records=1_000_000,
                      audit_batch=10_000, restart_instances=50, restart_rounds=7)
# --quick must stay under 90 s on a busy two-core machine: the audit log's three full reads (verify, open,
# controller restart) cost about 100 us a record there in wall time, hence 60,000 records.
QUICK_SIZE = ScaleSize(instances=(10, 50, 100, 200), baseline_instances=10, calls=100, audit_records=60_000,
                       audit_batch=5_000, restart_instances=50, restart_rounds=5)


def size_of(profile: Profile) -> ScaleSize:
    return QUICK_SIZE if profile.rounds < 100 else FULL_SIZE


def run(profile: Profile) -> Iterator[Result]:
    yield from measure(profile, size_of(profile))


def measure(profile: Profile, size: ScaleSize) -> Iterator[Result]:
    """Every scale figure at ``size``; ``run`` picks the size from the profile, tests pass a tiny one."""
    with tempfile.TemporaryDirectory(prefix="pv-bench-scale-") as scratch:
        root = Path(scratch)
        for part, results in (("instances", _instances(profile, size, root / "instances")),
                              ("audit log", _audit(profile, size, root / "audit")),
                              ("agent restart", _agent_restart(size, root / "restart"))):
            began = time.perf_counter()
            yield from results
            _progress(f"{part}: {time.perf_counter() - began:.1f} s")


def _progress(message: str) -> None:
    print(f"  scale: {message}", file=sys.stderr, flush=True)


def _mib(kib: int) -> float:
    return round(kib / 1024, 2)


def _pss_kib(pid: int) -> int | None:
    """Proportional set size of ``pid`` in KiB (``/proc/PID/smaps_rollup``); None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def _rss(pid: int) -> int:
    kib = vm_rss_kib(pid)
    if kib is None:
        raise RuntimeError(f"process {pid} is gone")
    return kib


def _stub(channel: grpc.Channel) -> Any:
    return pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _processes() -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """Processes started inside the block, stopped (SIGTERM, then SIGKILL) at its end, newest first."""
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        yield started
    finally:
        for name, child in reversed(started):
            status = agenthost.stop(child)
            if status != 0:
                print(f"bench scale: the {name} exited with {status}", file=sys.stderr)


def _cleanup_agent(agent: agenthost.AgentHost) -> None:
    """SIGKILL the agent's VMs (stopping an agent leaves them running) and remove its runtime directory."""
    agenthost.discard(agent)  # its runtime directory is outside the temporary directory: in /tmp


def _prepare_agent(directory: Path, sysfs: Path, instances: int) -> agenthost.AgentHost:
    """A sim agent with ``instances + 2`` cores and memory for as many instances: neither refuses a start."""
    return agenthost.prepare(directory, backend="sim", sysfs_root=_fake_sysfs(sysfs, instances + 2),
                             memory_budget_mib=(instances + 2) * MEMORY_MIB)


def _prepare_controller(directory: Path, agent: agenthost.AgentHost) -> controllerhost.ControllerHost:
    """The development controller, with rate limits far above anything the benchmark asks."""
    return controllerhost.prepare(directory, agent, principal_rate_per_s=1e6, principal_burst=1_000_000,
                                  instance_rate_per_s=1e6, instance_burst=1_000_000)


# --- part 1: many instances ----------------------------------------------------------


@dataclass
class _Point:
    """What the big host looks like at one count."""

    instances: int
    describe_us: float
    list_us: float
    agent_kib: int
    controller_kib: int


def _start_request(agent: agenthost.AgentHost, instance_id: str) -> Any:
    return pb.StartInstanceRequest(client_token=str(uuid.uuid4()), instance_id=instance_id, vcpus=1,
                                   memory_mib=MEMORY_MIB, image_digest=agent.image_digest,
                                   image_signature=agent.image_signature)


def _start_up_to(stub: Any, agent: agenthost.AgentHost, ids: list[str], count: int,
                 started_at: float) -> dict[str, str] | None:
    """Start instances until ``ids`` holds ``count``; the first RESOURCE_EXHAUSTED refusal stops and is returned."""
    while len(ids) < count:
        iid = str(uuid.uuid4())
        try:
            answer = stub.StartInstance(_start_request(agent, iid), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return {"code": error.code().name, "details": error.details() or ""}
        if answer.instance.state != pb.INSTANCE_STATE_RUNNING:
            raise RuntimeError(f"instance {iid} started {pb.InstanceState.Name(answer.instance.state)}")
        ids.append(iid)
        if len(ids) % PROGRESS_EVERY == 0:
            _progress(f"{len(ids)} instances running ({time.perf_counter() - started_at:.1f} s)")
    return None


def _median_call_us(call: Callable[[Any], Any], requests: list[Any], calls: int) -> float:
    times = []
    for request in itertools.islice(itertools.cycle(requests), calls):
        began = time.perf_counter_ns()
        call(request)
        times.append(time.perf_counter_ns() - began)
    return round(statistics.median(times) / 1000, 1)


def _describe_requests(ids: list[str]) -> list[Any]:
    return [pb.DescribeInstanceRequest(instance_id=iid) for iid in ids]


def _list_all(stub: Any) -> list[Any]:
    """Every instance: ListInstances page by page until ``next_page_token`` is empty."""
    instances: list[Any] = []
    token = ""
    while True:
        answer = stub.ListInstances(pb.ListInstancesRequest(page_size=LIST_PAGE_SIZE, page_token=token),
                                    timeout=CALL_TIMEOUT_S)
        instances.extend(answer.instances)
        if not answer.next_page_token:
            return instances
        if answer.next_page_token <= token:
            raise RuntimeError(f"ListInstances does not move forward: {answer.next_page_token!r} after {token!r}")
        token = answer.next_page_token


def _point(stub: Any, ids: list[str], calls: int, agent_pid: int, controller_pid: int) -> _Point:
    describe = _median_call_us(lambda r: stub.DescribeInstance(r, timeout=CALL_TIMEOUT_S), _describe_requests(ids),
                               calls)
    listing = _median_call_us(lambda _: _list_all(stub), [None], calls)
    return _Point(len(ids), describe, listing, _rss(agent_pid), _rss(controller_pid))


def _check_listing(stub: Any, ids: list[str]) -> None:
    listed = _list_all(stub)
    running = {i.instance_id for i in listed if i.state == pb.INSTANCE_STATE_RUNNING}
    if running != set(ids) or len(listed) != len(ids):
        raise RuntimeError(f"ListInstances holds {len(listed)} instances, {len(running)} running; "
                           f"{len(ids)} were started")


def _vm_memory(agent: agenthost.AgentHost) -> dict[str, Any]:
    pids = process.find_by_argument(str(agent.runtime_dir).encode())
    rss = [kib for kib in map(vm_rss_kib, pids) if kib is not None]
    pss = [kib for kib in map(_pss_kib, pids) if kib is not None]
    return {"count": len(pids), "rss_mib_sum": _mib(sum(rss)), "pss_mib_sum": _mib(sum(pss)),
            "pss_kib_per_vm": round(sum(pss) / max(1, len(pss)), 1),
            "note": "a sim VM is one `sleep infinity` process (hostagent/backends/sim.py)"}


def _instances(profile: Profile, size: ScaleSize, root: Path) -> Iterator[Result]:
    target = size.instances[-1]
    prepared: list[agenthost.AgentHost] = []
    try:
        small_agent = _prepare_agent(root / "small-agent", root / "small-sysfs", size.baseline_instances)
        prepared.append(small_agent)
        big_agent = _prepare_agent(root / "big-agent", root / "big-sysfs", target)
        prepared.append(big_agent)
        with _processes() as started:
            for name, agent in (("small agent", small_agent), ("big agent", big_agent)):
                started.append((name, agenthost.start(agent)))
            big_agent_pid = started[-1][1].pid
            small_host = _prepare_controller(root / "small-controller", small_agent)
            big_host = _prepare_controller(root / "big-controller", big_agent)
            small_process, small_endpoint = controllerhost.start(small_host)
            started.append(("small controller", small_process))
            big_process, big_endpoint = controllerhost.start(big_host)
            started.append(("big controller", big_process))
            with (small_host.channel(small_endpoint, ROLE) as small_channel,
                  big_host.channel(big_endpoint, ROLE) as big_channel):
                small, big = _stub(small_channel), _stub(big_channel)
                began = time.perf_counter()
                small_ids: list[str] = []
                refused = _start_up_to(small, small_agent, small_ids, size.baseline_instances, began)
                if refused is not None:
                    raise RuntimeError(f"the small host refused instance {len(small_ids) + 1}: {refused}")
                _check_listing(big, [])  # the agent link is up and TLS warm before the first reading
                before = _Point(0, 0.0, 0.0, _rss(big_agent_pid), _rss(big_process.pid))
                ids: list[str] = []
                points: list[_Point] = []
                limit: dict[str, Any] | None = None
                for count in size.instances:
                    refused = _start_up_to(big, big_agent, ids, count, began)
                    _check_listing(big, ids)
                    point = _point(big, ids, size.calls, big_agent_pid, big_process.pid)
                    points.append(point)
                    _progress(f"{point.instances} instances: Describe {point.describe_us} us, "
                              f"List {point.list_us} us, agent {_mib(point.agent_kib)} MiB, "
                              f"controller {_mib(point.controller_kib)} MiB")
                    if refused is not None:
                        limit = {"instances": len(ids), "refusal": refused,
                                 "agent_max_instances": MAX_INSTANCES}
                        _progress(f"the host refused instance {len(ids) + 1} of {target}: "
                                  f"{refused['code']}: {refused['details']}")
                        break
                last = points[-1]
                vms = _vm_memory(big_agent)
                common = {"instances": last.instances, "target": target, "limit": limit}
                batched = Profile(batch_ns=COMPARE_BATCH_NS, rounds=profile.rounds)
                big_describe = itertools.cycle(_describe_requests(ids))
                small_describe = itertools.cycle(_describe_requests(small_ids))
                yield compare("scale.describe", lambda _: big.DescribeInstance(next(big_describe),
                                                                               timeout=CALL_TIMEOUT_S),
                              lambda _: small.DescribeInstance(next(small_describe), timeout=CALL_TIMEOUT_S),
                              None, profile=batched, unit="us", baseline_instances=len(small_ids), **common,
                              latency_us_at={p.instances: p.describe_us for p in points})
                yield compare("scale.list", lambda _: _list_all(big), lambda _: _list_all(small), None,
                              profile=batched, unit="us", baseline_instances=len(small_ids), **common,
                              page_size=LIST_PAGE_SIZE, latency_us_at={p.instances: p.list_us for p in points})
                for name, after_kib, before_kib, at in (
                        ("agent", last.agent_kib, before.agent_kib, {p.instances: _mib(p.agent_kib) for p in points}),
                        ("controller", last.controller_kib, before.controller_kib,
                         {p.instances: _mib(p.controller_kib) for p in points})):
                    extra: dict[str, Any] = {
                        **common, "per_instance_kib": round((after_kib - before_kib) / max(1, last.instances), 1),
                        "rss_mib_at": at}
                    if name == "agent":
                        extra["sim_vms"] = vms
                    yield Result(f"scale.rss_{name}", _mib(after_kib), _mib(before_kib), "MiB", extra)
    finally:
        for agent in prepared:
            _cleanup_agent(agent)


# --- part 2: the audit log -----------------------------------------------------------


def _call_set(log: AuditLog, index: int) -> None:
    """Four records, as four calls leave them: a start's intent and outcome, a describe, a refusal."""
    iid = str(uuid.UUID(int=index, version=4))
    intent = log.append(PRINCIPAL, START, {"instance_id": iid, "client_token": str(uuid.UUID(int=index + 1, version=4)),
                                           "vcpus": "1", "memory_mib": "64"},
                        Decision.ALLOWED, Outcome.PENDING, wait=False)
    log.finish(intent, Outcome.OK, {"state": "RUNNING"}, wait=False)
    log.append(PRINCIPAL, DESCRIBE, {"instance_id": iid}, Decision.ALLOWED, Outcome.OK, wait=False)
    log.append(REFUSED, START, {}, Decision.DENIED, Outcome.PERMISSION_DENIED, wait=False)


def _copy_log(source: Path, target: Path) -> None:
    """A consistent copy of a log that nothing appends to (``audit.head`` first, as the writer orders them)."""
    target.mkdir(mode=0o700)
    for name in ("audit.head", "audit.log"):
        shutil.copyfile(source / name, target / name)
        os.chmod(target / name, 0o600)


@dataclass
class _Build:
    cpu_us: list[float]  # per record, each batch: CPU time of this process (the appender and the writer)
    wall_us: list[float]  # per record, each batch
    tenth_records: int  # records in the copy taken at N/10


def _build_log(directory: Path, signer: CheckpointSigner, records: int, batch: int, tenth: Path) -> _Build:
    """Append about ``records`` records (whole call sets); copy the log to ``tenth`` at N/10."""
    build = _Build([], [], 0)
    sets_per_batch = max(1, batch // 4)
    index = 0
    began = time.perf_counter()
    with AuditLog(directory, signer, durable=False) as log:
        while log.last_sequence < records:
            first = log.last_sequence
            wall, cpu = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(sets_per_batch):
                _call_set(log, index)
                index += 1
            log.sync()
            added = log.last_sequence - first
            build.cpu_us.append((time.process_time_ns() - cpu) / 1000 / added)
            build.wall_us.append((time.perf_counter_ns() - wall) / 1000 / added)
            if not build.tenth_records and log.last_sequence >= records // 10:
                log.checkpoint()  # audit.head now holds the newest record: the copy verifies whole
                build.tenth_records = log.last_sequence
                _copy_log(directory, tenth)
            if len(build.cpu_us) % 10 == 0:
                _progress(f"audit log: {log.last_sequence} of {records} records "
                          f"({time.perf_counter() - began:.1f} s)")
    return build


@dataclass(frozen=True)
class _Timing:
    wall_s: float
    cpu_s: float  # of this thread: what the work cost, whatever else the machine runs meanwhile


def _timed(action: Callable[[], Any]) -> tuple[_Timing, Any]:
    wall, cpu = time.perf_counter(), time.thread_time()
    value = action()
    return _Timing(time.perf_counter() - wall, time.thread_time() - cpu), value


def _start_controller(host: controllerhost.ControllerHost) -> tuple[float, subprocess.Popen[bytes], int]:
    """Seconds from its start to its ready line (polled every 50 ms), the process, its VmRSS once ready."""
    began = time.perf_counter()
    child, _ = controllerhost.start(host, timeout=CONTROLLER_TIMEOUT_S)
    seconds = time.perf_counter() - began
    return seconds, child, _rss(child.pid)


def _restart_controller(host: controllerhost.ControllerHost) -> tuple[float, int]:
    seconds, child, rss = _start_controller(host)
    # Its start is what is measured; a stop that fails is shown, as bench/controller.py does, not fatal.
    stopping = time.perf_counter()
    if agenthost.stop(child, timeout=60.0) != 0:
        print(f"bench scale: the controller exited with {child.returncode} after SIGTERM "
              f"({time.perf_counter() - stopping:.1f} s); its log ends:\n"
              f"{host.log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
    return seconds, rss


def _audit(profile: Profile, size: ScaleSize, root: Path) -> Iterator[Result]:
    root.mkdir()
    # The controllers need an agent in their configuration; they never call it here.
    agent = agenthost.prepare(root / "agent", backend="sim")
    try:
        full = _prepare_controller(root / "controller-full", agent)
        empty = _prepare_controller(root / "controller-empty", agent)
        full.state_dir.mkdir(mode=0o700)
        (full.state_dir / "audit").mkdir(mode=0o700)
        # As controller.main does: the host identity's key signs the checkpoints.
        signer = CheckpointSigner.for_host(identity.load_or_create(full.state_dir / "host.x25519"))
        log_dir = full.state_dir / "audit"
        build = _build_log(log_dir, signer, size.audit_records, size.audit_batch, root / "tenth")
        yield Result("scale.audit_append_build", round(build.cpu_us[-1], 2), round(build.cpu_us[0], 2),
                     "us/record", {"batch_records": size.audit_batch, "batches": len(build.cpu_us),
                                   "median_us": round(statistics.median(build.cpu_us), 2),
                                   "max_us": round(max(build.cpu_us), 2), "wall_us": round(build.wall_us[-1], 2),
                                   "baseline_wall_us": round(build.wall_us[0], 2), "durable": False, "wait": False})

        _progress("verifying the log at N/10, at N, and at N/10 again")
        # N/10 before and after N, so that the baseline brackets the long reading in time.
        before, tenth_report = _timed(lambda: verify_directory(root / "tenth", signer.public_key))
        full_verify, full_report = _timed(lambda: verify_directory(log_dir, signer.public_key))
        after, _ = _timed(lambda: verify_directory(root / "tenth", signer.public_key))
        tenth = [before, after]
        shutil.rmtree(root / "tenth")
        if tenth_report.records != build.tenth_records:
            raise RuntimeError(f"the copy at N/10 holds {tenth_report.records} records, not {build.tenth_records}")
        tenth_cpu = statistics.mean(t.cpu_s for t in tenth)
        yield Result("scale.audit_verify", round(full_verify.cpu_s / full_report.records * 1e6, 2),
                     round(tenth_cpu / tenth_report.records * 1e6, 2), "us/record",
                     {"records": full_report.records, "seconds": round(full_verify.wall_s, 2),
                      "cpu_seconds": round(full_verify.cpu_s, 2), "baseline_records": tenth_report.records,
                      "baseline_seconds": [round(t.wall_s, 3) for t in tenth],
                      "baseline_cpu_seconds": [round(t.cpu_s, 3) for t in tenth],
                      "checkpoints": full_report.checkpoints})

        small_dir = root / "small-log"
        small_dir.mkdir(mode=0o700)
        AuditLog(small_dir, signer).close()  # created: the genesis checkpoint and its opening record
        opens = []
        for _ in range(3):
            timing, small_log = _timed(lambda: AuditLog(small_dir, signer))
            opens.append(timing.wall_s)
            small_log.close()
        _progress(f"opening the log of {full_report.records} records")
        full_open, full_log = _timed(lambda: AuditLog(log_dir, signer))
        small_log = AuditLog(small_dir, signer)
        try:
            yield Result("scale.audit_open", round(full_open.wall_s, 3), round(statistics.median(opens), 4), "s",
                         {"records": full_log.opened.records, "baseline_records": small_log.opened.records,
                          "us_per_record": round(full_open.wall_s / full_log.opened.records * 1e6, 2),
                          "cpu_us_per_record": round(full_open.cpu_s / full_log.opened.records * 1e6, 2)})
            params = {"instance_id": str(uuid.uuid4())}

            def ours(p: dict[str, str]) -> None:
                full_log.append(PRINCIPAL, DESCRIBE, p, Decision.ALLOWED, Outcome.OK)

            def baseline(p: dict[str, str]) -> None:
                small_log.append(PRINCIPAL, DESCRIBE, p, Decision.ALLOWED, Outcome.OK)

            yield compare("scale.audit_append", ours, baseline, params,
                          profile=Profile(batch_ns=COMPARE_BATCH_NS, rounds=profile.rounds), unit="us",
                          records=full_log.last_sequence, baseline_records=small_log.last_sequence,
                          durable=True, wait=True)
        finally:
            full_log.close()
            small_log.close()

        _progress("restarting the controller on the empty and on the full log")
        _restart_controller(empty)  # its first start creates its state: keys, an empty log, the token store
        restarts: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
        for state in (empty, full, empty):
            restarts[state is full].append(_restart_controller(state))
        (full_restart_s, full_rss), = restarts[True]
        yield Result("scale.controller_restart", round(full_restart_s, 3),
                     round(statistics.median(s for s, _ in restarts[False]), 3), "s",
                     {"records": full_report.records, "rss_mib": _mib(full_rss),
                      "baseline_rss_mib": _mib(max(rss for _, rss in restarts[False])),
                      "baseline_samples": len(restarts[False])})
    finally:
        shutil.rmtree(agent.runtime_dir, ignore_errors=True)


# --- part 3: agent restart -----------------------------------------------------------


def _launch_agent(host: agenthost.AgentHost) -> tuple[float, subprocess.Popen[bytes], m.InstanceList]:
    """Start the agent as ``agenthost.start`` does; seconds until a new session's ListInstances is answered."""
    offset = host.log.stat().st_size if host.log.exists() else 0
    began = time.perf_counter()
    with open(host.log, "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "hostagent.main", "--config", str(host.config)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    try:
        while True:
            link = AgentLink(host.socket, host.secret(), timeout=RESTART_TIMEOUT_S)
            try:
                link.connect()  # refused until the new agent listens; answered once it has adopted its VMs
                answer = link.request(m.ListInstances(None))  # one page of 64: enough for restart_instances
                seconds = time.perf_counter() - began
                break
            except AgentLinkError:
                if child.poll() is not None or time.monotonic() > deadline:
                    text = host.log.read_bytes()[offset:].decode(errors="replace")
                    raise RuntimeError(f"passivisor-agent did not answer (status {child.poll()}):\n"
                                       f"{text[-2000:]}") from None
                time.sleep(AGENT_POLL_S)
            finally:
                link.close()
    except BaseException:
        agenthost.stop(child)
        raise
    if not isinstance(answer, m.InstanceList):
        agenthost.stop(child)
        raise RuntimeError(f"the agent answered ListInstances with {answer!r}")
    return seconds, child, answer


def _adopted(host: agenthost.AgentHost) -> int:
    found = RECOVERED.findall(host.log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no recovery line in {host.log}")
    return int(found[-1][0])


def _agent_restart(size: ScaleSize, root: Path) -> Iterator[Result]:
    root.mkdir()
    count = size.restart_instances
    hosts: dict[bool, agenthost.AgentHost] = {}  # with instances or without
    children: dict[bool, subprocess.Popen[bytes]] = {}
    try:
        hosts[True] = _prepare_agent(root / "full-agent", root / "sysfs", count)
        hosts[False] = agenthost.prepare(root / "empty-agent", backend="sim", sysfs_root=root / "sysfs")
        for full, host in hosts.items():
            children[full] = agenthost.start(host)
        host = hosts[True]
        ids = {uuid.uuid4() for _ in range(count)}
        link = AgentLink(host.socket, host.secret(), timeout=CALL_TIMEOUT_S)
        link.connect()
        try:
            for iid in ids:
                info = link.request(m.StartInstance(iid, 1, MEMORY_MIB, host.image_digest, host.image_signature))
                if not isinstance(info, m.InstanceInfo) or info.state is not m.InstanceState.RUNNING:
                    raise RuntimeError(f"starting {iid} over the agent channel answered {info!r}")
        finally:
            link.close()
        _progress(f"{count} instances running on the agent to restart")
        samples: dict[bool, list[float]] = {True: [], False: []}
        for round_no in range(size.restart_rounds):
            for full in (True, False) if round_no % 2 == 0 else (False, True):
                status = agenthost.stop(children.pop(full))
                if status != 0:
                    raise RuntimeError(f"passivisor-agent exited with {status}; see {hosts[full].log}")
                seconds, children[full], listing = _launch_agent(hosts[full])
                samples[full].append(seconds)
                expected = ids if full else set()
                running = {s.instance_id for s in listing.instances if s.state is m.InstanceState.RUNNING}
                if running != expected or len(listing.instances) != len(expected):
                    raise RuntimeError(f"after a restart the agent lists {len(listing.instances)} instances, "
                                       f"{len(running)} running; {len(expected)} expected")
                if full and _adopted(hosts[full]) != count:
                    raise RuntimeError(f"the agent adopted {_adopted(hosts[full])} VMs, not {count}")
            _progress(f"agent restart round {round_no + 1}/{size.restart_rounds}: {count} instances "
                      f"{samples[True][-1]:.3f} s, none {samples[False][-1]:.3f} s")
        yield Result("scale.agent_restart", round(statistics.median(samples[True]), 3),
                     round(statistics.median(samples[False]), 3), "s",
                     {"instances": count, "samples": size.restart_rounds, "adopted": _adopted(host),
                      "all_running": True, "runs_s": [round(s, 3) for s in samples[True]],
                      "baseline_runs_s": [round(s, 3) for s in samples[False]]})
    finally:
        for child in children.values():
            agenthost.stop(child)
        for host in hosts.values():
            _cleanup_agent(host)
