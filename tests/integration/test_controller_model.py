"""Model-based test of the controller: random RPCs from random roles, checked against a reference model.

Real components started here: one ``passivisor-agent`` process (sim backend, under its production
seccomp filter) on a fabricated host of seven single-thread cores, CPU 0 reserved for the host, with a
768 MiB memory budget and no SR-IOV device; one ``passivisor-controller`` process in front of it, with its
rate limits raised out of the way; and a TLS 1.3 channel to the controller per principal, each with a
client certificate from the development PKI: the five control-plane roles of the shipped policy and one
principal the policy does not know.

Theory of operation.  :class:`ControllerMachine` (a hypothesis ``RuleBasedStateMachine``) sends
StartInstance, StopInstance, AttachVolume, DetachVolume, AssignVirtualFunction, ReleaseVirtualFunction,
DescribeInstance, ListInstances and the read-only telemetry and audit calls, each from a random principal
(biased towards the one the policy grants the method), on instance ids from a small pool so that unknown
ids, wrong states and collisions are frequent, sometimes with one argument broken.  It also re-sends
earlier mutating requests with the same client token, from the same or another principal, and sends new
requests under an old token.  For every call the model predicts the answer independently of the
controller's code, in the controller's order (controller/grpc_service.py, "the order of checks"):

1. PERMISSION_DENIED unless the policy (issue 4, section 3) grants the method to the principal;
2. INVALID_ARGUMENT when a field breaks its constraint in proto/passivisor/v1/controller.proto;
   INVALID_ARGUMENT for a malformed envelope (the model sends 64 bytes; encrypted attaches that work
   are tested in test_encrypted_volume_grpc.py);
3. for a mutating call, by (principal, client_token): the first answer again when the token was used
   with the same method and parameters, INVALID_ARGUMENT when it was used with different ones;
4. the agent's own rules (hostagent/state.py, hostagent/service.py, the allocator's "lowest free cores
   first"), mapped by controller/app.py's AGENT_CODES: NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS,
   RESOURCE_EXHAUSTED; else OK with the exact expected response.

The model changes only when the real call succeeded and was not a replay.  After every step the
invariant compares the host with the model: ListInstances (every page of a walk), DescribeInstance of every
instance the model
knows (state, vCPUs, memory, pinned CPUs, volumes), and the agent's own allocator gauges from GetMetrics
(free cores, free memory, running instances); no CPU is held twice, the reserved CPU never.

Isolation between examples: the agent and the controller live for the whole module, and the agent keeps
the record of every instance it has seen (at most 1024, forgetting the lowest-sorted record that holds
nothing).  Each example therefore uses ids of its own, which sort after every earlier example's, and
starts by force-stopping whatever the previous one left running: the model starts empty, the earlier
records it ignores hold nothing and are the first to be forgotten.

Paging: a ListInstances step asks for one page (a random page_size, and a page_token that is one of the
example's ids or none): the page must be ordered, after its token, at most page_size long, carry a
next_page_token exactly when it is full (the id of its last instance), and show exactly the model's
instances in the range it covers.  The invariant walks every page.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from inventory.fakesysfs import write_cpu_tree
from prometheus_client.parser import text_string_to_metric_families

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.pki import DEFAULT_ROLES, issue_client_cert, load_ca
from hostagent.images import load_private_key, sign_image
from hostagent.state import MAX_INSTANCES

# --- the host --------------------------------------------------------------------------------------------

CPUS = 7  # seven cores of one thread each (SMT width 1)
RESERVED_CPU = 0  # kept by the host: never pinned to an instance
ALLOCATABLE = frozenset(range(CPUS)) - {RESERVED_CPU}
MEMORY_BUDGET_MIB = 768  # a 512 MiB instance and one of 256 fill it: INSUFFICIENT_MEMORY is frequent
POOL = 4  # instance ids per example
VOLUMES = 4  # volume ids; the last has no file in the agent's volume directory
CALL_TIMEOUT_S = 10.0
RATE = 1e6  # the controller's rate limits, raised so that the limiter never answers here

OK = grpc.StatusCode.OK
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

RUNNING, STOPPED = pb.INSTANCE_STATE_RUNNING, pb.INSTANCE_STATE_STOPPED
HOLDING = frozenset({pb.INSTANCE_STATE_STARTING, pb.INSTANCE_STATE_RUNNING, pb.INSTANCE_STATE_STOPPING})

# --- the policy, as issue 4 section 3 states it (the model's copy, not read from the shipped file) ---------

INTRUDER = "intruder"  # a certificate from the right CA for a principal the policy does not name
POLICY: dict[str, frozenset[str]] = {
    "instance-manager": frozenset({"StartInstance", "StopInstance", "DescribeInstance", "ListInstances"}),
    "volume-attacher": frozenset({"AttachVolume", "DetachVolume", "GetHostIdentity"}),
    "network-manager": frozenset({"AssignVirtualFunction", "ReleaseVirtualFunction"}),
    "telemetry": frozenset({"GetMetrics", "PollEvents"}),
    "auditor": frozenset({"ReadAuditLog", "GetHostIdentity"}),
    INTRUDER: frozenset(),
}
PRINCIPALS = tuple(POLICY)
MUTATING = ("StartInstance", "StopInstance", "AttachVolume", "DetachVolume", "AssignVirtualFunction",
            "ReleaseVirtualFunction")
READ_ONLY_OTHERS = ("GetHostIdentity", "GetMetrics", "PollEvents", "ReadAuditLog")


def owner(method: str) -> str:
    return next(role for role, methods in POLICY.items() if method in methods)


# --- the fixture -----------------------------------------------------------------------------------------


@dataclass
class Host:
    agent: agenthost.AgentHost
    stubs: dict[str, Any]
    volume_ids: tuple[str, ...]  # the last one has no file
    unknown_digest: bytes  # signed by the image-signing key, but not in the image store
    valid_signatures: dict[bytes, bytes]  # digest -> its signature by the image-signing key
    examples: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 32)))


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, agent_seccomp: bool) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("model")
    sysfs = root / "sysfs"
    write_cpu_tree(sysfs, [(cpu,) for cpu in range(CPUS)])
    (sysfs / "bus" / "pci" / "devices").mkdir(parents=True)  # a host without SR-IOV
    agent = agenthost.prepare(root / "agent", backend="sim", sysfs_root=sysfs, reserved_cpus=(RESERVED_CPU,),
                              memory_budget_mib=MEMORY_BUDGET_MIB, seccomp=agent_seccomp)
    volume_ids = tuple(str(uuid.uuid4()) for _ in range(VOLUMES))
    for volume_id in volume_ids[:-1]:
        path = agent.volume_dir / volume_id
        path.touch(mode=0o600)
        path.write_bytes(bytes(4096))
    signing_key = load_private_key(agent.signing_key)
    unknown_digest = bytes(range(32))
    signatures = {d: sign_image(d, signing_key) for d in (agent.image_digest, unknown_digest)}
    assert signatures[agent.image_digest] == agent.image_signature  # Ed25519 signatures are deterministic
    agent_process = agenthost.start(agent)
    controller = controllerhost.prepare(root / "controller", agent, principal_rate_per_s=RATE,
                                        principal_burst=1_000_000, instance_rate_per_s=RATE,
                                        instance_burst=1_000_000)
    channels: list[grpc.Channel] = []
    try:
        process, endpoint = controllerhost.start(controller)
        try:
            ca = controller.pki.ca_certificate.read_bytes()
            credentials = {role: (controller.pki.clients[role].certificate.read_bytes(),
                                  controller.pki.clients[role].key.read_bytes()) for role in DEFAULT_ROLES}
            intruder = issue_client_cert(load_ca(controller.pki.directory), f"spiffe://controlplane/{INTRUDER}")
            credentials[INTRUDER] = (intruder.certificate_pem, intruder.private_key_pem())
            assert set(credentials) == set(POLICY)
            stubs = {}
            for role, (cert, key) in credentials.items():
                channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(ca, key, cert),
                                              options=[("grpc.ssl_target_name_override", "localhost")])
                channels.append(channel)
                stubs[role] = pb_grpc.HostControllerStub(channel)
            yield Host(agent, stubs, volume_ids, unknown_digest, signatures)
        finally:
            for channel in channels:
                channel.close()
            agenthost.stop(process)
    finally:
        agenthost.stop(agent_process)
        agenthost.kill_vms(agent)


# --- validation, as the .proto declares it (the model's own reading) -------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def list_all(stub: Any) -> list[Any]:
    """Every instance the host lists, page by page (page_size 256) until next_page_token is empty."""
    instances: list[Any] = []
    token = ""
    while True:
        answer = stub.ListInstances(pb.ListInstancesRequest(page_size=256, page_token=token), timeout=CALL_TIMEOUT_S)
        instances += answer.instances
        if not answer.next_page_token:
            return instances
        assert answer.next_page_token > token, "ListInstances does not move forward"
        token = answer.next_page_token


def _is_id(text: str) -> bool:
    return _UUID.fullmatch(text) is not None


def _pci_ok(address: Any) -> bool:
    return address.domain <= 0xFFFF and address.bus <= 0xFF and address.device <= 31 and address.function <= 7


def violations(method: str, r: Any) -> list[str]:
    """The fields of request ``r`` that break their constraint in controller.proto."""
    checks: dict[str, bool] = {}
    if method in MUTATING:
        checks["client_token"] = _is_id(r.client_token)
    if method in (*MUTATING, "DescribeInstance"):
        checks["instance_id"] = _is_id(r.instance_id)
    if method == "StartInstance":
        checks["vcpus"] = 1 <= r.vcpus <= 128
        checks["memory_mib"] = 64 <= r.memory_mib <= 1 << 20
        checks["image_digest"] = len(r.image_digest) == 32
        checks["image_signature"] = len(r.image_signature) == 64
    elif method == "StopInstance":
        checks["mode"] = r.mode in (pb.STOP_MODE_GRACEFUL, pb.STOP_MODE_FORCE)
        bounds = (1, 600) if r.mode == pb.STOP_MODE_GRACEFUL else (0, 0) if r.mode == pb.STOP_MODE_FORCE else (0, 600)
        checks["timeout_seconds"] = bounds[0] <= r.timeout_seconds <= bounds[1]
    elif method in ("AttachVolume", "DetachVolume"):
        checks["volume_id"] = _is_id(r.volume_id)
        if method == "AttachVolume":
            checks["envelope"] = len(r.envelope) <= 1024
    elif method == "AssignVirtualFunction":
        checks["physical_function"] = r.HasField("physical_function") and _pci_ok(r.physical_function)
        mac = bytes(r.mac)
        checks["mac"] = len(mac) == 6 and mac != bytes(6) and not mac[0] & 1  # unicast, not all zero
        checks["vlan"] = r.vlan <= 4095
    elif method == "ReleaseVirtualFunction":
        checks["virtual_function"] = r.HasField("virtual_function") and _pci_ok(r.virtual_function)
    elif method == "ReadAuditLog":
        checks["max_records"] = 1 <= r.max_records <= 1000
    elif method == "PollEvents":
        checks["max_events"] = 1 <= r.max_events <= 64
    elif method == "ListInstances":
        checks["page_size"] = r.page_size <= 256  # 0 (absent) means the default
        checks["page_token"] = r.page_token == "" or _is_id(r.page_token)  # empty: the first page
    return [name for name, ok in checks.items() if not ok]


# --- broken arguments -----------------------------------------------------------------------------------

BAD_IDS: dict[str, Callable[[str], str]] = {
    "empty": lambda s: "",
    "garbage": lambda s: "not-a-uuid",
    "upper": lambda s: s.upper(),
    "nil": lambda s: "00000000-0000-0000-0000-000000000000",
    "variant": lambda s: s[:19] + "7" + s[20:],  # the RFC 9562 variant nibble must be 8, 9, a or b
    "no-hyphens": lambda s: s.replace("-", ""),
    "braces": lambda s: "{" + s + "}",
    "trailing-space": lambda s: s + " ",
}
_ID_FIELDS = {
    "StartInstance": ("client_token", "instance_id"),
    "StopInstance": ("client_token", "instance_id"),
    "AttachVolume": ("client_token", "instance_id", "volume_id"),
    "DetachVolume": ("client_token", "instance_id", "volume_id"),
    "AssignVirtualFunction": ("client_token", "instance_id"),
    "ReleaseVirtualFunction": ("client_token", "instance_id"),
    "DescribeInstance": ("instance_id",),
}
_OTHER_BREAKS: dict[str, tuple[str, ...]] = {
    "StartInstance": ("vcpus=0", "vcpus=129", "memory_mib=63", "memory_mib=1048577", "image_digest=short",
                      "image_signature=empty"),
    "StopInstance": ("mode=unspecified", "mode=undefined", "graceful-timeout=0", "graceful-timeout=601",
                     "force-timeout=1"),
    "AttachVolume": ("envelope=1025",),
    "AssignVirtualFunction": ("mac=multicast", "mac=zero", "mac=short", "vlan=4096", "physical_function=missing",
                              "physical_function.device=32"),
    "ReleaseVirtualFunction": ("virtual_function=missing", "virtual_function.function=8"),
    "ReadAuditLog": ("max_records=0", "max_records=1001"),
    "PollEvents": ("max_events=0", "max_events=65"),
    # An empty page_token is valid (the first page), so it is broken only from a set one (``build``).
    "ListInstances": ("page_size=257", *(f"page_token:{kind}" for kind in BAD_IDS if kind != "empty")),
}
BREAKS: dict[str, tuple[str, ...]] = {
    method: tuple(f"{name}:{kind}" for name in _ID_FIELDS.get(method, ()) for kind in BAD_IDS)
    + _OTHER_BREAKS.get(method, ())
    for method in (*MUTATING, "DescribeInstance", "ListInstances", *READ_ONLY_OTHERS)
}


def break_argument(r: Any, how: str) -> None:
    """Make one argument of ``r`` invalid, as named in :data:`BREAKS`."""
    if ":" in how:
        name, kind = how.split(":")
        setattr(r, name, BAD_IDS[kind](getattr(r, name)))
        return
    name, value = how.split("=")
    if name == "image_digest":
        r.image_digest = r.image_digest[:31]
    elif name == "image_signature":
        r.image_signature = b""
    elif name == "mode":
        r.mode = pb.STOP_MODE_UNSPECIFIED if value == "unspecified" else 7  # 7: a number the enum does not define
    elif name.endswith("-timeout"):
        r.mode = pb.STOP_MODE_GRACEFUL if name.startswith("graceful") else pb.STOP_MODE_FORCE
        r.timeout_seconds = int(value)
    elif name == "envelope":
        r.envelope = bytes(int(value))
    elif name == "mac":
        r.mac = {"multicast": b"\x03\x00\x00\x00\x00\x01", "zero": bytes(6), "short": b"\x02\x00\x00\x00\x01"}[value]
    elif name in ("physical_function", "virtual_function"):
        r.ClearField(name)
    elif "." in name:
        message, part = name.split(".")
        setattr(getattr(r, message), part, int(value))
    else:
        setattr(r, name, int(value))


# --- strategies ------------------------------------------------------------------------------------------


def role_for(method: str) -> st.SearchStrategy[str]:
    """Mostly the principal the policy grants ``method`` to (so calls get through), else any principal."""
    return st.integers(0, 2).flatmap(lambda n: st.just(owner(method)) if n < 2 else st.sampled_from(PRINCIPALS))


def sometimes_broken(method: str) -> st.SearchStrategy[str | None]:
    """None (all arguments valid) five times in six, else one way to break an argument of ``method``."""
    return st.integers(0, 5).flatmap(lambda n: st.none() if n < 5 else st.sampled_from(BREAKS[method]))


# Slot 0 most often: the instances "populate" starts take the first slots, so calls mostly meet instances that
# exist, and the other slots keep NOT_FOUND and fresh starts frequent.
SLOTS = st.sampled_from([0, 0, 0, 1, 1, 2, 3])  # the POOL slots
ARGS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "StartInstance": st.fixed_dictionaries({
        "slot": SLOTS,
        # Large enough that a start often meets INSUFFICIENT_CORES or INSUFFICIENT_MEMORY, 7 even on an empty host.
        "vcpus": st.sampled_from([1, 2, 3, 4, 5, 7]),
        "memory_mib": st.sampled_from([64, 128, 256, 512, 768]),
        "image": st.sampled_from(["good"] * 8 + ["bad-signature", "unknown-digest"]),
        "broken": sometimes_broken("StartInstance")}),
    "StopInstance": st.fixed_dictionaries({
        "slot": SLOTS, "force": st.booleans(), "timeout_seconds": st.integers(1, 3),
        "broken": sometimes_broken("StopInstance")}),
    "AttachVolume": st.fixed_dictionaries({
        "slot": SLOTS, "volume": st.integers(0, VOLUMES - 1), "read_only": st.booleans(),
        "envelope": st.integers(0, 9).map(lambda n: n == 9), "broken": sometimes_broken("AttachVolume")}),
    "DetachVolume": st.fixed_dictionaries({
        "slot": SLOTS, "volume": st.integers(0, VOLUMES - 1), "broken": sometimes_broken("DetachVolume")}),
    "AssignVirtualFunction": st.fixed_dictionaries({
        "slot": SLOTS, "pf_function": st.integers(0, 7), "vlan": st.integers(0, 4095),
        "broken": sometimes_broken("AssignVirtualFunction")}),
    "ReleaseVirtualFunction": st.fixed_dictionaries({
        "slot": SLOTS, "vf_function": st.integers(0, 7), "broken": sometimes_broken("ReleaseVirtualFunction")}),
    "DescribeInstance": st.fixed_dictionaries({"slot": SLOTS, "broken": sometimes_broken("DescribeInstance")}),
    "ListInstances": st.fixed_dictionaries({
        "page_size": st.sampled_from([0, 1, 2, 3, 64, 256]), "after": st.none() | SLOTS,
        "broken": sometimes_broken("ListInstances")}),
    "GetHostIdentity": st.fixed_dictionaries({"broken": st.none()}),
    "GetMetrics": st.fixed_dictionaries({"broken": st.none()}),
    "PollEvents": st.fixed_dictionaries({"broken": sometimes_broken("PollEvents")}),
    "ReadAuditLog": st.fixed_dictionaries({"broken": sometimes_broken("ReadAuditLog")}),
}


# --- the model -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInstance:
    state: int
    vcpus: int
    memory_mib: int
    image_digest: bytes
    cpus: tuple[int, ...] = ()  # held only while RUNNING
    volumes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Expected:
    """What the model says a call answers, and what it changes if the call succeeds."""

    code: grpc.StatusCode
    why: str  # the rule that decides it, for the statistics and a failure's message
    response: Any = None  # the exact answer, when the model can build it
    check: Callable[[Any], None] | None = None  # a check of the answer, when it cannot
    apply: Callable[[], None] | None = None
    stores: bool = False  # a new client token: the controller keeps this answer for replays
    replay: bool = False


@dataclass(frozen=True)
class Stored:
    """An answer the controller keeps under (principal, client token)."""

    method: str
    fingerprint: bytes
    code: grpc.StatusCode
    response: Any


@dataclass(frozen=True)
class Sent:
    """A mutating request sent earlier, for replays and token reuse."""

    role: str
    method: str
    request: Any


def _fingerprint(method: str, request: Any) -> bytes:
    """Method and parameters, the client token excepted (controller/idempotency.py, "the same request")."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("client_token")
    return method.encode() + b"\0" + copy.SerializeToString(deterministic=True)


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "passivisor_agent" and sample.labels.get("metric") == name:
                return float(sample.value)
    raise AssertionError(f"GetMetrics has no passivisor_agent{{metric={name!r}}}")


