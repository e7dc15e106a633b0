"""Encrypted volumes seen from a real guest, and the host that never sees the key (issue 5, "Done when"; C7, C8).

Real components: a real agent (qemu backend, seccomp on; QEMU under TCG, as ``passivisor-qemu`` when
that user exists), the tiny development guest (controller/devhost/guest.py; "Marker mode" in
guest_init.sh), a real controller process behind mTLS, and the controller's nbdkit with the luks
filter.  The control plane's part is played here as in test_encrypted_volume_grpc.py (the sim-backend
version): GetHostIdentity, ``create_volume`` with a data key this test knows, ``envelope.wrap``,
AttachVolume as the volume-attacher.  One guest boots for the whole module; each test attaches its
own volume and leaves the instance without one.

What is checked:

- the round trip: the guest writes its marker through the encryption process, the backing file then
  holds it only encrypted (it is there, decrypted with the key by qemu-img, so its absence in plain
  text means something), and attached again the guest reads the same token back;
- while a volume is attached, the memory of the agent and of every QEMU process of the host holds the
  key in no form (raw, lowercase hex passphrase, uppercase hex), nor does any file the agent or the
  controller wrote.  The scanner's positive control is the controller, which must hold the raw key
  for the attachment's life (controller/volumes.py, "Where the key lives"), and nbdkit, which must
  hold the passphrase.  The raw-volume counterpart (the marker does reach a raw backing file in plain
  text) is test_agent_qemu.py's lifecycle test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from memscan import ProcessScan, find_in_range, scan_files, scan_process
from polling import wait_until

from controller import envelope
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.devhost.guest import DiskTokenLine, GuestSignal, init_script, marker_sector, parse_console_line
from controller.volumetool import create_volume, passphrase_of
from hostagent import process

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in ("qemu-system-x86_64", "nbdkit", "qemu-img")),
                       reason="QEMU, nbdkit and qemu-img are installed by `make deps` "
                              "(Debian qemu-system-x86, nbdkit, qemu-utils)"),
]

SIZE = 16 << 20
MEMORY_MIB = 256


@dataclass
class Host:
    agent: agenthost.AgentHost
    agent_pid: int
    controller: controllerhost.ControllerHost
    controller_pid: int
    endpoint: str
    host_public: bytes
    key: bytearray = field(repr=False)  # the data key of every volume made by `volume()`
    template: Path = field()  # a LUKS volume made with `key`, copied for each test (create takes ~2.4 s)
    instance_id: str = ""  # the one guest of the module, booted and READY

    @property
    def console(self) -> Path:
        return self.agent.runtime_dir / uuid.UUID(self.instance_id).hex / "console.log"

    def stub(self, role: str) -> pb_grpc.HostControllerStub:
        return pb_grpc.HostControllerStub(self.controller.channel(self.endpoint, role))  # type: ignore[no-untyped-call]

    def volume(self) -> tuple[str, Path]:
        """A fresh encrypted volume (a copy of the template) in the controller's volume directory."""
        volume_id = str(uuid.uuid4())
        path = self.controller.encrypted_volume_dir / volume_id
        shutil.copyfile(self.template, path)
        return volume_id, path

    def envelope(self, volume_id: str) -> bytes:
        return envelope.wrap(self.key, self.host_public, uuid.UUID(self.instance_id), uuid.UUID(volume_id))

    def needles(self) -> dict[str, bytes]:
        """The data key in every form the host might hold it."""
        passphrase = passphrase_of(self.key)
        return {"raw key": bytes(self.key), "hex passphrase": bytes(passphrase),
                "uppercase hex": bytes(passphrase).upper()}


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("encq")
    agent = agenthost.prepare(root / "agent", backend="qemu", seccomp=True)
    with contextlib.ExitStack() as cleanup:
        agent_process = agenthost.start(agent, timeout=60)
        cleanup.callback(kill_servers, root / "controller")
        cleanup.callback(agenthost.kill_vms, agent)
        cleanup.callback(agenthost.stop, agent_process)
        controller = controllerhost.prepare(root / "controller", agent, instance_rate_per_s=1000.0,
                                            instance_burst=1000)
        controller_process, endpoint = controllerhost.start(controller)
        cleanup.callback(agenthost.stop, controller_process)
        key = bytearray(secrets.token_bytes(envelope.DATA_KEY_SIZE))
        template = root / "template.luks"
        create_volume(template, SIZE, key)
        host = Host(agent, agent_process.pid, controller, controller_process.pid, endpoint, b"", key, template)
        identity = host.stub("volume-attacher").GetHostIdentity(pb.GetHostIdentityRequest(), timeout=20)
        host.host_public = identity.public_key

        host.instance_id = str(uuid.uuid4())
        started = host.stub("instance-manager").StartInstance(pb.StartInstanceRequest(
            client_token=str(uuid.uuid4()), instance_id=host.instance_id, vcpus=1, memory_mib=MEMORY_MIB,
            image_digest=agent.image_digest, image_signature=agent.image_signature), timeout=60)
        assert started.instance.state == pb.INSTANCE_STATE_RUNNING
        console_line(host.console, lambda line: line == "PASSIVISOR-GUEST-READY")
        yield host

        stopped = host.stub("instance-manager").StopInstance(pb.StopInstanceRequest(
            client_token=str(uuid.uuid4()), instance_id=host.instance_id, mode=pb.STOP_MODE_GRACEFUL,
            timeout_seconds=30), timeout=60)
        assert stopped.instance.state == pb.INSTANCE_STATE_STOPPED
        assert find_qemu(host) == []


