"""Encrypted volumes through the whole controller, with real nbdkit, qemu-img and mTLS (issue 5, claim C8).

A real controller process and a real agent (sim backend: the agent itself
keeps the NBD socket for the simulated VM while the volume is attached; the
guest side is in test_encrypted_volume_qemu.py).  The control plane's side is played here:
it fetches the host key with GetHostIdentity, makes a LUKS volume with a
data key it knows, wraps the key with ``controller.envelope.wrap`` and
sends AttachVolume.  Every refusal is checked three ways: the status code,
no encryption process left running and the instance unchanged, and the
audit record of the attempt.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from polling import wait_until

from controller import envelope
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.volumetool import create_volume, passphrase_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("qemu-img") is None,
                       reason="nbdkit and qemu-img are installed by `make deps` (Debian nbdkit, qemu-utils)"),
]

SIZE = 16 << 20


@dataclass
class Host:
    agent: agenthost.AgentHost
    controller: controllerhost.ControllerHost
    endpoint: str
    host_public: bytes
    key: bytearray = field(repr=False)  # the data key of every volume made by `volume()`
    template: Path = field()  # one LUKS volume made with `key`, copied for each test (qemu-img create takes ~2.4 s)
    running: list[str] = field(default_factory=list)  # instances a test started; stopped after it

    def stub(self, role: str) -> pb_grpc.HostControllerStub:
        return pb_grpc.HostControllerStub(self.controller.channel(self.endpoint, role))  # type: ignore[no-untyped-call]

    def volume(self) -> tuple[str, Path]:
        """A fresh encrypted volume (a copy of the template) in the controller's volume directory."""
        volume_id = str(uuid.uuid4())
        path = self.controller.encrypted_volume_dir / volume_id
        shutil.copyfile(self.template, path)
        return volume_id, path


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("enc")
    agent = agenthost.prepare(root / "agent", backend="sim", seccomp=False)
    agent_process = agenthost.start(agent)
    controller = controllerhost.prepare(root / "controller", agent, instance_rate_per_s=1000.0,
                                        instance_burst=1000)
    process, endpoint = controllerhost.start(controller)
    key = bytearray(secrets.token_bytes(envelope.DATA_KEY_SIZE))
    template = root / "template.luks"
    create_volume(template, SIZE, key)
    try:
        with controller.channel(endpoint, "volume-attacher") as channel:
            identity = pb_grpc.HostControllerStub(channel).GetHostIdentity(  # type: ignore[no-untyped-call]
                pb.GetHostIdentityRequest(), timeout=20)
        yield Host(agent, controller, endpoint, identity.public_key, key, template)
    finally:
        agenthost.stop(process)
        agenthost.stop(agent_process)
        agenthost.kill_vms(agent)
        for pid in servers():
            os.kill(pid, 9)


@pytest.fixture(autouse=True)
def stop_instances(host: Host) -> Iterator[None]:
    """This host has few cores: every test stops the instances it started."""
    yield
    manager = host.stub("instance-manager")
    while host.running:
        iid = host.running.pop()
        with contextlib.suppress(grpc.RpcError):  # already stopped by the test
            manager.StopInstance(pb.StopInstanceRequest(client_token=str(uuid.uuid4()), instance_id=iid,
                                                        mode=pb.STOP_MODE_FORCE), timeout=20)


