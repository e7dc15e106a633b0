"""pvctl (controller/cli.py): parsing, output, errors, and the audit verifier.

Real components: a real grpcio server on 127.0.0.1 port 0 with mutual TLS (the development PKI that
``init_pki`` makes in a temporary directory, client certificate required) serving a *fake* HostController
that answers canned responses and errors and records what it received and who sent it; a real audit log
written by ``controller.audit.log.AuditLog`` in a temporary directory, served through ReadAuditLog as
``AuditRecord.encoded``.  pvctl runs in-process through ``main(argv, stdout=..., stderr=...)``; one test runs
it as a subprocess to see the real stderr (gRPC's C core writes there directly).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message

from controller import cli
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.audit.chain import CallRecord, CheckpointRecord, Decision, Outcome, decode
from controller.audit.checkpoint import CheckpointPolicy, CheckpointSigner
from controller.audit.log import HEAD_NAME, LOG_NAME, AuditLog, verify_directory
from controller.pki import DEFAULT_ROLES, PkiPaths, init_pki, principal_of, role_principal
from controller.policy import Method, load_default

ROOT = Path(__file__).resolve().parents[2]
INSTANCE = "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"
VOLUME = "11111111-2222-4333-9444-555555555555"
TOKEN = "aaaaaaaa-bbbb-4ccc-addd-eeeeeeeeeeee"
DIGEST = bytes(range(32))
SIGNATURE = bytes(range(64, 128))
UUID_LINE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# -- google.rpc messages, encoded by hand (independently of pvctl's decoder) ------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bad_request(*violations: tuple[str, str]) -> bytes:
    return b"".join(_field(1, _field(1, f.encode()) + _field(2, d.encode())) for f, d in violations)


def retry_info(seconds: int, nanos: int) -> bytes:
    return _field(1, _field(1, seconds) + _field(2, nanos))


def rpc_status(code: grpc.StatusCode, message: str, *details: tuple[str, bytes]) -> bytes:
    anys = b"".join(_field(3, _field(1, f"type.googleapis.com/{t}".encode()) + _field(2, v)) for t, v in details)
    return _field(1, code.value[0]) + _field(2, message.encode()) + anys


# -- the fake controller ------------------------------------------------------------------------------------------


@dataclass
class Failure:
    code: grpc.StatusCode
    details: str
    trailing: Sequence[tuple[str, str | bytes]] = ()
    times: int | None = None  # fail this many calls, then answer; None: fail every call


@dataclass
class Received:
    method: str
    request: Any  # the request message of ``method``
    principal: str | None
    time_remaining: float | None


def instance_info(state: pb.InstanceState = pb.INSTANCE_STATE_RUNNING) -> pb.InstanceInfo:
    return pb.InstanceInfo(
        instance_id=INSTANCE, state=state, vcpus=2, memory_mib=512, image_digest=DIGEST, host_cpus=[2, 3],
        volume_ids=[VOLUME], virtual_functions=[pb.PciAddress(domain=0, bus=3, device=0x10, function=2)])


def audit_record(line: bytes) -> pb.AuditRecord:
    """The decoded view of a stored line, as the controller serves it (the verifier uses ``encoded`` only)."""
    record = decode(line)
    message = pb.AuditRecord(sequence=record.sequence, prev_hash=record.prev_hash, record_hash=record.hash,
                             encoded=line)
    message.time.FromMilliseconds(record.time_ms)
    if isinstance(record, CheckpointRecord):
        message.kind = pb.AUDIT_RECORD_KIND_CHECKPOINT
        message.checkpoint.head_sequence = record.head_sequence
        message.checkpoint.head_hash = record.head_hash
        message.checkpoint.signature = record.signature
        return message
    assert isinstance(record, CallRecord)
    message.kind = pb.AuditRecordKind.Value(f"AUDIT_RECORD_KIND_{record.kind.value}")
    message.principal = record.principal
    message.method = record.method
    message.parameters.update(dict(record.params))
    message.decision = pb.AuditDecision.Value(f"AUDIT_DECISION_{record.decision.value}")
    message.outcome = "" if record.pending else record.outcome.value
    message.refers_to = record.refers_to or 0
    return message


@dataclass
class FakeController(pb_grpc.HostControllerServicer):
    responses: dict[str, Message] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    audit_lines: list[bytes] = field(default_factory=list)
    audit_page_cap: int = 7
    event_pages: list[pb.PollEventsResponse | Failure] = field(default_factory=list)
    list_pages: dict[str, pb.ListInstancesResponse] = field(default_factory=dict)  # by page_token, if any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _answer(self, method: str, request: Message, context: grpc.ServicerContext,
                make: Callable[[], Message] | None = None) -> Message:
        with self.lock:
            self.received.append(Received(method, request, principal_of(dict(context.auth_context())),
                                          context.time_remaining()))
        failure = self.failures.get(method)
        if failure is not None and failure.times is not None:
            failure.times -= 1
            if failure.times < 0:
                failure = None
        if failure is not None:
            if failure.trailing:
                context.set_trailing_metadata(tuple(failure.trailing))
            context.abort(failure.code, failure.details)
        return make() if make is not None else self.responses[method]

    def calls(self, method: str) -> list[Received]:
        return [r for r in self.received if r.method == method]

    def StartInstance(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("StartInstance", request, context)

    def StopInstance(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("StopInstance", request, context)

    def AttachVolume(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("AttachVolume", request, context)

    def DetachVolume(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("DetachVolume", request, context)

    def AssignVirtualFunction(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("AssignVirtualFunction", request, context)

    def ReleaseVirtualFunction(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("ReleaseVirtualFunction", request, context)

    def DescribeInstance(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("DescribeInstance", request, context)

    def ListInstances(self, request: Any, context: grpc.ServicerContext) -> Message:
        if not self.list_pages:
            return self._answer("ListInstances", request, context)
        return self._answer("ListInstances", request, context, lambda: self.list_pages[request.page_token])

    def GetHostIdentity(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("GetHostIdentity", request, context)

    def GetMetrics(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self._answer("GetMetrics", request, context)

    def ReadAuditLog(self, request: Any, context: grpc.ServicerContext) -> Message:
        def page() -> Message:
            first = max(1, request.from_sequence)
            count = min(request.max_records, self.audit_page_cap)
            lines = self.audit_lines[first - 1:first - 1 + count]
            return pb.ReadAuditLogResponse(records=[audit_record(line) if _decodes(line) else
                                                    pb.AuditRecord(sequence=first + i, encoded=line)
                                                    for i, line in enumerate(lines)],
                                           next_sequence=first + len(lines))

        return self._answer("ReadAuditLog", request, context, page)

    def PollEvents(self, request: Message, context: grpc.ServicerContext) -> Message:
        def page() -> Message:
            step = self.event_pages.pop(0) if self.event_pages else pb.PollEventsResponse()
            if isinstance(step, Failure):
                context.abort(step.code, step.details)
            assert isinstance(step, pb.PollEventsResponse)
            return step

        return self._answer("PollEvents", request, context, page)


def _decodes(line: bytes) -> bool:
    try:
        decode(line)
    except Exception:
        return False
    return True


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("cli") / "pki")


@dataclass
class Server:
    port: int
    fake: FakeController

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def server(pki: PkiPaths) -> Iterator[Server]:
    fake = FakeController()
    running = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_HostControllerServicer_to_server(fake, running)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_certificate.read_bytes())],
        root_certificates=pki.ca_certificate.read_bytes(), require_client_auth=True)
    port = running.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    running.start()
    yield Server(port, fake)
    running.stop(None)


def connect(pki: PkiPaths, server: Server, role: str = "instance-manager") -> list[str]:
    return ["--endpoint", server.endpoint, "--ca", str(pki.ca_certificate),
            "--cert", str(pki.clients[role].certificate), "--key", str(pki.clients[role].key)]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The single stderr line; fails unless stderr is exactly one line."""
        lines = self.err.splitlines()
        assert len(lines) == 1 and self.err.endswith("\n"), self.err
        return lines[0]

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def small_audit_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """pvctl asks for pages the fake serves whole: a short page is the head (ReadAuditLog's contract)."""
    monkeypatch.setattr(cli, "VERIFY_PAGE", FakeController.audit_page_cap)


