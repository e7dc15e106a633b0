"""Hostile input on the controller's gRPC port (issue 6 §3; claims C2, C3, C11, C16; docs/reliability.md).

Real components, started once for the module as in test_controller_grpc.py: a ``passivisor-controller``
process serving mTLS on 127.0.0.1 port 0, and a ``passivisor-agent`` process (sim backend) behind it.
One victim instance runs on the agent for the whole module.  The attacks use the real gRPC client
library (``channel.unary_unary(path)`` with no serializer sends any bytes as the request), the ``ssl``
module and plain TCP sockets.  The rate limits are raised so that the floods measure the transport and
the handler, not the limiter (test_controller_grpc.py tests the limiter).

Every case checks what docs/reliability.md promises, in ``Host.settled``:

1. the answer: the status code, and the message (and field violations) a client can act on;
2. the controller still serves: the process is alive, its log since the case holds no traceback, and a
   proper call succeeds afterwards;
3. the state is unchanged: ListInstances, DescribeInstance of the victim and the VM processes are what
   they were before the case;
4. the audit trail: every attempt that reached the controller's handler is recorded with its principal,
   method, decision and outcome.  Attempts the gRPC transport refuses before any handler runs (an
   oversized message, a failed TLS handshake, a stream that never sends its request) leave no record,
   and the cases say so explicitly, so that a change either way is noticed.

Three defects were found here and fixed: too many unknown fields, one short deadline taking the agent
link down, and (D3) callers stalled mid-request holding every worker thread of the synchronous gRPC
server (the controller now serves with grpc.aio, where a call waiting for its request holds no thread:
controller/grpc_service.py, ``Server``).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import random
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf.message import DecodeError
from polling import wait_until

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.api.rpc_status import STATUS_DETAILS_KEY, decode_status
from controller.devhost import agenthost, controllerhost
from controller.grpc_service import build_server
from controller.pki import issue_client_cert, load_ca, role_principal
from hostagent import process

SERVICE = "/passivisor.v1.HostController/"
MAX_MESSAGE = 64 * 1024  # grpc.max_receive_message_length of controller/grpc_service.py::build_server
WORKERS = inspect.signature(build_server).parameters["max_workers"].default
NOT_PROTOBUF = "the request is not a valid protobuf message"
INVALID, DENIED, ALLOWED = pb.AUDIT_DECISION_INVALID, pb.AUDIT_DECISION_DENIED, pb.AUDIT_DECISION_ALLOWED
IM = role_principal("instance-manager")
AUDITOR = role_principal("auditor")

AuditKey = tuple[str, str, int, str]  # principal, method, decision, outcome


def own_read(record: Any) -> bool:
    """Whether an audit record can be one of this module's own successful audit reads."""
    return bool(record.principal == AUDITOR and record.method == "ReadAuditLog" and record.outcome == "OK")


@dataclass
class Before:
    state: tuple[object, ...]
    mark: int  # the next audit sequence number when the case began
    log_offset: int