def servers(path: Path | None = None) -> list[int]:
    """Pids of nbdkit processes (serving ``path``, if given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        wanted = str(path).encode()
        if argv and argv[0].endswith(b"nbdkit") and (path is None or wanted in argv or b"file=" + wanted in argv):
            found.append(int(entry.name))
    return found


def started(host: Host) -> str:
    iid = str(uuid.uuid4())
    host.stub("instance-manager").StartInstance(pb.StartInstanceRequest(
        client_token=str(uuid.uuid4()), instance_id=iid, vcpus=1, memory_mib=64,
        image_digest=host.agent.image_digest, image_signature=host.agent.image_signature), timeout=20)
    host.running.append(iid)
    return iid


def attach(host: Host, iid: str, vid: str, sealed: bytes) -> pb.AttachVolumeResponse:
    return host.stub("volume-attacher").AttachVolume(pb.AttachVolumeRequest(
        client_token=str(uuid.uuid4()), instance_id=iid, volume_id=vid, envelope=sealed), timeout=30)


def volumes_of(host: Host, iid: str) -> list[str]:
    answer = host.stub("instance-manager").DescribeInstance(pb.DescribeInstanceRequest(instance_id=iid), timeout=20)
    return list(answer.instance.volume_ids)


def last_attach_record(host: Host) -> pb.AuditRecord:
    auditor = host.stub("auditor")
    records: list[pb.AuditRecord] = []
    cursor = 1
    while True:
        page = auditor.ReadAuditLog(pb.ReadAuditLogRequest(from_sequence=cursor, max_records=1000), timeout=20)
        records += page.records
        if len(page.records) < 1000:
            break
        cursor = page.next_sequence
    outcome_of = {r.refers_to: r.outcome for r in records if r.refers_to}
    attempts = [r for r in records if r.method == "AttachVolume" and not r.refers_to]
    last = attempts[-1]
    if not last.outcome:  # an intent: its outcome is a later record
        last.outcome = outcome_of.get(last.sequence, "")
    return last


def test_an_encrypted_volume_is_served_while_attached_and_ends_with_the_detach(host: Host) -> None:
    iid = started(host)
    vid, path = host.volume()
    attach(host, iid, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(iid), uuid.UUID(vid)))
    assert volumes_of(host, iid) == [vid]
    assert len(servers(path)) == 1
    record = last_attach_record(host)
    assert record.outcome == "OK" and record.parameters["volume_id"] == vid
    assert "redacted" in record.parameters["envelope"]
    host.stub("volume-attacher").DetachVolume(pb.DetachVolumeRequest(
        client_token=str(uuid.uuid4()), instance_id=iid, volume_id=vid), timeout=20)
    wait_until(lambda: not servers(path), what="the encryption process ends with the detach")
    assert volumes_of(host, iid) == []


def test_stopping_the_instance_ends_its_encryption_processes(host: Host) -> None:
    iid = started(host)
    vid, path = host.volume()
    attach(host, iid, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(iid), uuid.UUID(vid)))
    assert len(servers(path)) == 1
    host.stub("instance-manager").StopInstance(pb.StopInstanceRequest(
        client_token=str(uuid.uuid4()), instance_id=iid, mode=pb.STOP_MODE_FORCE), timeout=20)
    wait_until(lambda: not servers(path), what="the encryption process ends with the instance")


def _other_host_public() -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


REFUSALS = {
    # case: (how the control plane (mis)builds the envelope, the expected code)
    "another host": (lambda h, i, v: envelope.wrap(h.key, _other_host_public(), i, v),
                     grpc.StatusCode.PERMISSION_DENIED),
    "another instance": (lambda h, i, v: envelope.wrap(h.key, h.host_public, uuid.uuid4(), v),
                         grpc.StatusCode.PERMISSION_DENIED),
    "another volume": (lambda h, i, v: envelope.wrap(h.key, h.host_public, i, uuid.uuid4()),
                       grpc.StatusCode.PERMISSION_DENIED),
    "truncated": (lambda h, i, v: envelope.wrap(h.key, h.host_public, i, v)[:-1], grpc.StatusCode.INVALID_ARGUMENT),
    "unknown version": (lambda h, i, v: b"\x02" + envelope.wrap(h.key, h.host_public, i, v)[1:],
                        grpc.StatusCode.INVALID_ARGUMENT),
    "tampered": (lambda h, i, v: _flip_last(envelope.wrap(h.key, h.host_public, i, v)),
                 grpc.StatusCode.INVALID_ARGUMENT),
    "a key that does not unlock the volume": (
        lambda h, i, v: envelope.wrap(secrets.token_bytes(32), h.host_public, i, v),
        grpc.StatusCode.FAILED_PRECONDITION),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_envelopes_are_refused_audited_and_change_nothing(host: Host, case: str) -> None:
    make, expected = REFUSALS[case]
    iid = started(host)
    vid, path = host.volume()
    before = path.read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        attach(host, iid, vid, make(host, uuid.UUID(iid), uuid.UUID(vid)))
    assert info.value.code() == expected, info.value.details()
    assert not servers(path), "a refused attach left an encryption process running"
    assert volumes_of(host, iid) == []
    assert path.read_bytes() == before
    record = last_attach_record(host)
    assert record.parameters["volume_id"] == vid and record.outcome == expected.name
    # The right envelope still works afterwards: the refusal left nothing behind that blocks it.
    attach(host, iid, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(iid), uuid.UUID(vid)))
    assert volumes_of(host, iid) == [vid]


def test_a_volume_is_served_once(host: Host) -> None:
    first, second = started(host), started(host)
    vid, path = host.volume()
    attach(host, first, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(first), uuid.UUID(vid)))
    [server] = servers(path)
    with pytest.raises(grpc.RpcError) as info:
        attach(host, second, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(second), uuid.UUID(vid)))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert servers(path) == [server] and volumes_of(host, second) == []


def test_a_missing_volume_file_is_not_found(host: Host) -> None:
    iid = started(host)
    vid = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as info:
        attach(host, iid, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(iid), uuid.UUID(vid)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert volumes_of(host, iid) == []


def test_no_file_written_by_the_controller_or_the_agent_holds_the_key(host: Host) -> None:
    iid = started(host)
    vid, _ = host.volume()
    attach(host, iid, vid, envelope.wrap(host.key, host.host_public, uuid.UUID(iid), uuid.UUID(vid)))
    needles = [bytes(host.key), bytes(passphrase_of(host.key)), bytes(host.key).hex().upper().encode()]
    scanned = 0
    for top in (host.controller.state_dir, host.agent.directory, host.agent.runtime_dir):
        for path in top.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                scanned += 1
                assert not any(needle in data for needle in needles), f"{path} holds the data key"
    assert scanned >= 5  # the audit log, the idempotency store, the journal, ...
