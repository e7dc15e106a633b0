"""The QEMU command line and object names (hostagent/backends/qemu_cmdline.py); no QEMU needed."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.backend import LaunchSpec, vf_device_id, volume_device_id
from hostagent.backends.qemu_cmdline import (
    MAX_NODE_NAME_CHARS,
    SANDBOX,
    Accel,
    QemuOptions,
    RuntimePaths,
    build_argv,
    check_pci_address,
    is_managed_device,
    nbd_fd_name,
    opt_value,
    root_port_ids,
    volume_node_name,
)
from hostagent.wire.messages import PciAddress

QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
INSTANCE = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")


def spec(runtime_dir: Path = Path("/run/pv/i1"), **changes: object) -> LaunchSpec:
    values: dict[str, object] = {
        "instance_id": INSTANCE,
        "vcpus": 2,
        "memory_mib": 512,
        "host_cpus": (2, 3),
        "kernel": Path("/images/k"),
        "initrd": Path("/images/i"),
        "cmdline": "console=ttyS0 panic=-1 quiet",
        "runtime_dir": runtime_dir,
    }
    values.update(changes)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def argv_for(s: LaunchSpec | None = None, **options: object) -> list[str]:
    s = s or spec()
    qemu = QemuOptions(binary="/usr/bin/qemu-system-x86_64", **options)  # type: ignore[arg-type]
    return build_argv(s, qemu, RuntimePaths.for_dir(s.runtime_dir))


def values_of(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_the_exact_command_line() -> None:
    """The reviewed command line, in full: a change to the device model must show up here."""
    assert argv_for() == [
        "/usr/bin/qemu-system-x86_64",
        "-name", f"guest=passivisor-{INSTANCE},debug-threads=on",
        "-uuid", str(INSTANCE),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
        "-msg", "timestamp=on",
        "-machine", "q35,accel=tcg,mem-merge=off,dump-guest-core=off",
        "-cpu", "qemu64",
        "-smp", "2",
        "-m", "512M",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-chardev", "socket,id=mon0,path=/run/pv/i1/qmp.sock,server=off,reconnect=1",
        "-mon", "chardev=mon0,mode=control",
        "-chardev", "socket,id=ser0,path=/run/pv/i1/console.sock,server=off,reconnect=1",
        "-device", "isa-serial,chardev=ser0,id=serial0",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-pci,rng=rng0,id=rng0-pci",
        *[x for i in range(8) for x in ("-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis=1,slot={i + 1}")],
        "-kernel", "/images/k",
        "-initrd", "/images/i",
        "-append", "console=ttyS0 panic=-1 quiet",
    ]  # fmt: skip


def test_no_network_device_and_no_defaults() -> None:
    argv = argv_for()
    joined = " ".join(argv)
    for flag in ("-netdev", "-nic", "-net", "-usb", "-vga", "-drive", "-hda", "-cdrom", "-serial", "-monitor", "-qmp"):
        assert flag not in argv
    assert "virtio-net" not in joined and "e1000" not in joined
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    # Every device is named in the argv: serial, rng, root ports, nothing else.
    devices = [d.split(",")[0] for d in values_of(argv, "-device")]
    assert devices == ["isa-serial", "virtio-rng-pci"] + ["pcie-root-port"] * 8


def test_hardening_options() -> None:
    argv = argv_for()
    assert values_of(argv, "-sandbox") == [SANDBOX]
    assert "resourcecontrol=deny" in SANDBOX and "spawn=deny" in SANDBOX  # C15
    assert "mem-merge=off" in values_of(argv, "-machine")[0]  # C9: no KSM between instances
    assert "-S" in argv  # vCPUs start stopped until pinned
    assert "rng-random,filename=/dev/urandom,id=rng0" in values_of(argv, "-object")  # C13


def test_monitor_and_console_are_client_sockets_of_qemu() -> None:
    """C1: QEMU connects (server=off) to sockets the agent listens on, and reconnects after a live update."""
    chardevs = values_of(argv_for(), "-chardev")
    assert len(chardevs) == 2
    for chardev in chardevs:
        assert chardev.startswith("socket,") and "server=off" in chardev and "reconnect=1" in chardev
        assert "server=on" not in chardev and "wait" not in chardev


@pytest.mark.parametrize(("accel", "machine"), [("tcg", "accel=tcg"), ("kvm", "accel=kvm"), ("auto", "accel=kvm:tcg")])
def test_accelerators(accel: str, machine: str) -> None:
    assert f"q35,{machine}," in values_of(argv_for(accel=Accel(accel)), "-machine")[0]


def test_cpu_model_and_port_count_are_options() -> None:
    argv = argv_for(cpu_model="max", hotplug_ports=3)
    assert values_of(argv, "-cpu") == ["max"]
    assert [d for d in values_of(argv, "-device") if d.startswith("pcie-root-port")] == [
        f"pcie-root-port,id=rp{i},bus=pcie.0,chassis=1,slot={i + 1}" for i in range(3)
    ]


@pytest.mark.parametrize("model", ["host", "", "qemu64,+vmx", "a b", "-x"])
def test_unsafe_cpu_models_are_refused(model: str) -> None:
    with pytest.raises(ValueError):
        QemuOptions(binary="q", cpu_model=model)


@pytest.mark.parametrize("ports", [0, 25, -1])
def test_port_count_is_bounded(ports: int) -> None:
    with pytest.raises(ValueError):
        QemuOptions(binary="q", hotplug_ports=ports)


def test_commas_in_paths_are_escaped() -> None:
    argv = argv_for(spec(Path("/run/a,b")))
    assert "socket,id=mon0,path=/run/a,,b/qmp.sock,server=off,reconnect=1" in values_of(argv, "-chardev")
    assert opt_value("x,y,,z") == "x,,y,,,,z"
    with pytest.raises(ValueError):
        opt_value("a\nb")


def test_kernel_arguments_are_passed_verbatim() -> None:
    argv = argv_for(spec(cmdline="console=ttyS0 a=b,c", kernel=Path("/k,1")))
    assert values_of(argv, "-append") == ["console=ttyS0 a=b,c"]
    assert values_of(argv, "-kernel") == ["/k,1"]


def test_a_socket_path_too_long_for_sockaddr_un_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than"):
        argv_for(spec(Path("/" + "d" * 100)))


@pytest.mark.parametrize(
    "changes",
    [
        {"vcpus": 0},
        {"vcpus": 2, "host_cpus": (1,)},
        {"host_cpus": (1, 1)},
        {"host_cpus": (-1, 2)},
        {"memory_mib": 1},
        {"cmdline": "a\nb"},
        {"cmdline": "a\0b"},
    ],
)
def test_inconsistent_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        argv_for(spec(**changes))


@given(st.uuids())
def test_volume_names_are_valid_for_qemu(volume_id: uuid.UUID) -> None:
    node = volume_node_name(volume_id)
    assert len(node) <= MAX_NODE_NAME_CHARS and QEMU_ID.fullmatch(node)
    assert QEMU_ID.fullmatch(volume_device_id(volume_id))
    assert QEMU_ID.fullmatch(nbd_fd_name(volume_id))
    assert is_managed_device(volume_device_id(volume_id))
    assert volume_node_name(volume_id) == node  # deterministic: the same after an agent restart


@given(st.uuids(), st.uuids())
def test_volume_names_are_injective(a: uuid.UUID, b: uuid.UUID) -> None:
    if a != b:
        assert volume_node_name(a) != volume_node_name(b)
        assert nbd_fd_name(a) != nbd_fd_name(b)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_vf_ids_are_valid_for_qemu(domain: int, bus: int, device: int, function: int) -> None:
    vf = PciAddress(domain, bus, device, function)
    check_pci_address(vf)
    assert QEMU_ID.fullmatch(vf_device_id(vf)) and is_managed_device(vf_device_id(vf))


@pytest.mark.parametrize("vf", [PciAddress(0x10000, 0, 0, 0), PciAddress(0, 0x100, 0, 0),
                                PciAddress(0, 0, 0x20, 0), PciAddress(0, 0, 0, 8), PciAddress(0, -1, 0, 0)])
def test_out_of_range_pci_addresses_are_refused(vf: PciAddress) -> None:
    with pytest.raises(ValueError):
        check_pci_address(vf)


def test_only_hotplugged_devices_are_managed() -> None:
    for fixed in ("rp0", "serial0", "rng0-pci", "", "vol-", "vol-a b"):
        assert not is_managed_device(fixed)
    assert root_port_ids(3) == ("rp0", "rp1", "rp2")
