"""The controller end to end: real mTLS on port 0, a real controller process, a real agent (sim backend).

Every call goes through a TLS 1.3 channel with a client certificate from the
development PKI; the controller authenticates, authorizes, validates, rate
limits, audits and forwards to the agent over the authenticated channel.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.api.rpc_status import STATUS_DETAILS_KEY, decode_status
from controller.devhost import agenthost, controllerhost
from controller.pki import issue_client_cert, load_ca, new_ca

ROLES = ("instance-manager", "volume-attacher", "network-manager", "telemetry", "auditor")


@dataclass
class Host:
    agent: agenthost.AgentHost
    controller: controllerhost.ControllerHost
    endpoint: str

    def stub(self, role: str | None = None, *, cert: bytes | None = None, key: bytes | None = None) -> object:
        ca = self.controller.pki.ca_certificate.read_bytes()
        if role is not None:
            paths = self.controller.pki.clients[role]
            cert, key = paths.certificate.read_bytes(), paths.key.read_bytes()
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        channel = grpc.secure_channel(self.endpoint, credentials,
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        return pb_grpc.HostControllerStub(channel)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("ctl")
    agent = agenthost.prepare(root / "agent", backend="sim", seccomp=False)
    agent_process = agenthost.start(agent)
    controller = controllerhost.prepare(root / "controller", agent, instance_rate_per_s=1.0, instance_burst=6)
    process, endpoint = controllerhost.start(controller)
    yield Host(agent, controller, endpoint)
    agenthost.stop(process)
    agenthost.stop(agent_process)
    agenthost.kill_vms(agent)


def start_request(host: Host, instance_id: str, token: str | None = None, vcpus: int = 1) -> object:
    return pb.StartInstanceRequest(client_token=token or str(uuid.uuid4()), instance_id=instance_id, vcpus=vcpus,
                                   memory_mib=128, image_digest=host.agent.image_digest,
                                   image_signature=host.agent.image_signature)


def code_of(call: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=20)  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_the_instance_manager_runs_a_lifecycle(host: Host) -> None:
    stub = host.stub("instance-manager")
    iid = str(uuid.uuid4())
    started = stub.StartInstance(start_request(host, iid), timeout=20)  # type: ignore[attr-defined]
    assert started.instance.instance_id == iid and started.instance.state == pb.INSTANCE_STATE_RUNNING
    described = stub.DescribeInstance(pb.DescribeInstanceRequest(instance_id=iid), timeout=20)  # type: ignore[attr-defined]
    assert described.instance == started.instance
    listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=20)  # type: ignore[attr-defined]
    assert iid in [i.instance_id for i in listed.instances]
    stopped = stub.StopInstance(pb.StopInstanceRequest(  # type: ignore[attr-defined]
        client_token=str(uuid.uuid4()), instance_id=iid, mode=pb.STOP_MODE_GRACEFUL, timeout_seconds=5), timeout=20)
    assert stopped.instance.state == pb.INSTANCE_STATE_STOPPED


def test_a_retried_start_is_answered_from_the_first_result(host: Host) -> None:
    stub = host.stub("instance-manager")
    iid, token = str(uuid.uuid4()), str(uuid.uuid4())
    first = stub.StartInstance(start_request(host, iid, token), timeout=20)  # type: ignore[attr-defined]
    again = stub.StartInstance(start_request(host, iid, token), timeout=20)  # type: ignore[attr-defined]
    assert again == first  # not INSTANCE_EXISTS: the agent was not asked twice
    assert code_of(stub.StartInstance, start_request(host, iid, token, vcpus=2)) is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("role", ROLES)
def test_every_role_is_refused_outside_its_scope(host: Host, role: str) -> None:
    stub = host.stub(role)
    allowed = {
        "instance-manager": {"StartInstance", "StopInstance", "DescribeInstance", "ListInstances"},
        "volume-attacher": {"AttachVolume", "DetachVolume", "GetHostIdentity"},
        "network-manager": {"AssignVirtualFunction", "ReleaseVirtualFunction"},
        "telemetry": {"GetMetrics", "PollEvents"},
        "auditor": {"ReadAuditLog", "GetHostIdentity"},
    }[role]
    requests = {
        "ListInstances": pb.ListInstancesRequest(), "GetMetrics": pb.GetMetricsRequest(),
        "ReadAuditLog": pb.ReadAuditLogRequest(max_records=1), "GetHostIdentity": pb.GetHostIdentityRequest(),
        "PollEvents": pb.PollEventsRequest(max_events=1),
        "DescribeInstance": pb.DescribeInstanceRequest(instance_id=str(uuid.uuid4())),
    }
    for method, request in requests.items():
        if method in allowed:
            continue
        assert code_of(getattr(stub, method), request) is grpc.StatusCode.PERMISSION_DENIED, (role, method)


def test_a_principal_missing_from_the_policy_is_denied(host: Host, tmp_path: Path) -> None:
    ca = load_ca(host.controller.pki.directory)
    intruder = issue_client_cert(ca, "spiffe://controlplane/intruder")
    stub = host.stub(cert=intruder.certificate_pem, key=intruder.private_key_pem())
    assert code_of(stub.ListInstances, pb.ListInstancesRequest()) is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


@pytest.mark.parametrize("problem", ["no_certificate", "other_ca", "expired"])
def test_unauthenticated_clients_never_get_through(host: Host, problem: str) -> None:
    if problem == "no_certificate":
        stub = host.stub(cert=None, key=None)
    elif problem == "other_ca":
        stranger = issue_client_cert(new_ca(), "spiffe://controlplane/instance-manager")
        stub = host.stub(cert=stranger.certificate_pem, key=stranger.private_key_pem())
    else:
        ca = load_ca(host.controller.pki.directory)
        now = datetime.datetime.now(datetime.UTC)
        old = issue_client_cert(ca, "spiffe://controlplane/instance-manager",
                                not_before=now - datetime.timedelta(days=10),
                                not_after=now - datetime.timedelta(days=1))
        stub = host.stub(cert=old.certificate_pem, key=old.private_key_pem())
    code = code_of(stub.ListInstances, pb.ListInstancesRequest())  # type: ignore[attr-defined]
    assert code is grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails


def test_invalid_requests_get_field_violations(host: Host) -> None:
    stub = host.stub("instance-manager")
    bad = pb.DescribeInstanceRequest(instance_id="NOT-A-UUID")
    with pytest.raises(grpc.RpcError) as info:
        stub.DescribeInstance(bad, timeout=20)  # type: ignore[attr-defined]
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(info.value.trailing_metadata())
    violations, _ = decode_status(trailers[STATUS_DETAILS_KEY], grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert violations and violations[0][0] == "instance_id"


def test_a_flood_on_one_instance_is_rate_limited(host: Host) -> None:
    stub = host.stub("instance-manager")
    iid = str(uuid.uuid4())
    codes = []
    for _ in range(12):
        try:
            stub.StopInstance(pb.StopInstanceRequest(  # type: ignore[attr-defined]
                client_token=str(uuid.uuid4()), instance_id=iid, mode=pb.STOP_MODE_FORCE), timeout=20)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                trailers = dict(exc.trailing_metadata())
                assert int(trailers["retry-after-ms"]) > 0
                _, retry = decode_status(trailers[STATUS_DETAILS_KEY], exc.code().value[0])
                assert retry is not None and retry > 0
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.NOT_FOUND in codes  # the first ones reached the agent: no such instance


def test_identity_metrics_events_and_the_audit_trail(host: Host) -> None:
    identity = host.stub("volume-attacher").GetHostIdentity(pb.GetHostIdentityRequest(), timeout=20)  # type: ignore[attr-defined]
    assert len(identity.public_key) == 32 and len(identity.signing_public_key) == 32
    metrics = host.stub("telemetry").GetMetrics(pb.GetMetricsRequest(), timeout=20)  # type: ignore[attr-defined]
    assert "passivisor_calls_total" in metrics.text and "passivisor_agent_link_up 1.0" in metrics.text
    events = host.stub("telemetry").PollEvents(pb.PollEventsRequest(max_events=64), timeout=20)  # type: ignore[attr-defined]
    assert events.next_cursor >= 1
    auditor = host.stub("auditor")
    records, cursor = [], 1
    while True:  # reading is audited too: a short page is the head at the time of the call
        page = auditor.ReadAuditLog(pb.ReadAuditLogRequest(from_sequence=cursor, max_records=100), timeout=20)  # type: ignore[attr-defined]
        records += page.records
        if len(page.records) < 100:
            break
        assert page.next_sequence > cursor
        cursor = page.next_sequence
    methods = {(r.method, r.decision) for r in records}
    assert ("ListInstances", pb.AUDIT_DECISION_DENIED) in methods or any(r.outcome == "PERMISSION_DENIED"
                                                                        for r in records)
    assert any(r.outcome == "INVALID_ARGUMENT" and r.decision == pb.AUDIT_DECISION_INVALID for r in records)
    assert records[0].kind == pb.AUDIT_RECORD_KIND_CHECKPOINT and len(records[0].checkpoint.signature) == 64
    assert {r.kind for r in records} >= {pb.AUDIT_RECORD_KIND_CALL, pb.AUDIT_RECORD_KIND_OUTCOME}
    assert all(b"envelope" not in r.encoded for r in records)
