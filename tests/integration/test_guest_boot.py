"""Boots the real development guest under QEMU (TCG) and checks its console protocol.

Real components: ``qemu-system-x86_64`` (q35, TCG: nested KVM hangs guests on this machine kind) and
the guest that ``controller.devhost.guest.build_guest`` builds from Debian packages (first run
downloads them with ``apt-get download``; later runs use the cache). QMP is reached here over a Unix
socket that QEMU listens on and this test connects to; the agent itself uses a socketpair.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.devhost.guest import GuestConsoleLine, GuestImage, GuestSignal, build_guest, parse_console_line

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT_S = 60.0


class Console:
    """Follows the serial log file QEMU writes and hands out the guest's protocol lines in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._lines: list[GuestConsoleLine] = []

    def _poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        for raw in complete:
            line = parse_console_line(raw.decode(errors="replace"))
            if line is not None:
                self._lines.append(line)

    def wait_for(
        self, match: Callable[[GuestConsoleLine], bool], timeout: float, alive: Callable[[], bool]
    ) -> GuestConsoleLine:
        """Consume lines until one matches; fail on timeout or if QEMU exits first."""
        deadline = time.monotonic() + timeout
        while True:
            self._poll()
            while self._lines:
                line = self._lines.pop(0)
                if match(line):
                    return line
            if time.monotonic() > deadline or not alive():
                log = self.path.read_text(errors="replace") if self.path.exists() else "(none)"
                pytest.fail(f"no matching console line within {timeout} s (QEMU alive: {alive()}); log:\n{log}")
            time.sleep(0.05)


class Qmp:
    """Just enough QMP (qemu-qmp-ref, "QMP protocol") for these tests: commands and events."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._timeout = timeout
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        assert "QMP" in greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise AssertionError(f"QMP {command} failed: {message['error']}")
            else:
                return message["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            while True:
                for event in self.events:
                    if event["event"] == name:
                        self.events.remove(event)
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no QMP event {name} within {timeout} s (seen: {self.events})")
                self._sock.settimeout(remaining)
                try:
                    self.events.append(self._read())
                except TimeoutError:
                    pytest.fail(f"no QMP event {name} within {timeout} s (seen: {self.events})")
        finally:
            self._sock.settimeout(self._timeout)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class BootedGuest:
    def __init__(self, image: GuestImage, workdir: Path, extra: list[str]) -> None:
        assert QEMU is not None
        self.console_path = workdir / "console.log"
        qmp_path = workdir / "qmp.sock"
        argv = [
            QEMU,
            "-accel", "tcg",
            "-machine", "q35",
            "-m", "256",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initramfs),
            "-append", image.cmdline,
            "-serial", f"file:{self.console_path}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-device", "virtio-rng-pci",
            *extra,
        ]  # fmt: skip
        self.started = time.monotonic()
        self.stderr = (workdir / "qemu.stderr").open("wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        self.console = Console(self.console_path)
        self.qmp = Qmp(qmp_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(
        self, signal: GuestSignal, timeout: float = 30.0, words: tuple[str, ...] | None = None
    ) -> GuestConsoleLine:
        return self.console.wait_for(
            lambda line: line.signal is signal and (words is None or line.words == words), timeout, self.alive
        )

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.qmp.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return build_guest()


@pytest.fixture
def boot(image: GuestImage) -> Iterator[Callable[..., BootedGuest]]:
    workdir = Path(tempfile.mkdtemp(prefix="pvguest-"))  # short: a Unix socket path has 108 bytes
    guests: list[BootedGuest] = []

    def _boot(*extra: str) -> BootedGuest:
        guest = BootedGuest(image, workdir, list(extra))
        guests.append(guest)
        return guest

    yield _boot
    for guest in guests:
        guest.close()
    shutil.rmtree(workdir, ignore_errors=True)


def raw_disk(path: Path, size: int = 8 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_guest_reports_ready_virtio_rng_and_its_disks(boot: Callable[..., BootedGuest], tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "cold.raw")
    guest = boot("-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0")

    guest.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
    boot_s = time.monotonic() - guest.started
    print(f"guest boot to PASSIVISOR-GUEST-READY: {boot_s:.2f} s")

    rng = guest.wait_for(GuestSignal.RNG, timeout=10)
    assert any(name.startswith("virtio_rng") for name in rng.words), rng  # claim C13
    assert guest.wait_for(GuestSignal.DISKS, timeout=10).words == ("vda",)
    # Unchanged disks are repeated at least every ~5 s, so a reader never waits long for a status.
    assert guest.wait_for(GuestSignal.DISKS, timeout=10).words == ("vda",)


def test_guest_lists_a_hotplugged_disk_and_drops_it_after_unplug(
    boot: Callable[..., BootedGuest], tmp_path: Path
) -> None:
    disk = raw_disk(tmp_path / "hot.raw")
    guest = boot("-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1")
    guest.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)
    assert guest.wait_for(GuestSignal.DISKS, timeout=10).words == ()

    guest.qmp.execute(
        "blockdev-add", **{"node-name": "hot0", "driver": "raw", "file": {"driver": "file", "filename": str(disk)}}
    )
    guest.qmp.execute("device_add", driver="virtio-blk-pci", id="hotdisk", drive="hot0", bus="rp1")
    guest.wait_for(GuestSignal.DISKS, words=("vda",), timeout=30)

    # PCIe native hot-unplug waits ~5 s for an attention-button "cancel" before the guest lets go.
    guest.qmp.execute("device_del", id="hotdisk")
    guest.qmp.wait_event("DEVICE_DELETED", timeout=30)
    guest.wait_for(GuestSignal.DISKS, words=(), timeout=10)
    guest.qmp.execute("blockdev-del", **{"node-name": "hot0"})


def test_acpi_powerdown_stops_the_guest_gracefully(boot: Callable[..., BootedGuest]) -> None:
    guest = boot()
    guest.wait_for(GuestSignal.READY, timeout=BOOT_TIMEOUT_S)

    asked = time.monotonic()
    guest.qmp.execute("system_powerdown")
    guest.wait_for(GuestSignal.POWEROFF, timeout=30)
    shutdown = guest.qmp.wait_event("SHUTDOWN", timeout=30)
    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert guest.proc.wait(timeout=30) == 0
    print(f"guest graceful power-off: {time.monotonic() - asked:.2f} s")
