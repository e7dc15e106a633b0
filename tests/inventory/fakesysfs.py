"""Fabricated sysfs trees, and a fake kernel that gives their write-triggers meaning.

No SR-IOV hardware exists on the machines this project is tested on (DESIGN.md,
"Environment facts"), so VF logic runs against a directory tree shaped like
``/sys``.  In real sysfs, ``drivers/<name>/bind`` and friends are write-triggers:
the kernel acts on the write and the file holds nothing.  In a plain directory
they would just be files, and a binder that wrote the wrong thing would pass.

So the tree comes with :class:`FakeKernel`, a :class:`~hostagent.inventory.SysfsAccess`
that performs every write on the real files of the tree *and then applies the
kernel's semantics*, failing the write with the errno the kernel would return:

- ``bus/pci/drivers/<X>/bind`` with a BDF: ENODEV if no such device or if its
  ``driver_override`` names another driver, EBUSY if it is bound already;
  otherwise the device's ``driver`` symlink is created (-> ``../../../bus/pci/drivers/X``)
  together with the driver's back link;
- ``bus/pci/drivers/<X>/unbind``: ENODEV unless the device is bound to X; removes both links;
- ``.../driver_override``: stores the name; a lone newline clears it (reads back "(null)");
- ``.../reset``: counts function-level resets in :attr:`FakeKernel.resets`;
- ``bus/pci/drivers_probe``: binds an unbound device to its override, or else
  to its native driver when that driver is loaded.

So "the VF ends up bound to vfio-pci" is observable as a real symlink in the
tree, exactly where the binder (and an operator) would look.  Failures are
injected per path or per write number (:meth:`FakeKernel.fail_path`,
:meth:`FakeKernel.fail_nth_write`), either before the write acts or after it
(a kernel that did the work and still returned an error), and
:attr:`FakeKernel.writes` records every attempted write, failed ones included.

CPU topology trees (``devices/system/cpu``) are built by :func:`write_cpu_tree`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostagent.inventory import HostSysfs, format_cpu_list, parse_bdf

# Hypothesis tests build a tree per example; on tmpfs that is ~40x faster than on disk.
_FAST_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for one generated tree, on tmpfs when the machine has one."""
    return tempfile.TemporaryDirectory(prefix="passivisor-fakesysfs-", dir=_FAST_SCRATCH)


# --- CPU topology ------------------------------------------------------------


def write_cpu_tree(
    root: Path,
    cores: Sequence[Sequence[int]],
    *,
    online: str | None = None,
    package_of_core: Callable[[int], int] = lambda index: 0,
    sibling_files: Iterable[str] = ("core_cpus_list", "thread_siblings_list"),
) -> Path:
    """Write ``root/devices/system/cpu`` for cores given as groups of sibling CPU ids; return that directory.

    Core ``i`` gets ``core_id`` ``i`` in package ``package_of_core(i)``; ``online``
    defaults to the canonical list of every CPU.  Tests then damage single files.
    """
    cpu_root = root / "devices" / "system" / "cpu"
    cpu_root.mkdir(parents=True, exist_ok=True)
    every_cpu = [cpu for core in cores for cpu in core]
    (cpu_root / "online").write_text((format_cpu_list(every_cpu) if online is None else online) + "\n")
    names = tuple(sibling_files)
    for index, core in enumerate(cores):
        for cpu in core:
            topology = cpu_root / f"cpu{cpu}" / "topology"
            topology.mkdir(parents=True, exist_ok=True)
            (topology / "physical_package_id").write_text(f"{package_of_core(index)}\n")
            (topology / "core_id").write_text(f"{index}\n")
            for name in names:
                (topology / name).write_text(format_cpu_list(core) + "\n")
    return cpu_root


# --- PCI ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """What the kernel knows about one device: bound driver and driver_override."""

    driver: str | None
    override: str | None


@dataclass
class _Injection:
    error: OSError
    remaining: int | None  # None: every time
    after_effect: bool  # the kernel acted, then reported the error