def _check_identity(answer: Any) -> None:
    assert len(answer.public_key) == 32 and len(answer.signing_public_key) == 32, answer


def _check_metrics(answer: Any) -> None:
    assert _metric(answer.text, "cores_total") == len(ALLOCATABLE)
    assert _metric(answer.text, "memory_total_mib") == MEMORY_BUDGET_MIB


class ControllerMachine(RuleBasedStateMachine):
    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host
        self.example = next(host.examples)
        self.ids = tuple(self._uuid(0, slot) for slot in range(POOL))
        self.tokens_issued = 0
        self.instances: dict[str, ModelInstance] = {}
        self.stored: dict[tuple[str, str], Stored] = {}
        self.sent: list[Sent] = []
        self._clean_up_previous_example()

    def _uuid(self, kind: int, n: int) -> str:
        # The example number leads, so every id of this example sorts after every earlier example's: the
        # records the agent forgets first (hostagent/state.py, _forgettable) are never this example's.
        # The fixed letters make every id change when upper-cased (BAD_IDS["upper"]) whatever the numbers are.
        return f"{self.example:08x}-{kind:04x}-4abc-8def-{n:012x}"

    def _token(self) -> str:
        self.tokens_issued += 1
        return self._uuid(1, self.tokens_issued)

    def _clean_up_previous_example(self) -> None:
        manager = self.host.stubs["instance-manager"]
        for summary in list_all(manager):
            if summary.state == RUNNING:
                manager.StopInstance(pb.StopInstanceRequest(client_token=self._token(), instance_id=summary.instance_id,
                                                            mode=pb.STOP_MODE_FORCE), timeout=CALL_TIMEOUT_S)
        listed = list_all(manager)
        assert not [i.instance_id for i in listed if i.state in HOLDING], "the previous example left instances"

    # --- derived model state ----------------------------------------------------------------------------

    def held_cpus(self) -> list[int]:
        return [cpu for i in self.instances.values() for cpu in i.cpus]

    def memory_used(self) -> int:
        return sum(i.memory_mib for i in self.instances.values() if i.state == RUNNING)

    def info(self, iid: str, instance: ModelInstance | None = None) -> Any:
        """The InstanceInfo the controller should give for ``iid`` (as the model has it, or as ``instance``)."""
        i = self.instances[iid] if instance is None else instance
        return pb.InstanceInfo(instance_id=iid, state=i.state, vcpus=i.vcpus, memory_mib=i.memory_mib,
                               image_digest=i.image_digest, host_cpus=sorted(i.cpus), volume_ids=sorted(i.volumes))

    # --- building requests ------------------------------------------------------------------------------

    def build(self, method: str, args: dict[str, Any]) -> Any:
        r: Any
        if method in MUTATING:
            iid = self.ids[args["slot"]]
            token = self._token()
        if method == "StartInstance":
            digest, signature = self.host.agent.image_digest, self.host.agent.image_signature
            if args["image"] == "bad-signature":
                signature = bytes([signature[0] ^ 1]) + signature[1:]
            elif args["image"] == "unknown-digest":
                digest = self.host.unknown_digest
                signature = self.host.valid_signatures[digest]
            r = pb.StartInstanceRequest(client_token=token, instance_id=iid, vcpus=args["vcpus"],
                                        memory_mib=args["memory_mib"], image_digest=digest, image_signature=signature)
        elif method == "StopInstance":
            r = pb.StopInstanceRequest(client_token=token, instance_id=iid,
                                       mode=pb.STOP_MODE_FORCE if args["force"] else pb.STOP_MODE_GRACEFUL,
                                       timeout_seconds=0 if args["force"] else args["timeout_seconds"])
        elif method in ("AttachVolume", "DetachVolume"):
            volume_id = self.host.volume_ids[args["volume"]]
            if method == "AttachVolume":
                r = pb.AttachVolumeRequest(client_token=token, instance_id=iid, volume_id=volume_id,
                                           read_only=args["read_only"],
                                           envelope=b"\x01" * 64 if args["envelope"] else b"")
            else:
                r = pb.DetachVolumeRequest(client_token=token, instance_id=iid, volume_id=volume_id)
        elif method == "AssignVirtualFunction":
            r = pb.AssignVirtualFunctionRequest(
                client_token=token, instance_id=iid, mac=b"\x02\x00\x00\x00\x00\x01", vlan=args["vlan"],
                physical_function=pb.PciAddress(domain=0, bus=0x3b, device=0, function=args["pf_function"]))
        elif method == "ReleaseVirtualFunction":
            r = pb.ReleaseVirtualFunctionRequest(
                client_token=token, instance_id=iid,
                virtual_function=pb.PciAddress(domain=0, bus=0x3b, device=2, function=args["vf_function"]))
        elif method == "DescribeInstance":
            r = pb.DescribeInstanceRequest(instance_id=self.ids[args["slot"]])
        elif method == "ListInstances":
            after = args["after"]
            if after is None and (args["broken"] or "").startswith("page_token"):
                after = 0  # a token to break
            r = pb.ListInstancesRequest(page_size=args["page_size"],
                                        page_token="" if after is None else self.ids[after])
        elif method == "PollEvents":
            r = pb.PollEventsRequest(after_cursor=0, max_events=8)  # after 0: a peek, nothing acknowledged
        elif method == "ReadAuditLog":
            r = pb.ReadAuditLogRequest(from_sequence=1, max_records=4)
        else:
            r = getattr(pb, f"{method}Request")()
        if args["broken"] is not None:
            break_argument(r, args["broken"])
            assert violations(method, r), f"{args['broken']} did not break {method}"  # the test's own check
        return r

    # --- the model's answers ----------------------------------------------------------------------------

    def predict(self, role: str, method: str, r: Any) -> Expected:
        if method not in POLICY[role]:
            return Expected(PERMISSION_DENIED, f"{method} is not granted to {role}")
        if violations(method, r):
            return Expected(INVALID_ARGUMENT, f"broken: {', '.join(violations(method, r))}")
        if method == "AttachVolume" and r.envelope:
            # 64 bytes of 0x01: not an envelope (docs/envelope-format.md: exactly 145 bytes, version 1).
            return Expected(INVALID_ARGUMENT, "a malformed envelope")
        if method in MUTATING:
            stored = self.stored.get((role, r.client_token))
            if stored is not None:
                if stored.fingerprint != _fingerprint(method, r):
                    return Expected(INVALID_ARGUMENT, "client_token reused with another method or parameters")
                return Expected(stored.code, "the first answer to this token", response=stored.response, replay=True)
            return dataclasses.replace(self.agent_answer(method, r), stores=True)
        return self.agent_answer(method, r)

    def agent_answer(self, method: str, r: Any) -> Expected:
        """The agent's rules for a valid, authorized request, in the agent's order of checks."""
        if method == "ListInstances":
            return Expected(OK, "", check=functools.partial(self.check_page, r))
        if method == "GetHostIdentity":
            return Expected(OK, "", check=_check_identity)
        if method == "GetMetrics":
            return Expected(OK, "", check=_check_metrics)
        if method in ("PollEvents", "ReadAuditLog"):
            return Expected(OK, "")
        iid = r.instance_id
        current = self.instances.get(iid)
        if method == "StartInstance":
            return self.start(r, current)
        if current is None:
            return Expected(NOT_FOUND, "UNKNOWN_INSTANCE")
        if method == "DescribeInstance":
            return Expected(OK, "", response=pb.DescribeInstanceResponse(instance=self.info(iid)))
        if method == "StopInstance":
            if current.state != RUNNING:
                return Expected(FAILED_PRECONDITION, "INVALID_STATE: not RUNNING")
            stopped = ModelInstance(STOPPED, current.vcpus, current.memory_mib, current.image_digest)
            return Expected(OK, "", response=pb.StopInstanceResponse(instance=self.info(iid, stopped)),
                            apply=lambda: self.instances.__setitem__(iid, stopped))
        if current.state != RUNNING:
            return Expected(FAILED_PRECONDITION, "INVALID_STATE: devices need a RUNNING instance")
        if method == "AttachVolume":
            if any(r.volume_id in i.volumes for i in self.instances.values()):
                return Expected(ALREADY_EXISTS, "VOLUME_ALREADY_ATTACHED")
            if r.volume_id == self.host.volume_ids[-1]:
                return Expected(NOT_FOUND, "VOLUME_NOT_FOUND: no file")
            attached = dataclasses.replace(current, volumes=current.volumes | {r.volume_id})
            return Expected(OK, "", response=pb.AttachVolumeResponse(instance_id=iid, volume_id=r.volume_id,
                                                                 state=pb.VOLUME_STATE_ATTACHED),
                            apply=lambda: self.instances.__setitem__(iid, attached))
        if method == "DetachVolume":
            if r.volume_id not in current.volumes:
                return Expected(FAILED_PRECONDITION, "VOLUME_NOT_ATTACHED")
            detached = dataclasses.replace(current, volumes=current.volumes - {r.volume_id})
            return Expected(OK, "", response=pb.DetachVolumeResponse(instance_id=iid, volume_id=r.volume_id,
                                                                 state=pb.VOLUME_STATE_DETACHED),
                            apply=lambda: self.instances.__setitem__(iid, detached))
        # AssignVirtualFunction: PF_NOT_FOUND (this host has no SR-IOV device); ReleaseVirtualFunction:
        # VF_NOT_ASSIGNED (no VF was ever assigned).  Both FAILED_PRECONDITION.
        return Expected(FAILED_PRECONDITION, "PF_NOT_FOUND" if method == "AssignVirtualFunction" else "VF_NOT_ASSIGNED")

    def start(self, r: Any, current: ModelInstance | None) -> Expected:
        if current is not None and current.state == RUNNING:
            return Expected(ALREADY_EXISTS, "INSTANCE_EXISTS")
        free = sorted(ALLOCATABLE - set(self.held_cpus()))
        if r.vcpus > len(free):
            return Expected(RESOURCE_EXHAUSTED, "INSUFFICIENT_CORES")
        if r.memory_mib > MEMORY_BUDGET_MIB - self.memory_used():
            return Expected(RESOURCE_EXHAUSTED, "INSUFFICIENT_MEMORY")
        if self.host.valid_signatures.get(r.image_digest) != r.image_signature:
            return Expected(FAILED_PRECONDITION, "IMAGE_REJECTED (the signature is checked first)")
        if r.image_digest != self.host.agent.image_digest:
            return Expected(NOT_FOUND, "IMAGE_NOT_FOUND")
        started = ModelInstance(RUNNING, r.vcpus, r.memory_mib, r.image_digest, tuple(free[:r.vcpus]))
        return Expected(OK, "", response=pb.StartInstanceResponse(instance=self.info(r.instance_id, started)),
                        apply=lambda: self.instances.__setitem__(r.instance_id, started))

    # --- one call ---------------------------------------------------------------------------------------

    def call(self, role: str, method: str, request: Any) -> None:
        expected = self.predict(role, method, request)
        try:
            answer = getattr(self.host.stubs[role], method)(request, timeout=CALL_TIMEOUT_S)
            code = OK
        except grpc.RpcError as exc:
            answer, code = None, exc.code()
        event(f"{method} -> {code.name} {expected.why}".rstrip())
        assert code == expected.code, (f"{role} {method}: the controller answered {code.name}, the model "
                                       f"expects {expected.code.name} ({expected.why}); request: {request}")
        if code == OK:
            if expected.response is not None:
                assert answer == expected.response, f"{method}: answered\n{answer}\nthe model expects\n" \
                                                    f"{expected.response}"
            if expected.check is not None:
                expected.check(answer)
            if expected.apply is not None:
                expected.apply()
        if expected.stores:
            self.stored[(role, request.client_token)] = Stored(method, _fingerprint(method, request), code, answer)
        if method in MUTATING:
            self.sent.append(Sent(role, method, request))

    def check_listing(self, instances: list[Any]) -> None:
        """Every page of a walk together: this example's instances are the model's, earlier ones hold nothing."""
        self.check_range(instances, "", "")
        assert len(instances) == len({i.instance_id for i in instances}) <= MAX_INSTANCES

    def check_range(self, instances: Any, after: str, through: str) -> None:
        """``instances`` are every instance whose id sorts after ``after`` and up to ``through`` ("": no end)."""
        prefix = self._uuid(0, 0)[:8]
        ours = {i.instance_id: (i.state, i.vcpus, i.memory_mib) for i in instances
                if i.instance_id.startswith(prefix)}
        assert ours == {iid: (i.state, i.vcpus, i.memory_mib) for iid, i in self.instances.items()
                        if iid > after and (not through or iid <= through)}
        holding = [i.instance_id for i in instances if not i.instance_id.startswith(prefix) and i.state in HOLDING]
        assert not holding, f"instances of an earlier example hold resources: {holding}"

    def check_page(self, request: Any, answer: Any) -> None:
        """One page: ordered ids after the token, at most page_size, and a token exactly when it is full and
        more may follow (the canonical id of its last instance)."""
        ids = [i.instance_id for i in answer.instances]
        assert ids == sorted(set(ids)) and all(iid > request.page_token for iid in ids), ids
        size = request.page_size or 64
        assert len(ids) <= size
        if answer.next_page_token:
            assert len(ids) == size and answer.next_page_token == ids[-1], (len(ids), answer.next_page_token)
        self.check_range(answer.instances, request.page_token, answer.next_page_token)

    # --- rules ------------------------------------------------------------------------------------------

    @initialize(sizes=st.lists(st.tuples(st.sampled_from([1, 2]), st.sampled_from([64, 128, 256])), min_size=1,
                               max_size=POOL - 1),
                volumes=st.lists(st.tuples(SLOTS, st.integers(0, VOLUMES - 1)), max_size=3))
    def populate(self, sizes: list[tuple[int, int]], volumes: list[tuple[int, int]]) -> None:
        """Start a few instances and attach some volumes first, so that most steps meet running instances with
        volumes (through the model, as any call: a pair may name a slot not started, or a volume twice)."""
        for slot, (vcpus, memory_mib) in enumerate(sizes):
            args = {"slot": slot, "vcpus": vcpus, "memory_mib": memory_mib, "image": "good", "broken": None}
            self.call("instance-manager", "StartInstance", self.build("StartInstance", args))
        for slot, volume in volumes:
            args = {"slot": slot, "volume": volume, "read_only": False, "envelope": False, "broken": None}
            self.call("volume-attacher", "AttachVolume", self.build("AttachVolume", args))

    @rule(role=role_for("StartInstance"), args=ARGS["StartInstance"])
    def start_instance(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "StartInstance", self.build("StartInstance", args))

    @rule(role=role_for("StopInstance"), args=ARGS["StopInstance"])
    def stop_instance(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "StopInstance", self.build("StopInstance", args))

    @precondition(lambda self: any(i.state == RUNNING for i in self.instances.values()))
    @rule(data=st.data(), force=st.booleans())
    def stop_a_running_instance(self, data: st.DataObject, force: bool) -> None:
        """StopInstance of an instance the model has RUNNING (with its volumes, if it has some)."""
        running = sorted(iid for iid, i in self.instances.items() if i.state == RUNNING)
        iid = data.draw(st.sampled_from(running), label="running")
        role = data.draw(role_for("StopInstance"), label="role")
        self.call(role, "StopInstance", pb.StopInstanceRequest(
            client_token=self._token(), instance_id=iid, mode=pb.STOP_MODE_FORCE if force else pb.STOP_MODE_GRACEFUL,
            timeout_seconds=0 if force else 1))

    @rule(role=role_for("AttachVolume"), args=ARGS["AttachVolume"])
    def attach_volume(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "AttachVolume", self.build("AttachVolume", args))

    @rule(role=role_for("DetachVolume"), args=ARGS["DetachVolume"])
    def detach_volume(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "DetachVolume", self.build("DetachVolume", args))

    @precondition(lambda self: any(i.volumes for i in self.instances.values()))
    @rule(data=st.data())
    def detach_an_attached_volume(self, data: st.DataObject) -> None:
        """DetachVolume of a volume the model has attached, which random (slot, volume) pairs rarely meet."""
        attached = sorted((iid, volume_id) for iid, i in self.instances.items() for volume_id in i.volumes)
        iid, volume_id = data.draw(st.sampled_from(attached), label="attached")
        role = data.draw(role_for("DetachVolume"), label="role")
        self.call(role, "DetachVolume", pb.DetachVolumeRequest(client_token=self._token(), instance_id=iid,
                                                               volume_id=volume_id))

    @rule(role=role_for("AssignVirtualFunction"), args=ARGS["AssignVirtualFunction"])
    def assign_virtual_function(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "AssignVirtualFunction", self.build("AssignVirtualFunction", args))

    @rule(role=role_for("ReleaseVirtualFunction"), args=ARGS["ReleaseVirtualFunction"])
    def release_virtual_function(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "ReleaseVirtualFunction", self.build("ReleaseVirtualFunction", args))

    @rule(role=role_for("DescribeInstance"), args=ARGS["DescribeInstance"])
    def describe_instance(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "DescribeInstance", self.build("DescribeInstance", args))

    @rule(role=role_for("ListInstances"), args=ARGS["ListInstances"])
    def list_instances(self, role: str, args: dict[str, Any]) -> None:
        self.call(role, "ListInstances", self.build("ListInstances", args))

    @rule(data=st.data(), method=st.sampled_from(READ_ONLY_OTHERS))
    def read_only_call(self, data: st.DataObject, method: str) -> None:
        role = data.draw(role_for(method), label="role")
        self.call(role, method, self.build(method, data.draw(ARGS[method], label="args")))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """Send an earlier mutating request again, token and all, mostly from the same principal."""
        sent = data.draw(st.sampled_from(self.sent), label="sent")
        role = data.draw(st.integers(0, 2).flatmap(
            lambda n: st.just(sent.role) if n < 2 else st.sampled_from(PRINCIPALS)), label="role")
        self.call(role, sent.method, sent.request)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def reuse_token(self, data: st.DataObject) -> None:
        """A new mutating request (any method) under an earlier request's token, from that principal."""
        sent = data.draw(st.sampled_from(self.sent), label="sent")
        method = data.draw(st.sampled_from(MUTATING), label="method")
        request = self.build(method, data.draw(ARGS[method], label="args"))
        request.client_token = sent.request.client_token
        self.call(sent.role, method, request)

    # --- the invariant ----------------------------------------------------------------------------------

    @invariant()
    def the_host_matches_the_model(self) -> None:
        manager = self.host.stubs["instance-manager"]
        self.check_listing(list_all(manager))
        held: list[int] = []
        for iid in self.instances:
            described = manager.DescribeInstance(pb.DescribeInstanceRequest(instance_id=iid),
                                                 timeout=CALL_TIMEOUT_S).instance
            assert described == self.info(iid), f"DescribeInstance {iid}:\n{described}\nthe model has\n" \
                                                f"{self.info(iid)}"
            held += described.host_cpus
        assert len(held) == len(set(held)) <= len(ALLOCATABLE), f"a CPU is held twice: {sorted(held)}"
        assert set(held) <= ALLOCATABLE, f"an instance is pinned to a reserved CPU: {sorted(held)}"
        text = self.host.stubs["telemetry"].GetMetrics(pb.GetMetricsRequest(), timeout=CALL_TIMEOUT_S).text
        running = [i for i in self.instances.values() if i.state == RUNNING]
        assert _metric(text, "cores_free") == len(ALLOCATABLE) - len(held)
        assert _metric(text, "memory_free_mib") == MEMORY_BUDGET_MIB - self.memory_used()
        assert _metric(text, "instances_running") == len(running)


EXAMPLES = settings.default.max_examples  # 50 under the "ci" profile, more under "long"
STEPS = 30


@pytest.mark.slow
# About 1.5 s per example, and up to five minutes of shrinking (hypothesis's own limit) when one fails.
@pytest.mark.timeout(max(300, 4 * EXAMPLES) + 300)
def test_random_rpcs_from_random_roles_match_the_model(host: Host) -> None:
    run_state_machine_as_test(lambda: ControllerMachine(host),
                              settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None))