def console_line(console: Path, accept: Callable[[str], bool], timeout: float = 90, after: int = 0) -> str:
    """The first console line from byte ``after`` on that ``accept`` takes (as in test_agent_qemu.py)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists():
            for line in console.read_bytes()[after:].decode(errors="replace").splitlines():
                if accept(line.strip()):
                    return line.strip()
        time.sleep(0.2)
    tail = console.read_text(errors="replace")[-1500:] if console.exists() else "(no console log)"
    raise AssertionError(f"no matching console line within {timeout} s:\n{tail}")


def disks(line: str) -> list[str] | None:
    return line.split()[1:] if line.startswith("PASSIVISOR-DISKS") else None


def find_qemu(host: Host) -> list[int]:
    """The VM processes of this host: their argv names the agent's runtime directory (agenthost.kill_vms)."""
    return process.find_by_argument(str(host.agent.runtime_dir).encode())


def servers(needle: Path) -> list[int]:
    """Pids of the nbdkit processes whose argv names ``needle`` (a volume file, or the directory above it)."""
    found = []
    for pid in process.find_by_argument(str(needle).encode()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].endswith(b"nbdkit"):
                found.append(pid)
    return found


def kill_servers(directory: Path) -> None:
    for pid in servers(directory):
        ticks = process.start_ticks(pid)
        if ticks is not None:
            process.kill(pid, ticks, signal.SIGKILL)


def attach(host: Host, volume_id: str, sealed: bytes) -> str:
    """AttachVolume; return the guest's name of the disk (it is the only one)."""
    mark = host.console.stat().st_size
    answer = host.stub("volume-attacher").AttachVolume(pb.AttachVolumeRequest(
        client_token=str(uuid.uuid4()), instance_id=host.instance_id, volume_id=volume_id, envelope=sealed),
        timeout=60)
    assert answer.state == pb.VOLUME_STATE_ATTACHED
    listed = disks(console_line(host.console, lambda line: bool(disks(line)), after=mark, timeout=60))
    assert listed is not None and len(listed) == 1, listed
    return listed[0]


def detach(host: Host, volume_id: str, path: Path) -> None:
    """DetachVolume; return once the guest has no disk and the volume's nbdkit is gone."""
    mark = host.console.stat().st_size
    answer = host.stub("volume-attacher").DetachVolume(pb.DetachVolumeRequest(
        client_token=str(uuid.uuid4()), instance_id=host.instance_id, volume_id=volume_id), timeout=60)
    assert answer.state == pb.VOLUME_STATE_DETACHED
    console_line(host.console, lambda line: disks(line) == [], after=mark, timeout=60)
    wait_until(lambda: not servers(path), timeout=10, what="the encryption process ends with the detach")


