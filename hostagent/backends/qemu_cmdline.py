"""What the agent tells QEMU: its command line and the names of the objects it creates.

Pure functions, no I/O: everything here is unit-tested without QEMU.

The command line is the minimal device model of claim C15 and DESIGN.md ("Environment facts"):

- ``-nodefaults -no-user-config``: no default NIC, VGA, floppy, CD-ROM, serial or parallel port, and no
  configuration file from the host; every device the guest sees is named below (C6: no network
  device at all, so there is no ``-netdev``/``-nic`` anywhere).
- ``q35`` with ``mem-merge=off`` (no KSM page sharing between instances, C9) and
  ``dump-guest-core=off`` (a QEMU core dump holds no guest memory, C7).
- A CPU model that TCG can run (``-cpu host`` aborts on this machine kind); vCPU count and memory
  from the :class:`~hostagent.backend.LaunchSpec`.
- ``-S``: the vCPUs stay stopped until the agent has pinned them to the instance's cores and
  issued ``cont``, so not one guest instruction runs on a core of another instance (C9).
- ``-sandbox on,...=deny``: QEMU's own seccomp filter; ``resourcecontrol=deny`` forbids QEMU to
  change its CPU affinity, which is why the agent pins the vCPU threads from outside (C15).
- ``virtio-rng-pci`` fed from ``/dev/urandom`` (C13).
- A fixed set of ``pcie-root-port`` devices, one per hot-pluggable device (volumes, VFs).
- The monitor and the serial console are *client* sockets of QEMU (``server=off``) that connect to
  sockets the agent listens on; ``reconnect=1`` makes QEMU connect again, once a second, to a
  restarted agent listening at the same path (C1: the agent never connects; C10: live update).
- ``-no-reboot``: a guest reset ends the VM (the guest's ``panic=-1`` relies on it), so a crashed
  guest shows up as an exit the agent reports, never as a silent reboot loop.
"""

from __future__ import annotations

import base64
import enum
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..backend import LaunchSpec, vf_device_id, volume_device_id
from ..wire.messages import PciAddress

# The device ids themselves are part of the backend contract (hostagent.backend), so that the
# service layer can compare journal and reality; they are re-exported here beside the other names.
__all__ = [
    "Accel",
    "QemuOptions",
    "RuntimePaths",
    "build_argv",
    "check_pci_address",
    "check_spec",
    "is_managed_device",
    "nbd_fd_name",
    "opt_value",
    "root_port_ids",
    "vf_device_id",
    "volume_device_id",
    "volume_node_name",
]

# Names of the files a running VM owns in its runtime directory.
MONITOR_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"  # QEMU's own stdout/stderr (diagnostics, never guest output)

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

# QEMU's block layer keeps node names in a 32-byte buffer (31 characters and a NUL).
MAX_NODE_NAME_CHARS = 31

MONITOR_CHARDEV = "mon0"
CONSOLE_CHARDEV = "ser0"
ROOT_PORT_PREFIX = "rp"
VOLUME_DEVICE_PREFIX = "vol-"  # as hostagent.backend.volume_device_id
VF_DEVICE_PREFIX = "vf-"  # as hostagent.backend.vf_device_id
VOLUME_NODE_PREFIX = "nv"
NBD_FD_PREFIX = "nbd-"

DEFAULT_CPU_MODEL = "qemu64"
DEFAULT_HOTPLUG_PORTS = 8
MAX_HOTPLUG_PORTS = 24  # q35's pcie.0 has 32 slots; leave room for the fixed devices
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
RECONNECT_S = 1

# The exact shapes of hostagent.backend.volume_device_id and vf_device_id.
_MANAGED_DEVICE = re.compile(r"vol-[0-9a-f]{32}|vf-[0-9a-f]{4}-[0-9a-f]{2}-[0-9a-f]{2}-[0-7]")
_CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Accel(enum.Enum):
    TCG = "tcg"
    KVM = "kvm"
    AUTO = "auto"  # KVM where QEMU can open /dev/kvm, TCG otherwise (QEMU's "kvm:tcg" fallback list)

    @property
    def machine_value(self) -> str:
        return "kvm:tcg" if self is Accel.AUTO else self.value


@dataclass(frozen=True)
class QemuOptions:
    """Host-wide settings of the QEMU backend (the per-VM values come from the LaunchSpec)."""

    binary: str
    accel: Accel = Accel.TCG
    cpu_model: str = DEFAULT_CPU_MODEL
    hotplug_ports: int = DEFAULT_HOTPLUG_PORTS

    def __post_init__(self) -> None:
        if not _CPU_MODEL.fullmatch(self.cpu_model) or self.cpu_model == "host":
            # "host" passes the host CPU through, which needs KVM and aborts on this machine kind.
            raise ValueError(f"unsupported CPU model {self.cpu_model!r}")
        if not 1 <= self.hotplug_ports <= MAX_HOTPLUG_PORTS:
            raise ValueError(f"hotplug_ports must be in 1..{MAX_HOTPLUG_PORTS}")


