"""Fixtures that run a real ``passivisor-agent`` process (sim backend) and talk to it over its socket.

Real components started here:

- the agent, as a separate process (``python -m hostagent.main --config agent.toml``), provisioned and
  started by ``controller.devhost.agenthost`` exactly as ``pvctl dev up`` will do it;
- for each instance the agent starts, the sim backend's VM process: ``/bin/sleep`` in its own session,
  whose argv[0] is ``passivisor-sim-vm:<runtime dir>``.

Tests see the agent only from the outside: its Unix socket (through the controller's ``AgentLink`` or
a :class:`RawPeer` that can send any bytes), its log file, its journal file and /proc. Nothing of the
agent's state lives in the test process.

The host is a fabricated sysfs tree (``tests/inventory/fakesysfs.py``): four physical cores of two SMT
siblings each and no SR-IOV device, so allocations are the same on every machine. Timeouts are short
(``FRAME_TIMEOUT_S``, ``HANDSHAKE_TIMEOUT_S``) so that the stall cases finish in about a second.

Seccomp: every agent runs under its production seccomp filter (``hostagent/sandbox.py``), checked in
/proc after start; the ``agent_seccomp`` fixture is the one switch for every agent these tests start.

Cleanup: every agent is killed with its process group, and every VM process whose argv names a
runtime directory of the test is killed; teardown fails if one of them survives (a leak is a bug).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from inventory.fakesysfs import write_cpu_tree
from polling import wait_until

from controller.agentlink import AgentLink
from controller.devhost import agenthost
from hostagent import wire
from hostagent.channel import ControllerHandshake, Session
from hostagent.images import load_private_key, sign_image
from hostagent.wire import messages as m

CORES = ((0, 1), (2, 3), (4, 5), (6, 7))  # four physical cores, SMT width 2
SMT_WIDTH = 2
MEMORY_BUDGET_MIB = 4096
FRAME_TIMEOUT_S = 1.0
HANDSHAKE_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 30.0  # long enough that no test's own pauses close its session
SIM_VM_MARK = "passivisor-sim-vm:"
AGENT_START_TIMEOUT_S = 20.0

# Metrics that count connections rather than describe state.
SESSION_METRICS = frozenset({m.MetricId.FRAMES_REJECTED, m.MetricId.SESSIONS_REJECTED, m.MetricId.EVENTS_PENDING})

T = TypeVar("T")


# --- /proc ----------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _argv0(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def sim_vm_pids(runtime_dir: Path) -> frozenset[int]:
    """Live sim VM processes whose runtime directory is below ``runtime_dir``."""
    prefix = f"{SIM_VM_MARK}{runtime_dir}/"
    return frozenset(int(pid) for pid in os.listdir("/proc")
                     if pid.isdigit() and _argv0(pid).startswith(prefix) and process_alive(int(pid)))


def _kill_sim_vm(pid: int, runtime_dir: Path) -> None:
    """SIGKILL one VM process, through a pidfd so that a reused pid is never signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _argv0(str(pid)).startswith(f"{SIM_VM_MARK}{runtime_dir}/"):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


# --- the channel, spoken by hand ---------------------------------------------------
#
# An independent implementation of the key schedule in docs/agent-channel.md ("Provisioning"), used to
# forge frames the real ``Session`` refuses to build (wrong direction, a proof under a wrong secret).
# ``RawPeer.handshake`` checks it against ``Session.seal`` so that a forged frame is wrong only in
# the way a test intends.

_LABEL = b"passivisor/v1 "


