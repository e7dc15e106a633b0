"""Controller benchmarks: ``python -m bench controller``.

Everything runs for real: a sim-backend agent (``passivisor-agent``) and the
controller (``passivisor-controller``, started through ``controller.main``)
as separate processes, mTLS with the development PKI, clients in this process.
The rate limits are raised out of the way (a benchmark is not a flood to be
refused); everything else is the shipped configuration and default policy.

- ``controller.describe``: DescribeInstance of a running instance, as the
  instance-manager, through the whole pipeline (certificate to principal,
  authorization, validation, audit record made durable, the agent round trip)
  beside a bare unary call: a gRPC server built by the same ``build_server``
  (grpc.aio on its own event-loop thread, same TLS credentials, client
  certificate required, same options) in a separate process, like the
  controller, whose one generic handler is served the way the controller
  serves its methods (``unary_on_pool``: the request read on the event loop,
  the handler run in the worker pool) and returns the controller's own
  serialized DescribeInstanceResponse for that instance without looking at
  the request.  (grpc's own path for a synchronous handler under grpc.aio
  costs about 0.3 ms and twice the server CPU more per call than the adapter
  on this machine, so a baseline served that way would flatter the ratio.)
  Both sides use the same stub, request, client certificate and channel
  options, and are measured interleaved by ``harness.compare``.  Target ratio
  <= 2 (issue 4).  The controller serves with grpc.aio since defect D3 of
  docs/reliability.md was fixed: ratios measured before are not comparable.

- ``controller.lifecycle_1``, ``_8``, ``_32`` and ``_64``: StartInstance/StopInstance
  throughput (ops/s, each call one op) with 1, 8, 32 and 64 client threads, each with its own
  channel, each starting and stopping its own instance (1 vCPU, 64 MiB) with fresh client tokens,
  with the audit log's fsync on (``ours``, the shipped controller) beside the same controller with
  ``AuditLog(durable=False)`` (``baseline``).  The controller has no configuration switch for that,
  so the baseline process runs ``controller.main`` with that one constructor argument changed.
  The agent accepts one controller session at a time, so the two run one after the other over the
  same agent, each on its own state directory: a *session* is one controller process that measures
  one window per client count (ascending in one session, descending in the next), and sessions
  alternate durable/volatile, volatile/durable, ...  The median window of each side and count is
  reported (every round is printed on stderr); with ``--quick`` there is one session per side and
  each window lasts a second.  Meanwhile a telemetry client pulls events, as in normal operation,
  which keeps the agent's event queue short (see ``_poll_events``).  Target ratio >= 0.5 at 32
  clients (issue 4); the other counts show how the cost changes with concurrency.

  What this does and does not measure: the agent serves one command at a
  time (``controller.app.AgentConnection`` serialises them too), and a sim
  start or stop, with its journal fsyncs, costs far more than the audit
  record, so the agent is the bottleneck of both runs.  With many callers the
  audit log's group commit overlaps its fsyncs with other calls' agent work,
  so the ratio shows what audit durability costs a busy controller, not what
  one fsync costs; with one caller nothing overlaps, and the ratio comes
  closest to the cost of one fsync per call.  The idempotency store's fsync on
  completion stays on in both runs.  The controller serves at most 16 calls at
  once (``build_server``'s thread pool); the other callers queue in gRPC.  The
  agent sees a fabricated sysfs CPU tree of 72 single-thread cores and a
  memory budget of 8 GiB, so that 64 instances fit (the machine may have two
  CPUs; sim VMs are ``sleep`` processes and pin nothing).
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from hostagent.inventory import format_cpu_list

from .harness import Profile, Result, compare

ROLE = "instance-manager"  # the shipped policy lets it Start, Stop and Describe
CLIENT_COUNTS = (1, 8, 32, 64)  # issue 4: mutating-call throughput at each, audit fsync on and off
TARGET_CLIENTS = 32  # the count the target (ratio >= 0.5) is stated for
CORES = 72  # more than the most clients + the described instance: no start is refused for want of cores
MEMORY_MIB = 64  # the smallest the API allows
MEMORY_BUDGET_MIB = 8192  # room for 65 instances of MEMORY_MIB (sim VMs are sleep processes: nothing is used)
CALL_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1  # how often the telemetry role pulls events during the lifecycle benchmark
POLL_BATCH = 64  # PollEventsRequest.max_events at most

# Runs the real controller; "volatile" changes one thing: the audit log skips fsync.
_CONTROLLER = textwrap.dedent("""
    import functools, sys
    import controller.main as main
    if sys.argv[1] == "volatile":
        main.AuditLog = functools.partial(main.AuditLog, durable=False)
    sys.exit(main.main(sys.argv[2:]))
