"""SR-IOV virtual functions: discovery, the VF pool, and the vfio-pci binder (claims C6, C9, C12).

Theory of operation
-------------------
Three layers, from pure to effectful:

1. **Addresses.**  :func:`parse_bdf` reads the kernel's canonical PCI address
   form ``dddd:bb:dd.f`` (lowercase hex, device <= 0x1f, function <= 7) into a
   :class:`hostagent.wire.PciAddress`; nothing else is accepted.  The wire
   type is used as is, so addresses from ASSIGN_VF / RELEASE_VF compare equal
   to those found in sysfs without any conversion.

2. **Discovery** (:func:`discover_pfs`) reads, through a :class:`SysfsAccess`
   rooted at a configurable sysfs root, each physical function's
   ``sriov_totalvfs``, ``sriov_numvfs`` and ``virtfn0..virtfn{numvfs-1}``
   symlinks.  The result is a tuple of frozen :class:`PhysicalFunction`
   values; every read is capped and every number bounded, and any
   contradiction (an extra or missing ``virtfnN``, a VF listed twice, a link
   to a device that does not exist) is a :class:`SriovDiscoveryError`.

3. **The pool** (:class:`VfPool`) is pure bookkeeping over those values: which
   instance holds which VF.  Invariants (tested against a reference model):

   - a VF is held by at most one instance;
   - held VFs + free VFs = every discovered VF;
   - :meth:`VfPool.acquire` takes the free VF with the lowest index of the
     requested PF; :meth:`VfPool.release` hands back exactly that :class:`Vf`;
   - every refusal raises a :class:`VfPoolError` subclass and changes nothing.

4. **The binder** (:class:`SysfsVfBinder`, behind the :class:`VfBinder`
   protocol) moves a VF between its host driver and vfio-pci with the
   kernel's sysfs write-triggers (Documentation/ABI/testing/sysfs-bus-pci):
   ``driver_override``, ``drivers/<name>/unbind``, ``drivers/vfio-pci/bind``
   and, on release, ``reset`` (a function-level reset scrubs device state left
   by the guest, C12) and optionally ``drivers_probe``.  Each step registers
   its undo; when a step fails, the steps done so far are undone in reverse
   order (the failing step's own undo included, since a sysfs write that
   reports an error may still have acted; each undo checks the state and does
   nothing when there is nothing to undo) and a :class:`VfBindError` says which
   step failed and whether the rollback itself succeeded.  So either the whole operation happened or the
   device is back where it was (or the error says, with
   ``kind == ROLLBACK_FAILED``, that neither is known to hold).

The pool and the binder are separate on purpose: the agent acquires from the
pool, binds, hot-plugs, and on any failure undoes in reverse (issue 3, §5).
Neither is thread-safe; the agent serialises commands.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

from hostagent.wire import PciAddress

DEFAULT_SYSFS_ROOT = Path("/sys")
_T = TypeVar("_T")
VFIO_DRIVER = "vfio-pci"

# ASSIGN_VF answers carry the VF index as 0..255 (docs/wire-format.md, VF_STATUS);
# a PF with more enabled VFs than that cannot be represented and is refused.
MAX_VFS_PER_PF = 256
MAX_TOTAL_VFS = 0xFFFF  # the SR-IOV capability's TotalVFs field is 16 bits
# A large server has a few hundred PCI functions; with every VF of a few
# SR-IOV NICs enabled, a few thousand.  Beyond this the scan refuses rather
# than walk an unbounded directory.
MAX_PCI_DEVICES = 16384
MAX_DIR_ENTRIES = 4096  # entries of one device directory (attributes, virtfnN links)
MAX_ATTRIBUTE_BYTES = 4096  # one sysfs attribute is at most a page
MAX_LINK_BYTES = 1024

_BDF = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
_COUNT = re.compile(r"0|[1-9][0-9]{0,4}")
_VIRTFN = re.compile(r"virtfn(0|[1-9][0-9]{0,4})")
# Kernel driver names are C identifiers in practice, a few with dashes (vfio-pci).
_DRIVER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


# --- errors ------------------------------------------------------------------


class SriovError(Exception):
    """Base of every error of this module."""


class InvalidPciAddress(SriovError):
    """Text or a value that is not a canonical PCI function address."""


class SriovDiscoveryErrorKind(enum.Enum):
    PF_NOT_FOUND = "pf_not_found"  # a configured PF has no device directory
    NOT_SRIOV = "not_sriov"  # a configured PF has no sriov_totalvfs / sriov_numvfs
    MISSING = "missing"  # an entry the kernel always provides is absent
    UNREADABLE = "unreadable"
    MALFORMED = "malformed"  # a number, address or link target outside its grammar
    TOO_MANY = "too_many"  # above MAX_VFS_PER_PF, MAX_PCI_DEVICES or MAX_DIR_ENTRIES
    INCONSISTENT = "inconsistent"  # virtfnN links that contradict sriov_numvfs or each other


class SriovDiscoveryError(SriovError):
    def __init__(self, kind: SriovDiscoveryErrorKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


class VfPoolError(SriovError):
    """Base of every refusal by the pool.  A refusal never changes state."""


class VfPoolConfigError(VfPoolError):
    """The discovered PFs cannot form a pool (a PF or VF address appears twice)."""


class PfNotFound(VfPoolError):
    def __init__(self, pf: PciAddress) -> None:
        super().__init__(f"no SR-IOV physical function {pf}")
        self.pf = pf


class NoFreeVf(VfPoolError):
    def __init__(self, pf: PciAddress) -> None:
        super().__init__(f"physical function {pf} has no free VF")
        self.pf = pf


class VfNotAssigned(VfPoolError):
    """The VF is unknown, free, or held by another instance (one error, so a caller learns nothing else)."""

    def __init__(self, instance_id: uuid.UUID, vf: PciAddress) -> None:
        super().__init__(f"VF {vf} is not assigned to instance {instance_id}")
        self.instance_id = instance_id
        self.vf = vf


class VfRestoreRejected(VfPoolError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BindStep(enum.Enum):
    """The steps of :meth:`SysfsVfBinder.bind_vfio` and :meth:`SysfsVfBinder.unbind_vfio`, in order."""

    CHECK = "check"  # preconditions, before any write
    SET_DRIVER_OVERRIDE = "set_driver_override"
    UNBIND_HOST_DRIVER = "unbind_host_driver"
    BIND_VFIO = "bind_vfio"
    VERIFY = "verify"  # the device's driver link now names the expected driver
    UNBIND_VFIO = "unbind_vfio"
    RESET = "reset"
    CLEAR_DRIVER_OVERRIDE = "clear_driver_override"
    REPROBE = "reprobe"


class VfBindErrorKind(enum.Enum):
    DEVICE_NOT_FOUND = "device_not_found"  # refused before any write
    VFIO_DRIVER_MISSING = "vfio_driver_missing"  # vfio-pci not loaded; refused before any write
    BOUND_TO_OTHER_DRIVER = "bound_to_other_driver"  # unbind_vfio of a device vfio-pci does not own
    STEP_FAILED = "step_failed"  # a step failed; everything done before it was undone
    ROLLBACK_FAILED = "rollback_failed"  # a step failed and so did at least one undo: state unknown


class VfBindError(SriovError):
    def __init__(
        self,
        kind: VfBindErrorKind,
        address: PciAddress,
        step: BindStep,
        detail: str,
        rollback_failures: tuple[tuple[BindStep, str], ...] = (),
    ) -> None:
        super().__init__(f"{kind.value} at {step.value} for {address}: {detail}")
        self.kind = kind
        self.address = address
        self.step = step
        self.detail = detail
        self.rollback_failures = rollback_failures


# --- addresses ---------------------------------------------------------------


def parse_bdf(text: str) -> PciAddress:
    """``"0000:03:00.1"`` -> PciAddress; lowercase hex only, device <= 0x1f, function <= 7."""
    match = _BDF.fullmatch(text) if len(text) == 12 else None
    if match is None:
        raise InvalidPciAddress(f"not a canonical PCI address: {text[:32]!r}")
    address = PciAddress(*(int(group, 16) for group in match.groups()))
    check_pci_address(address)
    return address


def check_pci_address(address: PciAddress) -> PciAddress:
    """Refuse a PciAddress whose fields are out of range (it may have been built by hand)."""
    fields = (address.domain, address.bus, address.device, address.function)
    limits = (0xFFFF, 0xFF, 0x1F, 0x7)
    for value, limit in zip(fields, limits, strict=True):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise InvalidPciAddress(f"PCI address field out of range: {fields}")
    return address


def format_bdf(address: PciAddress) -> str:
    """The canonical sysfs name of a (checked) address."""
    return str(check_pci_address(address))


def _pci_key(address: PciAddress) -> tuple[int, int, int, int]:
    return (address.domain, address.bus, address.device, address.function)


# --- sysfs access ------------------------------------------------------------


class SysfsAccess(Protocol):
    """The few sysfs operations this module needs, on paths relative to a sysfs root.

    Every failure is an :class:`OSError`.  Tests substitute a fake kernel that
    applies the semantics of the write-trigger files (tests/inventory/fakesysfs.py).
    """

    def read(self, relpath: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str: ...

    def write(self, relpath: str, data: str) -> None: ...

    def readlink(self, relpath: str) -> str | None: ...

    def exists(self, relpath: str) -> bool: ...

    def listdir(self, relpath: str, limit: int = MAX_DIR_ENTRIES) -> tuple[str, ...]: ...


class HostSysfs:
    """:class:`SysfsAccess` on a real directory tree (``/sys`` in production)."""

    def __init__(self, root: Path = DEFAULT_SYSFS_ROOT) -> None:
        self.root = root

    def path(self, relpath: str) -> Path:
        parts = relpath.split("/")
        if relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
            # Paths are built from checked addresses and driver names; this is a
            # second line of defence against leaving the sysfs root.
            raise OSError(errno.EINVAL, "path escapes the sysfs root", relpath)
        return self.root.joinpath(*parts)

    def read(self, relpath: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
        with open(self.path(relpath), "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", relpath)
        try:
            return data.decode("ascii")
        except UnicodeDecodeError as error:
            raise OSError(errno.EILSEQ, "not ASCII", relpath) from error

    def write(self, relpath: str, data: str) -> None:
        # No O_CREAT: a sysfs attribute that does not exist must fail, never be
        # created.  O_TRUNC is what `echo x > attr` does and is a no-op on sysfs.
        # One write(2) call: sysfs hands each write to the kernel as one store.
        payload = data.encode("ascii")
        fd = os.open(self.path(relpath), os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            written = os.write(fd, payload)
        finally:
            os.close(fd)
        if written != len(payload):
            raise OSError(errno.EIO, f"short write ({written} of {len(payload)} bytes)", relpath)

    def readlink(self, relpath: str) -> str | None:
        path = self.path(relpath)
        if not path.is_symlink():
            return None
        target = os.readlink(path)
        if len(target) > MAX_LINK_BYTES:
            raise OSError(errno.ENAMETOOLONG, "link target too long", relpath)
        return target

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).exists()

    def listdir(self, relpath: str, limit: int = MAX_DIR_ENTRIES) -> tuple[str, ...]:
        names: list[str] = []
        with os.scandir(self.path(relpath)) as entries:
            for entry in entries:
                if len(names) == limit:
                    raise OSError(errno.E2BIG, f"more than {limit} entries", relpath)
                names.append(entry.name)
        return tuple(sorted(names))


def _device_dir(address: PciAddress) -> str:
    return f"bus/pci/devices/{format_bdf(address)}"


# --- discovery ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vf:
    """One virtual function: its PF, its index N (``virtfnN``) and its own address."""

    pf: PciAddress
    index: int
    address: PciAddress


@dataclass(frozen=True, slots=True)
class PhysicalFunction:
    """An SR-IOV physical function and its enabled VFs, ``vfs[i].index == i``."""

    address: PciAddress
    total_vfs: int
    vfs: tuple[Vf, ...]


def _discovery_read(sysfs: SysfsAccess, relpath: str) -> str:
    try:
        return sysfs.read(relpath, MAX_ATTRIBUTE_BYTES)
    except FileNotFoundError as error:
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.MISSING, relpath) from error
    except OSError as error:
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.UNREADABLE, f"{relpath}: {error.strerror}") from error


def _read_count(sysfs: SysfsAccess, relpath: str, maximum: int) -> int:
    text = _discovery_read(sysfs, relpath)
    body = text[:-1] if text.endswith("\n") else text
    if not _COUNT.fullmatch(body):
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.MALFORMED, f"{relpath}: {body[:16]!r}")
    value = int(body)
    if value > maximum:
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.TOO_MANY, f"{relpath}: {value} > {maximum}")
    return value


def _guard_os(relpath: str, action: Callable[[], _T]) -> _T:
    try:
        return action()
    except OSError as error:
        kind = SriovDiscoveryErrorKind.TOO_MANY if error.errno == errno.E2BIG else SriovDiscoveryErrorKind.UNREADABLE
        raise SriovDiscoveryError(kind, f"{relpath}: {error.strerror}") from error


def _read_pf(sysfs: SysfsAccess, address: PciAddress) -> PhysicalFunction:
    device = _device_dir(address)
    total = _read_count(sysfs, f"{device}/sriov_totalvfs", MAX_TOTAL_VFS)
    enabled = _read_count(sysfs, f"{device}/sriov_numvfs", MAX_TOTAL_VFS)
    if enabled > total:
        raise SriovDiscoveryError(
            SriovDiscoveryErrorKind.INCONSISTENT, f"{device}: numvfs {enabled} > totalvfs {total}"
        )
    if enabled > MAX_VFS_PER_PF:
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.TOO_MANY, f"{device}: {enabled} VFs > {MAX_VFS_PER_PF}")
    names = _guard_os(device, lambda: sysfs.listdir(device, MAX_DIR_ENTRIES))
    links = {name for name in names if name.startswith("virtfn")}
    expected = {f"virtfn{index}" for index in range(enabled)}
    if links != expected:
        odd = sorted(links ^ expected)[:4]
        raise SriovDiscoveryError(
            SriovDiscoveryErrorKind.INCONSISTENT, f"{device}: virtfn links {odd} contradict sriov_numvfs={enabled}"
        )
    vfs: list[Vf] = []
    for index in range(enabled):
        link = f"{device}/virtfn{index}"
        target = _guard_os(link, partial(sysfs.readlink, link))
        if target is None:
            raise SriovDiscoveryError(SriovDiscoveryErrorKind.MALFORMED, f"{link} is not a symlink")
        # The kernel links virtfnN to the VF's device directory, a sibling of the
        # PF ("../0000:03:02.0"); only the last component names the VF.
        try:
            vf_address = parse_bdf(target.rsplit("/", 1)[-1])
        except InvalidPciAddress as error:
            raise SriovDiscoveryError(SriovDiscoveryErrorKind.MALFORMED, f"{link} -> {target[:64]!r}") from error
        if vf_address == address:
            raise SriovDiscoveryError(SriovDiscoveryErrorKind.INCONSISTENT, f"{link} points at the PF itself")
        if not _guard_os(link, partial(sysfs.exists, _device_dir(vf_address))):
            raise SriovDiscoveryError(SriovDiscoveryErrorKind.INCONSISTENT, f"{link}: VF {vf_address} has no device")
        vfs.append(Vf(address, index, vf_address))
    if len({vf.address for vf in vfs}) != len(vfs):
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.INCONSISTENT, f"{device}: a VF is listed twice")
    return PhysicalFunction(address, total, tuple(vfs))


def discover_pfs(sysfs: SysfsAccess, pfs: Iterable[PciAddress] | None = None) -> tuple[PhysicalFunction, ...]:
    """Read the SR-IOV physical functions under ``bus/pci/devices``.

    With ``pfs`` (the agent's configuration), exactly those PFs, each of which
    must exist and be SR-IOV capable.  Without it, every device that has a
    ``sriov_totalvfs`` attribute.  The result is sorted by PF address; a VF
    listed under two PFs is refused.
    """
    if pfs is None:
        names = _guard_os("bus/pci/devices", lambda: sysfs.listdir("bus/pci/devices", MAX_PCI_DEVICES))
        addresses: list[PciAddress] = []
        for name in names:
            try:
                candidate = parse_bdf(name)
            except InvalidPciAddress as error:
                raise SriovDiscoveryError(SriovDiscoveryErrorKind.MALFORMED, f"bus/pci/devices/{name[:32]}") from error
            if _guard_os(name, partial(sysfs.exists, f"{_device_dir(candidate)}/sriov_totalvfs")):
                addresses.append(candidate)
    else:
        addresses = []
        for pf in pfs:
            try:
                check_pci_address(pf)
            except InvalidPciAddress as error:
                raise SriovDiscoveryError(SriovDiscoveryErrorKind.MALFORMED, str(error)) from error
            device = _device_dir(pf)
            if not _guard_os(device, partial(sysfs.exists, device)):
                raise SriovDiscoveryError(SriovDiscoveryErrorKind.PF_NOT_FOUND, device)
            if not _guard_os(device, partial(sysfs.exists, f"{device}/sriov_totalvfs")):
                raise SriovDiscoveryError(SriovDiscoveryErrorKind.NOT_SRIOV, device)
            addresses.append(pf)
        if len(set(addresses)) != len(addresses):
            raise SriovDiscoveryError(SriovDiscoveryErrorKind.INCONSISTENT, "a PF is configured twice")
    found = tuple(_read_pf(sysfs, address) for address in sorted(addresses, key=_pci_key))
    all_vfs = [vf.address for pf in found for vf in pf.vfs]
    if len(set(all_vfs)) != len(all_vfs) or set(all_vfs) & {pf.address for pf in found}:
        raise SriovDiscoveryError(SriovDiscoveryErrorKind.INCONSISTENT, "a VF is listed under two PFs or is a PF")
    return found


# --- the pool ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VfAssignment:
    """One journaled holding: ``instance_id`` holds ``vf``."""

    instance_id: uuid.UUID
    vf: Vf


@dataclass(frozen=True, slots=True)
class VfPoolSnapshot:
    """Counts for metrics (VFS_TOTAL, VFS_FREE) and the assignments, sorted by VF address."""

    vfs_total: int
    vfs_free: int
    assignments: tuple[VfAssignment, ...]


class VfPool:
    """Which instance holds which VF; see the module docstring for the invariants."""

    def __init__(self, pfs: Iterable[PhysicalFunction]) -> None:
        by_pf: dict[PciAddress, PhysicalFunction] = {}
        by_address: dict[PciAddress, Vf] = {}
        for pf in pfs:
            if pf.address in by_pf:
                raise VfPoolConfigError(f"PF {pf.address} appears twice")
            by_pf[pf.address] = pf
            for index, vf in enumerate(pf.vfs):
                if vf.pf != pf.address or vf.index != index:
                    raise VfPoolConfigError(f"VF {vf.address} is not virtfn{index} of {pf.address}")
                if vf.address in by_address or vf.address in by_pf:
                    raise VfPoolConfigError(f"VF {vf.address} appears twice")
                by_address[vf.address] = vf
        if set(by_pf) & set(by_address):
            raise VfPoolConfigError("an address is both a PF and a VF")
        self._pfs = by_pf
        self._vfs = by_address
        # Mutable state: exactly this map.
        self._holder: dict[PciAddress, uuid.UUID] = {}

    # --- queries ---------------------------------------------------------------

    @property
    def pfs(self) -> tuple[PhysicalFunction, ...]:
        return tuple(sorted(self._pfs.values(), key=lambda pf: _pci_key(pf.address)))

    def holder_of(self, vf_address: PciAddress) -> uuid.UUID | None:
        return self._holder.get(vf_address)

    def held_by(self, instance_id: uuid.UUID) -> tuple[Vf, ...]:
        """The VFs an instance holds, sorted by address (the order of INSTANCE_INFO.vfs)."""
        held = (self._vfs[address] for address, holder in self._holder.items() if holder == instance_id)
        return tuple(sorted(held, key=lambda vf: _pci_key(vf.address)))

    def snapshot(self) -> VfPoolSnapshot:
        assignments = tuple(
            VfAssignment(holder, self._vfs[address])
            for address, holder in sorted(self._holder.items(), key=lambda item: _pci_key(item[0]))
        )
        return VfPoolSnapshot(len(self._vfs), len(self._vfs) - len(self._holder), assignments)

    # --- commands --------------------------------------------------------------

    def acquire(self, instance_id: uuid.UUID, pf: PciAddress) -> Vf:
        """Give ``instance_id`` the free VF of ``pf`` with the lowest index (PfNotFound, NoFreeVf)."""
        function = self._pfs.get(pf)
        if function is None:
            raise PfNotFound(pf)
        for vf in function.vfs:
            if vf.address not in self._holder:
                self._holder[vf.address] = instance_id
                return vf
        raise NoFreeVf(pf)

    def release(self, instance_id: uuid.UUID, vf_address: PciAddress) -> Vf:
        """Return a VF that ``instance_id`` holds (VfNotAssigned otherwise)."""
        if self._holder.get(vf_address) != instance_id:
            raise VfNotAssigned(instance_id, vf_address)
        del self._holder[vf_address]
        return self._vfs[vf_address]

    def release_all(self, instance_id: uuid.UUID) -> tuple[Vf, ...]:
        """Return every VF ``instance_id`` holds (none is not an error: an instance may hold none)."""
        held = self.held_by(instance_id)
        for vf in held:
            del self._holder[vf.address]
        return held

    def restore(self, assignments: Iterable[VfAssignment]) -> None:
        """Rebuild the holdings from a journal, all or nothing, into a pool that holds nothing.

        Every VF must be one this pool discovered (same PF, index and address)
        and appear once; otherwise :class:`VfRestoreRejected` and nothing changes.
        """
        if self._holder:
            raise VfRestoreRejected("the pool already holds assignments")
        holder: dict[PciAddress, uuid.UUID] = {}
        for assignment in assignments:
            vf = assignment.vf
            if self._vfs.get(vf.address) != vf:
                raise VfRestoreRejected(f"VF {vf.address} (virtfn{vf.index} of {vf.pf}) is not in this pool")
            if vf.address in holder:
                raise VfRestoreRejected(f"VF {vf.address} is held twice")
            holder[vf.address] = assignment.instance_id
        self._holder = holder


# --- the binder --------------------------------------------------------------


class VfBinder(Protocol):
    """Moves a VF to vfio-pci and back.  Implementations roll back on failure (see module docstring)."""

    def bind_vfio(self, vf: PciAddress) -> None: ...

    def unbind_vfio(self, vf: PciAddress) -> None: ...


class _StepFailed(Exception):
    """A step ran without an OSError but did not have its effect (internal to the binder)."""


class _Transaction:
    """Runs steps, remembers how to undo each, and undoes them in reverse when one fails."""

    def __init__(self, address: PciAddress) -> None:
        self._address = address
        self._undo: list[tuple[BindStep, Callable[[], None]]] = []

    def run(self, step: BindStep, action: Callable[[], None], undo: Callable[[], None] | None = None) -> None:
        # The undo is registered before the action runs, so a failing step is
        # undone too: a sysfs write that reports an error may still have had an
        # effect (a probe that bound the device, then failed).  Every undo is
        # therefore written to be harmless when its action did nothing.
        if undo is not None:
            self._undo.append((step, undo))
        try:
            action()
        except (OSError, _StepFailed) as error:
            self._fail(step, error)

    def _fail(self, step: BindStep, cause: Exception) -> NoReturn:
        failures: list[tuple[BindStep, str]] = []
        for done, undo in reversed(self._undo):
            try:
                undo()
            except (OSError, _StepFailed) as error:
                failures.append((done, str(error)))
        kind = VfBindErrorKind.ROLLBACK_FAILED if failures else VfBindErrorKind.STEP_FAILED
        raise VfBindError(kind, self._address, step, str(cause), tuple(failures)) from cause


class SysfsVfBinder:
    """:class:`VfBinder` through the kernel's sysfs driver-binding files.

    ``reset``: on unbind, write ``1`` to the VF's ``reset`` attribute (when the
    device has one) so that nothing the guest left in the function survives
    (C12).  ``reprobe``: on unbind, ask the kernel to probe the VF again so a
    host driver may take it; off by default because a host that never uses VFs
    itself is smaller (C6), and an unbound VF is what bind_vfio expects.
    """

    def __init__(self, sysfs: SysfsAccess, *, reset: bool = True, reprobe: bool = False) -> None:
        self._sysfs = sysfs
        self._reset = reset
        self._reprobe = reprobe

    def current_driver(self, vf: PciAddress) -> str | None:
        """The name of the driver bound to ``vf``, or None."""
        target = self._sysfs.readlink(f"{_device_dir(vf)}/driver")
        if target is None:
            return None
        name = target.rsplit("/", 1)[-1]
        if not _DRIVER_NAME.fullmatch(name):
            raise OSError(errno.EINVAL, f"odd driver link target {target[:64]!r}", _device_dir(vf))
        return name

    def bind_vfio(self, vf: PciAddress) -> None:
        """Bind ``vf`` to vfio-pci; a no-op when it already is (so a retry after a crash is safe)."""
        bdf, _device, override = self._precheck(vf)
        current, previous_override, _has_reset = self._observe(vf)
        if current == VFIO_DRIVER and previous_override == VFIO_DRIVER:
            return
        tx = _Transaction(vf)
        # driver_override first, so that nothing (a hotplug event, drivers_probe)
        # can hand the device back to its host driver between unbind and bind.
        tx.run(
            BindStep.SET_DRIVER_OVERRIDE,
            lambda: self._sysfs.write(override, VFIO_DRIVER),
            lambda: self._write_override(override, previous_override),
        )
        if current is not None and current != VFIO_DRIVER:
            host_driver = current
            tx.run(
                BindStep.UNBIND_HOST_DRIVER,
                lambda: self._sysfs.write(f"bus/pci/drivers/{host_driver}/unbind", bdf),
                # The kernel matches a driver only if the override allows it, so
                # the undo restores the previous override before binding again.
                lambda: self._rebind(vf, host_driver, previous_override),
            )
        if current != VFIO_DRIVER:
            tx.run(
                BindStep.BIND_VFIO,
                lambda: self._sysfs.write(f"bus/pci/drivers/{VFIO_DRIVER}/bind", bdf),
                lambda: self._unbind_if_bound(vf, VFIO_DRIVER),
            )
        tx.run(BindStep.VERIFY, lambda: self._expect_driver(vf, VFIO_DRIVER))

    def unbind_vfio(self, vf: PciAddress) -> None:
        """Unbind ``vf`` from vfio-pci, reset it, clear its override, optionally re-probe it.

        An unbound VF is accepted (the unbind step is skipped); a VF bound to
        any other driver is refused before any write (BOUND_TO_OTHER_DRIVER).
        """
        bdf, device, override = self._precheck(vf)
        current, previous_override, has_reset = self._observe(vf)
        if current not in (None, VFIO_DRIVER):
            raise VfBindError(
                VfBindErrorKind.BOUND_TO_OTHER_DRIVER, vf, BindStep.CHECK, f"bound to {current}, not {VFIO_DRIVER}"
            )
        tx = _Transaction(vf)
        if current == VFIO_DRIVER:
            tx.run(
                BindStep.UNBIND_VFIO,
                lambda: self._sysfs.write(f"bus/pci/drivers/{VFIO_DRIVER}/unbind", bdf),
                lambda: self._rebind(vf, VFIO_DRIVER, previous_override),
            )
        if self._reset and has_reset:
            tx.run(BindStep.RESET, lambda: self._sysfs.write(f"{device}/reset", "1"))
        tx.run(
            BindStep.CLEAR_DRIVER_OVERRIDE,
            lambda: self._sysfs.write(override, "\n"),
            lambda: self._write_override(override, previous_override),
        )
        if self._reprobe:
            # Whatever host driver the kernel picks may take the VF; undoing means unbinding it again.
            tx.run(
                BindStep.REPROBE, lambda: self._sysfs.write("bus/pci/drivers_probe", bdf), lambda: self._unbind_any(vf)
            )
        else:
            tx.run(BindStep.VERIFY, lambda: self._expect_driver(vf, None))

    # --- helpers ---------------------------------------------------------------

    def _precheck(self, vf: PciAddress) -> tuple[str, str, str]:
        try:
            bdf = format_bdf(vf)
        except InvalidPciAddress as error:
            raise VfBindError(VfBindErrorKind.DEVICE_NOT_FOUND, vf, BindStep.CHECK, str(error)) from error
        device = _device_dir(vf)
        try:
            if not self._sysfs.exists(device):
                raise VfBindError(VfBindErrorKind.DEVICE_NOT_FOUND, vf, BindStep.CHECK, device)
            if not self._sysfs.exists(f"bus/pci/drivers/{VFIO_DRIVER}"):
                raise VfBindError(VfBindErrorKind.VFIO_DRIVER_MISSING, vf, BindStep.CHECK, "is vfio-pci loaded?")
        except OSError as error:
            raise VfBindError(VfBindErrorKind.STEP_FAILED, vf, BindStep.CHECK, str(error)) from error
        return bdf, device, f"{device}/driver_override"

    def _observe(self, vf: PciAddress) -> tuple[str | None, str | None, bool]:
        """Current driver, current override and whether the device can be reset; read before any write."""
        device = _device_dir(vf)
        try:
            return (
                self.current_driver(vf),
                self._read_override(f"{device}/driver_override"),
                self._sysfs.exists(f"{device}/reset"),
            )
        except OSError as error:
            raise VfBindError(VfBindErrorKind.STEP_FAILED, vf, BindStep.CHECK, str(error)) from error

    def _read_override(self, override: str) -> str | None:
        text = self._sysfs.read(override)
        value = text[:-1] if text.endswith("\n") else text
        # The kernel shows an unset override as "(null)".
        return None if value in ("", "(null)") else value

    def _write_override(self, override: str, value: str | None) -> None:
        # Writing a lone newline clears driver_override (drivers/base/driver.c).
        self._sysfs.write(override, "\n" if value is None else value)

    def _expect_driver(self, vf: PciAddress, expected: str | None) -> None:
        actual = self.current_driver(vf)
        if actual != expected:
            raise _StepFailed(f"driver is {actual}, expected {expected}")

    def _rebind(self, vf: PciAddress, driver: str, override: str | None) -> None:
        """Undo an unbind: restore the override that lets ``driver`` match, then bind it again."""
        self._write_override(f"{_device_dir(vf)}/driver_override", override)
        if self.current_driver(vf) is None:
            self._sysfs.write(f"bus/pci/drivers/{driver}/bind", format_bdf(vf))
        self._expect_driver(vf, driver)

    def _unbind_if_bound(self, vf: PciAddress, driver: str) -> None:
        if self.current_driver(vf) == driver:
            self._sysfs.write(f"bus/pci/drivers/{driver}/unbind", format_bdf(vf))

    def _unbind_any(self, vf: PciAddress) -> None:
        current = self.current_driver(vf)
        if current is not None:
            self._sysfs.write(f"bus/pci/drivers/{current}/unbind", format_bdf(vf))
