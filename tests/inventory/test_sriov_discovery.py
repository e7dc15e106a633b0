"""PCI addresses and SR-IOV discovery against fabricated sysfs trees."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from inventory.fakesysfs import FakePciHost, scratch_dir

from hostagent.inventory import (
    HostSysfs,
    InvalidPciAddress,
    SriovDiscoveryError,
    SriovDiscoveryErrorKind,
    Vf,
    check_pci_address,
    discover_pfs,
    format_bdf,
    parse_bdf,
)
from hostagent.wire import PciAddress

# --- addresses -------------------------------------------------------------------------


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A fresh directory for a fabricated tree (on tmpfs when available: these tests create many files)."""
    with scratch_dir() as scratch:
        yield Path(scratch)


def test_parses_the_canonical_form() -> None:
    assert parse_bdf("0000:03:00.1") == PciAddress(0, 3, 0, 1)
    assert parse_bdf("ffff:ff:1f.7") == PciAddress(0xFFFF, 0xFF, 0x1F, 7)
    assert format_bdf(PciAddress(0x10, 0xA, 0x1F, 7)) == "0010:0a:1f.7"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "03:00.1",  # the domain is not optional
        "0000:03:00.1\n",
        " 0000:03:00.1",
        "0000:03:00.8",  # function > 7
        "0000:03:20.0",  # device > 0x1f
        "0000:03:00.01",
        "0000:3:00.1",
        "00000:03:00.1",
        "0000:03:00:1",
        "0000-03-00.1",
        "0000:0A:00.1",  # uppercase
        "000g:03:00.1",
        "0000:03:00.",
        "0000:03:0\u0661.1",  # a non-ASCII digit
        "../../etc/pas",
    ],
)
def test_rejects_every_other_address_text(text: str) -> None:
    with pytest.raises(InvalidPciAddress):
        parse_bdf(text)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_addresses_round_trip(domain: int, bus: int, device: int, function: int) -> None:
    address = PciAddress(domain, bus, device, function)
    assert parse_bdf(format_bdf(address)) == address


@given(st.text(alphabet="0123456789abcdefABX:.\n", max_size=14))
def test_parse_bdf_is_total(text: str) -> None:
    try:
        address = parse_bdf(text)
    except InvalidPciAddress:
        return
    assert format_bdf(address) == text


@pytest.mark.parametrize(
    "address",
    [
        PciAddress(0x10000, 0, 0, 0),
        PciAddress(0, 0x100, 0, 0),
        PciAddress(0, 0, 0x20, 0),
        PciAddress(0, 0, 0, 8),
        PciAddress(-1, 0, 0, 0),
        PciAddress(0, 0, 0, True),
    ],
)
def test_rejects_out_of_range_address_values(address: PciAddress) -> None:
    with pytest.raises(InvalidPciAddress):
        check_pci_address(address)
    with pytest.raises(InvalidPciAddress):
        format_bdf(address)


# --- discovery ---------------------------------------------------------------------------

PF = "0000:03:00.0"
VFS = ["0000:03:02.0", "0000:03:02.1", "0000:03:02.2"]
PF_B = "0000:81:00.0"
VFS_B = ["0000:81:10.0"]


def fabricate(root: Path) -> FakePciHost:
    host = FakePciHost(root)
    host.add_driver("vfio-pci")
    host.add_pf(PF_B, VFS_B, total_vfs=64)
    host.add_pf(PF, VFS, total_vfs=8)
    host.add_device("0000:00:1f.0", driver="lpc_ich")  # not SR-IOV: ignored by a scan
    return host


def test_scan_finds_every_sr_iov_pf_in_address_order(root_dir: Path) -> None:
    fabricate(root_dir)
    pfs = discover_pfs(HostSysfs(root_dir))
    assert [format_bdf(pf.address) for pf in pfs] == [PF, PF_B]
    first = pfs[0]
    assert first.total_vfs == 8
    assert first.vfs == tuple(Vf(parse_bdf(PF), index, parse_bdf(vf)) for index, vf in enumerate(VFS))
    assert pfs[1].total_vfs == 64 and len(pfs[1].vfs) == 1


def test_explicit_pfs_are_read_in_address_order(root_dir: Path) -> None:
    fabricate(root_dir)
    pfs = discover_pfs(HostSysfs(root_dir), [parse_bdf(PF_B), parse_bdf(PF)])
    assert [format_bdf(pf.address) for pf in pfs] == [PF, PF_B]
    only = discover_pfs(HostSysfs(root_dir), [parse_bdf(PF_B)])
    assert [format_bdf(pf.address) for pf in only] == [PF_B]


def test_a_pf_with_no_enabled_vfs_has_none(root_dir: Path) -> None:
    host = FakePciHost(root_dir)
    host.add_pf(PF, [], total_vfs=16)
    (pf,) = discover_pfs(HostSysfs(root_dir))
    assert pf.vfs == () and pf.total_vfs == 16


def test_an_empty_tree_has_no_pfs(root_dir: Path) -> None:
    FakePciHost(root_dir)
    assert discover_pfs(HostSysfs(root_dir)) == ()


def _pf_dir(root: Path, bdf: str = PF) -> Path:
    return root / "devices/pci0000:00" / bdf


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)


def _relink(path: Path, target: str) -> None:
    path.unlink()
    os.symlink(target, path)