def _hkdf(secret: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    for part in parts:
        h.update(part)
    return h.finalize()


def controller_proof(secret: bytes, controller_nonce: bytes, agent_nonce: bytes) -> bytes:
    handshake_key = _hkdf(secret, None, _LABEL + b"handshake key", 32)
    return _hmac(handshake_key, _LABEL + b"controller proof", controller_nonce, agent_nonce)


@dataclass(frozen=True)
class SessionKeys:
    controller_to_agent: bytes
    agent_to_controller: bytes


def session_keys(secret: bytes, controller_nonce: bytes, agent_nonce: bytes) -> SessionKeys:
    material = _hkdf(secret, controller_nonce + agent_nonce, _LABEL + b"session keys", 64)
    return SessionKeys(material[:32], material[32:])


class RawPeer:
    """A client of the agent socket that can send arbitrary bytes and descriptors.

    ``handshake`` runs the real controller handshake (``ControllerHandshake``) and leaves ``session``
    ready for ``Session.seal``; ``forge`` builds a frame with any sequence number, any message (even
    one the session would refuse to send) and a MAC under a key of the caller's choice.
    """

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = wire.FrameDecoder(wire.Direction.TO_CONTROLLER)
        self.session: Session | None = None
        self.keys: SessionKeys | None = None
        self.received = b""

    # sending ------------------------------------------------------------------

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = self.sock.sendmsg([data], ancillary)
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def seal(self, message: m.Message) -> bytes:
        assert self.session is not None, "handshake first"
        return self.session.seal(message)

    def forge(self, message: m.Message, seq: int, key: bytes | None = None) -> bytes:
        """Header, payload and an HMAC under ``key`` (default: the controller-to-agent session key)."""
        if key is None:
            assert self.keys is not None, "handshake first"
            key = self.keys.controller_to_agent
        region = wire.signed_region(wire.Frame(seq, message))
        return region + _hmac(key, region)

    # receiving -----------------------------------------------------------------

    def read_frame(self) -> wire.Frame:
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(self.decoder.bytes_needed())
            if not data:
                raise ConnectionError("the agent closed the connection")
            self.decoder.feed(data)
        return frame

    def request(self, message: m.Message, fds: Sequence[int] = ()) -> m.Message:
        assert self.session is not None, "handshake first"
        self.send(self.session.seal(message), fds)
        return self.session.open(self.read_frame())

    def closed_by_agent(self, timeout: float = 5.0) -> bool:
        """Read until the agent closes the connection; False if it is still open after ``timeout``.

        Whatever the agent sent before closing is kept in ``received``.
        """
        self.sock.settimeout(timeout)
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass  # closed while our bytes were still unread on its side
        return True

    def answer_before_close(self) -> m.Message | None:
        """The one sealed answer the agent sent before it closed, opened with the session."""
        if not self.received:
            return None
        assert self.session is not None
        frame = wire.decode(self.received, wire.Direction.TO_CONTROLLER)
        return self.session.open(frame)

    # the handshake ------------------------------------------------------------

    def hello(self) -> bytes:
        """Send HELLO with a fresh nonce; return the nonce."""
        nonce = os.urandom(m.NONCE_SIZE)
        self.send(wire.encode(wire.Frame(0, m.Hello(nonce))))
        return nonce

    def handshake(self, secret: bytes) -> Session:
        """Authenticate as the controller, then prove the hand-made key schedule matches the real one."""
        handshake = ControllerHandshake(secret)
        hello = handshake.start()
        controller_nonce = wire.decode(hello).message.controller_nonce  # type: ignore[union-attr]
        self.send(hello)
        challenge = self.read_frame()
        proof, session = handshake.on_challenge(challenge)
        assert isinstance(challenge.message, m.Challenge)
        assert wire.decode(proof).message == m.Proof(controller_proof(secret, controller_nonce,
                                                                      challenge.message.agent_nonce))
        self.send(proof)
        self.session = session
        self.keys = session_keys(secret, controller_nonce, challenge.message.agent_nonce)
        probe = m.Ping(0x5EED)
        sealed = session.seal(probe)
        assert sealed == self.forge(probe, 1), "the hand-made session keys differ from hostagent.channel's"
        self.send(sealed)
        assert session.open(self.read_frame()) == m.Pong(0x5EED)
        return session

    def forged_handshake(self, secret: bytes) -> None:
        """HELLO, then a PROOF computed under ``secret`` without checking the agent's proof first.

        With the wrong secret this is what a peer that lacks the key can do at best: the agent must
        refuse the PROOF.  (``handshake`` checks ``controller_proof`` against the real controller.)
        """
        controller_nonce = self.hello()
        challenge = self.read_frame().message
        assert isinstance(challenge, m.Challenge)
        proof = controller_proof(secret, controller_nonce, challenge.agent_nonce)
        self.send(wire.encode(wire.Frame(0, m.Proof(proof))))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- a controller's view ---------------------------------------------------------------


class Client:
    """An ``AgentLink`` plus the reads every test repeats."""

    def __init__(self, link: AgentLink) -> None:
        self.link = link

    def request(self, message: m.Message, fds: Sequence[int] = ()) -> m.Message:
        return self.link.request(message, fds)

    def ok(self, message: m.Message, expected: type[T], fds: Sequence[int] = ()) -> T:
        answer = self.request(message, fds)
        assert isinstance(answer, expected), f"{type(message).__name__} answered {answer}"
        return answer

    def describe(self, instance_id: uuid.UUID) -> m.Message:
        return self.request(m.DescribeInstance(instance_id))

    def listing(self, after: uuid.UUID | None = None) -> m.InstanceList:
        """One page: the first one, or the one after ``after``."""
        return self.ok(m.ListInstances(after), m.InstanceList)

    def metrics(self) -> dict[m.MetricId, int]:
        return {s.metric: s.value for s in self.ok(m.GetMetrics(), m.Metrics).samples}

    def events(self, after: int = 0, limit: int = m.MAX_EVENTS_PER_PULL) -> m.Events:
        """One pull.  ``after=0`` acknowledges nothing, so it only peeks."""
        return self.ok(m.GetEvents(after, limit), m.Events)

    def drain(self, after: int = 0) -> tuple[list[m.Event], int]:
        """Pull until nothing new comes; return the events and the cursor to continue from."""
        pulled: list[m.Event] = []
        while True:
            batch = self.events(after)
            if not batch.events:
                return pulled, batch.next_cursor
            pulled.extend(batch.events)
            after = batch.next_cursor

    def close(self) -> None:
        self.link.close()


@dataclass(frozen=True)
class Observation:
    """Everything a command could change, seen from outside the agent."""

    listing: m.InstanceList
    described: tuple[tuple[uuid.UUID, m.Message], ...]
    metrics: tuple[tuple[m.MetricId, int], ...]
    pending_events: m.Events
    journal: bytes
    runtime: tuple[str, ...]
    vm_pids: frozenset[int]

    @property
    def journal_instances(self) -> Any:
        return json.loads(self.journal)["instances"]

    def resources(self) -> tuple[tuple[m.MetricId, int], ...]:
        return tuple((k, v) for k, v in self.metrics if k not in SESSION_METRICS)

    def state(self) -> tuple[Any, ...]:
        """The instance state only: what a hostile session must not change (its own events aside)."""
        return (self.listing, self.described, self.resources(), self.journal_instances, self.runtime,
                self.vm_pids)

    def metric(self, metric: m.MetricId) -> int:
        return dict(self.metrics)[metric]


class HeldFiles:
    """Descriptors opened on an instance's runtime files, to look at their blocks after the names are gone.

    An open descriptor keeps the inode alive without adding a link, so after the agent scrubs the
    directory (claim C12) the data it left behind can still be read here: it must be all zeros.
    """

    def __init__(self, directory: Path) -> None:
        self.fds: dict[str, int] = {}
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.fds[str(path.relative_to(directory))] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.sizes = {name: os.fstat(fd).st_size for name, fd in self.fds.items()}

    def not_zeroed(self) -> list[str]:
        """Files whose content is not all zeros now (or whose size changed)."""
        bad = []
        for name, fd in self.fds.items():
            size = os.fstat(fd).st_size
            data = os.pread(fd, size + 1, 0)
            if size != self.sizes[name] or data.count(0) != len(data):
                bad.append(name)
        return bad

    def unlinked(self) -> bool:
        return all(os.fstat(fd).st_nlink == 0 for fd in self.fds.values())

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


# --- one agent -------------------------------------------------------------------------


@dataclass
class Agent:
    """One provisioned agent (``host``) and its process; the helpers tests use are hung on it."""

    host: agenthost.AgentHost
    options: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    # Tests import nothing from this conftest at run time; they reach these through the fixture.
    wait_until = staticmethod(wait_until)
    process_alive = staticmethod(process_alive)
    smt_width: ClassVar[int] = SMT_WIDTH

    @property
    def cores(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(core) for core in self.options["cores"])

    @property
    def memory_budget_mib(self) -> int:
        return int(self.options["memory_budget_mib"])

    @property
    def frame_timeout_s(self) -> float:
        return float(self.options["frame_timeout_s"])

    @property
    def handshake_timeout_s(self) -> float:
        return float(self.options["handshake_timeout_s"])

    @property
    def idle_timeout_s(self) -> float:
        return float(self.options["idle_timeout_s"])

    # the process ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "the agent is already running"
        self.process = agenthost.start(self.host, timeout=AGENT_START_TIMEOUT_S)
        if self.options["seccomp"]:
            # The ready line comes after the filter is installed (hostagent/main.py); check it is in force.
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            assert "\nSeccomp:\t2\n" in status, "the agent runs without its seccomp filter"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the agent's process group (the VMs have their own sessions and survive)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        """SIGTERM: the live-update path; the agent detaches from its VMs and exits."""
        assert self.process is not None
        return agenthost.stop(self.process)

    def run_foreground(self, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run the agent to completion (for start-up failures); stdout and stderr captured."""
        return subprocess.run(
            [sys.executable, "-m", "hostagent.main", "--config", str(self.host.config)],
            capture_output=True, text=True, timeout=timeout, check=False, start_new_session=True)

    # talking to it ------------------------------------------------------------------

    def link(self, secret: bytes | None = None, *, timeout: float = 10.0, connect: bool = True) -> AgentLink:
        link = AgentLink(self.host.socket, self.host.secret() if secret is None else secret, timeout=timeout)
        self._closers.append(link.close)
        if connect:
            link.connect()
        return link

    def client(self) -> Client:
        return Client(self.link())

    def raw(self, *, timeout: float = 5.0) -> RawPeer:
        peer = RawPeer(self.host.socket, timeout=timeout)
        self._closers.append(peer.close)
        return peer

    def session(self) -> RawPeer:
        """A raw peer that completed the real handshake (and one PING that checks the key schedule)."""
        peer = self.raw()
        peer.handshake(self.host.secret())
        return peer

    def close_connections(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()

    # what it writes -----------------------------------------------------------------

    def log_mark(self) -> int:
        return self.host.log.stat().st_size if self.host.log.exists() else 0

    def log(self, since: int = 0) -> str:
        return self.host.log.read_bytes()[since:].decode(errors="replace")

    def wait_for_log(self, text: str, *, since: int = 0, timeout: float = 5.0) -> str:
        return wait_until(lambda: text in self.log(since) and self.log(since), timeout=timeout,
                          what=f"{text!r} in the agent log")

    @property
    def journal_path(self) -> Path:
        return self.host.state_dir / "state.json"

    def journal(self) -> dict[str, Any]:
        return json.loads(self.journal_path.read_bytes())

    def journaled_instance(self, instance_id: uuid.UUID) -> dict[str, Any]:
        return next(i for i in self.journal()["instances"] if i["instance_id"] == str(instance_id))

    def vm_pid(self, instance_id: uuid.UUID) -> int:
        vm = self.journaled_instance(instance_id)["vm"]
        assert vm is not None, f"{instance_id} has no VM in the journal"
        return int(vm["pid"])

    def vm_pids(self) -> frozenset[int]:
        return sim_vm_pids(self.host.runtime_dir)

    def runtime_dir_of(self, instance_id: uuid.UUID) -> Path:
        return self.host.runtime_dir / instance_id.hex

    def hold_runtime_files(self, instance_id: uuid.UUID) -> HeldFiles:
        held = HeldFiles(self.runtime_dir_of(instance_id))
        self._closers.append(held.close)
        assert held.fds, "the instance has no runtime files"
        assert held.not_zeroed(), "the runtime files hold nothing to scrub"
        return held

    def runtime_tree(self) -> tuple[str, ...]:
        root = self.host.runtime_dir
        return tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*")))

    # provisioning ----------------------------------------------------------------

    def new_volume(self, size: int = 1 << 20) -> uuid.UUID:
        """A raw volume file ``<volume_dir>/<uuid>``, sparse, as an operator makes with truncate."""
        volume_id = uuid.uuid4()
        path = self.host.volume_dir / str(volume_id)
        path.touch(mode=0o600)
        os.truncate(path, size)
        return volume_id

    def sign(self, digest: bytes) -> bytes:
        """A valid signature by this host's image-signing key over any digest."""
        return sign_image(digest, load_private_key(self.host.signing_key))

    def start_command(self, instance_id: uuid.UUID | None = None, *, vcpus: int = SMT_WIDTH,
                      memory_mib: int = 128) -> m.StartInstance:
        return m.StartInstance(instance_id or uuid.uuid4(), vcpus, memory_mib, self.host.image_digest,
                               self.host.image_signature)

    def start_instance(self, client: Client, instance_id: uuid.UUID | None = None, *, vcpus: int = SMT_WIDTH,
                       memory_mib: int = 128) -> m.InstanceInfo:
        info = client.ok(self.start_command(instance_id, vcpus=vcpus, memory_mib=memory_mib), m.InstanceInfo)
        assert info.state is m.InstanceState.RUNNING
        return info

    def observe(self, client: Client, instance_ids: Sequence[uuid.UUID] = ()) -> Observation:
        return Observation(
            listing=client.listing(),
            described=tuple((i, client.describe(i)) for i in instance_ids),
            metrics=tuple(sorted(client.metrics().items())),
            pending_events=client.events(0),
            journal=self.journal_path.read_bytes(),
            runtime=self.runtime_tree(),
            vm_pids=self.vm_pids(),
        )

    # teardown --------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Kill the agent and every VM of this host; return what leaked (for the teardown to report)."""
        self.close_connections()
        problems = []
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        leaked = self.vm_pids()
        for pid in leaked:
            _kill_sim_vm(pid, self.host.runtime_dir)
        deadline = time.monotonic() + 5
        while self.vm_pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.vm_pids():
            problems.append(f"sim VM processes survived SIGKILL: {sorted(self.vm_pids())}")
        return problems


def _prepare(directory: Path, *, seccomp: bool, cores: Sequence[Sequence[int]] = CORES,
             **overrides: Any) -> Agent:
    sysfs = directory.parent / f"{directory.name}-sysfs"
    write_cpu_tree(sysfs, cores)
    (sysfs / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)  # a host without SR-IOV
    options: dict[str, Any] = {
        "backend": "sim",
        "sysfs_root": sysfs,
        "memory_budget_mib": MEMORY_BUDGET_MIB,
        "seccomp": seccomp,
        "frame_timeout_s": FRAME_TIMEOUT_S,
        "handshake_timeout_s": HANDSHAKE_TIMEOUT_S,
        "idle_timeout_s": IDLE_TIMEOUT_S,
    }
    options.update(overrides)
    return Agent(agenthost.prepare(directory, **options), {**options, "cores": cores})


def _teardown(agents: list[Agent]) -> None:
    problems = [problem for agent in agents for problem in agent.cleanup()]
    if problems:
        pytest.fail("; ".join(problems))


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def agent_seccomp() -> bool:
    """Whether the agents under test install their seccomp filter.

    Production agents always do; these tests run them the same way.  This is the one switch.
    """
    return True


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(tmp_path: Path, agent_seccomp: bool) -> Iterator[AgentFactory]:
    """``make_agent(name="host", start=True, **prepare_overrides)``: a provisioned (and started) agent."""
    agents: list[Agent] = []

    def make(name: str = "host", *, start: bool = True, **overrides: Any) -> Agent:
        agent = _prepare(tmp_path / name, seccomp=agent_seccomp, **overrides)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    _teardown(agents)


@pytest.fixture
def agent(make_agent: AgentFactory) -> Agent:
    """A running sim agent of its own for this test."""
    return make_agent()


@pytest.fixture
def client(agent: Agent) -> Client:
    """A controller session (``AgentLink``) with :func:`agent`."""
    return agent.client()


@pytest.fixture(scope="module")
def module_agent(tmp_path_factory: pytest.TempPathFactory, agent_seccomp: bool) -> Iterator[Agent]:
    """One running sim agent shared by a module whose tests leave its state as they found it."""
    agent = _prepare(tmp_path_factory.mktemp("module") / "host", seccomp=agent_seccomp)
    try:
        agent.start()
        yield agent
    finally:
        _teardown([agent])
