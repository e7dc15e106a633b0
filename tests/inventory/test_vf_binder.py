"""The sysfs VF binder against a fabricated tree with a fake kernel: end states and rollback.

The fake kernel (tests/inventory/fakesysfs.py) applies the kernel's semantics
to every write, so "bound to vfio-pci" below means the device's ``driver``
symlink in the tree names vfio-pci, exactly as in a real ``/sys``.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from inventory.fakesysfs import DeviceState, FakeKernel, FakePciHost, scratch_dir

from hostagent.inventory import (
    BindStep,
    HostSysfs,
    SysfsVfBinder,
    VfBinder,
    VfBindError,
    VfBindErrorKind,
    VfPool,
    discover_pfs,
    parse_bdf,
)
from hostagent.wire import PciAddress

PF = "0000:03:00.0"
VF = "0000:03:02.0"
OTHER_VF = "0000:03:02.1"
VF_ADDRESS = parse_bdf(VF)
DEVICE = f"bus/pci/devices/{VF}"


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A fresh directory for a fabricated tree (on tmpfs when available: these tests create many files)."""
    with scratch_dir() as scratch:
        yield Path(scratch)


def make_host(root: Path, *, vf_driver: str | None = "iavf", vfio: bool = True) -> tuple[FakePciHost, FakeKernel]:
    host = FakePciHost(root)
    if vfio:
        host.add_driver("vfio-pci")
    host.add_pf(PF, [VF, OTHER_VF], total_vfs=8, vf_driver=vf_driver)
    if vf_driver is None:
        host.native_driver[VF] = "iavf"
        host.add_driver("iavf")
    return host, FakeKernel(host)


def test_the_binder_satisfies_the_protocol(root_dir: Path) -> None:
    _, kernel = make_host(root_dir)
    binder: VfBinder = SysfsVfBinder(kernel)
    assert isinstance(binder, SysfsVfBinder)


# --- happy paths ------------------------------------------------------------------------