def _too_many_vfs(root: Path) -> None:
    _rewrite(_pf_dir(root) / "sriov_totalvfs", "300\n")
    _rewrite(_pf_dir(root) / "sriov_numvfs", "257\n")


def _virtfn_not_a_link(root: Path) -> None:
    (_pf_dir(root) / "virtfn1").unlink()
    (_pf_dir(root) / "virtfn1").mkdir()


Damage = Callable[[Path], object]
DAMAGE: dict[str, tuple[Damage, str]] = {
    "numvfs-above-totalvfs": (lambda r: _rewrite(_pf_dir(r) / "sriov_totalvfs", "2\n"), "INCONSISTENT"),
    "numvfs-malformed": (lambda r: _rewrite(_pf_dir(r) / "sriov_numvfs", "3 \n"), "MALFORMED"),
    "numvfs-negative": (lambda r: _rewrite(_pf_dir(r) / "sriov_numvfs", "-1\n"), "MALFORMED"),
    "numvfs-leading-zero": (lambda r: _rewrite(_pf_dir(r) / "sriov_numvfs", "03\n"), "MALFORMED"),
    "numvfs-huge": (lambda r: _rewrite(_pf_dir(r) / "sriov_numvfs", "9" * 5000), "UNREADABLE"),
    "numvfs-missing": (lambda r: (_pf_dir(r) / "sriov_numvfs").unlink(), "MISSING"),
    "totalvfs-too-big": (lambda r: _rewrite(_pf_dir(r) / "sriov_totalvfs", "65536\n"), "TOO_MANY"),
    "too-many-vfs": (_too_many_vfs, "TOO_MANY"),
    "virtfn-missing": (lambda r: (_pf_dir(r) / "virtfn2").unlink(), "INCONSISTENT"),
    "virtfn-extra": (lambda r: os.symlink("../0000:03:02.0", _pf_dir(r) / "virtfn3"), "INCONSISTENT"),
    "virtfn-leading-zero": (lambda r: os.rename(_pf_dir(r) / "virtfn2", _pf_dir(r) / "virtfn02"), "INCONSISTENT"),
    "virtfn-not-a-link": (_virtfn_not_a_link, "MALFORMED"),
    "virtfn-bad-target": (lambda r: _relink(_pf_dir(r) / "virtfn1", "../0000:03:02.1x"), "MALFORMED"),
    "virtfn-to-itself": (lambda r: _relink(_pf_dir(r) / "virtfn1", f"../{PF}"), "INCONSISTENT"),
    "virtfn-twice": (lambda r: _relink(_pf_dir(r) / "virtfn1", "../0000:03:02.0"), "INCONSISTENT"),
    "vf-without-device": (lambda r: _relink(_pf_dir(r) / "virtfn1", "../0000:03:05.0"), "INCONSISTENT"),
    "vf-under-two-pfs": (lambda r: _relink(_pf_dir(r, PF_B) / "virtfn0", "../0000:03:02.0"), "INCONSISTENT"),
    "vf-is-another-pf": (lambda r: _relink(_pf_dir(r, PF_B) / "virtfn0", f"../{PF}"), "INCONSISTENT"),
    "odd-device-name": (lambda r: os.symlink("../../../devices/x", r / "bus/pci/devices/0000:03:00"), "MALFORMED"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_rejects_a_damaged_tree(root_dir: Path, case: str) -> None:
    fabricate(root_dir)
    damage, kind = DAMAGE[case]
    damage(root_dir)
    with pytest.raises(SriovDiscoveryError) as caught:
        discover_pfs(HostSysfs(root_dir))
    assert caught.value.kind is SriovDiscoveryErrorKind[kind]


@pytest.mark.parametrize(
    ("pf", "kind"),
    [
        ("0000:04:00.0", SriovDiscoveryErrorKind.PF_NOT_FOUND),
        ("0000:00:1f.0", SriovDiscoveryErrorKind.NOT_SRIOV),
        ("0000:03:02.0", SriovDiscoveryErrorKind.NOT_SRIOV),  # a VF is not a PF
    ],
)
def test_rejects_a_configured_pf_that_is_not_one(root_dir: Path, pf: str, kind: SriovDiscoveryErrorKind) -> None:
    fabricate(root_dir)
    with pytest.raises(SriovDiscoveryError) as caught:
        discover_pfs(HostSysfs(root_dir), [parse_bdf(PF), parse_bdf(pf)])
    assert caught.value.kind is kind


def test_rejects_a_pf_configured_twice_or_out_of_range(root_dir: Path) -> None:
    fabricate(root_dir)
    with pytest.raises(SriovDiscoveryError) as twice:
        discover_pfs(HostSysfs(root_dir), [parse_bdf(PF), parse_bdf(PF)])
    assert twice.value.kind is SriovDiscoveryErrorKind.INCONSISTENT
    with pytest.raises(SriovDiscoveryError) as bad:
        discover_pfs(HostSysfs(root_dir), [PciAddress(0, 0, 0x20, 0)])
    assert bad.value.kind is SriovDiscoveryErrorKind.MALFORMED


def test_a_missing_pci_tree_is_an_error_not_a_crash(root_dir: Path) -> None:
    with pytest.raises(SriovDiscoveryError) as caught:
        discover_pfs(HostSysfs(root_dir / "nowhere"))
    assert caught.value.kind is SriovDiscoveryErrorKind.UNREADABLE