def disk_line(host: Host, kind: GuestSignal, device: str, after: int) -> DiskTokenLine:
    """The guest's DISK_MARKER or DISK_WROTE line for ``device``; fails at once on that disk's ERROR line."""
    def accept(line: str) -> bool:
        parsed = parse_console_line(line)
        return ((isinstance(parsed, DiskTokenLine) and parsed.signal is kind and parsed.device == device)
                or line.startswith(f"PASSIVISOR-ERROR disk {device} "))
    parsed = parse_console_line(console_line(host.console, accept, after=after, timeout=60))
    assert isinstance(parsed, DiskTokenLine), parsed
    return parsed


def decrypted_first_sector(path: Path, key: bytearray, scratch: Path) -> bytes:
    """Sector 0 of the LUKS volume ``path`` as the guest sees it, decrypted by qemu-img with ``key``.

    An independent reader of the volume: the passphrase goes to qemu-img on a pipe, as the controller
    sends it (controller/volumes.py), so it touches no file.
    """
    spec = "json:" + json.dumps({"driver": "luks", "key-secret": "k", "file": {"driver": "file",
                                                                               "filename": str(path)}})
    out = scratch / "sector0.raw"
    read_fd, write_fd = os.pipe()
    try:
        passphrase = passphrase_of(key)
        try:
            os.write(write_fd, passphrase)  # 64 bytes: below PIPE_BUF, never blocks
        finally:
            envelope.wipe(passphrase)
            os.close(write_fd)
        subprocess.run(["qemu-img", "dd", "--object", f"secret,id=k,file=/dev/fd/{read_fd},format=raw",
                        "-O", "raw", "bs=512", "count=1", f"if={spec}", f"of={out}"],
                       pass_fds=(read_fd,), check=True, capture_output=True, timeout=60)
    finally:
        os.close(read_fd)
    return out.read_bytes()


# --------------------------------------------------------------------------------------------------------------
# The scanner itself


@pytest.mark.parametrize("chunk", [83, 512, 4099])
def test_the_scanner_finds_every_needle_wherever_chunks_cut_it(tmp_path: Path, chunk: int) -> None:
    """memscan reads in chunks; a needle across a chunk boundary must be found, once, at its offset."""
    needles = {"short": b"\xa5" * 3 + b"k", "long": secrets.token_bytes(32)}
    size = 3 * chunk + 77
    for name, needle in needles.items():
        for offset in [*range(0, 40), *range(chunk - 40, chunk + 1), size - len(needle)]:
            data = bytearray(size)
            data[offset:offset + len(needle)] = needle
            path = tmp_path / "image"
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            try:
                read, hits = find_in_range(fd, 0, size, needles, chunk=chunk)
            finally:
                os.close(fd)
            assert read == size
            assert hits[name] == [offset], (name, offset)
            assert all(not found for other, found in hits.items() if other != name)


# --------------------------------------------------------------------------------------------------------------
# With the guest


def test_the_guest_marker_reaches_the_volume_only_encrypted_and_comes_back(host: Host, tmp_path: Path) -> None:
    vid, path = host.volume()
    before = path.read_bytes()
    sealed = host.envelope(vid)
    start = mark = host.console.stat().st_size
    device = attach(host, vid, sealed)
    # The volume's plaintext is whatever zeros decrypt to, not a marker: the guest writes one.
    wrote = disk_line(host, GuestSignal.DISK_WROTE, device, after=mark)
    assert len(servers(path)) == 1
    detach(host, vid, path)

    data = path.read_bytes()
    assert data != before, "the guest's write did not reach the backing file"
    plaintext = [needle for needle in (b"PASSIVISOR-MARKER", wrote.token.encode()) if needle in data]
    assert plaintext == [], "the backing file holds the guest's marker in plain text"
    # The marker is in the volume all the same, encrypted: the key opens it.
    assert decrypted_first_sector(path, host.key, tmp_path) == marker_sector(wrote.token)

    # Attached again (same envelope: same instance, same volume), the guest reads its own token back.
    mark = host.console.stat().st_size
    device = attach(host, vid, sealed)
    found = disk_line(host, GuestSignal.DISK_MARKER, device, after=mark)
    assert found.token == wrote.token
    detach(host, vid, path)
    assert path.read_bytes() == data  # reading wrote nothing
    log = host.console.read_bytes()[start:].decode(errors="replace")
    assert "PASSIVISOR-ERROR" not in log, log