@dataclass(frozen=True)
class RuntimePaths:
    """Where one VM's sockets and logs live, all inside its private runtime directory."""

    runtime_dir: Path
    monitor: Path
    console: Path
    console_log: Path
    qemu_log: Path

    @staticmethod
    def for_dir(runtime_dir: Path) -> RuntimePaths:
        return RuntimePaths(
            runtime_dir=runtime_dir,
            monitor=runtime_dir / MONITOR_SOCKET,
            console=runtime_dir / CONSOLE_SOCKET,
            console_log=runtime_dir / CONSOLE_LOG,
            qemu_log=runtime_dir / QEMU_LOG,
        )

    def check(self) -> None:
        """Raise ValueError when a socket path cannot be bound (too long for sockaddr_un)."""
        for sock in (self.monitor, self.console):
            if len(bytes(sock)) > MAX_SOCKET_PATH_BYTES:
                raise ValueError(f"socket path {sock} is longer than {MAX_SOCKET_PATH_BYTES} bytes")


def opt_value(value: str) -> str:
    """Quote a value for QEMU's ``key=value,...`` option syntax: a literal comma is written twice."""
    if "\n" in value or "\0" in value:
        raise ValueError("option values cannot hold newlines or NULs")
    return value.replace(",", ",,")


def root_port_ids(count: int) -> tuple[str, ...]:
    return tuple(f"{ROOT_PORT_PREFIX}{i}" for i in range(count))


def _b32(u: uuid.UUID) -> str:
    # 16 bytes -> 26 base32 characters: injective, and short enough for a node name.
    return base64.b32encode(u.bytes).decode().rstrip("=").lower()


def volume_node_name(volume_id: uuid.UUID) -> str:
    """The block node name of a volume (31 characters at most, hence base32 and not the uuid text)."""
    name = VOLUME_NODE_PREFIX + _b32(volume_id)
    assert len(name) <= MAX_NODE_NAME_CHARS
    return name


def nbd_fd_name(volume_id: uuid.UUID) -> str:
    """The name a passed NBD socket gets in QEMU's fd table (QMP ``getfd``)."""
    return NBD_FD_PREFIX + _b32(volume_id)


def check_pci_address(vf: PciAddress) -> None:
    """Raise ValueError unless every field of ``vf`` is in range for a PCI function address."""
    for name, value, top in (
        ("domain", vf.domain, 0xFFFF),
        ("bus", vf.bus, 0xFF),
        ("device", vf.device, 0x1F),
        ("function", vf.function, 0x7),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"PCI {name} {value} out of range 0..{top}")


def is_managed_device(qdev_id: str) -> bool:
    """Whether a qdev id is exactly one this backend hot-plugs (and so reports in VmRecord.devices)."""
    return bool(_MANAGED_DEVICE.fullmatch(qdev_id))


def check_spec(spec: LaunchSpec) -> None:
    """The backend's own sanity check of a LaunchSpec (the agent validated it; C2: check again)."""
    if not 1 <= spec.vcpus <= 255:
        raise ValueError(f"vcpus {spec.vcpus} out of range 1..255")
    if len(spec.host_cpus) != spec.vcpus:
        raise ValueError(f"{spec.vcpus} vCPUs but {len(spec.host_cpus)} host CPUs to pin them to")
    if len(set(spec.host_cpus)) != len(spec.host_cpus) or any(c < 0 for c in spec.host_cpus):
        raise ValueError("host CPUs must be distinct and non-negative")
    if not 16 <= spec.memory_mib <= 1 << 22:
        raise ValueError(f"memory {spec.memory_mib} MiB out of range")
    if "\0" in spec.cmdline or "\n" in spec.cmdline:
        raise ValueError("kernel command line holds a NUL or a newline")


def build_argv(spec: LaunchSpec, options: QemuOptions, paths: RuntimePaths) -> list[str]:
    """The complete QEMU command line for ``spec``; see the module docstring for the why of each part."""
    check_spec(spec)
    paths.check()
    machine = f"q35,accel={options.accel.machine_value},mem-merge=off,dump-guest-core=off"
    monitor = f"socket,id={MONITOR_CHARDEV},path={opt_value(str(paths.monitor))},server=off,reconnect={RECONNECT_S}"
    console = f"socket,id={CONSOLE_CHARDEV},path={opt_value(str(paths.console))},server=off,reconnect={RECONNECT_S}"
    argv = [
        options.binary,
        "-name", f"guest=passivisor-{spec.instance_id},debug-threads=on",
        "-uuid", str(spec.instance_id),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-S",
        "-msg", "timestamp=on",
        "-machine", machine,
        "-cpu", options.cpu_model,
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-sandbox", SANDBOX,
        "-chardev", monitor,
        "-mon", f"chardev={MONITOR_CHARDEV},mode=control",
        "-chardev", console,
        "-device", f"isa-serial,chardev={CONSOLE_CHARDEV},id=serial0",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-pci,rng=rng0,id=rng0-pci",
    ]  # fmt: skip
    for i, port in enumerate(root_port_ids(options.hotplug_ports)):
        argv += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis=1,slot={i + 1}"]
    # -kernel, -initrd and -append take their value verbatim (no key=value parsing).
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline]
    return argv