@dataclass
class Host:
    agent: agenthost.AgentHost
    controller: controllerhost.ControllerHost
    process: Any  # subprocess.Popen of the controller
    endpoint: str
    agent_pid: int
    victim: str = ""
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    audit_cursor: int = 1

    # --- connections ---

    def credentials(self, role: str | None = None, *, cert: bytes | None = None,
                    key: bytes | None = None) -> grpc.ChannelCredentials:
        if role is not None:
            paths = self.controller.pki.clients[role]
            cert, key = paths.certificate.read_bytes(), paths.key.read_bytes()
        return grpc.ssl_channel_credentials(self.controller.pki.ca_certificate.read_bytes(), key, cert)

    def new_channel(self, role: str | None = None, *, cert: bytes | None = None,
                    key: bytes | None = None) -> grpc.Channel:
        return grpc.secure_channel(self.endpoint, self.credentials(role, cert=cert, key=key),
                                   options=[("grpc.ssl_target_name_override", "localhost")])

    def channel(self, role: str = "instance-manager") -> grpc.Channel:
        if role not in self.channels:
            self.channels[role] = self.new_channel(role)
        return self.channels[role]

    def stub(self, role: str = "instance-manager") -> Any:
        return pb_grpc.HostControllerStub(self.channel(role))  # type: ignore[no-untyped-call]

    def raw(self, method: str, data: bytes, role: str = "instance-manager", timeout: float = 20) -> bytes:
        """Send ``data`` as the request bytes of ``method``; no serializer touches them."""
        call = self.channel(role).unary_unary(SERVICE + method)
        return call(data, timeout=timeout)  # type: ignore[no-any-return]

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.endpoint.rpartition(":")
        return host, int(port)

    # --- observation ---

    def observe(self) -> tuple[object, ...]:
        stub = self.stub()
        listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=20)
        described = stub.DescribeInstance(pb.DescribeInstanceRequest(instance_id=self.victim), timeout=20)
        vms = sorted(process.find_by_argument(str(self.agent.runtime_dir).encode()))
        return (sorted((i.instance_id, i.state, i.vcpus, i.memory_mib) for i in listed.instances),
                described.instance.SerializeToString(deterministic=True), vms)

    def fd_count(self) -> int:
        return len(list(Path(f"/proc/{self.process.pid}/fd").iterdir()))

    def log_size(self) -> int:
        return self.controller.log.stat().st_size

    def log_since(self, offset: int) -> str:
        return self.controller.log.read_bytes()[offset:].decode(errors="replace")

    def heal(self) -> None:
        """Wait until a proper call is served (the agent link backs off after a failure)."""
        def served() -> bool:
            try:
                self.stub().ListInstances(pb.ListInstancesRequest(), timeout=20)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                return False
            return True
        wait_until(served, timeout=30, what="the controller to serve a proper call")

    # --- the audit trail ---

    def _read(self, start: int) -> list[Any]:
        auditor = self.stub("auditor")
        records: list[Any] = []
        while True:
            page = auditor.ReadAuditLog(pb.ReadAuditLogRequest(from_sequence=start, max_records=1000), timeout=20)
            records += page.records
            if len(page.records) < 1000:
                return records
            start = page.next_sequence

    def audit_mark(self) -> int:
        """The next sequence number, once the records of the calls made so far are durable (readable)."""
        while True:
            time.sleep(0.1)
            records = self._read(self.audit_cursor)
            if records:
                self.audit_cursor = records[-1].sequence + 1
            if all(own_read(r) or r.kind == pb.AUDIT_RECORD_KIND_CHECKPOINT for r in records):
                return self.audit_cursor

    def audit_since(self, mark: int, expected: int, ignore: Callable[[Any], bool] | None = None) -> list[Any]:
        """The records of the case: from ``mark`` on, without checkpoints, this test's own audit reads and
        whatever ``ignore`` says (a bystander's calls)."""
        def relevant() -> list[Any]:
            return [r for r in self._read(mark) if r.kind != pb.AUDIT_RECORD_KIND_CHECKPOINT
                    and not own_read(r) and not (ignore is not None and ignore(r))]
        # Refusals are appended without waiting for their fsync; ReadAuditLog serves durable records only.
        found: list[Any] = []

        def enough() -> bool:
            nonlocal found
            found = relevant()
            return len(found) >= expected
        if expected:
            wait_until(enough, what=f"{expected} audit records", timeout=10)
        time.sleep(0.3)  # the group commit writes within milliseconds: a record too many would be there now
        return relevant()

    # --- the four promises ---

    def before(self) -> Before:
        self.heal()
        return Before(self.observe(), self.audit_mark(), self.log_size())

    def alive(self, before: Before) -> None:
        assert self.process.poll() is None, f"the controller died:\n{self.log_since(before.log_offset)[-3000:]}"
        text = self.log_since(before.log_offset)
        assert "Traceback" not in text, text[-3000:]

    def serving(self, before: Before) -> None:
        """Promises 2 and 3: alive, no traceback, a proper call served, the state as it was."""
        self.alive(before)
        self.heal()
        assert self.observe() == before.state

    def settled(self, before: Before, records: Sequence[AuditKey],
                ignore: Callable[[Any], bool] | None = None) -> list[Any]:
        """All four promises; ``records`` are the audit records the case must have left, in order."""
        self.alive(before)
        found = self.audit_since(before.mark, len(records), ignore)  # before this check's own calls
        assert [(r.principal, r.method, r.decision, r.outcome) for r in found] == list(records)
        self.serving(before)
        return found


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("hostile")
    agent = agenthost.prepare(root / "agent", backend="sim", seccomp=False)
    agent_process = agenthost.start(agent)
    controller = controllerhost.prepare(root / "controller", agent, principal_rate_per_s=1000.0,
                                        principal_burst=1000, instance_rate_per_s=1000.0, instance_burst=1000)
    controller_process, endpoint = controllerhost.start(controller)
    result = Host(agent, controller, controller_process, endpoint, agent_process.pid)
    try:
        result.victim = str(uuid.uuid4())
        result.stub().StartInstance(start_request(result, result.victim), timeout=20)
        yield result
    finally:
        for channel in result.channels.values():
            channel.close()
        agenthost.stop(controller_process)
        agenthost.stop(agent_process)
        agenthost.kill_vms(agent)


@pytest.fixture
def before(host: Host) -> Before:
    return host.before()


def start_request(host: Host, instance_id: str, token: str | None = None) -> Any:
    return pb.StartInstanceRequest(client_token=token or str(uuid.uuid4()), instance_id=instance_id, vcpus=1,
                                   memory_mib=128, image_digest=host.agent.image_digest,
                                   image_signature=host.agent.image_signature)