def test_while_attached_no_host_process_but_the_controller_and_nbdkit_holds_the_key(host: Host) -> None:
    vid, path = host.volume()
    mark = host.console.stat().st_size
    device = attach(host, vid, host.envelope(vid))
    wrote = disk_line(host, GuestSignal.DISK_WROTE, device, after=mark)  # data went through the key
    needles = host.needles()
    # What QEMU's memory must hold: the guest's RAM, where the guest unpacked its /init (page-aligned in
    # its rootfs; QEMU's own copy of the initramfs is gzip-compressed), and where the plaintext marker
    # the guest wrote usually lingers (reported only: that depends on the guest's allocator).
    in_guest = {"guest /init": init_script()[:64], "guest marker": marker_sector(wrote.token)[:60]}
    try:
        [server] = servers(path)
        qemus = find_qemu(host)
        assert len(qemus) == 1, qemus  # one instance; nothing else names the runtime directory
        assert Path(f"/proc/{qemus[0]}/comm").read_text().startswith("qemu-system")

        scans: dict[str, ProcessScan] = {"agent": scan_process(host.agent_pid, needles)}
        for pid in qemus:
            scans[f"qemu {pid}"] = scan_process(pid, {**needles, **in_guest})
        # The positive controls: the same scanner, on the processes that must hold the key.
        controller = scan_process(host.controller_pid, needles)
        nbdkit = scan_process(server, needles)
        report = {name: (f"{scan.scanned >> 20} MiB in {scan.mappings} mappings, {len(scan.skipped)} skipped",
                         {n: len(f) for n, f in scan.found.items()})
                  for name, scan in [*scans.items(), ("controller", controller), ("nbdkit", nbdkit)]}
        print(f"\nmemory scanned, hits per needle: {report}")

        for name, scan in scans.items():
            held = {needle: where for needle, where in scan.found.items() if where and needle in needles}
            assert held == {}, f"{name} holds the data key: {held}"
        assert scans["agent"].scanned > 8 << 20, report
        # The guest's RAM is mapped in QEMU: all of it must have been read, and the scan saw the guest.
        assert sum(scans[f"qemu {pid}"].scanned for pid in qemus) > MEMORY_MIB << 20, report
        assert all(scans[f"qemu {pid}"].holds("guest /init") for pid in qemus), report
        assert controller.holds("raw key"), f"the scanner did not find the key where it must be: {report}"
        assert nbdkit.holds("hex passphrase"), f"nbdkit does not hold the passphrase it decrypts with: {report}"

        # And no file written by the agent or the controller: both whole directories (state, journal,
        # volumes, images, audit log, idempotency store, attachment state, both logs) and the runtime
        # directory (the console log).
        roots = [host.agent.directory, host.agent.runtime_dir, host.controller.directory]
        for wanted in (host.agent.state_dir, host.agent.volume_dir, host.agent.log, host.controller.state_dir,
                       host.controller.log, host.controller.encrypted_volume_dir):
            assert any(wanted.is_relative_to(root) for root in roots), wanted
        files = scan_files(roots, needles)
        print(f"files scanned: {files.files}, {files.scanned >> 20} MiB")
        assert files.found == [], files.found
        assert files.files >= 10, files
    finally:
        detach(host, vid, path)
