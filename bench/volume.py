"""Encrypted-volume I/O inside a real guest: ``python -m bench volume``.

Everything runs for real: the sandboxed ``passivisor-agent`` (qemu backend,
TCG), ``passivisor-controller`` and a development guest built in *bench*
mode (``controller/devhost/guest.py``): on every disk that appears, the guest
times one sequential write pass and one sequential read pass of N MiB with
``dd bs=1M`` and direct I/O (no guest page cache), against its own clock
(``/proc/uptime``, centiseconds), and prints ``PASSIVISOR-DISK-BENCH``.

- ``volume.write`` and ``volume.read``: MiB/s through the encrypted path
  (``ours``: AttachVolume with an envelope; the controller serves the LUKS
  volume with nbdkit's luks filter over a socketpair, QEMU speaks NBD to it)
  beside the same passes over a plain raw file the agent passes to QEMU as a
  descriptor (``baseline``), in the same run, on the same guest, in
  alternating rounds; the median round of each side is reported.

What the figures mean.  Under TCG only the guest's instructions are
emulated; QEMU and nbdkit move the data at native speed, so the ratio shows
what the encrypted path (an NBD hop and AES-XTS in nbdkit) costs relative to
QEMU reading a file.  docs/performance.md measures where that cost lies: the
guest sends one 1 MiB request at a time; writes are bounded by the NBD
transport itself (nbdkit without the luks filter writes no faster in the
guest), reads by the luks filter's one 512-byte pread per sector (AES is a
small part); QEMU's own luks driver is slower.  The raw write pass is bimodal
from round to round, so use several rounds (the full profile) before reading
much into one write ratio.  The read pass reads what the write pass just
wrote, so on the host it is served from the page cache (of the raw file, or
of the LUKS file under nbdkit): an upper bound for both sides.  The write pass is
not flushed to the host disk.  Volume creation (``qemu-img create``, about
2.4 s) is not timed.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controller import envelope
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.devhost import agenthost, controllerhost
from controller.devhost.guest import DiskBenchLine, GuestSignal, parse_console_line
from controller.volumetool import create_volume

from .harness import Profile, Result

CALL_TIMEOUT_S = 60.0
MIB = 1 << 20


def _sizes(profile: Profile) -> tuple[int, int]:
    """(MiB per pass, rounds per side): the quick profile writes 256 MiB twice, the full one 1 GiB three times."""
    return (256, 1) if profile.rounds < 100 else (1024, 3)


def run(profile: Profile) -> Iterator[Result]:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("nbdkit") is None:
        print("bench volume: QEMU and nbdkit are needed (make deps installs them); skipped", file=sys.stderr)
        return
    mib, rounds = _sizes(profile)
    with tempfile.TemporaryDirectory(prefix="pv-bench-volume-") as scratch:
        root = Path(scratch)
        agent = agenthost.prepare(root / "agent", backend="qemu", guest_mode="bench", bench_mib=mib)
        agent_process = agenthost.start(agent)
        try:
            controller = controllerhost.prepare(root / "controller", agent, instance_rate_per_s=1e6,
                                                instance_burst=1_000_000)
            controller_process, endpoint = controllerhost.start(controller)
            try:
                yield from _measure(agent, controller, endpoint, mib, rounds)
            finally:
                agenthost.stop(controller_process)
        finally:
            agenthost.stop(agent_process)
            agenthost.discard(agent)


def _stub(host: controllerhost.ControllerHost, endpoint: str, role: str) -> Any:
    return pb_grpc.HostControllerStub(host.channel(endpoint, role))  # type: ignore[no-untyped-call]


def _wait_for(console: Path, offset: int, timeout: float, want: GuestSignal) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists():
            for line in console.read_bytes()[offset:].decode(errors="replace").splitlines():
                parsed = parse_console_line(line.strip())
                if parsed is not None and parsed.signal is want:
                    return parsed
                if parsed is not None and parsed.signal is GuestSignal.ERROR:
                    raise RuntimeError(f"the guest reported: {line.strip()}")
        time.sleep(0.1)
    raise RuntimeError(f"no {want.value} line on {console} within {timeout:.0f} s")


def _measure(agent: agenthost.AgentHost, controller: controllerhost.ControllerHost, endpoint: str, mib: int,
             rounds: int) -> Iterator[Result]:
    manager = _stub(controller, endpoint, "instance-manager")
    attacher = _stub(controller, endpoint, "volume-attacher")
    host_public = attacher.GetHostIdentity(pb.GetHostIdentityRequest(), timeout=CALL_TIMEOUT_S).public_key
    iid = str(uuid.uuid4())
    manager.StartInstance(pb.StartInstanceRequest(
        client_token=str(uuid.uuid4()), instance_id=iid, vcpus=1, memory_mib=256,
        image_digest=agent.image_digest, image_signature=agent.image_signature), timeout=CALL_TIMEOUT_S)
    console = agent.runtime_dir / uuid.UUID(iid).hex / "console.log"
    _wait_for(console, 0, 120, GuestSignal.READY)
    size = (mib + 16) * MIB
    samples: dict[str, list[DiskBenchLine]] = {"encrypted": [], "plain": []}
    try:
        for index, side in enumerate(side for r in range(rounds)
                                     for side in (("plain", "encrypted") if r % 2 == 0 else ("encrypted", "plain"))):
            vid = str(uuid.uuid4())
            key = bytearray(secrets.token_bytes(envelope.DATA_KEY_SIZE))
            if side == "plain":
                path = agent.volume_dir / vid
                with open(path, "wb") as file:
                    file.truncate(size)
                sealed = b""
            else:
                path = controller.encrypted_volume_dir / vid
                create_volume(path, size, key)
                sealed = envelope.wrap(key, host_public, uuid.UUID(iid), uuid.UUID(vid))
            envelope.wipe(key)
            offset = console.stat().st_size
            attacher.AttachVolume(pb.AttachVolumeRequest(client_token=str(uuid.uuid4()), instance_id=iid,
                                                         volume_id=vid, envelope=sealed), timeout=CALL_TIMEOUT_S)
            line = _wait_for(console, offset, 600, GuestSignal.DISK_BENCH)
            attacher.DetachVolume(pb.DetachVolumeRequest(client_token=str(uuid.uuid4()), instance_id=iid,
                                                         volume_id=vid), timeout=CALL_TIMEOUT_S)
            path.unlink()
            print(f"  round {index // 2 + 1}/{rounds} {side:9}: write {_mib_s(line.write_bytes_per_s):8.1f} MiB/s"
                  f"  read {_mib_s(line.read_bytes_per_s):8.1f} MiB/s", file=sys.stderr, flush=True)
            samples[side].append(line)
    finally:
        manager.StopInstance(pb.StopInstanceRequest(client_token=str(uuid.uuid4()), instance_id=iid,
                                                    mode=pb.STOP_MODE_FORCE), timeout=CALL_TIMEOUT_S)
    for direction in ("write", "read"):
        ours = statistics.median(_mib_s(getattr(s, f"{direction}_bytes_per_s")) for s in samples["encrypted"])
        baseline = statistics.median(_mib_s(getattr(s, f"{direction}_bytes_per_s")) for s in samples["plain"])
        yield Result(f"volume.{direction}", round(ours, 1), round(baseline, 1), "MiB/s",
                     {"samples": rounds, "mib_per_pass": mib, "report_if_ratio_below": 0.5})


def _mib_s(bytes_per_s: float | None) -> float:
    if bytes_per_s is None:  # a pass shorter than the guest clock's centisecond
        raise RuntimeError("a pass took less than one centisecond: raise the size per pass")
    return bytes_per_s / MIB
