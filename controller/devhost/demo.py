"""What `make demo` runs until the gRPC controller exists (issue 4).

Part 1 walks through the wire codec.  Part 2 starts a real host agent
(``passivisor-agent``, seccomp on) on a development host in ``.demo/`` and
drives it over its authenticated socket the way the controller will: start an
instance from a signed image, watch the guest boot on its serial console,
hot-plug a volume and see the guest list it, ask for an SR-IOV VF (this host
has none: a clear refusal), unplug the volume, stop the guest, pull the events
and metrics, and stop the agent.  With ``--backend qemu`` the guest is a real
Linux VM under QEMU (TCG); with ``--backend sim`` the VM is simulated and the
guest-side checks are skipped, which the output says.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from controller.agentlink import AgentLink
from hostagent.wire import demo as codec_demo
from hostagent.wire import messages as m

from . import agenthost

DEMO_DIR = Path(".demo")


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _wait_for_console(console: Path, accept: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists():
            for line in reversed(console.read_text(errors="replace").splitlines()):
                if accept(line.strip()):
                    return line.strip()
        time.sleep(0.2)
    raise SystemExit(f"demo: the guest did not print the expected line within {timeout:.0f} s ({console})")


def _show(message: object) -> str:
    """A message on one short line: enum names, short hex for bytes, ids as they are."""
    fields = []
    for name in getattr(message, "__dataclass_fields__", {}):
        value = getattr(message, name)
        if isinstance(value, bytes):
            value = value.hex()[:12] + "..."
        elif hasattr(value, "name") and not isinstance(value, str):
            value = value.name
        elif isinstance(value, tuple):
            value = "(" + ", ".join(str(v) for v in value) + ")"
        fields.append(f"{name}={value}")
    return f"{type(message).__name__}({', '.join(fields)})"


def _disks(line: str) -> list[str]:
    return line.split()[1:]


def agent_scenario(backend: str, directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    _step(f"provisioning a development host in {directory} (backend {backend})")
    host = agenthost.prepare(directory, backend=backend)
    print(f"channel secret, image-signing key and a signed image (digest {host.image_digest.hex()[:16]}...)")
    agent = agenthost.start(host, timeout=60)
    print(f"passivisor-agent pid {agent.pid} listens on {host.socket}; it never connects anywhere")
    guest = backend == "qemu"
    try:
        link = AgentLink(host.socket, host.secret(), timeout=120)
        link.connect()
        print("mutual handshake done; every frame from now on carries a MAC and a sequence number")
        print(f"PING -> {_show(link.request(m.Ping(1)))}")

        _step("START_INSTANCE: the agent re-verifies the image signature and hash, pins whole cores")
        iid = uuid.uuid4()
        info = link.request(m.StartInstance(iid, 1, 256, host.image_digest, host.image_signature))
        print(f"-> {_show(info)}")
        if not isinstance(info, m.InstanceInfo):
            raise SystemExit("demo: the instance did not start")
        console = host.runtime_dir / iid.hex / "console.log"
        if guest:
            print(_wait_for_console(console, lambda line: line == "PASSIVISOR-GUEST-READY", 90))
            print(_wait_for_console(console, lambda line: line.startswith("PASSIVISOR-RNG"), 30),
                  "(virtio-rng, claim C13)")
        else:
            print("(sim backend: no guest to watch)")

        _step("ATTACH_VOLUME: a raw 16 MiB volume, hot-plugged as virtio-blk")
        volume = uuid.uuid4()
        with open(host.volume_dir / str(volume), "wb") as file:
            file.truncate(16 << 20)
        print(f"-> {_show(link.request(m.AttachVolume(iid, volume, m.VolumeSource.FILE, False)))}")
        if guest:
            print(_wait_for_console(console, lambda line: line.startswith("PASSIVISOR-DISKS")
                                    and "vda" in _disks(line), 60), "(seen from inside the guest)")

        _step("ASSIGN_VF: this host has no SR-IOV hardware, so the agent refuses with a typed error")
        answer = link.request(m.AssignVf(iid, m.PciAddress(0, 0x3b, 0, 0), b"\x02\x00\x00\x00\x00\x01", 0))
        print(f"-> {_show(answer)}  (PF_NOT_FOUND: no such physical function here; state unchanged)")

        _step("DETACH_VOLUME")
        print(f"-> {_show(link.request(m.DetachVolume(iid, volume)))}")
        if guest:
            print(_wait_for_console(console, lambda line: line.startswith("PASSIVISOR-DISKS")
                                    and "vda" not in _disks(line), 60), "(the disk is gone inside the guest)")

        _step("STOP_INSTANCE: ACPI power-down, then quit after the timeout")
        print(f"-> {_show(link.request(m.StopInstance(iid, m.StopMode.GRACEFUL, 30)))}")
        print(f"runtime directory scrubbed: {not console.parent.exists()}")

        _step("pulled, never pushed: events and metrics")
        events = link.request(m.GetEvents(0, 64))
        assert isinstance(events, m.Events)
        for event in events.events:
            subject = event.instance_id or "host"
            print(f"  event {event.cursor}: {event.kind.name} {subject} ({event.reason.name})")
        metrics = link.request(m.GetMetrics())
        assert isinstance(metrics, m.Metrics)
        print("  " + ", ".join(f"{s.metric.name.lower()}={s.value}" for s in metrics.samples))
        link.close()
    finally:
        _step("stopping the agent (SIGTERM: it detaches from running VMs, which keep running)")
        print(f"passivisor-agent exited with {agenthost.stop(agent)}; its log is {host.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.devhost.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("qemu", "sim"), default="qemu")
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="where the development host lives")
    args = parser.parse_args(argv)
    _step("part 1: the wire codec")
    codec_demo.main()
    _step("part 2: the passive host agent")
    agent_scenario(args.backend, args.dir.absolute())
    print("\ndemo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
