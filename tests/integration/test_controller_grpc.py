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
from inventory.fakesysfs import write_cpu_tree

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


# --- ListInstances paging --------------------------------------------------------------------------------------

PAGED_INSTANCES = 150  # three agent pages of at most 64
# The paged host's policy: the shipped one, plus ListInstances for the auditor limited to ids that begin
# with one of these (about a quarter of the instances), to show that a scoped principal sees only its own.
SCOPED_PREFIXES = ("0", "5", "a", "f")


def _violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
    violations, _ = decode_status(trailers[STATUS_DETAILS_KEY], grpc.StatusCode.INVALID_ARGUMENT.value[0])
    return violations


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"page_size": 257}, "page_size"),
    ({"page_size": 1 << 31}, "page_size"),
    ({"page_token": "NOT-A-UUID"}, "page_token"),
    ({"page_token": "3F2A6C1E-9B4D-4E7A-8C21-5D6E7F809A1B"}, "page_token"),  # not canonical: uppercase
    ({"page_token": "00000000-0000-0000-0000-000000000000"}, "page_token"),  # nil: use an empty token
    ({"page_token": "3f2a6c1e-9b4d-4e7a-cc21-5d6e7f809a1b"}, "page_token"),  # not the RFC 9562 variant
    ({"page_token": "3f2a6c1e9b4d4e7a8c215d6e7f809a1b"}, "page_token"),  # no hyphens
    ({"page_token": "3f2a6c1e-9b4d-4e7a-8c21-5d6e7f809a1b" + "0" * 64}, "page_token"),
], ids=["size-257", "size-2^31", "token-garbage", "token-uppercase", "token-nil", "token-variant", "token-hex",
        "token-long"])
def test_list_paging_parameters_out_of_bounds_are_refused(host: Host, request_fields: dict[str, object],
                                                          field: str) -> None:
    stub = host.stub("instance-manager")
    with pytest.raises(grpc.RpcError) as info:
        stub.ListInstances(pb.ListInstancesRequest(**request_fields), timeout=20)  # type: ignore[attr-defined]
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in _violations(info.value)] == [field]


@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, list[str]]]:
    """A host running PAGED_INSTANCES sim instances (one single-thread core each), and their ids in id order."""
    root = tmp_path_factory.mktemp("paged")
    sysfs = root / "sysfs"
    write_cpu_tree(sysfs, [(cpu,) for cpu in range(PAGED_INSTANCES + 2)])
    (sysfs / "bus" / "pci" / "devices").mkdir(parents=True)  # a host without SR-IOV
    agent = agenthost.prepare(root / "agent", backend="sim", sysfs_root=sysfs, seccomp=False,
                              memory_budget_mib=(PAGED_INSTANCES + 2) * 64)
    agent_process = agenthost.start(agent)
    shipped = (Path(controllerhost.__file__).parents[1] / "default_policy.toml").read_text()
    granted = 'methods = ["ReadAuditLog", "GetHostIdentity"]'
    assert shipped.count(granted) == 1  # the auditor's entry
    policy = root / "policy.toml"
    policy.write_text(shipped.replace(granted, 'methods = ["ReadAuditLog", "GetHostIdentity", "ListInstances"]\n'
                                               f'instance_id_prefixes = {list(SCOPED_PREFIXES)!r}'.replace("'", '"')))
    controller = controllerhost.prepare(root / "controller", agent, principal_rate_per_s=1e6,
                                        principal_burst=1_000_000, instance_rate_per_s=1e6, instance_burst=1_000_000,
                                        policy=policy)
    process, endpoint = controllerhost.start(controller)
    try:
        big = Host(agent, controller, endpoint)
        stub = big.stub("instance-manager")
        ids = sorted(str(uuid.uuid4()) for _ in range(PAGED_INSTANCES))
        for iid in ids:
            request = pb.StartInstanceRequest(client_token=str(uuid.uuid4()), instance_id=iid, vcpus=1, memory_mib=64,
                                              image_digest=agent.image_digest, image_signature=agent.image_signature)
            stub.StartInstance(request, timeout=20)  # type: ignore[attr-defined]
        yield big, ids
    finally:
        agenthost.stop(process)
        agenthost.stop(agent_process)
        agenthost.kill_vms(agent)


def _walk(stub: object, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        answer = stub.ListInstances(pb.ListInstancesRequest(page_size=page_size, page_token=token),  # type: ignore[attr-defined]
                                    timeout=20)
        pages.append([i.instance_id for i in answer.instances])
        if not answer.next_page_token:
            return pages
        assert answer.next_page_token == pages[-1][-1]  # the id of the last instance of the page
        token = answer.next_page_token
        assert len(pages) <= PAGED_INSTANCES


@pytest.mark.parametrize(("page_size", "sizes"), [
    (0, [64, 64, 22]),  # absent: 64, one agent page each
    (100, [100, 50]),  # each gRPC page from two agent pages
    (150, [150]),  # exactly every instance: no token, the agent said nothing follows
    (256, [150]),
    (64, [64, 64, 22]),
    (75, [75, 75]),  # the last page is full, and still the last: nothing follows it
    (1, [1] * 150),
])
def test_walking_the_pages_returns_every_instance_once_in_id_order(paged: tuple[Host, list[str]], page_size: int,
                                                                   sizes: list[int]) -> None:
    host, ids = paged
    pages = _walk(host.stub("instance-manager"), page_size)
    assert [len(page) for page in pages] == sizes
    assert [iid for page in pages for iid in page] == ids


def test_a_page_token_naming_no_instance_lists_from_where_it_would_sort(paged: tuple[Host, list[str]]) -> None:
    host, ids = paged
    stub = host.stub("instance-manager")
    for token, expected in (("00000000-0000-4000-8000-000000000000", ids[:64]),  # before every id
                            ("ffffffff-ffff-4fff-bfff-ffffffffffff", [])):  # after every id
        answer = stub.ListInstances(pb.ListInstancesRequest(page_token=token), timeout=20)  # type: ignore[attr-defined]
        assert [i.instance_id for i in answer.instances] == expected
        assert answer.next_page_token == (ids[63] if expected else "")
    # An instance forgotten between two pages does not stop the walk: a token is only a position.
    gone = str(uuid.uuid4())
    expected = [iid for iid in ids if iid > gone][:10]
    answer = stub.ListInstances(pb.ListInstancesRequest(page_size=10, page_token=gone), timeout=20)  # type: ignore[attr-defined]
    assert [i.instance_id for i in answer.instances] == expected


@pytest.mark.parametrize("page_size", [0, 1, 7, 64, 256])
def test_a_principal_limited_to_prefixes_lists_only_its_instances(paged: tuple[Host, list[str]],
                                                                  page_size: int) -> None:
    """Every page holds only instances in scope, every token names one, and the walk shows each of them once."""
    host, ids = paged
    scoped = [iid for iid in ids if iid.startswith(SCOPED_PREFIXES)]
    assert 0 < len(scoped) < len(ids)  # the test means something
    pages = _walk(host.stub("auditor"), page_size)
    assert [iid for page in pages for iid in page] == scoped
    assert all(iid.startswith(SCOPED_PREFIXES) for page in pages for iid in page)  # tokens: _walk checks them
