"""The controller across restarts and failures: tokens survive, the agent can go away, deadlines hold.

Real processes over real mTLS, sim agent backend.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost


@dataclass
class Host:
    agent: agenthost.AgentHost
    controller: controllerhost.ControllerHost
    processes: dict[str, object] = field(default_factory=dict)
    endpoint: str = ""

    def start_agent(self) -> None:
        self.processes["agent"] = agenthost.start(self.agent)

    def start_controller(self) -> None:
        self.processes["controller"], self.endpoint = controllerhost.start(self.controller)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            agenthost.stop(process)  # type: ignore[arg-type]

    def channel(self, role: str = "instance-manager") -> grpc.Channel:
        paths = self.controller.pki.clients[role]
        credentials = grpc.ssl_channel_credentials(self.controller.pki.ca_certificate.read_bytes(),
                                                   paths.key.read_bytes(), paths.certificate.read_bytes())
        return grpc.secure_channel(self.endpoint, credentials,
                                   options=[("grpc.ssl_target_name_override", "localhost")])

    def stub(self, role: str = "instance-manager") -> object:
        return pb_grpc.HostControllerStub(self.channel(role))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    agent = agenthost.prepare(tmp_path / "agent", backend="sim", seccomp=False)
    controller = controllerhost.prepare(tmp_path / "controller", agent)
    result = Host(agent, controller)
    result.start_agent()
    result.start_controller()
    yield result
    result.stop("controller")
    result.stop("agent")
    agenthost.kill_vms(agent)


def start_request(host: Host, instance_id: str, token: str) -> object:
    return pb.StartInstanceRequest(client_token=token, instance_id=instance_id, vcpus=1, memory_mib=128,
                                   image_digest=host.agent.image_digest, image_signature=host.agent.image_signature)


def test_client_tokens_survive_a_controller_restart(host: Host) -> None:
    iid, token = str(uuid.uuid4()), str(uuid.uuid4())
    first = host.stub().StartInstance(start_request(host, iid, token), timeout=20)  # type: ignore[attr-defined]
    host.stop("controller")
    host.start_controller()
    again = host.stub().StartInstance(start_request(host, iid, token), timeout=20)  # type: ignore[attr-defined]
    assert again == first
    with pytest.raises(grpc.RpcError) as info:  # a new token for the same instance reaches the agent
        host.stub().StartInstance(start_request(host, iid, str(uuid.uuid4())), timeout=20)  # type: ignore[attr-defined]
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS


def test_the_agent_going_away_is_unavailable_then_heals(host: Host) -> None:
    stub = host.stub()
    assert stub.ListInstances(pb.ListInstancesRequest(), timeout=20).instances == []  # type: ignore[attr-defined]
    host.stop("agent")
    with pytest.raises(grpc.RpcError) as info:
        stub.ListInstances(pb.ListInstancesRequest(), timeout=20)  # type: ignore[attr-defined]
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    host.start_agent()
    for _ in range(100):  # the controller backs off between attempts, at most a few seconds here
        try:
            stub.ListInstances(pb.ListInstancesRequest(), timeout=20)  # type: ignore[attr-defined]
            break
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
            time.sleep(0.2)
    else:
        pytest.fail("the controller did not reconnect to the restarted agent")


def test_a_deadline_of_zero_is_refused(host: Host) -> None:
    with pytest.raises(grpc.RpcError) as info:
        host.stub().ListInstances(pb.ListInstancesRequest(), timeout=0)  # type: ignore[attr-defined]
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_health_check_answers_authenticated_callers(host: Host) -> None:
    check = host.channel("telemetry").unary_unary("/grpc.health.v1.Health/Check")
    assert check(b"", timeout=20) == b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def test_unknown_fields_are_refused(host: Host) -> None:
    describe = host.channel().unary_unary("/passivisor.v1.HostController/DescribeInstance")
    valid = pb.DescribeInstanceRequest(instance_id=str(uuid.uuid4())).SerializeToString()
    unknown_field = b"\xf8\x06\x01"  # field 111, varint 1
    with pytest.raises(grpc.RpcError) as info:
        describe(valid + unknown_field, timeout=20)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as garbage:
        describe(b"\xff\xff\xff", timeout=20)
    assert garbage.value.code() is grpc.StatusCode.INVALID_ARGUMENT
