"""``python -m bench start``: StartInstance and AttachVolume through the controller beside QEMU by hand.

The fast tests check the hand-driven side's console reader and QMP client against a socketpair.
The slow one starts what the benchmark starts (a qemu-backend ``passivisor-agent``, a
``passivisor-controller`` with TLS on port 0 and the development PKI, and the development guest
under QEMU with TCG), one round per side; as in test_bench_cli.py, no timing is asserted: only the
output contract (names, units, positive figures, the issue's targets in the extras).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# bench/ is a tool run from the checkout (``python -m bench``), not an installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import start  # noqa: E402
from bench.harness import QUICK, Result  # noqa: E402
from controller.devhost.guest import GuestSignal  # noqa: E402

# --- the console, as the hand launch reads it ---------------------------------------------


def test_the_socket_console_finds_a_line_split_across_reads() -> None:
    ours, qemu = socket.socketpair()
    with ours, qemu:
        console = start.SocketConsole(ours)
        qemu.sendall(b"[    0.1] kernel noise\r\nPASSIVISOR-GUEST-RE")
        threading.Timer(0.05, qemu.sendall, (b"ADY\r\nPASSIVISOR-DISKS\r\nPASSIVISOR-DISKS vda\r\n",)).start()
        console.wait(GuestSignal.READY, timeout=5)
        console.wait(GuestSignal.DISKS, start._lists_disk, timeout=5)  # the empty DISKS line is skipped


def test_the_socket_console_refuses_a_guest_error_and_times_out() -> None:
    ours, qemu = socket.socketpair()
    with ours, qemu:
        console = start.SocketConsole(ours)
        qemu.sendall(b"PASSIVISOR-ERROR disk vda cannot open /dev/vda\r\n")
        with pytest.raises(RuntimeError, match="cannot open"):
            console.wait(GuestSignal.DISKS, timeout=5)
        with pytest.raises(RuntimeError, match=r"within 0\.1 s"):
            console.wait(GuestSignal.DISKS, timeout=0.1)


def test_the_log_console_reads_what_the_agent_appends(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    console = start.LogConsole(log)
    threading.Timer(0.05, log.write_bytes, (b"PASSIVISOR-DISKS vdb\r\nPASSIVISOR-DISKS vda vdb\r\n",)).start()
    console.wait(GuestSignal.DISKS, start._lists_disk, timeout=5)


# --- QMP by hand ------------------------------------------------------------------------------


def test_hand_qmp_skips_events_passes_descriptors_and_raises_on_errors(tmp_path: Path) -> None:
    ours, qemu = socket.socketpair()
    received: list[tuple[dict[str, object], int]] = []

    def monitor() -> None:
        qemu.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        reader = qemu.makefile("rb")
        for answer in (b'{"event": "RESUME", "data": {}}\r\n{"return": {}}\r\n',
                       b'{"return": {"fdset-id": 3}}\r\n',
                       b'{"error": {"class": "GenericError", "desc": "no such bus"}}\r\n'):
            data, fds, _, _ = socket.recv_fds(qemu, 4096, 1)
            for fd in fds:
                os.close(fd)
            received.append((json.loads(data), len(fds)))
            qemu.sendall(answer)
        reader.close()

    server = threading.Thread(target=monitor)
    server.start()
    volume = tmp_path / "volume"
    volume.write_bytes(b"")
    with ours, qemu:
        qmp = start.HandQmp(ours, timeout=5)
        assert qmp.execute("cont") == {}
        fd = os.open(volume, os.O_RDWR)
        try:
            assert qmp.execute("add-fd", {"opaque": "vol-x"}, fd=fd) == {"fdset-id": 3}
        finally:
            os.close(fd)
        with pytest.raises(RuntimeError, match="no such bus"):
            qmp.execute("device_add", {"driver": "virtio-blk-pci"})
        server.join(5)
    assert received == [({"execute": "cont"}, 0), ({"execute": "add-fd", "arguments": {"opaque": "vol-x"}}, 1),
                        ({"execute": "device_add", "arguments": {"driver": "virtio-blk-pci"}}, 0)]


# --- one round per side, for real ------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
def test_one_round_reports_every_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(start, "QUICK_SIZES", start.Sizes(rounds=1))
    results: list[Result] = list(start.run(QUICK))
    assert [r.name for r in results] == ["start.start_to_ready", "start.start_to_qmp_ready",
                                         "start.attach_to_visible"]
    for result in results:
        line = json.loads(result.to_json())
        assert {"name", "ours", "baseline", "ratio", "unit"} <= line.keys()
        assert line["unit"] == "ms" and line["samples"] == 1
        assert line["ours"] > 0 and line["baseline"] > 0, line
    by_name = {r.name: r for r in results}
    assert by_name["start.start_to_ready"].extra["target_ratio"] == 1.1
    assert by_name["start.attach_to_visible"].extra["target_ratio"] == 1.2
    assert "target_ratio" not in by_name["start.start_to_qmp_ready"].extra
    # The guest is ready only after QEMU runs it, on both sides.
    assert by_name["start.start_to_ready"].ours > by_name["start.start_to_qmp_ready"].ours
    assert by_name["start.start_to_ready"].baseline > by_name["start.start_to_qmp_ready"].baseline