@dataclass
class FakePciHost:
    """A fabricated ``/sys`` PCI hierarchy under ``root`` (devices live in ``devices/pci0000:00``)."""

    root: Path
    native_driver: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for directory in ("devices/pci0000:00", "bus/pci/devices", "bus/pci/drivers"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        (self.root / "bus/pci/drivers_probe").write_text("")

    # --- building ---------------------------------------------------------------

    def add_driver(self, name: str) -> None:
        directory = self.root / "bus/pci/drivers" / name
        directory.mkdir(parents=True, exist_ok=True)
        for trigger in ("bind", "unbind", "new_id", "remove_id"):
            (directory / trigger).touch()

    def add_device(self, bdf: str, *, driver: str | None = None, native: str | None = None, reset: bool = True) -> None:
        """A PCI function; ``native`` is the driver drivers_probe picks, ``driver`` the one bound now."""
        parse_bdf(bdf)  # the fabricated tree is only ever canonical
        real = self.root / "devices/pci0000:00" / bdf
        real.mkdir(parents=True)
        (real / "driver_override").write_text("(null)\n")
        (real / "vendor").write_text("0x8086\n")
        if reset:
            (real / "reset").touch()
        os.symlink(f"../../../devices/pci0000:00/{bdf}", self.root / "bus/pci/devices" / bdf)
        if native is not None:
            self.native_driver[bdf] = native
        if driver is not None:
            self.add_driver(driver)
            self.link_driver(bdf, driver)

    def add_pf(
        self,
        pf: str,
        vfs: Sequence[str],
        *,
        total_vfs: int | None = None,
        pf_driver: str | None = "ice",
        vf_driver: str | None = "iavf",
    ) -> None:
        """An SR-IOV PF with ``vfs`` enabled (virtfn0.. in order), each VF bound to ``vf_driver``."""
        self.add_device(pf, driver=pf_driver, native=pf_driver)
        real = self.root / "devices/pci0000:00" / pf
        (real / "sriov_totalvfs").write_text(f"{len(vfs) if total_vfs is None else total_vfs}\n")
        (real / "sriov_numvfs").write_text(f"{len(vfs)}\n")
        for index, vf in enumerate(vfs):
            self.add_device(vf, driver=vf_driver, native=vf_driver)
            os.symlink(f"../{vf}", real / f"virtfn{index}")
            os.symlink(f"../{pf}", self.root / "devices/pci0000:00" / vf / "physfn")

    # --- kernel semantics -------------------------------------------------------

    def device_dir(self, bdf: str) -> Path:
        return self.root / "devices/pci0000:00" / bdf

    def driver_of(self, bdf: str) -> str | None:
        link = self.device_dir(bdf) / "driver"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def override_of(self, bdf: str) -> str | None:
        text = (self.device_dir(bdf) / "driver_override").read_text().rstrip("\n")
        return None if text == "(null)" else text

    def state(self) -> dict[str, DeviceState]:
        """Driver and override of every device: compare before/after to show nothing changed."""
        devices = sorted(os.listdir(self.root / "bus/pci/devices"))
        return {bdf: DeviceState(self.driver_of(bdf), self.override_of(bdf)) for bdf in devices}

    def link_driver(self, bdf: str, driver: str) -> None:
        os.symlink(f"../../../bus/pci/drivers/{driver}", self.device_dir(bdf) / "driver")
        os.symlink(f"../../../../devices/pci0000:00/{bdf}", self.root / "bus/pci/drivers" / driver / bdf)

    def unlink_driver(self, bdf: str, driver: str) -> None:
        os.unlink(self.device_dir(bdf) / "driver")
        os.unlink(self.root / "bus/pci/drivers" / driver / bdf)


class FakeKernel(HostSysfs):
    """:class:`HostSysfs` on a :class:`FakePciHost` tree, with the kernel's write semantics (module docstring)."""

    def __init__(self, host: FakePciHost) -> None:
        super().__init__(host.root)
        self.host = host
        self.writes: list[tuple[str, str]] = []
        self.resets: dict[str, int] = {}
        self.ignore_binds = False  # a bind that "succeeds" without effect (tests the VERIFY step)
        self._by_path: dict[str, _Injection] = {}
        self._nth: dict[int, _Injection] = {}

    # --- failure injection ------------------------------------------------------

    def fail_path(
        self, relpath: str, error: int = errno.EIO, *, times: int | None = None, after_effect: bool = False
    ) -> None:
        """Make writes to ``relpath`` fail with ``error`` (every time, or the next ``times`` times).

        With ``after_effect`` the write acts first and then reports the error.
        """
        self._by_path[relpath] = _Injection(OSError(error, os.strerror(error), relpath), times, after_effect)

    def fail_nth_write(self, n: int, error: int = errno.EIO, *, after_effect: bool = False) -> None:
        """Make the ``n``-th write from now (0-based, counting every attempted write) fail."""
        self._nth[len(self.writes) + n] = _Injection(OSError(error, os.strerror(error)), 1, after_effect)

    def _injected(self, relpath: str) -> _Injection | None:
        nth = self._nth.pop(len(self.writes) - 1, None)
        if nth is not None:
            return nth
        injection = self._by_path.get(relpath)
        if injection is None or injection.remaining == 0:
            return None
        if injection.remaining is not None:
            injection.remaining -= 1
        return injection

    # --- SysfsAccess ------------------------------------------------------------

    def write(self, relpath: str, data: str) -> None:
        self.writes.append((relpath, data))
        injection = self._injected(relpath)
        if injection is not None and not injection.after_effect:
            raise injection.error
        self._act(relpath, data)
        if injection is not None:
            raise injection.error

    def _act(self, relpath: str, data: str) -> None:
        super().write(relpath, data)  # the file records what was written last
        parts = relpath.split("/")
        if parts[:3] == ["bus", "pci", "drivers"] and len(parts) == 5 and parts[4] in ("bind", "unbind"):
            bdf = self._device_argument(data)
            if parts[4] == "bind":
                self._bind(bdf, parts[3])
            else:
                self._unbind(bdf, parts[3])
        elif relpath == "bus/pci/drivers_probe":
            self._probe(self._device_argument(data))
        elif parts[:3] == ["bus", "pci", "devices"] and len(parts) == 5 and parts[4] == "driver_override":
            value = "(null)" if data in ("", "\n") else data.rstrip("\n")
            (self.host.device_dir(parts[3]) / "driver_override").write_text(value + "\n")
        elif parts[:3] == ["bus", "pci", "devices"] and len(parts) == 5 and parts[4] == "reset":
            if data.rstrip("\n") != "1":
                raise OSError(errno.EINVAL, "reset takes 1", relpath)
            self.resets[parts[3]] = self.resets.get(parts[3], 0) + 1

    def _device_argument(self, data: str) -> str:
        bdf = data.rstrip("\n")
        if not (self.host.root / "bus/pci/devices" / bdf).exists():
            raise OSError(errno.ENODEV, "no such device", bdf)
        return bdf

    def _bind(self, bdf: str, driver: str) -> None:
        override = self.host.override_of(bdf)
        if override is not None and override != driver:
            raise OSError(errno.ENODEV, f"driver_override is {override}", bdf)
        if self.host.driver_of(bdf) is not None:
            raise OSError(errno.EBUSY, "device is bound", bdf)
        if not self.ignore_binds:
            self.host.link_driver(bdf, driver)

    def _unbind(self, bdf: str, driver: str) -> None:
        if self.host.driver_of(bdf) != driver:
            raise OSError(errno.ENODEV, f"not bound to {driver}", bdf)
        self.host.unlink_driver(bdf, driver)

    def _probe(self, bdf: str) -> None:
        if self.host.driver_of(bdf) is not None:
            return
        driver = self.host.override_of(bdf) or self.host.native_driver.get(bdf)
        if driver is not None and (self.host.root / "bus/pci/drivers" / driver).is_dir():
            self.host.link_driver(bdf, driver)
