"""Where every secret of a host ends up after a scenario that uses each of them (issue 6 §4; claims C7, C8).

Real components: a ``passivisor-agent`` (sim backend, seccomp on, as shipped), a ``passivisor-controller``
behind mTLS on port 0, the controller's ``nbdkit`` serving an encrypted volume, ``qemu-img`` checking its
key, and the sim VM process that holds the volume's NBD socket the way QEMU would.  The development PKI
and keys come from ``controller.devhost`` exactly as ``pvctl dev up`` makes them.

The secrets, and how the test knows them (it reads the files that are meant to hold them):

- the agent-channel secret (``agent/keys/channel.key``), used by every call that reaches the agent;
- a volume data key, made here, wrapped to the host key and attached through AttachVolume (nbdkit, luks);
- the TLS private keys: the controller's (``pki/server.key``), each control-plane role's
  (``pki/clients/ROLE.key``; every role makes calls), and the development CA's (``pki/ca.key``);
- the host identity's private keys (``state/host.x25519``, which opens the envelope, and
  ``state/host.ed25519``, which signs the audit checkpoints);
- the image-signing private key (``agent/keys/image-signing.key``), which signed the image booted here.

Each is searched for raw, as lowercase and uppercase hex, and as base64 at each of the three byte
alignments (the part of the encoding that depends on the secret alone); a PEM key also as its file's
text and its second base64 line.  The places searched: the controller's and the agent's logs; the audit
log, as ReadAuditLog serves it and as the file holds it; the metrics text of GetMetrics; the message and
trailers of every refused call of the scenario; every file under the controller's and the agent's
directories (state, runtime, keys, PKI, volumes, logs) before and after both stop; core files in those
directories and the working directory; argv and environment of the agent, the controller, nbdkit and
the sim VM; and the memory of the agent, the sim VM, nbdkit and the controller (``integration/memscan.py``).

The allow-list (``ALLOWED``) is the whole of what may hold a secret: each secret's own file, the memory
of the processes that must use it, and nothing else.  Two positive controls prove the scanner can find
what it looks for: the controller's memory must hold the data key (controller/volumes.py, "Where the key
lives") and nbdkit's the passphrase; and every secret must be found in its own file.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from integration.memscan import scan_process

from controller import envelope
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.pki import DEFAULT_ROLES, issue_client_cert, load_ca
from controller.volumetool import create_volume
from hostagent import process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("qemu-img") is None,
                       reason="nbdkit and qemu-img are installed by `make deps` (Debian nbdkit, qemu-utils)"),
]

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16 << 20
DATA_KEY = "data key"
CHANNEL = "channel secret"
SERVER_TLS = "controller TLS key"
CA_KEY = "CA key"
HOST_X25519 = "host X25519 key"
HOST_ED25519 = "host Ed25519 key"
IMAGE_SIGNING = "image-signing key"


def client_tls(role: str) -> str:
    return f"{role} TLS key"


# The whole allow-list: secret -> the places that may hold it.  "file:" places are relative to the test's
# directory (controller/..., agent/...); "memory:" places are processes.
ALLOWED: dict[str, frozenset[str]] = {
    CHANNEL: frozenset({"file:agent/keys/channel.key", "memory:agent", "memory:controller"}),
    DATA_KEY: frozenset({"memory:controller", "memory:nbdkit"}),
    SERVER_TLS: frozenset({"file:controller/pki/server.key", "memory:controller"}),
    CA_KEY: frozenset({"file:controller/pki/ca.key"}),
    HOST_X25519: frozenset({"file:controller/state/host.x25519", "memory:controller"}),
    HOST_ED25519: frozenset({"file:controller/state/host.ed25519", "memory:controller"}),
    IMAGE_SIGNING: frozenset({"file:agent/keys/image-signing.key"}),
    **{client_tls(role): frozenset({f"file:controller/pki/clients/{role}.key"}) for role in DEFAULT_ROLES},
}


def forms(secret: bytes) -> dict[str, bytes]:
    """The encodings of ``secret`` searched for: raw, hex both cases, and base64 at the three alignments.

    For base64, ``k`` bytes of something else before the secret change the first group of four
    characters and the bytes after it the last group; what is left depends on the secret alone.
    """
    found = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for k in range(3):
        encoded = base64.b64encode(bytes(k) + secret)
        start = 4 if k else 0
        end = len(encoded) if (k + len(secret)) % 3 == 0 else len(encoded) - 4
        found[f"base64@{k}"] = encoded[start:end]
    return found


def pem_forms(pem: bytes) -> dict[str, bytes]:
    """A PEM private key: its private scalar in every form, the file's text and its second base64 line."""
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    return {**forms(scalar), "pem": pem.strip(), "pem line 2": body[1]}