def refused(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    kwargs.setdefault("timeout", 20)
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    trailers = dict(error.trailing_metadata() or ())
    found, _ = decode_status(trailers[STATUS_DETAILS_KEY], error.code().value[0])
    return found


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def string_field(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


# --------------------------------------------------------------------------------------------------------------
# Malformed protobuf bytes


MALFORMED = {
    "truncated-varint": b"\x08\x80\x80",
    "length-past-the-end": b"\x0a\x24abc",
    "wire-type-6": b"\x0e\x00",
    "wire-type-7": b"\x0f\x00",
    "field-number-zero": b"\x00\x01",
    "unterminated-group": b"\x0b",
    "end-group-without-start": b"\x0c",
    "eleven-byte-varint": b"\x08" + b"\xff" * 10 + b"\x01",
    "length-beyond-2-gib": b"\x0a" + b"\xff" * 9 + b"\x01",
    "truncated-fixed64": b"\x09\x00\x00",
}


@pytest.mark.parametrize("method", ["DescribeInstance", "StopInstance"])
@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_protobuf_bytes_are_refused_and_audited(host: Host, before: Before, method: str,
                                                         data: bytes) -> None:
    with pytest.raises(DecodeError):  # the case is what it says: protobuf itself refuses these bytes
        getattr(pb, f"{method}Request").FromString(data)
    error = refused(host.raw, method, data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == NOT_PROTOBUF
    [record] = host.settled(before, [(IM, method, INVALID, "INVALID_ARGUMENT")])
    assert dict(record.parameters) == {"request_bytes": str(len(data))}


def test_random_bytes_are_refused_and_audited(host: Host, before: Before) -> None:
    """200 random requests of 1 to 512 bytes to a mutating method that would stop the victim if obeyed."""
    generator = random.Random(6)
    cases = [generator.randbytes(generator.randint(1, 512)) for _ in range(200)]
    answers = []
    for data in cases:
        error = refused(host.raw, "StopInstance", data)
        answers.append((error.code(), error.details()))
    assert {code for code, _ in answers} == {grpc.StatusCode.INVALID_ARGUMENT}
    # Most do not parse; the few that do break a declared constraint (no valid UUID arises by chance).
    assert all(detail == NOT_PROTOBUF or detail.startswith("the request breaks its declared constraints: ")
               for _, detail in answers)
    host.settled(before, [(IM, "StopInstance", INVALID, "INVALID_ARGUMENT")] * len(cases))


# --------------------------------------------------------------------------------------------------------------
# Known fields with the wrong wire type (protobuf keeps them as unknown fields; the validator refuses them)

TOKEN, OTHER = str(uuid.uuid4()), str(uuid.uuid4())

WRONG_TYPES = {
    # case: (role, method, request bytes, expected violations (field, rule-ish text))
    "string-as-varint": ("instance-manager", "DescribeInstance", tag(1, 0) + varint(7),
                         [("#1", "unknown field number 1 (wire type 0)"), ("instance_id", "is required")]),
    "string-as-fixed32": ("instance-manager", "DescribeInstance", tag(1, 5) + bytes(4),
                          [("#1", "unknown field number 1 (wire type 5)"), ("instance_id", "is required")]),
    "enum-as-fixed64": ("instance-manager", "StopInstance",
                        string_field(1, TOKEN.encode()) + string_field(2, OTHER.encode()) + tag(3, 1) + bytes(8),
                        [("#3", "unknown field number 3 (wire type 1)"), ("mode", "is required")]),
    "uint32-as-length-delimited": ("instance-manager", "StopInstance",
                                   string_field(1, TOKEN.encode()) + string_field(2, OTHER.encode())
                                   + tag(3, 0) + varint(2) + string_field(4, b"\x05"),
                                   [("#4", "unknown field number 4 (wire type 2)")]),
    "message-as-varint": ("network-manager", "ReleaseVirtualFunction",
                          string_field(1, TOKEN.encode()) + string_field(2, OTHER.encode()) + tag(3, 0) + varint(1),
                          [("#3", "unknown field number 3 (wire type 0)"), ("virtual_function", "is required")]),
}


@pytest.mark.parametrize(("role", "method", "data", "expected"), WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_known_fields_of_the_wrong_wire_type_are_named(host: Host, before: Before, role: str, method: str,
                                                       data: bytes, expected: list[tuple[str, str]]) -> None:
    getattr(pb, f"{method}Request").FromString(data)  # protobuf parses it: the validator must refuse it
    error = refused(host.raw, method, data, role=role)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("the request breaks its declared constraints: ")
    assert violations(error) == expected
    host.settled(before, [(role_principal(role), method, INVALID, "INVALID_ARGUMENT")])


# --------------------------------------------------------------------------------------------------------------
# Invalid UTF-8 in string fields

INVALID_UTF8 = {
    "ff-fe": b"\xff\xfe",
    "overlong-slash": b"\xc0\xaf",
    "lone-surrogate": b"\xed\xa0\x80",
    "truncated-sequence": b"\xe2\x82",
    "above-u10ffff": b"\xf4\x90\x80\x80",
    "in-a-uuid": TOKEN.encode()[:35] + b"\xff",
}


@pytest.mark.parametrize("method", ["DescribeInstance", "StartInstance"])
@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_invalid_utf8_in_a_string_field_is_refused(host: Host, before: Before, method: str, bad: bytes) -> None:
    if method == "DescribeInstance":
        data = string_field(1, bad)
    else:  # the client token of a mutating call, the rest of the request valid
        data = string_field(1, bad) + start_request(host, str(uuid.uuid4())).SerializeToString()[38:]
    error = refused(host.raw, method, data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == NOT_PROTOBUF
    host.settled(before, [(IM, method, INVALID, "INVALID_ARGUMENT")])


def test_valid_utf8_that_is_not_a_uuid_is_named(host: Host, before: Before) -> None:
    arabic_one = TOKEN[:35] + "\u0661"  # 37 UTF-8 bytes
    error = refused(host.stub().DescribeInstance, pb.DescribeInstanceRequest(instance_id=arabic_one))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == [("instance_id", "must be at most 36 UTF-8 bytes, got 37")]
    host.settled(before, [(IM, "DescribeInstance", INVALID, "INVALID_ARGUMENT")])


# --------------------------------------------------------------------------------------------------------------
# Boundary values: the last valid value passes validation, the first invalid one is named

PCI_MAX = pb.PciAddress(domain=0xFFFF, bus=0xFF, device=0x1F, function=7)
MAC = bytes.fromhex("020000000001")

BOUNDARIES: dict[str, tuple[str, str, Callable[[Host], Any], grpc.StatusCode, str | None]] = {
    # case: (role, method, request, expected code, the violation's field, or None when validation passes)
    "read-audit-max-records-1000": ("auditor", "ReadAuditLog",
                                    lambda h: pb.ReadAuditLogRequest(max_records=1000), grpc.StatusCode.OK, None),
    "read-audit-max-records-1001": ("auditor", "ReadAuditLog", lambda h: pb.ReadAuditLogRequest(max_records=1001),
                                    grpc.StatusCode.INVALID_ARGUMENT, "max_records"),
    "read-audit-from-2**64-1": ("auditor", "ReadAuditLog",
                                lambda h: pb.ReadAuditLogRequest(from_sequence=2**64 - 1, max_records=1),
                                grpc.StatusCode.OK, None),
    "poll-events-max-events-65": ("telemetry", "PollEvents", lambda h: pb.PollEventsRequest(max_events=65),
                                  grpc.StatusCode.INVALID_ARGUMENT, "max_events"),
    "start-vcpus-128": ("instance-manager", "StartInstance",
                        lambda h: pb.StartInstanceRequest(**{**_start_fields(h), "vcpus": 128}),
                        grpc.StatusCode.RESOURCE_EXHAUSTED, None),  # valid; the agent has 2 cores
    "start-vcpus-129": ("instance-manager", "StartInstance",
                        lambda h: pb.StartInstanceRequest(**{**_start_fields(h), "vcpus": 129}),
                        grpc.StatusCode.INVALID_ARGUMENT, "vcpus"),
    "start-memory-63": ("instance-manager", "StartInstance",
                        lambda h: pb.StartInstanceRequest(**{**_start_fields(h), "memory_mib": 63}),
                        grpc.StatusCode.INVALID_ARGUMENT, "memory_mib"),
    "start-memory-2**20+1": ("instance-manager", "StartInstance",
                             lambda h: pb.StartInstanceRequest(**{**_start_fields(h), "memory_mib": (1 << 20) + 1}),
                             grpc.StatusCode.INVALID_ARGUMENT, "memory_mib"),
    "start-digest-33-bytes": ("instance-manager", "StartInstance",
                              lambda h: pb.StartInstanceRequest(**{**_start_fields(h), "image_digest": bytes(33)}),
                              grpc.StatusCode.INVALID_ARGUMENT, "image_digest"),
    "stop-victim-graceful-601-s": ("instance-manager", "StopInstance",
                                   lambda h: pb.StopInstanceRequest(client_token=str(uuid.uuid4()),
                                                                    instance_id=h.victim, mode=pb.STOP_MODE_GRACEFUL,
                                                                    timeout_seconds=601),
                                   grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
    "stop-victim-mode-3": ("instance-manager", "StopInstance",
                           lambda h: pb.StopInstanceRequest(client_token=str(uuid.uuid4()), instance_id=h.victim,
                                                            mode=3),  # type: ignore[arg-type]
                           grpc.StatusCode.INVALID_ARGUMENT, "mode"),
    "stop-unknown-graceful-600-s": ("instance-manager", "StopInstance",
                                    lambda h: pb.StopInstanceRequest(client_token=str(uuid.uuid4()),
                                                                     instance_id=str(uuid.uuid4()),
                                                                     mode=pb.STOP_MODE_GRACEFUL, timeout_seconds=600),
                                    grpc.StatusCode.NOT_FOUND, None),
    "describe-id-37-chars": ("instance-manager", "DescribeInstance",
                             lambda h: pb.DescribeInstanceRequest(instance_id=h.victim + "0"),
                             grpc.StatusCode.INVALID_ARGUMENT, "instance_id"),
    "attach-envelope-1025-bytes": ("volume-attacher", "AttachVolume",
                                   lambda h: pb.AttachVolumeRequest(client_token=str(uuid.uuid4()),
                                                                    instance_id=h.victim,
                                                                    volume_id=str(uuid.uuid4()),
                                                                    envelope=bytes(1025)),
                                   grpc.StatusCode.INVALID_ARGUMENT, "envelope"),
    "assign-vf-largest-pci-vlan-4095": ("network-manager", "AssignVirtualFunction",
                                        lambda h: pb.AssignVirtualFunctionRequest(
                                            client_token=str(uuid.uuid4()), instance_id=h.victim,
                                            physical_function=PCI_MAX, mac=MAC, vlan=4095),
                                        grpc.StatusCode.FAILED_PRECONDITION, None),  # valid; no such PF here
    "assign-vf-vlan-4096": ("network-manager", "AssignVirtualFunction",
                            lambda h: pb.AssignVirtualFunctionRequest(
                                client_token=str(uuid.uuid4()), instance_id=h.victim,
                                physical_function=PCI_MAX, mac=MAC, vlan=4096),
                            grpc.StatusCode.INVALID_ARGUMENT, "vlan"),
    "assign-vf-device-32": ("network-manager", "AssignVirtualFunction",
                            lambda h: pb.AssignVirtualFunctionRequest(
                                client_token=str(uuid.uuid4()), instance_id=h.victim,
                                physical_function=pb.PciAddress(device=32), mac=MAC, vlan=1),
                            grpc.StatusCode.INVALID_ARGUMENT, "physical_function.device"),
}


def _start_fields(host: Host) -> dict[str, Any]:
    return {"client_token": str(uuid.uuid4()), "instance_id": str(uuid.uuid4()), "vcpus": 1, "memory_mib": 128,
            "image_digest": host.agent.image_digest, "image_signature": host.agent.image_signature}


@pytest.mark.parametrize(("role", "method", "make", "code", "field_name"), BOUNDARIES.values(),
                         ids=BOUNDARIES.keys())
def test_boundary_values_over_the_wire(host: Host, before: Before, role: str, method: str,
                                       make: Callable[[Host], Any], code: grpc.StatusCode,
                                       field_name: str | None) -> None:
    request = make(host)
    call = getattr(host.stub(role), method)
    if code is grpc.StatusCode.OK:
        call(request, timeout=20)
    else:
        error = refused(call, request)
        assert error.code() is code, error.details()
        if field_name is not None:
            assert [name for name, _ in violations(error)] == [field_name]
    mutating = method in {"StartInstance", "StopInstance", "AttachVolume", "AssignVirtualFunction"}
    if role == "auditor" and code is grpc.StatusCode.OK:
        expected = []  # the auditor's successful reads are what audit_since leaves out
    elif field_name is not None:
        expected = [(role_principal(role), method, INVALID, "INVALID_ARGUMENT")]
    elif mutating:  # a valid mutating call: its intent, then its outcome (kind OUTCOME, decision ALLOWED)
        expected = [(role_principal(role), method, ALLOWED, ""), (role_principal(role), method, ALLOWED, code.name)]
    else:
        expected = [(role_principal(role), method, ALLOWED, code.name)]
    host.settled(before, expected)


# --------------------------------------------------------------------------------------------------------------
# Oversized messages and huge repeated fields


def padded_describe(host: Host, total: int) -> bytes:
    """A valid DescribeInstance request with one unknown bytes field (number 15) making it ``total`` bytes."""
    valid = pb.DescribeInstanceRequest(instance_id=host.victim).SerializeToString()
    room = total - len(valid) - 1  # the tag of field 15, wire type 2, is one byte
    for length_size in (1, 2, 3, 4):
        if len(varint(room - length_size)) == length_size:
            data = valid + tag(15, 2) + varint(room - length_size) + bytes(room - length_size)
            assert len(data) == total
            return data
    raise AssertionError("no padding fits")


def test_a_message_of_exactly_the_limit_reaches_the_validator(host: Host, before: Before) -> None:
    error = refused(host.raw, "DescribeInstance", padded_describe(host, MAX_MESSAGE))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in violations(error)] == ["#15"]
    [record] = host.settled(before, [(IM, "DescribeInstance", INVALID, "INVALID_ARGUMENT")])
    assert dict(record.parameters) == {"request_bytes": str(MAX_MESSAGE)}


@pytest.mark.parametrize("size", [MAX_MESSAGE + 1, 1 << 20, 4 << 20], ids=["limit+1", "1MiB", "4MiB"])
def test_an_oversized_message_is_refused_by_the_transport(host: Host, before: Before, size: int) -> None:
    error = refused(host.raw, "DescribeInstance", padded_describe(host, size))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"Received message larger than max ({size} vs. {MAX_MESSAGE})" in error.details()
    host.settled(before, [])  # refused by grpc before the handler runs: no audit record (docs/reliability.md)


def test_a_field_repeated_to_fill_the_message_is_a_non_canonical_encoding(host: Host, before: Before) -> None:
    one = string_field(1, host.victim.encode())
    data = one * ((MAX_MESSAGE - 100) // len(one))  # proto3: the last copy wins, silently
    assert pb.DescribeInstanceRequest.FromString(data).instance_id == host.victim
    error = refused(host.raw, "DescribeInstance", data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == [("(request)", f"the request is {len(data)} bytes but its content encodes "
                                               f"canonically in {len(one)}: a value was truncated, repeated or padded")]
    host.settled(before, [(IM, "DescribeInstance", INVALID, "INVALID_ARGUMENT")])


def test_forty_unknown_fields_name_the_first_twenty_and_count_the_rest(host: Host, before: Before) -> None:
    """The answer's trailers stay far below grpc's 8 KiB soft metadata limit whatever the count (D1, fixed)."""
    data = pb.DescribeInstanceRequest(instance_id=host.victim).SerializeToString() + (tag(111, 0) + b"\x01") * 40
    error = refused(host.raw, "DescribeInstance", data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == [*violations(error)[:20], ("(request)", "20 more violations not shown")]
    assert [name for name, _ in violations(error)[:20]] == ["#111"] * 20
    host.settled(before, [(IM, "DescribeInstance", INVALID, "INVALID_ARGUMENT")])


def test_a_message_full_of_unknown_fields_gets_a_readable_refusal(host: Host, before: Before) -> None:
    data = (tag(111, 0) + b"\x01") * 20_000  # 60 000 bytes, below the transport limit
    error = refused(host.raw, "ListInstances", data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "unknown field number 111" in error.details()
    host.settled(before, [(IM, "ListInstances", INVALID, "INVALID_ARGUMENT")])


# --------------------------------------------------------------------------------------------------------------
# Deadlines


def test_a_deadline_of_zero_on_a_connected_channel(host: Host, before: Before) -> None:
    """The call either expires at the client or is answered normally; a retried start converges to one instance.

    On a connected channel a call with ``timeout=0`` can reach the controller before the client's timer
    fires (test_controller_resilience.py opens a new channel, so the deadline passes during the handshake).
    """
    stub = host.stub()
    described = set()
    for _ in range(20):
        try:
            answer = stub.DescribeInstance(pb.DescribeInstanceRequest(instance_id=host.victim), timeout=0)
            described.add(answer.instance.SerializeToString(deterministic=True))
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), exc
    assert described <= {before.state[1]}

    iid, token = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        stub.StartInstance(start_request(host, iid, token), timeout=0)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), exc
    host.heal()
    codes = []
    for _ in range(50):  # the retry a client makes after DEADLINE_EXCEEDED: same token, a real deadline
        try:
            stub.StartInstance(start_request(host, iid, token), timeout=20)
            codes.append(grpc.StatusCode.OK)
            break
        except grpc.RpcError as exc:
            codes.append(exc.code())
            # ALREADY_EXISTS: the first attempt's effect was unknown (agent hop timed out) and it did start.
            if exc.code() is grpc.StatusCode.ALREADY_EXISTS:
                break
            assert exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE), exc
            time.sleep(0.2)
    assert codes[-1] in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS), codes
    listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=20).instances
    assert [(i.instance_id, i.state) for i in listed if i.instance_id == iid] == [(iid, pb.INSTANCE_STATE_RUNNING)]
    stub.StopInstance(pb.StopInstanceRequest(client_token=str(uuid.uuid4()), instance_id=iid,
                                             mode=pb.STOP_MODE_FORCE), timeout=20)
    assert host.process.poll() is None and "Traceback" not in host.log_since(before.log_offset)
    host.heal()
    assert host.observe()[1:] == before.state[1:]  # the victim and the VM processes (the stopped one is listed)


def test_a_caller_with_a_short_deadline_does_not_take_the_agent_link_down_for_others(host: Host,
                                                                                    before: Before) -> None:
    """A slow agent, made deterministic: it is paused (SIGSTOP) while a caller with a 0.3 s deadline waits.

    The hurried caller gets DEADLINE_EXCEEDED, rightly; the agent is resumed before the next caller comes,
    and that caller should be served.  (Without the pause, calls with 1-3 ms deadlines did the same in
    ad-hoc runs on a loaded machine, but not reliably enough for a test.)
    """
    hurried = host.stub("instance-manager")
    with host.new_channel("instance-manager") as channel:
        bystander = pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]
        bystander.ListInstances(pb.ListInstancesRequest(), timeout=20)
        os.kill(host.agent_pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as info:
                hurried.DescribeInstance(pb.DescribeInstanceRequest(instance_id=host.victim), timeout=0.3)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.2)  # the controller's side of the hop times out too
        finally:
            os.kill(host.agent_pid, signal.SIGCONT)
        try:
            bystander.DescribeInstance(pb.DescribeInstanceRequest(instance_id=host.victim), timeout=20)
            failure = ""
        except grpc.RpcError as exc:
            failure = f"{exc.code().name}: {exc.details()}"
    assert failure == "", "a caller after the hurried one was refused"


# --------------------------------------------------------------------------------------------------------------
# TLS: bad certificates that pass the handshake, and more that do not (test_controller_grpc.py has
# no certificate, another CA and an expired one)


def _ca_itself(ca: Any) -> tuple[bytes, bytes]:
    return ca.certificate_pem, ca.credential.private_key_pem()


def _issued(principal: str | None, **options: Any) -> Callable[[Any], tuple[bytes, bytes]]:
    def make(ca: Any) -> tuple[bytes, bytes]:
        credential = issue_client_cert(ca, principal, **options)
        return credential.certificate_pem, credential.private_key_pem()
    return make


def _server_usage(ca: Any) -> tuple[bytes, bytes]:
    credential = ca.issue("x", usage=ExtendedKeyUsageOID.SERVER_AUTH, uris=[IM])
    return credential.certificate_pem, credential.private_key_pem()


_NOW = datetime.datetime.now(datetime.UTC)
CERTIFICATES = {
    # case: (how to make the certificate from the controller's CA, expected code, audited)
    "no-uri-san": (_issued(None), grpc.StatusCode.UNAUTHENTICATED, True),
    "two-uri-sans": (_issued(IM, extra_uris=[AUDITOR]), grpc.StatusCode.UNAUTHENTICATED, True),
    "uri-with-a-space": (_issued("spiffe://controlplane/instance manager"), grpc.StatusCode.UNAUTHENTICATED, True),
    "the-ca-certificate-itself": (_ca_itself, grpc.StatusCode.UNAUTHENTICATED, True),
    "server-auth-usage-only": (_server_usage, grpc.StatusCode.UNAVAILABLE, False),
    "not-yet-valid": (_issued(IM, not_before=_NOW + datetime.timedelta(days=1),
                              not_after=_NOW + datetime.timedelta(days=2)), grpc.StatusCode.UNAVAILABLE, False),
}


@pytest.mark.parametrize(("make", "code", "audited"), CERTIFICATES.values(), ids=CERTIFICATES.keys())
def test_bad_client_certificates_are_refused(host: Host, before: Before, make: Callable[[Any], tuple[bytes, bytes]],
                                             code: grpc.StatusCode, audited: bool) -> None:
    cert, key = make(load_ca(host.controller.pki.directory))
    with host.new_channel(cert=cert, key=key) as channel:
        stub = pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]
        error = refused(stub.ListInstances, pb.ListInstancesRequest())
    assert error.code() is code, error.details()
    if audited:  # the handshake succeeded; the handler found no single printable URI SAN
        assert error.details() == "a client certificate with one URI SAN over TLS 1.3 is required"
        host.settled(before, [("", "ListInstances", DENIED, "UNAUTHENTICATED")])
    else:  # the TLS handshake failed: no handler ran, so there is no audit record
        host.settled(before, [])


# --------------------------------------------------------------------------------------------------------------
# Floods and slow clients


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first flight of a client would send it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Latency:
    """A bystander that makes proper calls in a loop on its own connection; the slowest one is kept."""

    def __init__(self, host: Host) -> None:
        self.channel = host.new_channel("instance-manager")
        self.stub = pb_grpc.HostControllerStub(self.channel)  # type: ignore[no-untyped-call]
        self.stub.ListInstances(pb.ListInstancesRequest(), timeout=20)  # connected before the case begins
        self.slowest = 0.0
        self.calls = 1
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.stub.ListInstances(pb.ListInstancesRequest(), timeout=20)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.calls += 1
            time.sleep(0.01)

    @staticmethod
    def made(record: Any) -> bool:
        """Whether an audit record can be one of the bystander's calls."""
        return bool(record.principal == IM and record.method == "ListInstances" and record.outcome == "OK")

    def __enter__(self) -> Latency:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.channel.close()


def test_a_flood_of_tls_connections_is_served(host: Host, before: Before) -> None:
    """200 new mTLS connections, 8 at a time, each making one call, while a bystander keeps calling."""
    fds = host.fd_count()

    def one(_: int) -> str:
        with host.new_channel("instance-manager") as channel:
            stub = pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]
            try:
                stub.DescribeInstance(pb.DescribeInstanceRequest(instance_id=host.victim), timeout=20)
            except grpc.RpcError as exc:
                return exc.code().name
            return "OK"

    with Latency(host) as bystander, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    assert results == ["OK"] * 200
    assert bystander.errors == [] and bystander.calls > 0
    assert bystander.slowest < 2.0, f"a bystander's call took {bystander.slowest:.2f} s during the flood"
    wait_until(lambda: host.fd_count() <= fds + 4, what="the controller to close the flood's connections", timeout=10)
    # Every call of the flood and of the bystander is in the audit log, and nothing else.
    assert len(host.audit_since(before.mark, 200 + bystander.calls)) == 200 + bystander.calls
    host.settled(before, [(IM, "DescribeInstance", ALLOWED, "OK")] * 200, ignore=bystander.made)


def test_half_open_stalled_and_garbage_connections_do_not_block_service(host: Host, before: Before) -> None:
    """300 silent TCP connections, 100 stalled half-way through the ClientHello, 50 finished TLS handshakes
    that never send the HTTP/2 preface, and 50 that send HTTP/1.1 or random bytes instead of TLS."""
    fds = host.fd_count()
    hello = client_hello()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    paths = host.controller.pki.clients["instance-manager"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(host.controller.pki.ca_certificate)
    context.load_cert_chain(paths.certificate, paths.key)
    context.set_alpn_protocols(["h2"])
    held: list[socket.socket] = []
    try:
        with Latency(host) as bystander:
            held += [socket.create_connection(host.address) for _ in range(300)]
            for _ in range(100):
                sock = socket.create_connection(host.address)
                sock.sendall(hello[: len(hello) // 2])
                held.append(sock)
            for _ in range(50):
                held.append(context.wrap_socket(socket.create_connection(host.address), server_hostname="localhost"))
            generator = random.Random(7)
            for index in range(50):
                with socket.create_connection(host.address, timeout=10) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if index % 2 else generator.randbytes(512))
                    assert hung_up(sock), "the server kept a connection that did not speak TLS"
            time.sleep(0.5)
        assert bystander.errors == [] and bystander.calls > 0
        assert bystander.slowest < 2.0, f"a bystander's call took {bystander.slowest:.2f} s"
        assert host.fd_count() >= fds + 450  # the held connections are really open at the server
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: host.fd_count() <= fds + 4, what="the controller to close the held connections", timeout=10)
    host.settled(before, [], ignore=bystander.made)  # nothing else reached a handler: no other record


@pytest.mark.slow
def test_stalled_connections_are_cut_off_by_the_server(host: Host, before: Before) -> None:
    """What bounds a slow client's hold on a connection: grpc's own timeouts (about 2 minutes here).

    Nothing in the controller limits connections per peer, so these timeouts and RLIMIT_NOFILE are what
    stand between a peer without any certificate and the controller's descriptors (docs/reliability.md).
    """
    paths = host.controller.pki.clients["instance-manager"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(host.controller.pki.ca_certificate)
    context.load_cert_chain(paths.certificate, paths.key)
    context.set_alpn_protocols(["h2"])
    stalled = {"silent": socket.create_connection(host.address),
               "half-a-client-hello": socket.create_connection(host.address),
               "tls-without-http2-preface": context.wrap_socket(socket.create_connection(host.address),
                                                                server_hostname="localhost")}
    hello = client_hello()
    stalled["half-a-client-hello"].sendall(hello[: len(hello) // 2])
    started = time.monotonic()
    closed: dict[str, float] = {}
    try:
        while len(closed) < len(stalled) and time.monotonic() - started < 200:
            for name, sock in stalled.items():
                if name not in closed and hung_up_within(sock, 0.5):
                    closed[name] = time.monotonic() - started
    finally:
        for sock in stalled.values():
            sock.close()
    print(f"\nstalled connections closed by the server after (s): { {k: round(v) for k, v in closed.items()} }")
    assert set(closed) == set(stalled), f"still open after 200 s: {set(stalled) - set(closed)}"
    assert all(seconds < 150 for seconds in closed.values()), closed
    host.settled(before, [])


def hung_up_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed ``sock`` (read to the end, ignoring what it sent) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def hung_up(sock: socket.socket) -> bool:
    """Read until the server closes the connection (at most 10 s); it may send a TLS alert first."""
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _stall_until(release: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until released, then ends without a message."""
    release.wait(60)
    return
    yield b""  # a generator


def test_a_few_callers_stalled_mid_request_leave_the_others_served(host: Host, before: Before) -> None:
    """Four streams that send their headers and never their request message, on one connection."""
    stalls = 4
    assert stalls < WORKERS
    release = threading.Event()
    ca = load_ca(host.controller.pki.directory)
    stranger = issue_client_cert(ca, None)  # not even a principal: refused, if it ever reached the handler
    with host.new_channel(cert=stranger.certificate_pem, key=stranger.private_key_pem()) as channel:
        calls = [channel.stream_unary(SERVICE + "ListInstances").future(_stall_until(release))
                 for _ in range(stalls)]
        try:
            time.sleep(0.5)
            started = time.monotonic()
            host.stub().ListInstances(pb.ListInstancesRequest(), timeout=5)
            assert time.monotonic() - started < 1.0
        finally:
            release.set()
        for call in calls:
            error = call.exception(timeout=20)
            assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "requires exactly one request message" in error.details()
    # The proper call is the one record: the stalled streams were refused before the pipeline ran
    # (controller/grpc_service.py, unary_on_pool), as the synchronous grpc server refused them.
    host.settled(before, [(IM, "ListInstances", ALLOWED, "OK")])


def test_callers_stalled_mid_request_do_not_starve_the_server(host: Host, before: Before) -> None:
    """D3 (issue 6 §3): four times as many stalled streams as the server has workers, from a client with no
    principal; a proper call is served at once, because a call waiting for its request holds no thread."""
    release = threading.Event()
    ca = load_ca(host.controller.pki.directory)
    stranger = issue_client_cert(ca, None)
    with host.new_channel(cert=stranger.certificate_pem, key=stranger.private_key_pem()) as channel:
        calls = [channel.stream_unary(SERVICE + "ListInstances").future(_stall_until(release))
                 for _ in range(4 * WORKERS)]
        try:
            time.sleep(0.5)
            started = time.monotonic()
            served = True
            try:
                host.stub().ListInstances(pb.ListInstancesRequest(), timeout=5)
            except grpc.RpcError as exc:
                served = exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED
            waited = time.monotonic() - started
        finally:
            release.set()
            for call in calls:
                call.exception(timeout=20)
    assert served and waited < 1.0, f"a proper call waited {waited:.1f} s behind {4 * WORKERS} stalled streams"