def test_bind_moves_a_vf_from_its_host_driver_to_vfio(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    assert host.driver_of(VF) == "iavf"
    SysfsVfBinder(kernel).bind_vfio(VF_ADDRESS)
    assert host.state()[VF] == DeviceState("vfio-pci", "vfio-pci")
    assert os.readlink(root_dir / "bus/pci/drivers/vfio-pci" / VF).endswith(f"devices/pci0000:00/{VF}")
    assert not (root_dir / "bus/pci/drivers/iavf" / VF).exists()
    assert kernel.writes == [
        (f"{DEVICE}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/iavf/unbind", VF),
        ("bus/pci/drivers/vfio-pci/bind", VF),
    ]
    # The other VF of the PF is untouched.
    assert host.state()[OTHER_VF] == DeviceState("iavf", None)


def test_bind_of_an_unbound_vf_skips_the_unbind(root_dir: Path) -> None:
    host, kernel = make_host(root_dir, vf_driver=None)
    SysfsVfBinder(kernel).bind_vfio(VF_ADDRESS)
    assert host.state()[VF] == DeviceState("vfio-pci", "vfio-pci")
    assert [path for path, _ in kernel.writes] == [f"{DEVICE}/driver_override", "bus/pci/drivers/vfio-pci/bind"]


def test_bind_is_idempotent(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    binder = SysfsVfBinder(kernel)
    binder.bind_vfio(VF_ADDRESS)
    kernel.writes.clear()
    binder.bind_vfio(VF_ADDRESS)
    assert kernel.writes == []
    assert host.state()[VF] == DeviceState("vfio-pci", "vfio-pci")


def test_unbind_resets_and_leaves_the_vf_unbound(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    binder = SysfsVfBinder(kernel)
    binder.bind_vfio(VF_ADDRESS)
    kernel.writes.clear()
    binder.unbind_vfio(VF_ADDRESS)
    assert host.state()[VF] == DeviceState(None, None)
    assert kernel.resets == {VF: 1}
    assert kernel.writes == [
        ("bus/pci/drivers/vfio-pci/unbind", VF),
        (f"{DEVICE}/reset", "1"),
        (f"{DEVICE}/driver_override", "\n"),
    ]
    # Unbinding an unbound VF is harmless (a retry after a crash).
    binder.unbind_vfio(VF_ADDRESS)
    assert host.state()[VF] == DeviceState(None, None)


def test_unbind_with_reprobe_returns_the_vf_to_its_host_driver(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    binder = SysfsVfBinder(kernel, reprobe=True, reset=False)
    before = host.state()
    binder.bind_vfio(VF_ADDRESS)
    binder.unbind_vfio(VF_ADDRESS)
    assert host.state() == before
    assert kernel.resets == {}


def test_a_device_without_reset_is_not_reset(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    (host.device_dir(VF) / "reset").unlink()
    binder = SysfsVfBinder(kernel)
    binder.bind_vfio(VF_ADDRESS)
    binder.unbind_vfio(VF_ADDRESS)
    assert kernel.resets == {}
    assert host.state()[VF] == DeviceState(None, None)


# --- refusals before any write ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "vfio", "kind"),
    [
        (parse_bdf("0000:03:09.0"), True, VfBindErrorKind.DEVICE_NOT_FOUND),
        (PciAddress(0, 3, 0x20, 0), True, VfBindErrorKind.DEVICE_NOT_FOUND),
        (VF_ADDRESS, False, VfBindErrorKind.VFIO_DRIVER_MISSING),
    ],
)
def test_refusals_before_any_write_change_nothing(
    root_dir: Path, address: PciAddress, vfio: bool, kind: VfBindErrorKind
) -> None:
    host, kernel = make_host(root_dir, vfio=vfio)
    before = host.state()
    for operation in (SysfsVfBinder(kernel).bind_vfio, SysfsVfBinder(kernel).unbind_vfio):
        with pytest.raises(VfBindError) as caught:
            operation(address)
        assert caught.value.kind is kind
        assert caught.value.step is BindStep.CHECK
    assert kernel.writes == []
    assert host.state() == before


def test_unbind_refuses_a_vf_owned_by_another_driver(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    before = host.state()
    with pytest.raises(VfBindError) as caught:
        SysfsVfBinder(kernel).unbind_vfio(VF_ADDRESS)
    assert caught.value.kind is VfBindErrorKind.BOUND_TO_OTHER_DRIVER
    assert kernel.writes == []
    assert host.state() == before


def test_an_odd_driver_link_is_refused_before_any_write(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    link = host.device_dir(VF) / "driver"
    link.unlink()
    os.symlink("../../../bus/pci/drivers/..", link)
    with pytest.raises(VfBindError) as caught:
        SysfsVfBinder(kernel).bind_vfio(VF_ADDRESS)
    assert (caught.value.kind, caught.value.step) == (VfBindErrorKind.STEP_FAILED, BindStep.CHECK)
    assert kernel.writes == []


# --- rollback -----------------------------------------------------------------------------


def _prepared(root: Path, operation: str, vf_driver: str | None, reprobe: bool) -> tuple[FakePciHost, FakeKernel]:
    """A host ready for ``operation``: for an unbind, the VF is first bound by the binder (unless the
    tree already has it on vfio-pci, bound some other way and without an override)."""
    host, kernel = make_host(root, vf_driver=vf_driver)
    if operation == "unbind_vfio" and vf_driver != "vfio-pci":
        SysfsVfBinder(kernel, reprobe=reprobe).bind_vfio(VF_ADDRESS)
    kernel.writes.clear()
    return host, kernel


SCENARIOS = [
    ("bind_vfio", "iavf", False),
    ("bind_vfio", None, False),
    ("bind_vfio", "vfio-pci", False),  # bound already, but without the override
    ("unbind_vfio", "iavf", False),
    ("unbind_vfio", "iavf", True),
    ("unbind_vfio", "vfio-pci", False),
]


@pytest.mark.parametrize("after_effect", [False, True], ids=["failed-write", "acted-then-failed"])
@pytest.mark.parametrize(("operation", "vf_driver", "reprobe"), SCENARIOS)
def test_a_failure_at_any_write_rolls_everything_back(
    root_dir: Path, operation: str, vf_driver: str | None, reprobe: bool, after_effect: bool
) -> None:
    _, clean = _prepared(root_dir / "clean", operation, vf_driver, reprobe)
    getattr(SysfsVfBinder(clean, reprobe=reprobe), operation)(VF_ADDRESS)
    count = len(clean.writes)
    assert count >= 1
    for failing in range(count):
        host, kernel = _prepared(root_dir / f"run{failing}", operation, vf_driver, reprobe)
        binder = SysfsVfBinder(kernel, reprobe=reprobe)
        before = host.state()
        kernel.fail_nth_write(failing, errno.EINVAL, after_effect=after_effect)
        with pytest.raises(VfBindError) as caught:
            getattr(binder, operation)(VF_ADDRESS)
        assert caught.value.kind is VfBindErrorKind.STEP_FAILED, caught.value
        assert caught.value.rollback_failures == ()
        assert host.state() == before, f"write {failing} of {operation}"
        # The binder still works afterwards: the failed operation can be retried.
        getattr(binder, operation)(VF_ADDRESS)


def test_a_failing_bind_names_its_step_and_cause(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    before = host.state()
    kernel.fail_path("bus/pci/drivers/vfio-pci/bind", errno.EINVAL)  # e.g. the IOMMU group is not viable
    with pytest.raises(VfBindError) as caught:
        SysfsVfBinder(kernel).bind_vfio(VF_ADDRESS)
    assert caught.value.step is BindStep.BIND_VFIO
    assert caught.value.address == VF_ADDRESS
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.EINVAL
    assert host.state() == before == {**before, VF: DeviceState("iavf", None)}


def test_a_bind_without_effect_is_caught_by_verification(root_dir: Path) -> None:
    host, kernel = make_host(root_dir, vf_driver=None)
    before = host.state()
    kernel.ignore_binds = True
    with pytest.raises(VfBindError) as caught:
        SysfsVfBinder(kernel).bind_vfio(VF_ADDRESS)
    assert (caught.value.kind, caught.value.step) == (VfBindErrorKind.STEP_FAILED, BindStep.VERIFY)
    assert host.state() == before


def test_a_failing_reset_puts_the_vf_back_on_vfio(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    binder = SysfsVfBinder(kernel)
    binder.bind_vfio(VF_ADDRESS)
    kernel.fail_path(f"{DEVICE}/reset")
    with pytest.raises(VfBindError) as caught:
        binder.unbind_vfio(VF_ADDRESS)
    assert caught.value.step is BindStep.RESET
    # An unscrubbed VF must not go back to the host: it stays with vfio-pci.
    assert host.state()[VF] == DeviceState("vfio-pci", "vfio-pci")


def test_a_failing_rollback_is_reported_as_such(root_dir: Path) -> None:
    host, kernel = make_host(root_dir)
    kernel.fail_path("bus/pci/drivers/vfio-pci/bind")
    kernel.fail_path("bus/pci/drivers/iavf/bind")  # the host driver will not take the VF back
    with pytest.raises(VfBindError) as caught:
        SysfsVfBinder(kernel).bind_vfio(VF_ADDRESS)
    error = caught.value
    assert error.kind is VfBindErrorKind.ROLLBACK_FAILED
    assert error.step is BindStep.BIND_VFIO
    assert [step for step, _ in error.rollback_failures] == [BindStep.UNBIND_HOST_DRIVER]
    # The other undo steps still ran: the override is restored even though the rebind failed.
    assert host.state()[VF] == DeviceState(None, None)


# --- the sysfs access itself -----------------------------------------------------------------


def test_host_sysfs_never_creates_or_escapes(root_dir: Path) -> None:
    sysfs = HostSysfs(root_dir)
    with pytest.raises(FileNotFoundError):
        sysfs.write("bus/pci/drivers/vfio-pci/bind", VF)
    assert not (root_dir / "bus").exists()
    for escape in ("../etc/passwd", "/etc/passwd", "bus//pci", "bus/./pci", ""):
        with pytest.raises(OSError) as caught:
            sysfs.read(escape)
        assert caught.value.errno == errno.EINVAL


def test_host_sysfs_caps_reads_and_refuses_binary(root_dir: Path) -> None:
    (root_dir / "big").write_text("x" * 5000)
    (root_dir / "binary").write_bytes(b"\xff\n")
    sysfs = HostSysfs(root_dir)
    with pytest.raises(OSError) as big:
        sysfs.read("big")
    assert big.value.errno == errno.EFBIG
    assert sysfs.read("big", limit=5000) == "x" * 5000
    with pytest.raises(OSError) as binary:
        sysfs.read("binary")
    assert binary.value.errno == errno.EILSEQ


def test_host_sysfs_does_not_follow_a_symlinked_attribute(root_dir: Path) -> None:
    (root_dir / "target").write_text("keep\n")
    os.symlink("target", root_dir / "attribute")
    with pytest.raises(OSError) as caught:
        HostSysfs(root_dir).write("attribute", "1")
    assert caught.value.errno == errno.ELOOP
    assert (root_dir / "target").read_text() == "keep\n"


def test_host_sysfs_bounds_directory_listings(root_dir: Path) -> None:
    sysfs = HostSysfs(root_dir)
    (root_dir / "d").mkdir()
    for n in range(5):
        (root_dir / "d" / f"f{n}").touch()
    assert sysfs.listdir("d", limit=5) == tuple(f"f{n}" for n in range(5))
    with pytest.raises(OSError) as caught:
        sysfs.listdir("d", limit=4)
    assert caught.value.errno == errno.E2BIG


# --- the whole assignment flow, as the agent will run it --------------------------------------


def test_assignment_flow_rolls_back_when_the_vmm_refuses_the_device(root_dir: Path) -> None:
    """Issue 3, "Done when": bound to vfio-pci in the tree; when QEMU refuses, binding and allocation roll back."""
    host, kernel = make_host(root_dir)
    pool = VfPool(discover_pfs(kernel))
    binder = SysfsVfBinder(kernel)
    instance = uuid.UUID(int=7)
    tree_before, pool_before = host.state(), pool.snapshot()

    vf = pool.acquire(instance, parse_bdf(PF))
    binder.bind_vfio(vf.address)
    assert host.driver_of(str(vf.address)) == "vfio-pci"  # what device_add vfio-pci,host=BDF needs

    # device_add fails here (no VFIO hardware): undo in reverse order.
    binder.unbind_vfio(vf.address)
    assert pool.release(instance, vf.address) == vf
    assert pool.snapshot() == pool_before
    assert host.state() == {**tree_before, VF: DeviceState(None, None)}  # scrubbed, left for vfio next time
    assert kernel.resets == {VF: 1}