@dataclass
class Findings:
    """Every (secret, place) where some form of the secret was found, with the forms."""

    hits: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    searched: dict[str, int] = field(default_factory=dict)  # place kind -> bytes searched

    def search(self, place: str, data: bytes, needles: dict[str, dict[str, bytes]]) -> None:
        kind = place.split(":", 1)[0]
        self.searched[kind] = self.searched.get(kind, 0) + len(data)
        for secret, encodings in needles.items():
            for name, needle in encodings.items():
                if needle in data:
                    self.hits.setdefault((secret, place), set()).add(name)

    def add(self, secret: str, place: str, names: Iterable[str]) -> None:
        self.hits.setdefault((secret, place), set()).update(names)

    def outside(self, allowed: dict[str, frozenset[str]]) -> list[str]:
        return sorted(f"{secret} in {place} ({', '.join(sorted(names))})"
                      for (secret, place), names in self.hits.items() if place not in allowed[secret])

    def places(self, secret: str) -> set[str]:
        return {place for (name, place) in self.hits if name == secret}


@dataclass
class Host:
    root: Path
    agent: agenthost.AgentHost
    agent_process: object
    controller: controllerhost.ControllerHost
    controller_process: object
    endpoint: str
    key: bytearray = field(repr=False)
    template: Path = field()
    errors: list[bytes] = field(default_factory=list)  # every refused call's message and trailers

    def stub(self, role: str | None = None, *, cert: bytes | None = None, key: bytes | None = None) -> object:
        if role is not None:
            paths = self.controller.pki.clients[role]
            cert, key = paths.certificate.read_bytes(), paths.key.read_bytes()
        credentials = grpc.ssl_channel_credentials(self.controller.pki.ca_certificate.read_bytes(), key, cert)
        channel = grpc.secure_channel(self.endpoint, credentials,
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        return pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]

    def refused(self, call: object, request: object) -> grpc.StatusCode:
        """Make a call that must be refused; keep what it said."""
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)  # type: ignore[operator]
        error = info.value
        self.errors.append(error.details().encode())
        for name, value in error.trailing_metadata() or ():
            self.errors.append(name.encode() + b"=" + (value if isinstance(value, bytes) else value.encode()))
        return error.code()  # type: ignore[no-any-return]

    def needles(self) -> dict[str, dict[str, bytes]]:
        pki = self.controller.pki
        state = self.controller.state_dir
        found = {
            CHANNEL: forms(self.agent.secret()),
            DATA_KEY: forms(bytes(self.key)),
            SERVER_TLS: pem_forms(pki.server_key.read_bytes()),
            CA_KEY: pem_forms(pki.ca_key.read_bytes()),
            HOST_X25519: forms((state / "host.x25519").read_bytes()),
            HOST_ED25519: forms((state / "host.ed25519").read_bytes()),
            IMAGE_SIGNING: forms(_raw_ed25519(self.agent.signing_key.read_bytes())),
            **{client_tls(role): pem_forms(paths.key.read_bytes()) for role, paths in pki.clients.items()},
        }
        assert len((state / "host.x25519").read_bytes()) == len((state / "host.ed25519").read_bytes()) == 32
        assert set(found) == set(ALLOWED)
        return found

    def place_of(self, path: Path) -> str:
        if path.is_relative_to(self.agent.runtime_dir):
            return f"file:runtime/{path.relative_to(self.agent.runtime_dir)}"
        return f"file:{path.relative_to(self.root)}"

    def search_files(self, findings: Findings, needles: dict[str, dict[str, bytes]]) -> int:
        count = 0
        for top in (self.controller.directory, self.agent.directory, self.agent.runtime_dir):
            for path in sorted(top.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    findings.search(self.place_of(path), path.read_bytes(), needles)
                    count += 1
        return count


def _raw_ed25519(data: bytes) -> bytes:
    """The 32 private bytes of an image-signing key file (PEM PKCS8, or raw; hostagent/images.py)."""
    if len(data) == 32:
        return data
    key = serialization.load_pem_private_key(data, password=None)
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,  # type: ignore[union-attr]
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("secrets")
    agent = agenthost.prepare(root / "agent", backend="sim", seccomp=True)
    with contextlib.ExitStack() as cleanup:
        agent_process = agenthost.start(agent)
        cleanup.callback(kill_nbdkit, root / "controller")
        cleanup.callback(agenthost.kill_vms, agent)
        cleanup.callback(agenthost.stop, agent_process)
        controller = controllerhost.prepare(root / "controller", agent, instance_rate_per_s=1000.0,
                                            instance_burst=1000)
        controller_process, endpoint = controllerhost.start(controller)
        cleanup.callback(agenthost.stop, controller_process)
        key = bytearray(secrets.token_bytes(envelope.DATA_KEY_SIZE))
        template = root / "template.luks"  # outside the controller's and the agent's directories
        create_volume(template, SIZE, key)
        yield Host(root, agent, agent_process, controller, controller_process, endpoint, key, template)


def kill_nbdkit(directory: Path) -> None:
    for pid in nbdkit_pids(directory):
        ticks = process.start_ticks(pid)
        if ticks is not None:
            process.kill(pid, ticks, 9)


def nbdkit_pids(directory: Path) -> list[int]:
    found = []
    for pid in process.find_by_argument(str(directory).encode()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].endswith(b"nbdkit"):
                found.append(pid)
    return found


def proc_text(pid: int) -> dict[str, bytes]:
    return {"argv": Path(f"/proc/{pid}/cmdline").read_bytes(), "environ": Path(f"/proc/{pid}/environ").read_bytes()}


def core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit in /proc/PID/limits")


def core_files(directories: Iterable[Path]) -> list[Path]:
    found = []
    for directory in directories:
        for path in directory.rglob("*"):
            name = path.name
            if path.is_file() and (name == "core" or name.startswith("core.") or name.endswith(".core")):
                found.append(path)
    return found


def test_no_secret_leaves_the_places_meant_to_hold_it(host: Host) -> None:
    needles = host.needles()
    findings = Findings()
    pids: dict[str, int] = {"agent": host.agent_process.pid,  # type: ignore[attr-defined]
                            "controller": host.controller_process.pid}  # type: ignore[attr-defined]

    # --- the scenario: every role calls (every client key and the server key), the agent answers (the
    # channel secret), an envelope is opened (X25519) and its volume served (the data key, nbdkit),
    # checkpoints are signed (Ed25519), an image signed with the image-signing key boots.
    manager, attacher = host.stub("instance-manager"), host.stub("volume-attacher")
    iid = str(uuid.uuid4())
    manager.StartInstance(pb.StartInstanceRequest(  # type: ignore[attr-defined]
        client_token=str(uuid.uuid4()), instance_id=iid, vcpus=1, memory_mib=64,
        image_digest=host.agent.image_digest, image_signature=host.agent.image_signature), timeout=30)
    host_public = attacher.GetHostIdentity(pb.GetHostIdentityRequest(), timeout=30).public_key  # type: ignore[attr-defined]
    vid = str(uuid.uuid4())
    volume = host.controller.encrypted_volume_dir / vid
    shutil.copyfile(host.template, volume)
    sealed = envelope.wrap(host.key, host_public, uuid.UUID(iid), uuid.UUID(vid))

    def attach_request(data: bytes, volume_id: str = vid) -> pb.AttachVolumeRequest:
        return pb.AttachVolumeRequest(client_token=str(uuid.uuid4()), instance_id=iid, volume_id=volume_id,
                                      envelope=data)

    # Refusals first, each with the key in play: their messages are searched below.
    wrong_key = envelope.wrap(secrets.token_bytes(32), host_public, uuid.UUID(iid), uuid.UUID(vid))
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    other_instance = envelope.wrap(host.key, host_public, uuid.uuid4(), uuid.UUID(vid))
    missing = str(uuid.uuid4())
    for request, code in [
        (attach_request(wrong_key), grpc.StatusCode.FAILED_PRECONDITION),
        (attach_request(tampered), grpc.StatusCode.INVALID_ARGUMENT),
        (attach_request(other_instance), grpc.StatusCode.PERMISSION_DENIED),
        (attach_request(sealed[:100]), grpc.StatusCode.INVALID_ARGUMENT),
        (attach_request(envelope.wrap(host.key, host_public, uuid.UUID(iid), uuid.UUID(missing)), missing),
         grpc.StatusCode.NOT_FOUND),
    ]:
        assert host.refused(attacher.AttachVolume, request) is code  # type: ignore[attr-defined]
    assert host.refused(host.stub("telemetry").StartInstance,  # type: ignore[attr-defined]
                        pb.StartInstanceRequest()) is grpc.StatusCode.PERMISSION_DENIED
    assert host.refused(manager.DescribeInstance,  # type: ignore[attr-defined]
                        pb.DescribeInstanceRequest(instance_id="not-a-uuid")) is grpc.StatusCode.INVALID_ARGUMENT
    stranger = issue_client_cert(load_ca(host.controller.pki.directory), None)
    assert host.refused(host.stub(cert=stranger.certificate_pem, key=stranger.private_key_pem())
                        .ListInstances, pb.ListInstancesRequest()) is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert host.refused(host.stub("network-manager").AssignVirtualFunction,  # type: ignore[attr-defined]
                        pb.AssignVirtualFunctionRequest(
                            client_token=str(uuid.uuid4()), instance_id=iid,
                            physical_function=pb.PciAddress(bus=3), mac=bytes.fromhex("020000000001"), vlan=1),
                        ) is grpc.StatusCode.FAILED_PRECONDITION

    attacher.AttachVolume(attach_request(sealed), timeout=60)  # type: ignore[attr-defined]
    [server] = nbdkit_pids(host.controller.directory)
    pids["nbdkit"] = server
    vms = process.find_by_argument(str(host.agent.runtime_dir).encode())
    assert len(vms) == 1
    pids["sim VM"] = vms[0]
    metrics = host.stub("telemetry").GetMetrics(pb.GetMetricsRequest(), timeout=30).text  # type: ignore[attr-defined]
    assert "passivisor_agent_link_up 1.0" in metrics
    host.stub("telemetry").PollEvents(pb.PollEventsRequest(max_events=64), timeout=30)  # type: ignore[attr-defined]

    # --- while the volume is attached: argv, environment, core limits and memory of every process
    for name, pid in pids.items():
        for what, data in proc_text(pid).items():
            findings.search(f"{what}:{name}", data, needles)
    for name in ("controller", "nbdkit"):  # the two processes that hold the data key
        assert core_limit(pids[name]) == ("0", "0"), name
    scanned = {}
    for name, pid in pids.items():
        scan = scan_process(pid, {f"{secret}\0{form}": needle for secret, encodings in needles.items()
                                  for form, needle in encodings.items()})
        scanned[name] = scan.scanned
        for key, places in scan.found.items():
            if places:
                secret, form = key.split("\0")
                findings.add(secret, f"memory:{name}", [form])
    assert scanned["agent"] > 8 << 20 and scanned["controller"] > 8 << 20, scanned

    # --- what the control plane can pull: the audit log (all of it), the metrics, the refusals
    records, cursor = [], 1
    while True:
        page = host.stub("auditor").ReadAuditLog(  # type: ignore[attr-defined]
            pb.ReadAuditLogRequest(from_sequence=cursor, max_records=1000), timeout=30)
        records += page.records
        if len(page.records) < 1000:
            break
        cursor = page.next_sequence
    assert any(r.method == "AttachVolume" and r.outcome == "OK" for r in records)
    findings.search("ReadAuditLog", b"\n".join(r.SerializeToString() for r in records), needles)
    findings.search("GetMetrics", metrics.encode(), needles)
    assert len(host.errors) >= 9
    findings.search("refused calls", b"\n".join(host.errors), needles)
    files_while_attached = host.search_files(findings, needles)

    # --- the end: detach, stop, and both processes stop; then every file once more (logs, final checkpoint)
    attacher.DetachVolume(pb.DetachVolumeRequest(  # type: ignore[attr-defined]
        client_token=str(uuid.uuid4()), instance_id=iid, volume_id=vid), timeout=30)
    manager.StopInstance(pb.StopInstanceRequest(  # type: ignore[attr-defined]
        client_token=str(uuid.uuid4()), instance_id=iid, mode=pb.STOP_MODE_FORCE), timeout=30)
    assert agenthost.stop(host.controller_process) == 0  # type: ignore[arg-type]
    assert agenthost.stop(host.agent_process) == 0  # type: ignore[arg-type]
    files_after = host.search_files(findings, needles)
    logs = host.controller.log.read_bytes() + host.agent.log.read_bytes()
    assert b"stopped" in host.controller.log.read_bytes() and len(logs) > 0
    assert core_files([host.controller.directory, host.agent.directory, host.agent.runtime_dir]) == []
    assert [path for path in ROOT.iterdir() if path.name == "core" or path.name.startswith("core.")] == []

    report = {f"{secret} in {place}": sorted(names) for (secret, place), names in sorted(findings.hits.items())}
    print(f"\nsearched (bytes by kind of place): {findings.searched}; memory: {scanned}; "
          f"files: {files_while_attached} then {files_after}\nfound: {report}")

    assert findings.outside(ALLOWED) == [], "secrets found outside the allow-list"
    # The positive controls: the scanner finds what is there.
    assert findings.hits.get((DATA_KEY, "memory:controller"), set()) >= {"raw"}, report
    assert findings.hits.get((DATA_KEY, "memory:nbdkit"), set()) >= {"hex"}, report  # the passphrase
    for secret, places in ALLOWED.items():
        own_files = {place for place in places if place.startswith("file:")}
        assert own_files <= findings.places(secret), f"{secret} not found in {own_files}: the needle is wrong"
    assert findings.searched["file"] > 0 and findings.searched["argv"] > 0 and findings.searched["environ"] > 0