""")

# The bare server: the controller's build_server around a handler that answers every call with fixed bytes.
_BARE_SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import grpc
    from controller.grpc_service import build_server, unary_on_pool
    ca, cert, key, answer = (Path(name).read_bytes() for name in sys.argv[1:5])

    class Bare(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            return unary_on_pool(handler_call_details.method, lambda raw, context: answer)

    server, port = build_server(Bare(), listen="127.0.0.1:0", ca_pem=ca, cert_pem=cert, key_pem=key)
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(1).wait()
""")


def _fake_sysfs(root: Path, cores: int) -> Path:
    """A sysfs tree with ``cores`` single-thread cores in one package and no PCI devices."""
    cpu_root = root / "devices" / "system" / "cpu"
    cpu_root.mkdir(parents=True)
    (cpu_root / "online").write_text(format_cpu_list(range(cores)) + "\n")
    for cpu in range(cores):
        topology = cpu_root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        for name, value in (("physical_package_id", 0), ("core_id", cpu), ("core_cpus_list", cpu),
                            ("thread_siblings_list", cpu)):
            (topology / name).write_text(f"{value}\n")
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    return root


def _prepare_controller(directory: Path, agent: agenthost.AgentHost) -> controllerhost.ControllerHost:
    """The development controller, with rate limits far above anything the benchmark asks."""
    return controllerhost.prepare(directory, agent, principal_rate_per_s=1e6, principal_burst=1_000_000,
                                  instance_rate_per_s=1e6, instance_burst=1_000_000)