def pvctl(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return Run(code, out.getvalue(), err.getvalue())


def start_args(*extra: str) -> list[str]:
    return ["start", INSTANCE, "--vcpus", "2", "--memory-mib", "512", "--image-digest", DIGEST.hex(),
            "--image-signature", SIGNATURE.hex(), *extra]


def start_with(option: str, value: str) -> list[str]:
    """``start_args()`` with one value replaced: the option's, or the instance id for ``INSTANCE_ID``."""
    argv = start_args()
    argv[1 if option == "INSTANCE_ID" else argv.index(option) + 1] = value
    return argv


@pytest.fixture(scope="module")
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate()


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory, signer: CheckpointSigner) -> Path:
    """A closed audit log with checkpoints inside it, written by the real AuditLog."""
    directory = tmp_path_factory.mktemp("audit")
    with AuditLog(directory, signer, durable=False, policy=CheckpointPolicy(every=5, interval=3600)) as log:
        for index in range(4):
            intent = log.begin(role_principal("instance-manager"), Method.START_INSTANCE.path,
                               {"instance_id": INSTANCE, "vcpus": str(index + 1)})
            log.finish(intent, Outcome.OK, {"state": "RUNNING"})
            log.append(role_principal("telemetry"), Method.START_INSTANCE.path, {}, Decision.DENIED,
                       Outcome.PERMISSION_DENIED)
    return directory


@pytest.fixture
def audit_lines(audit_dir: Path) -> list[bytes]:
    return (audit_dir / LOG_NAME).read_bytes().splitlines()


# -- parsing and validation: exit 2, one line, nothing sent ------------------------------------------------------


