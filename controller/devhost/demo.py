"""What `make demo` runs: the whole host, driven through pvctl as a control plane would.

Part 1 walks through the wire codec.  Part 2 brings up a development host in
``.demo/`` with ``pvctl dev up`` (PKI, the sandboxed ``passivisor-agent``,
``passivisor-controller``) and runs a scenario with ``pvctl``, each call over
mTLS with the certificate of the role whose job it is: start an instance from
a signed image and watch the guest boot on its serial console; make an
encrypted volume whose data key is wrapped to the host's identity key, see an
envelope bound to another instance refused, attach the volume and watch the
guest write a marker to it, detach and check that the file holds no plain
text, attach again and watch the guest read the marker back; ask for an
SR-IOV VF (this host has none: a clear FAILED_PRECONDITION), stop, read and
verify the audit chain, pull the events, and shut everything down with
``pvctl dev down``.  With
``--backend sim`` the VM is simulated and the guest-side checks are skipped,
which the output says.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from hostagent.wire import demo as codec_demo

DEMO_DIR = Path(".demo")


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _wait_for_console(console: Path, accept: Callable[[str], bool], timeout: float, after: int = 0) -> str:
    """The newest console line (from byte ``after`` on) that ``accept`` takes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists():
            for line in reversed(console.read_bytes()[after:].decode(errors="replace").splitlines()):
                if accept(line.strip()):
                    return line.strip()
        time.sleep(0.2)
    raise SystemExit(f"demo: the guest did not print the expected line within {timeout:.0f} s ({console})")


def pvctl(directory: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run pvctl (as a control-plane service would) and echo the command and its output."""
    argv = [sys.executable, "-m", "controller.cli", *args]
    shown = " ".join(a if len(a) <= 40 else a[:16] + "..." for a in args)
    print(f"$ pvctl {shown}", flush=True)
    run = subprocess.run(argv, capture_output=True, text=True, cwd=directory.parent)  # noqa: S603
    for line in (run.stdout + run.stderr).strip().splitlines():
        print(f"  {line}")
    if check and run.returncode != 0:
        raise SystemExit(f"demo: pvctl {args[0]} failed")
    return run


def _disks(line: str) -> list[str]:
    return line.split()[1:]


def scenario(backend: str, directory: Path) -> None:
    if (directory / "dev.json").exists():
        subprocess.run([sys.executable, "-m", "controller.cli", "dev", "down", str(directory)],  # noqa: S603
                       capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)
    _step(f"pvctl dev up: PKI, agent and controller in {directory} (backend {backend})")
    up = pvctl(directory, "dev", "up", str(directory), "--backend", backend)
    dev = json.loads(up.stdout)
    dev_args = ("--dev", str(directory))
    guest = backend == "qemu"
    try:
        _step("the instance-manager starts an instance; the agent re-verifies the signed image, pins whole cores")
        iid = str(uuid.uuid4())
        pvctl(directory, *dev_args, "start", iid, "--vcpus", "1", "--memory-mib", "256",
              "--image-digest", dev["image_digest"], "--image-signature", dev["image_signature"])
        console = Path(dev["runtime_dir"]) / uuid.UUID(iid).hex / "console.log"
        if guest:
            print("  guest:", _wait_for_console(console, lambda line: line == "PASSIVISOR-GUEST-READY", 90))
            print("  guest:", _wait_for_console(console, lambda line: line.startswith("PASSIVISOR-RNG"), 30),
                  "(virtio-rng, claim C13)")
        else:
            print("  (sim backend: no guest to watch)")

        _step("the volume-attacher makes an encrypted volume and wraps its data key to this host's identity key")
        volume = str(uuid.uuid4())
        volume_file = Path(dev["encrypted_volume_dir"]) / volume
        envelope_file = directory / f"{volume}.envelope"
        key_file = directory / f"{volume}.key"  # the control plane's copy, to re-wrap the key below
        pvctl(directory, *dev_args, "volume", "create", "--volume-id", volume, "--instance-id", iid,
              "--size", "16M", "--out", str(volume_file), "--envelope-out", str(envelope_file),
              "--key-out", str(key_file))

        _step("an envelope wrapped for another instance is refused: the key is bound to instance and volume")
        stray = directory / f"{volume}.other-instance.envelope"
        pvctl(directory, *dev_args, "volume", "wrap", "--key-file", str(key_file), "--volume-id", volume,
              "--instance-id", str(uuid.uuid4()), "--envelope-out", str(stray))
        pvctl(directory, *dev_args, "attach", iid, volume, "--envelope-file", str(stray), check=False)

        _step("attach it: the controller unwraps the key and serves the volume decrypted over a socketpair")
        pvctl(directory, *dev_args, "attach", iid, volume, "--envelope-file", str(envelope_file))
        marker = None
        if guest:
            print("  guest:", _wait_for_console(console, lambda line: line.startswith("PASSIVISOR-DISKS")
                                                and "vda" in _disks(line), 60), "(seen from inside the guest)")
            wrote = _wait_for_console(console, lambda line: line.startswith("PASSIVISOR-DISK-WROTE vda "), 60)
            marker = wrote.split()[-1]
            print("  guest:", wrote, "(the guest wrote a marker to its disk)")
        _step("the network-manager asks for an SR-IOV VF: this host has none, a typed refusal")
        pvctl(directory, *dev_args, "assign-vf", iid, "--pf", "0000:3b:00.0", "--mac", "02:00:00:00:00:01",
              check=False)

        _step("least privilege: the telemetry role may not stop instances")
        pvctl(directory, *dev_args, "--role", "telemetry", "stop", iid, "--force", check=False)

        _step("detach: the encryption process ends and the key is wiped; the file holds only ciphertext")
        pvctl(directory, *dev_args, "detach", iid, volume)
        if guest:
            print("  guest:", _wait_for_console(console, lambda line: line.startswith("PASSIVISOR-DISKS")
                                                and "vda" not in _disks(line), 60), "(the disk is gone)")
        if marker is not None:
            found = marker.encode() in volume_file.read_bytes()
            print(f"  the marker {'IS' if found else 'is not'} in the volume file {volume_file.name} in plain text")
            if found:
                raise SystemExit("demo: the encrypted volume holds the guest's data in plain text")

            _step("attach again: the guest reads its marker back through the encrypted path")
            offset = console.stat().st_size
            pvctl(directory, *dev_args, "attach", iid, volume, "--envelope-file", str(envelope_file))
            print("  guest:", _wait_for_console(console, lambda line: line == f"PASSIVISOR-DISK-MARKER vda {marker}",
                                                60, after=offset), "(read back)")
            pvctl(directory, *dev_args, "detach", iid, volume)

        _step("stop")
        pvctl(directory, *dev_args, "stop", iid, "--timeout", "30")

        _step("pulled, never pushed: events, and the audit log with its hash chain verified")
        pvctl(directory, *dev_args, "events", "--max", "64")
        pvctl(directory, *dev_args, "audit", "read", "--max", "1000")
        pvctl(directory, *dev_args, "audit", "verify")
    finally:
        _step("pvctl dev down")
        pvctl(directory, "dev", "down", str(directory), check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.devhost.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("qemu", "sim"), default="qemu")
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="where the development host lives")
    args = parser.parse_args(argv)
    _step("part 1: the wire codec")
    codec_demo.main()
    _step("part 2: the host, through pvctl")
    scenario(args.backend, args.dir.absolute())
    print("\ndemo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