def _start_controller(host: controllerhost.ControllerHost, *, durable: bool,
                      timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Like ``controllerhost.start``, through ``_CONTROLLER``; returns the process and HOST:PORT."""
    offset = host.log.stat().st_size if host.log.exists() else 0
    with open(host.log, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", _CONTROLLER, "durable" if durable else "volatile", "--config", str(host.config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = host.log.read_bytes()[offset:].decode(errors="replace")
        found = controllerhost.READY.search(text)
        if found:
            return child, f"{found.group(1)}:{found.group(2)}"
        if child.poll() is not None:
            raise RuntimeError(f"passivisor-controller exited with {child.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    agenthost.stop(child)
    raise RuntimeError("passivisor-controller did not become ready in time")


@contextlib.contextmanager
def _controller(host: controllerhost.ControllerHost, *, durable: bool) -> Iterator[str]:
    child, endpoint = _start_controller(host, durable=durable)
    try:
        yield endpoint
    finally:
        if agenthost.stop(child) != 0:
            print(f"bench controller: the controller exited with {child.returncode}; see {host.log}",
                  file=sys.stderr)


def _stub(channel: grpc.Channel) -> Any:
    return pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]


def _channel(host: controllerhost.ControllerHost, endpoint: str, role: str = ROLE) -> grpc.Channel:
    """An mTLS channel as ``role``, built as a control-plane client builds it."""
    return host.channel(endpoint, role)


def _start_request(agent: agenthost.AgentHost, instance_id: str) -> Any:
    return pb.StartInstanceRequest(client_token=str(uuid.uuid4()), instance_id=instance_id, vcpus=1,
                                   memory_mib=MEMORY_MIB, image_digest=agent.image_digest,
                                   image_signature=agent.image_signature)


def _stop_request(instance_id: str) -> Any:
    return pb.StopInstanceRequest(client_token=str(uuid.uuid4()), instance_id=instance_id,
                                  mode=pb.STOP_MODE_GRACEFUL, timeout_seconds=5)


def run(profile: Profile) -> Iterator[Result]:
    with tempfile.TemporaryDirectory(prefix="pv-bench-") as scratch:
        root = Path(scratch)
        agent = agenthost.prepare(root / "agent", backend="sim", sysfs_root=_fake_sysfs(root / "sysfs", CORES),
                                  memory_budget_mib=MEMORY_BUDGET_MIB)
        agent_process = agenthost.start(agent)
        try:
            durable = _prepare_controller(root / "ctl-durable", agent)
            volatile = _prepare_controller(root / "ctl-volatile", agent)
            yield _describe(profile, agent, durable, root)
            yield from _lifecycle(profile, agent, durable, volatile)
        finally:
            agenthost.stop(agent_process)
            agenthost.discard(agent)


# --- controller.describe ------------------------------------------------------------


@contextlib.contextmanager
def _bare_server(host: controllerhost.ControllerHost, answer: Path) -> Iterator[str]:
    pki = host.pki
    server = subprocess.Popen(
        [sys.executable, "-c", _BARE_SERVER, str(pki.ca_certificate), str(pki.server_certificate),
         str(pki.server_key), str(answer)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdin is not None and server.stdout is not None
    try:
        port = server.stdout.readline().strip().decode()
        if not port:
            raise RuntimeError(f"the bare gRPC server exited with {server.wait()}")
        yield f"127.0.0.1:{port}"
    finally:
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _describe(profile: Profile, agent: agenthost.AgentHost, host: controllerhost.ControllerHost,
              root: Path) -> Result:
    with _controller(host, durable=True) as endpoint:
        channel = _channel(host, endpoint)
        stub = _stub(channel)
        iid = str(uuid.uuid4())
        stub.StartInstance(_start_request(agent, iid), timeout=CALL_TIMEOUT_S)
        request = pb.DescribeInstanceRequest(instance_id=iid)
        answer = stub.DescribeInstance(request, timeout=CALL_TIMEOUT_S)
        answer_file = root / "describe-response.bin"
        answer_file.write_bytes(answer.SerializeToString())
        try:
            with _bare_server(host, answer_file) as bare_endpoint, _channel(host, bare_endpoint) as bare_channel:
                bare_stub = _stub(bare_channel)
                if bare_stub.DescribeInstance(request, timeout=CALL_TIMEOUT_S) != answer:
                    raise RuntimeError("the bare server does not answer what the controller answers")

                def ours(req: Any) -> None:
                    stub.DescribeInstance(req, timeout=CALL_TIMEOUT_S)

                def bare(req: Any) -> None:
                    bare_stub.DescribeInstance(req, timeout=CALL_TIMEOUT_S)

                # A call takes hundreds of microseconds: batches of 10 ms hold enough calls to average
                # out the scheduler, and the rounds stay as many as the profile asks.
                batched = Profile(batch_ns=max(profile.batch_ns, 10_000_000), rounds=profile.rounds)
                result = compare("controller.describe", ours, bare, request, profile=batched, unit="us",
                                 response_bytes=answer.ByteSize(), target_ratio=2)
        finally:
            stub.StopInstance(_stop_request(iid), timeout=CALL_TIMEOUT_S)
            channel.close()
    return result


# --- controller.lifecycle_<N> -------------------------------------------------------


def _poll_events(stub: Any, stopping: threading.Event) -> None:
    """The telemetry role's loop: pull events every POLL_INTERVAL_S, acknowledging what it has seen.

    Every start and stop queues an event in the agent, which rewrites its whole journal, event queue
    included, on every state change; pulling acknowledges events (``hostagent.state.EventQueue.after``)
    and keeps the queue short, as in normal operation.  Without it every command would get slower
    round after round until the queue held its maximum of 1024 events.
    """
    cursor = 0
    while True:
        answer = stub.PollEvents(pb.PollEventsRequest(after_cursor=cursor, max_events=POLL_BATCH),
                                 timeout=CALL_TIMEOUT_S)
        cursor = answer.next_cursor
        if len(answer.events) < POLL_BATCH and stopping.wait(POLL_INTERVAL_S):
            return


def _lifecycle_window(agent: agenthost.AgentHost, stubs: list[Any], instance_ids: list[str],
                      seconds: float) -> float:
    """Start/Stop calls per second completed within ``seconds`` by ``len(stubs)`` concurrent clients.

    The window opens when every client is ready, and a call counts if it completed inside it.  Each
    client then stops its instance if it left it running (not counted), so that every window starts
    with all instances stopped.
    """
    window = [0.0, 0.0]  # start and deadline of the timed part
    failures: list[BaseException] = []

    def open_window() -> None:  # run by the barrier, once, as it releases everyone
        window[0] = time.perf_counter()
        window[1] = window[0] + seconds

    go = threading.Barrier(len(stubs) + 1, action=open_window)
    counts = [0] * len(stubs)

    def client(index: int) -> None:
        stub, iid = stubs[index], instance_ids[index]
        running = False
        try:
            go.wait()
            while True:
                if running:
                    stub.StopInstance(_stop_request(iid), timeout=CALL_TIMEOUT_S)
                else:
                    stub.StartInstance(_start_request(agent, iid), timeout=CALL_TIMEOUT_S)
                running = not running
                if time.perf_counter() >= window[1]:
                    break
                counts[index] += 1
            if running:  # the next window starts this instance again; not counted
                stub.StopInstance(_stop_request(iid), timeout=CALL_TIMEOUT_S)
        except BaseException as exc:
            failures.append(exc)
            go.abort()

    threads = [threading.Thread(target=client, args=(index,), name=f"client-{index}") for index in range(len(stubs))]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed; reported below
        go.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"a lifecycle client failed: {failures[0]!r}") from failures[0]
    return sum(counts) / seconds


def _lifecycle_session(agent: agenthost.AgentHost, host: controllerhost.ControllerHost, *, durable: bool,
                       counts: list[int], instance_ids: list[str], seconds: float) -> dict[int, float]:
    """One controller process, one window per client count in ``counts`` (in that order): ops/s by count.

    Every client has a channel of its own, opened once for the session and warmed up by one untimed
    call (its TLS handshake; the controller's agent link); a window with N clients uses the first N.
    A telemetry client pulls events throughout.
    """
    with _controller(host, durable=durable) as endpoint:
        channels = [_channel(host, endpoint) for _ in range(max(counts))]
        telemetry_channel = _channel(host, endpoint, role="telemetry")
        stopping = threading.Event()
        failures: list[BaseException] = []

        def poller() -> None:
            try:
                _poll_events(_stub(telemetry_channel), stopping)
            except BaseException as exc:
                failures.append(exc)

        telemetry = threading.Thread(target=poller, name="telemetry")
        telemetry.start()
        try:
            stubs = [_stub(channel) for channel in channels]
            for stub in stubs:
                stub.ListInstances(pb.ListInstancesRequest(), timeout=CALL_TIMEOUT_S)
            throughput = {count: _lifecycle_window(agent, stubs[:count], instance_ids[:count], seconds)
                          for count in counts}
        finally:
            stopping.set()
            telemetry.join()
            for channel in [*channels, telemetry_channel]:
                channel.close()
    if failures:
        raise RuntimeError(f"the telemetry client failed: {failures[0]!r}") from failures[0]
    return throughput


def lifecycle_plan(profile: Profile) -> tuple[int, float]:
    """(rounds, seconds per window): each round is one session per side, one window per client count."""
    return (1, 1.0) if profile.rounds < 100 else (4, 4.0)


def _lifecycle(profile: Profile, agent: agenthost.AgentHost, durable_host: controllerhost.ControllerHost,
               volatile_host: controllerhost.ControllerHost, client_counts: tuple[int, ...] = CLIENT_COUNTS
               ) -> Iterator[Result]:
    # Sessions alternate durable/volatile, then volatile/durable, ... (harness.py, point 2), so that a
    # burst of load on this shared machine does not land on one side only; within a session the client
    # counts go up in one round and down in the next, so that no count always runs first after a
    # controller start, or last on the largest audit log and idempotency store.  Each session restarts
    # its controller (the agent takes one controller session at a time), which costs about a second.
    rounds, seconds = lifecycle_plan(profile)
    instance_ids = [str(uuid.uuid4()) for _ in range(max(client_counts))]
    samples: dict[bool, dict[int, list[float]]] = {True: {n: [] for n in client_counts},
                                                   False: {n: [] for n in client_counts}}
    session = 0
    for round_no in range(rounds):
        for durable in (True, False) if round_no % 2 == 0 else (False, True):
            counts = list(client_counts) if session % 2 == 0 else list(reversed(client_counts))
            session += 1
            host = durable_host if durable else volatile_host
            throughput = _lifecycle_session(agent, host, durable=durable, counts=counts,
                                            instance_ids=instance_ids, seconds=seconds)
            for count in counts:
                samples[durable][count].append(throughput[count])
            print(f"  round {round_no + 1}/{rounds}: audit fsync {'on ' if durable else 'off'} "
                  + "  ".join(f"{count} clients {throughput[count]:7.1f}" for count in client_counts) + " ops/s",
                  file=sys.stderr, flush=True)
    for count in client_counts:
        extra: dict[str, Any] = {"samples": rounds, "clients": count, "seconds": seconds}
        if count == TARGET_CLIENTS:
            extra["target_min_ratio"] = 0.5
        yield Result(f"controller.lifecycle_{count}", round(statistics.median(samples[True][count]), 1),
                     round(statistics.median(samples[False][count]), 1), "ops/s", extra)