BAD_ARGUMENTS = [
    (["start", "not-a-uuid", "--vcpus", "2", "--memory-mib", "512", "--image-digest", DIGEST.hex(),
      "--image-signature", SIGNATURE.hex()], "INSTANCE_ID: 'not-a-uuid' is not a UUID"),
    (start_with("INSTANCE_ID", INSTANCE.upper()), f"not in canonical form; use {INSTANCE}"),
    (start_with("INSTANCE_ID", "0f1e2d3c-4b5a-4978-ca6b-5c4d3e2f1a0b"), "not an RFC 9562 UUID"),
    (start_with("--image-digest", "abcd"), "expected 64 hex digits, got 4"),
    (start_with("--image-signature", "zz" * 64), "not all hex digits"),
    (start_with("--vcpus", "0"), "--vcpus: must not be zero or empty"),
    (start_with("--vcpus", "129"), "--vcpus: must be at most 128, got 129"),
    (start_with("--vcpus", "-1"), "argument --vcpus: '-1' is not a non-negative decimal"),
    (start_with("--vcpus", "1_0"), "is not a non-negative decimal integer"),
    (start_with("--memory-mib", "63"), "--memory-mib: must be at least 64, got 63"),
    (start_args("--client-token", "nope"), "argument --client-token: 'nope' is not a UUID"),
    (start_args()[:6], "the following arguments are required: --image-digest, --image-signature"),
    (["stop", INSTANCE, "--force", "--timeout", "3"], "argument --timeout: not allowed with argument --force"),
    (["stop", INSTANCE, "--timeout", "0"], "argument --timeout: 0 is not in 1..600"),
    (["stop", INSTANCE, "--timeout", "601"], "argument --timeout: 601 is not in 1..600"),
    (["assign-vf", INSTANCE, "--pf", "03:00.0", "--mac", "02:00:00:00:00:01"], "is not a PCI address"),
    (["assign-vf", INSTANCE, "--pf", "0000:03:20.0", "--mac", "02:00:00:00:00:01"], "device number is 00..1f"),
    (["assign-vf", INSTANCE, "--pf", "0000:03:00.8", "--mac", "02:00:00:00:00:01"], "is not a PCI address"),
    (["assign-vf", INSTANCE, "--pf", "0000:03:00.0", "--mac", "03:00:00:00:00:01"], "is a multicast address"),
    (["assign-vf", INSTANCE, "--pf", "0000:03:00.0", "--mac", "00:00:00:00:00:00"], "is all zero"),
    (["assign-vf", INSTANCE, "--pf", "0000:03:00.0", "--mac", "02-00-00-00-00-01"], "is not a MAC address"),
    (["assign-vf", INSTANCE, "--pf", "0000:03:00.0", "--mac", "02:00:00:00:00:01", "--vlan", "4096"],
     "argument --vlan: 4096 is not in 0..4095"),
    (["release-vf", INSTANCE], "the following arguments are required: --vf"),
    (["attach", INSTANCE], "the following arguments are required: VOLUME_ID"),
    (["events", "--max", "65"], "argument --max: 65 is not in 1..64"),
    (["audit", "read", "--max", "1001"], "argument --max: 1001 is not in 1..1000"),
    (["audit"], "audit: the following arguments are required: ACTION"),
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
    (["--timeout", "0", "list"], "argument --timeout: '0' is not a number of seconds"),
    (["--timeout", "nan", "list"], "argument --timeout: 'nan' is not a number of seconds"),
    (["--endpoint", "localhost", "list"], "argument --endpoint: 'localhost' is not HOST:PORT"),
    (["--endpoint", "localhost:70000", "list"], "is not HOST:PORT with a port in 1..65535"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_ARGUMENTS, ids=[" ".join(a)[:60] for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_usage_line_and_nothing_is_sent(
        pki: PkiPaths, server: Server, argv: list[str], expected: str) -> None:
    # Connection options are valid and the server runs: only the arguments are at fault.
    run = pvctl(*connect(pki, server), *argv) if not argv or argv[0] != "--endpoint" else pvctl(*argv)
    assert run.code == cli.EXIT_USAGE
    assert run.out == ""
    assert run.error_line.startswith("pvctl: usage: ")
    assert expected in run.error_line
    assert server.fake.received == []


def test_help_exits_zero() -> None:
    with pytest.raises(SystemExit) as caught:  # argparse prints help itself
        cli.build_parser().parse_args(["--help"])
    assert caught.value.code == 0
    assert pvctl("--help").code == cli.EXIT_OK


def test_connection_options_are_required_for_a_call(server: Server) -> None:
    run = pvctl("list")
    assert run.code == cli.EXIT_USAGE
    assert run.error_line == "pvctl: usage: missing --endpoint, --ca, --cert, --key (or give --dev DIR)"


def test_role_without_dev_is_a_usage_error(pki: PkiPaths, server: Server) -> None:
    run = pvctl(*connect(pki, server), "--role", "auditor", "list")
    assert run.code == cli.EXIT_USAGE
    assert "--role chooses an identity of --dev DIR" in run.error_line
    assert server.fake.received == []


def test_a_client_key_others_can_read_is_refused_without_showing_it(
        pki: PkiPaths, server: Server, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    content = pki.clients["instance-manager"].key.read_bytes()
    key.write_bytes(content)
    key.chmod(0o644)
    argv = connect(pki, server)
    argv[argv.index("--key") + 1] = str(key)
    run = pvctl(*argv, "list")
    assert run.code == cli.EXIT_USAGE
    assert "client key:" in run.error_line and "0644" in run.error_line
    assert b"PRIVATE" not in run.err.encode() and content[40:80].decode() not in run.err
    assert server.fake.received == []


def test_options_may_follow_the_subcommand(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["ListInstances"] = pb.ListInstancesResponse()
    run = pvctl("list", "--json", *connect(pki, server))
    assert run.code == 0, run.err
    assert run.json() == {"instances": []}


# -- pki init ----------------------------------------------------------------------------------------------------


def test_pki_init_creates_the_layout_and_prints_the_paths(tmp_path: Path) -> None:
    directory = tmp_path / "dev-pki"
    run = pvctl("pki", "init", str(directory))
    assert run.code == 0, run.err
    assert run.err == ""
    expected = PkiPaths.of(directory)
    assert expected.ca_certificate.is_file() and stat.S_IMODE(expected.ca_key.stat().st_mode) == 0o600
    for role in DEFAULT_ROLES:
        client = expected.clients[role]
        assert client.certificate.is_file() and stat.S_IMODE(client.key.stat().st_mode) == 0o600
        assert f"role        {role} {client.certificate} {client.key}" in run.out.splitlines()
    assert f"ca          {expected.ca_certificate}" in run.out.splitlines()
    assert "PRIVATE KEY" not in run.out


def test_pki_init_json_and_refusal_to_overwrite(tmp_path: Path) -> None:
    directory = tmp_path / "dev-pki"
    run = pvctl("pki", "init", str(directory), "--json")
    assert run.code == 0
    document = run.json()
    paths = PkiPaths.of(directory)
    assert document["ca"] == str(paths.ca_certificate)
    assert document["server"] == {"cert": str(paths.server_certificate), "key": str(paths.server_key)}
    assert document["roles"] == {r: {"cert": str(c.certificate), "key": str(c.key)} for r, c in paths.clients.items()}
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    again = pvctl("pki", "init", str(directory))
    assert again.code == cli.EXIT_FAILED
    assert again.out == ""
    assert again.error_line.startswith("pvctl: pki init: ")
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before


# -- instance lifecycle ------------------------------------------------------------------------------------------


def test_start_generates_a_token_prints_it_and_sends_the_parsed_request(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["StartInstance"] = pb.StartInstanceResponse(instance=instance_info())
    run = pvctl(*connect(pki, server), *start_args())
    assert run.code == 0, run.err
    assert run.err == ""
    lines = run.out.splitlines()
    token = lines[0].removeprefix("client_token ")
    assert UUID_LINE.fullmatch(token)
    assert lines[1:] == [
        f"instance   {INSTANCE}",
        "state      RUNNING",
        "vcpus      2",
        "memory     512 MiB",
        f"image      sha256:{DIGEST.hex()}",
        "host_cpus  2,3",
        f"volumes    {VOLUME}",
        "vfs        0000:03:10.2",
    ]
    [call] = server.fake.received
    assert call.principal == role_principal("instance-manager")
    assert call.request == pb.StartInstanceRequest(client_token=token, instance_id=INSTANCE, vcpus=2,
                                                   memory_mib=512, image_digest=DIGEST, image_signature=SIGNATURE)
    assert call.time_remaining is not None and 25 < call.time_remaining <= cli.DEFAULT_DEADLINE


def test_start_json_is_one_document_with_the_token(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["StartInstance"] = pb.StartInstanceResponse(instance=instance_info())
    run = pvctl("--json", "--timeout", "5", *connect(pki, server), *start_args("--client-token", TOKEN))
    assert run.code == 0, run.err
    document = run.json()
    assert document["client_token"] == TOKEN
    instance = document["instance"]
    assert instance["instance_id"] == INSTANCE and instance["state"] == "INSTANCE_STATE_RUNNING"
    assert instance["memory_mib"] == 512 and instance["host_cpus"] == [2, 3]
    assert base64.b64decode(instance["image_digest"]) == DIGEST
    assert instance["virtual_functions"] == [{"domain": 0, "bus": 3, "device": 16, "function": 2}]
    [call] = server.fake.received
    assert call.request.client_token == TOKEN
    assert call.time_remaining is not None and call.time_remaining <= 5


def test_every_start_without_a_token_gets_a_fresh_one(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["StartInstance"] = pb.StartInstanceResponse(instance=instance_info())
    for _ in range(2):
        assert pvctl(*connect(pki, server), *start_args()).code == 0
    tokens = {call.request.client_token for call in server.fake.received}
    assert len(tokens) == 2


def test_stop_graceful_by_default_with_room_in_the_deadline(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["StopInstance"] = pb.StopInstanceResponse(
        instance=instance_info(pb.INSTANCE_STATE_STOPPED))
    run = pvctl(*connect(pki, server), "stop", INSTANCE)
    assert run.code == 0, run.err
    assert "state      STOPPED" in run.out.splitlines()
    [call] = server.fake.received
    request: Any = call.request
    assert (request.mode, request.timeout_seconds) == (pb.STOP_MODE_GRACEFUL, cli.DEFAULT_STOP_TIMEOUT)
    assert call.time_remaining is not None and call.time_remaining > cli.DEFAULT_STOP_TIMEOUT + 20


def test_stop_force_and_explicit_timeout(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["StopInstance"] = pb.StopInstanceResponse(instance=instance_info())
    assert pvctl(*connect(pki, server), "stop", INSTANCE, "--force").code == 0
    assert pvctl(*connect(pki, server), "stop", INSTANCE, "--timeout", "120").code == 0
    force, graceful = (call.request for call in server.fake.received)
    assert (force.mode, force.timeout_seconds) == (pb.STOP_MODE_FORCE, 0)
    assert (graceful.mode, graceful.timeout_seconds) == (pb.STOP_MODE_GRACEFUL, 120)
    assert server.fake.received[1].time_remaining is not None
    assert server.fake.received[1].time_remaining > 120


def test_describe_and_list(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["DescribeInstance"] = pb.DescribeInstanceResponse(instance=instance_info())
    server.fake.responses["ListInstances"] = pb.ListInstancesResponse(instances=[
        pb.InstanceSummary(instance_id=INSTANCE, state=pb.INSTANCE_STATE_RUNNING, vcpus=2, memory_mib=512),
        pb.InstanceSummary(instance_id=VOLUME, state=cast(Any, 99), vcpus=4, memory_mib=1024),
    ])
    described = pvctl(*connect(pki, server), "describe", INSTANCE)
    assert described.code == 0 and described.out.splitlines()[0] == f"instance   {INSTANCE}"
    assert server.fake.received[0].request == pb.DescribeInstanceRequest(instance_id=INSTANCE)
    listed = pvctl(*connect(pki, server), "list")
    assert listed.out.splitlines() == [
        f"{INSTANCE} RUNNING vcpus=2 memory_mib=512",
        f"{VOLUME} UNKNOWN(99) vcpus=4 memory_mib=1024",  # an enum value newer than this client
    ]
    as_json = pvctl(*connect(pki, server), "list", "--json").json()
    assert as_json["instances"][0] == {"instance_id": INSTANCE, "state": "INSTANCE_STATE_RUNNING", "vcpus": 2,
                                       "memory_mib": 512}
    server.fake.responses["ListInstances"] = pb.ListInstancesResponse()
    assert pvctl(*connect(pki, server), "list").out == "(no instances)\n"
    assert [r.request for r in server.fake.calls("ListInstances")][-1] == pb.ListInstancesRequest(page_size=256)


def _summaries(first: int, count: int) -> list[pb.InstanceSummary]:
    return [pb.InstanceSummary(instance_id=f"{i:08x}-0000-4000-8000-000000000000", state=pb.INSTANCE_STATE_RUNNING,
                               vcpus=1, memory_mib=64) for i in range(first, first + count)]


def test_list_walks_every_page(pki: PkiPaths, server: Server) -> None:
    first, second, third = _summaries(0, 256), _summaries(256, 256), _summaries(512, 3)
    server.fake.list_pages = {
        "": pb.ListInstancesResponse(instances=first, next_page_token=first[-1].instance_id),
        first[-1].instance_id: pb.ListInstancesResponse(instances=second, next_page_token=second[-1].instance_id),
        second[-1].instance_id: pb.ListInstancesResponse(instances=third),
    }
    listed = pvctl(*connect(pki, server), "list", "--json").json()
    assert [i["instance_id"] for i in listed["instances"]] == [s.instance_id for s in first + second + third]
    assert "next_page_token" not in listed
    assert [r.request for r in server.fake.calls("ListInstances")] == [
        pb.ListInstancesRequest(page_size=256),
        pb.ListInstancesRequest(page_size=256, page_token=first[-1].instance_id),
        pb.ListInstancesRequest(page_size=256, page_token=second[-1].instance_id),
    ]
    text = pvctl(*connect(pki, server), "list").out.splitlines()
    assert len(text) == 515 and text[-1] == f"{third[-1].instance_id} RUNNING vcpus=1 memory_mib=64"


def test_list_refuses_a_server_whose_pages_do_not_move_forward(pki: PkiPaths, server: Server) -> None:
    page = _summaries(5, 2)
    server.fake.list_pages = {
        "": pb.ListInstancesResponse(instances=page, next_page_token=page[-1].instance_id),
        page[-1].instance_id: pb.ListInstancesResponse(instances=page, next_page_token=page[0].instance_id),
    }
    run = pvctl(*connect(pki, server), "list")
    assert run.code == cli.EXIT_FAILED
    assert "does not move forward" in run.error_line and run.out == ""
    assert len(server.fake.calls("ListInstances")) == 2


# -- volumes and virtual functions -------------------------------------------------------------------------------


def test_attach_sends_the_envelope_and_never_shows_it(pki: PkiPaths, server: Server, tmp_path: Path) -> None:
    envelope = os.urandom(200)
    (tmp_path / "envelope").write_bytes(envelope)
    server.fake.responses["AttachVolume"] = pb.AttachVolumeResponse(
        instance_id=INSTANCE, volume_id=VOLUME, state=pb.VOLUME_STATE_ATTACHED)
    for extra in ([], ["--json"]):
        run = pvctl(*connect(pki, server, "volume-attacher"), "attach", INSTANCE, VOLUME, "--read-only",
                    "--envelope-file", str(tmp_path / "envelope"), *extra)
        assert run.code == 0, run.err
        for shown in (envelope.hex(), base64.b64encode(envelope).decode(), envelope[:8].hex()):
            assert shown not in run.out + run.err
    human = pvctl(*connect(pki, server, "volume-attacher"), "attach", INSTANCE, VOLUME)
    assert human.out.splitlines()[1] == f"volume {VOLUME} ATTACHED instance {INSTANCE}"
    first, _, third = (call.request for call in server.fake.received)
    assert isinstance(first, pb.AttachVolumeRequest) and isinstance(third, pb.AttachVolumeRequest)
    assert (first.envelope, first.read_only, first.volume_id) == (envelope, True, VOLUME)
    assert (third.envelope, third.read_only) == (b"", False)


def test_an_oversized_envelope_is_refused_before_sending(pki: PkiPaths, server: Server, tmp_path: Path) -> None:
    (tmp_path / "envelope").write_bytes(b"\x01" * (cli.MAX_ENVELOPE + 1))
    run = pvctl(*connect(pki, server), "attach", INSTANCE, VOLUME, "--envelope-file", str(tmp_path / "envelope"))
    assert run.code == cli.EXIT_USAGE
    assert f"is larger than {cli.MAX_ENVELOPE} bytes" in run.error_line
    assert server.fake.received == []


def test_detach(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["DetachVolume"] = pb.DetachVolumeResponse(
        instance_id=INSTANCE, volume_id=VOLUME, state=pb.VOLUME_STATE_DETACHED)
    run = pvctl(*connect(pki, server, "volume-attacher"), "detach", INSTANCE, VOLUME, "--client-token", TOKEN)
    assert run.out.splitlines() == [f"client_token {TOKEN}", f"volume {VOLUME} DETACHED instance {INSTANCE}"]
    assert server.fake.received[0].request == pb.DetachVolumeRequest(client_token=TOKEN, instance_id=INSTANCE,
                                                                     volume_id=VOLUME)


def test_assign_and_release_virtual_functions(pki: PkiPaths, server: Server) -> None:
    vf = pb.PciAddress(domain=0, bus=3, device=0x10, function=2)
    server.fake.responses["AssignVirtualFunction"] = pb.AssignVirtualFunctionResponse(
        instance_id=INSTANCE, virtual_function=vf, vf_index=2, state=pb.VIRTUAL_FUNCTION_STATE_ASSIGNED)
    server.fake.responses["ReleaseVirtualFunction"] = pb.ReleaseVirtualFunctionResponse(
        instance_id=INSTANCE, virtual_function=vf, vf_index=2, state=pb.VIRTUAL_FUNCTION_STATE_RELEASED)
    network = connect(pki, server, "network-manager")
    assigned = pvctl(*network, "assign-vf", INSTANCE, "--pf", "0000:3B:00.1", "--mac", "02:AB:cd:00:00:01",
                     "--vlan", "42")
    assert assigned.code == 0, assigned.err
    assert assigned.out.splitlines()[1] == f"virtual_function 0000:03:10.2 vf_index=2 ASSIGNED instance {INSTANCE}"
    released = pvctl(*network, "release-vf", INSTANCE, "--vf", "0000:03:10.2", "--json")
    assert released.json()["state"] == "VIRTUAL_FUNCTION_STATE_RELEASED"
    assign, release = (call.request for call in server.fake.received)
    assert isinstance(assign, pb.AssignVirtualFunctionRequest) and isinstance(release, pb.ReleaseVirtualFunctionRequest)
    assert assign.physical_function == pb.PciAddress(domain=0, bus=0x3B, device=0, function=1)
    assert (assign.mac, assign.vlan) == (bytes.fromhex("02abcd000001"), 42)
    assert release.virtual_function == vf


# -- errors from the server --------------------------------------------------------------------------------------


def test_permission_denied_is_one_line_with_the_code(pki: PkiPaths, server: Server) -> None:
    server.fake.failures["DescribeInstance"] = Failure(grpc.StatusCode.PERMISSION_DENIED,
                                                       "spiffe://controlplane/telemetry may not call DescribeInstance")
    run = pvctl(*connect(pki, server, "telemetry"), "describe", INSTANCE)
    assert run.code == cli.EXIT_FAILED
    assert run.out == ""
    assert run.error_line == ("pvctl: PERMISSION_DENIED: spiffe://controlplane/telemetry may not call "
                              "DescribeInstance")


def test_a_failed_mutating_call_names_its_token_for_a_retry(pki: PkiPaths, server: Server) -> None:
    server.fake.failures["StartInstance"] = Failure(grpc.StatusCode.UNAVAILABLE, "the agent is unreachable")
    run = pvctl(*connect(pki, server), *start_args())
    assert run.code == cli.EXIT_FAILED
    token = server.fake.received[0].request.client_token
    assert run.error_line.startswith("pvctl: UNAVAILABLE: the agent is unreachable; ")
    assert f"retry with --client-token {token}" in run.error_line


def test_field_violations_from_grpc_status_details(pki: PkiPaths, server: Server) -> None:
    details = rpc_status(grpc.StatusCode.INVALID_ARGUMENT, "invalid request",
                         ("google.rpc.BadRequest", bad_request(("vcpus", "must be a multiple of 2"),
                                                               ("instance_id", "is in use"))))
    server.fake.failures["StartInstance"] = Failure(grpc.StatusCode.INVALID_ARGUMENT, "invalid request",
                                                    [(cli.STATUS_DETAILS_KEY, details)])
    run = pvctl(*connect(pki, server), *start_args("--client-token", TOKEN))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith(
        "pvctl: INVALID_ARGUMENT: invalid request; field violations: vcpus: must be a multiple of 2; "
        "instance_id: is in use; client token " + TOKEN)


def test_field_violations_from_the_passivisor_metadata_key(pki: PkiPaths, server: Server) -> None:
    server.fake.failures["DescribeInstance"] = Failure(
        grpc.StatusCode.INVALID_ARGUMENT, "invalid request",
        [(cli.FIELD_VIOLATIONS_KEY, bad_request(("instance_id", "unknown field #9")))])
    run = pvctl(*connect(pki, server), "describe", INSTANCE)
    assert run.error_line == "pvctl: INVALID_ARGUMENT: invalid request; field violations: instance_id: unknown field #9"


def test_retry_hint_and_hostile_details_stay_on_one_printable_line(pki: PkiPaths, server: Server) -> None:
    details = rpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x",
                         ("google.rpc.RetryInfo", retry_info(0, 250_000_000)))
    server.fake.failures["ListInstances"] = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                    "rate limited\n\x1b[2Jsecond line",
                                                    [(cli.STATUS_DETAILS_KEY, details)])
    run = pvctl(*connect(pki, server), "list")
    assert run.code == cli.EXIT_FAILED
    assert run.error_line == "pvctl: RESOURCE_EXHAUSTED: rate limited ?[2Jsecond line; retry after 0.250 s"


def test_paging_waits_out_a_short_rate_limit_but_a_single_call_does_not_retry(
        pki: PkiPaths, server: Server, signer: CheckpointSigner, audit_lines: list[bytes]) -> None:
    hint = [(cli.STATUS_DETAILS_KEY, rpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down",
                                                ("google.rpc.RetryInfo", retry_info(0, 10_000_000))))]
    server.fake.audit_lines = audit_lines
    server.fake.responses["GetHostIdentity"] = identity_response(signer)
    server.fake.failures["ReadAuditLog"] = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", hint, times=2)
    verified = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert verified.code == 0, verified.err
    assert len(server.fake.calls("ReadAuditLog")) == 2 + len(audit_lines) // server.fake.audit_page_cap + 1
    server.fake.failures["ReadAuditLog"] = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", hint, times=1)
    read = pvctl(*connect(pki, server, "auditor"), "audit", "read")
    assert read.error_line == "pvctl: RESOURCE_EXHAUSTED: slow down; retry after 0.010 s"
    # A hint longer than pvctl waits out ends the paging with the refusal.
    long_hint = [(cli.STATUS_DETAILS_KEY, rpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down",
                                                     ("google.rpc.RetryInfo", retry_info(60, 0))))]
    server.fake.failures["ReadAuditLog"] = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", long_hint)
    refused = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert refused.error_line == "pvctl: RESOURCE_EXHAUSTED: slow down; retry after 60.000 s"


def test_a_rate_limited_mutating_call_is_never_retried(pki: PkiPaths, server: Server) -> None:
    hint = [(cli.STATUS_DETAILS_KEY, rpc_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down",
                                                ("google.rpc.RetryInfo", retry_info(0, 1_000_000))))]
    server.fake.failures["StartInstance"] = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", hint, times=1)
    run = pvctl(*connect(pki, server), *start_args())
    assert run.code == cli.EXIT_FAILED
    assert len(server.fake.received) == 1


def test_status_details_for_another_code_or_malformed_are_ignored(pki: PkiPaths, server: Server) -> None:
    mismatched = rpc_status(grpc.StatusCode.NOT_FOUND, "x", ("google.rpc.BadRequest", bad_request(("a", "b"))))
    server.fake.failures["ListInstances"] = Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad",
                                                    [(cli.STATUS_DETAILS_KEY, mismatched)])
    assert pvctl(*connect(pki, server), "list").error_line == "pvctl: INVALID_ARGUMENT: bad"
    server.fake.failures["ListInstances"] = Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad",
                                                    [(cli.STATUS_DETAILS_KEY, b"\xff\xff\xff")])
    assert pvctl(*connect(pki, server), "list").error_line == "pvctl: INVALID_ARGUMENT: bad"


def test_no_server_is_unavailable(pki: PkiPaths, server: Server) -> None:
    argv = connect(pki, server)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    argv[1] = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, not listening: connection refused
    try:
        run = pvctl("--timeout", "5", *argv, "list")
    finally:
        probe.close()
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: UNAVAILABLE: ")


def test_a_server_name_the_certificate_does_not_hold_fails_the_handshake(pki: PkiPaths, server: Server) -> None:
    server.fake.responses["ListInstances"] = pb.ListInstancesResponse()
    assert pvctl(*connect(pki, server), "--server-name", "localhost", "list").code == 0
    run = pvctl("--timeout", "5", *connect(pki, server), "--server-name", "elsewhere.example", "list")
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: UNAVAILABLE: ")
    assert len(server.fake.received) == 1


def test_the_real_stderr_is_one_line(pki: PkiPaths, server: Server) -> None:
    server.fake.failures["ListInstances"] = Failure(grpc.StatusCode.PERMISSION_DENIED, "not in your policy")
    done = subprocess.run([sys.executable, "-m", "controller.cli", *connect(pki, server), "list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == cli.EXIT_FAILED
    assert done.stdout == ""
    assert done.stderr == "pvctl: PERMISSION_DENIED: not in your policy\n"


# -- identity, metrics, events -----------------------------------------------------------------------------------


def identity_response(signer: CheckpointSigner) -> pb.GetHostIdentityResponse:
    public = bytes(range(100, 132))
    return pb.GetHostIdentityResponse(public_key=public, fingerprint=hashlib.sha256(public).digest(),
                                      signing_public_key=signer.public_bytes())


def test_identity(pki: PkiPaths, server: Server, signer: CheckpointSigner) -> None:
    response = identity_response(signer)
    server.fake.responses["GetHostIdentity"] = response
    run = pvctl(*connect(pki, server, "auditor"), "identity")
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"public_key          {response.public_key.hex()}",
        f"fingerprint         {response.fingerprint.hex()}",
        f"signing_public_key  {signer.public_bytes().hex()}",
        f"signing_fingerprint {hashlib.sha256(signer.public_bytes()).hexdigest()}",
    ]
    document = pvctl(*connect(pki, server, "auditor"), "identity", "--json").json()
    assert base64.b64decode(document["fingerprint"]) == response.fingerprint


def test_identity_with_a_fingerprint_that_does_not_match_fails(
        pki: PkiPaths, server: Server, signer: CheckpointSigner) -> None:
    response = identity_response(signer)
    response.fingerprint = bytes(32)
    server.fake.responses["GetHostIdentity"] = response
    run = pvctl(*connect(pki, server, "auditor"), "identity")
    assert run.code == cli.EXIT_FAILED
    assert run.out == ""
    assert run.error_line.startswith("pvctl: identity: the controller's fingerprint is not the SHA-256")


def test_metrics(pki: PkiPaths, server: Server) -> None:
    text = "# HELP calls_total Calls.\n# TYPE calls_total counter\ncalls_total{code=\"OK\"} 3.0\n"
    server.fake.responses["GetMetrics"] = pb.GetMetricsResponse(text=text, content_type="text/plain; version=0.0.4")
    run = pvctl(*connect(pki, server, "telemetry"), "metrics")
    assert run.out == text
    assert pvctl(*connect(pki, server, "telemetry"), "metrics", "--json").json() == {
        "text": text, "content_type": "text/plain; version=0.0.4"}


def event(cursor: int, kind: pb.EventKind, instance: str = INSTANCE,
          reason: pb.EventReason = pb.EVENT_REASON_REQUESTED) -> pb.Event:
    message = pb.Event(cursor=cursor, kind=kind, instance_id=instance, reason=reason)
    message.time.FromMilliseconds(1_700_000_000_123 + cursor)
    return message


def test_events_one_poll(pki: PkiPaths, server: Server) -> None:
    server.fake.event_pages = [pb.PollEventsResponse(events=[
        event(4, pb.EVENT_KIND_INSTANCE_STARTED),
        event(5, pb.EVENT_KIND_AGENT_RESTARTED, "", pb.EVENT_REASON_UNSPECIFIED),
    ], next_cursor=5)]
    run = pvctl(*connect(pki, server, "telemetry"), "events", "--after", "3", "--max", "10")
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"4 2023-11-14T22:13:20.127Z INSTANCE_STARTED {INSTANCE} REQUESTED",
        "5 2023-11-14T22:13:20.128Z AGENT_RESTARTED - UNSPECIFIED",
        "next_cursor 5",
    ]
    assert server.fake.received[0].request == pb.PollEventsRequest(after_cursor=3, max_events=10)


def test_events_follow_polls_from_the_cursor_until_the_server_fails(pki: PkiPaths, server: Server) -> None:
    server.fake.event_pages = [
        pb.PollEventsResponse(events=[event(1, pb.EVENT_KIND_INSTANCE_STARTED)], next_cursor=1),
        pb.PollEventsResponse(next_cursor=1),
        pb.PollEventsResponse(events=[event(2, pb.EVENT_KIND_INSTANCE_EXITED, reason=pb.EVENT_REASON_GUEST_POWEROFF)],
                              next_cursor=2),
        Failure(grpc.StatusCode.UNAVAILABLE, "controller stopping"),
    ]
    run = pvctl(*connect(pki, server, "telemetry"), "events", "--follow", "--json", "--poll-interval", "0.01")
    assert run.code == cli.EXIT_FAILED
    assert run.error_line == "pvctl: UNAVAILABLE: controller stopping"
    documents = [json.loads(line) for line in run.out.splitlines()]  # JSON Lines: one event each
    assert [(d["cursor"], d["kind"]) for d in documents] == [("1", "EVENT_KIND_INSTANCE_STARTED"),
                                                              ("2", "EVENT_KIND_INSTANCE_EXITED")]
    cursors = [call.request.after_cursor for call in server.fake.received]
    assert cursors == [0, 1, 1, 2]


# -- audit -------------------------------------------------------------------------------------------------------


def test_audit_read(pki: PkiPaths, server: Server, audit_lines: list[bytes]) -> None:
    server.fake.audit_lines = audit_lines
    third = decode(audit_lines[2])  # 1 is the genesis checkpoint, 2 the AuditLogOpened record
    assert isinstance(third, CallRecord) and third.pending
    run = pvctl(*connect(pki, server, "auditor"), "audit", "read", "--from", "3", "--max", "3")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert len(lines) == 4 and lines[-1] == "next_sequence 6"
    time = datetime.datetime.fromtimestamp(third.time_ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    assert lines[0] == (f"3 {time[:-3]}Z CALL spiffe://controlplane/instance-manager "
                        f"/passivisor.v1.HostController/StartInstance ALLOWED PENDING instance_id={INSTANCE} vcpus=1")
    assert " OUTCOME spiffe://controlplane/instance-manager " in lines[1]
    assert lines[1].endswith(" ALLOWED OK refers_to=3 state=RUNNING")
    assert lines[2].endswith(" DENIED PERMISSION_DENIED")
    assert server.fake.received[0].request == pb.ReadAuditLogRequest(from_sequence=3, max_records=3)
    document = pvctl(*connect(pki, server, "auditor"), "audit", "read", "--json", "--max", "1").json()
    assert document["next_sequence"] == "2"
    assert base64.b64decode(document["records"][0]["encoded"]) == audit_lines[0]
    assert document["records"][0]["kind"] == "AUDIT_RECORD_KIND_CHECKPOINT"


def test_audit_verify_online_passes_on_an_intact_log(
        pki: PkiPaths, server: Server, signer: CheckpointSigner, audit_dir: Path, audit_lines: list[bytes]) -> None:
    server.fake.audit_lines = audit_lines
    server.fake.responses["GetHostIdentity"] = identity_response(signer)
    expected = verify_directory(audit_dir, signer.public_key)
    assert expected.checkpoints > 2  # checkpoints inside the log, not only the genesis and the final one
    run = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert run.code == 0, run.err
    assert run.out.splitlines()[0] == (f"audit chain OK: {expected.records} records, last checkpoint at "
                                       f"{expected.last_checkpoint}")
    assert f"sha256:{hashlib.sha256(signer.public_bytes()).hexdigest()} (GetHostIdentity)" in run.out
    reads = server.fake.calls("ReadAuditLog")
    assert len(reads) == len(audit_lines) // server.fake.audit_page_cap + 1  # paged to the first short page
    assert [r.request.from_sequence for r in reads][:3] == [1, 8, 15]
    document = pvctl(*connect(pki, server, "auditor"), "audit", "verify", "--json").json()
    assert document["ok"] is True and document["records"] == expected.records
    assert document["last_checkpoint"] == expected.last_checkpoint


def _tampered(lines: list[bytes], how: str) -> tuple[list[bytes], int]:
    """The log damaged one way, and the sequence number verification must name."""
    lines = list(lines)
    target = next(i for i, line in enumerate(lines) if i > 2 and b'"kind":"CALL"' in line
                  and b"instance-manager" in line)
    if how == "edit":
        edited = lines[target].replace(b"instance-manager", b"instance-managex", 1)
        assert edited != lines[target]
        lines[target] = edited
    elif how == "delete":
        del lines[target]
    elif how == "swap":
        lines[target], lines[target + 1] = lines[target + 1], lines[target]
    return lines, target + 1


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_audit_verify_online_names_the_first_bad_record(
        pki: PkiPaths, server: Server, signer: CheckpointSigner, audit_lines: list[bytes], how: str) -> None:
    server.fake.audit_lines, bad = _tampered(audit_lines, how)
    server.fake.responses["GetHostIdentity"] = identity_response(signer)
    run = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert run.code == cli.EXIT_FAILED
    assert run.out == ""
    assert run.error_line.startswith(f"pvctl: audit verify: audit record {bad}: ")
    document = pvctl(*connect(pki, server, "auditor"), "audit", "verify", "--json")
    assert document.code == cli.EXIT_FAILED
    assert document.json()["ok"] is False and document.json()["sequence"] == bad


def test_audit_verify_with_a_byte_changed_in_one_line(
        pki: PkiPaths, server: Server, signer: CheckpointSigner, audit_lines: list[bytes]) -> None:
    lines = list(audit_lines)
    index = 9
    changed = bytearray(lines[index])
    position = changed.index(b'"time_ms":') + len(b'"time_ms":') + 3
    changed[position] = ord("0") if changed[position] != ord("0") else ord("1")
    lines[index] = bytes(changed)
    server.fake.audit_lines = lines
    server.fake.responses["GetHostIdentity"] = identity_response(signer)
    run = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith(f"pvctl: audit verify: audit record {index + 1}: ")
    assert "edited" in run.error_line


def test_audit_verify_refuses_a_key_that_did_not_sign_the_log(
        pki: PkiPaths, server: Server, audit_lines: list[bytes]) -> None:
    server.fake.audit_lines = audit_lines
    server.fake.responses["GetHostIdentity"] = identity_response(CheckpointSigner.generate())
    run = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: audit verify: audit record 1: checkpoint signed by another key")


def test_audit_verify_of_an_empty_log_fails(pki: PkiPaths, server: Server, signer: CheckpointSigner) -> None:
    server.fake.responses["GetHostIdentity"] = identity_response(signer)
    run = pvctl(*connect(pki, server, "auditor"), "audit", "verify")
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: audit verify: audit record 1: the log holds no records")


def write_key_file(path: Path, signer: CheckpointSigner) -> Path:
    path.write_text(signer.public_bytes().hex() + "\n")
    return path


def test_audit_verify_offline(tmp_path: Path, signer: CheckpointSigner, audit_dir: Path) -> None:
    key = write_key_file(tmp_path / "signing.hex", signer)
    expected = verify_directory(audit_dir, signer.public_key)
    run = pvctl("audit", "verify", "--file", str(audit_dir / LOG_NAME), "--public-key", str(key),
                "--head", str(audit_dir / HEAD_NAME))
    assert run.code == 0, run.err
    assert run.out.splitlines()[0] == (f"audit chain OK: {expected.records} records, last checkpoint at "
                                       f"{expected.last_checkpoint}")
    missing_key = pvctl("audit", "verify", "--file", str(audit_dir / LOG_NAME))
    assert missing_key.code == cli.EXIT_USAGE
    assert "needs --public-key" in missing_key.error_line


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_audit_verify_offline_names_the_first_bad_record(
        tmp_path: Path, signer: CheckpointSigner, audit_lines: list[bytes], how: str) -> None:
    lines, bad = _tampered(audit_lines, how)
    (tmp_path / LOG_NAME).write_bytes(b"".join(line + b"\n" for line in lines))
    run = pvctl("audit", "verify", "--file", str(tmp_path / LOG_NAME), "--public-key",
                str(write_key_file(tmp_path / "key.hex", signer)))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith(f"pvctl: audit verify: audit record {bad}: ")


def test_audit_verify_offline_with_the_signed_head_detects_a_cut_tail(
        tmp_path: Path, signer: CheckpointSigner, audit_dir: Path, audit_lines: list[bytes]) -> None:
    kept = len(audit_lines) - 3
    (tmp_path / LOG_NAME).write_bytes(b"".join(line + b"\n" for line in audit_lines[:kept]))
    key = str(write_key_file(tmp_path / "key.hex", signer))
    without_head = pvctl("audit", "verify", "--file", str(tmp_path / LOG_NAME), "--public-key", key)
    assert without_head.code == 0  # a cut after the last checkpoint in the file: only the head shows it
    assert "give --head to also detect a cut tail" in without_head.out
    run = pvctl("audit", "verify", "--file", str(tmp_path / LOG_NAME), "--public-key", key,
                "--head", str(audit_dir / HEAD_NAME))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith(f"pvctl: audit verify: audit record {kept + 1}: ")
    assert "the tail was cut" in run.error_line


def test_audit_verify_offline_with_a_malformed_key_file(tmp_path: Path, audit_dir: Path) -> None:
    (tmp_path / "key.hex").write_text("not hex")
    run = pvctl("audit", "verify", "--file", str(audit_dir / LOG_NAME), "--public-key", str(tmp_path / "key.hex"))
    assert run.code == cli.EXIT_USAGE
    assert "must hold the Ed25519 public key as 64 hex digits" in run.error_line


# -- --dev DIR ---------------------------------------------------------------------------------------------------


@pytest.fixture
def dev_dir(tmp_path: Path, pki: PkiPaths, server: Server) -> Path:
    """A dev.json as ``pvctl dev up`` writes it, with paths relative to its directory."""
    directory = tmp_path / "dev"
    directory.mkdir()

    def relative(path: Path) -> str:
        return os.path.relpath(path, directory)

    document = {
        "endpoint": f"localhost:{server.port}",  # the DNS SAN of the server certificate
        "ca": relative(pki.ca_certificate),
        "roles": {role: {"cert": relative(c.certificate), "key": relative(c.key)} for role, c in pki.clients.items()},
        "agent_pid": 1, "controller_pid": 2, "agent_socket": "/nonexistent", "state_dir": "/nonexistent",
    }
    (directory / cli.DEV_FILE).write_text(json.dumps(document))
    return directory


def test_dev_picks_the_role_the_default_policy_allows(
        dev_dir: Path, server: Server, signer: CheckpointSigner, audit_lines: list[bytes]) -> None:
    server.fake.responses["ListInstances"] = pb.ListInstancesResponse()
    server.fake.responses["GetHostIdentity"] = identity_response(signer)
    server.fake.audit_lines = audit_lines
    assert pvctl("--dev", str(dev_dir), "list").code == 0
    assert pvctl("--dev", str(dev_dir), "identity").code == 0
    assert pvctl("--dev", str(dev_dir), "audit", "verify").code == 0
    principals = [(call.method, call.principal) for call in server.fake.received]
    assert principals[0] == ("ListInstances", role_principal("instance-manager"))
    assert principals[1] == ("GetHostIdentity", role_principal("volume-attacher"))
    assert {p for m, p in principals[2:]} == {role_principal("auditor")}


def test_dev_with_an_explicit_role(dev_dir: Path, server: Server) -> None:
    server.fake.responses["ListInstances"] = pb.ListInstancesResponse()
    assert pvctl("--dev", str(dev_dir), "--role", "telemetry", "list").code == 0
    assert server.fake.received[0].principal == role_principal("telemetry")
    run = pvctl("--dev", str(dev_dir), "--role", "operator", "list")
    assert run.code == cli.EXIT_USAGE
    assert "role 'operator' is not in" in run.error_line and "auditor, instance-manager" in run.error_line


def test_dev_with_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / cli.DEV_FILE).write_text('{"endpoint": "localhost:1", "ca": "ca.pem"}')
    run = pvctl("--dev", str(tmp_path), "list")
    assert run.code == cli.EXIT_USAGE
    assert "roles must be an object" in run.error_line
    (tmp_path / cli.DEV_FILE).write_text("[")
    assert "is not valid JSON" in pvctl("--dev", str(tmp_path), "list").error_line


def subcommands(parser: argparse.ArgumentParser) -> Iterator[Any]:
    """Every leaf subcommand's Command, nested ones (audit read, pki init) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                command = child.get_default("command")
                if command is not None:
                    yield command
                yield from subcommands(child)


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_every_method_has_a_subcommand_and_a_default_role_allowed_to_call_it(method: Method) -> None:
    covering = [c for c in subcommands(cli.build_parser()) if method in c.methods]
    assert covering, f"no subcommand calls {method.value}"
    role = cli.default_role([method], DEFAULT_ROLES)
    assert role is not None
    assert load_default().authorize_method(role_principal(role), method).allowed


def test_generated_tokens_are_canonical_for_the_contract() -> None:
    for _ in range(100):
        token = str(uuid.uuid4())
        assert cli.canonical_uuid(token) == token
