"""CPU topology: the cpulist grammar and reading fabricated sysfs trees (claim C9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from inventory.fakesysfs import scratch_dir, write_cpu_tree

from hostagent.inventory import (
    DEFAULT_CPU_ROOT,
    MAX_CPUS,
    Core,
    Topology,
    TopologyError,
    TopologyErrorKind,
    format_cpu_list,
    parse_cpu_list,
    read_topology,
)

# --- the cpulist grammar -------------------------------------------------------


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A fresh directory for a fabricated tree (on tmpfs when available: these tests create many files)."""
    with scratch_dir() as scratch:
        yield Path(scratch)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0\n", (0,)),
        ("0", (0,)),
        ("0-3,8-11\n", (0, 1, 2, 3, 8, 9, 10, 11)),
        ("1,3,5\n", (1, 3, 5)),
        ("0-1,4095\n", (0, 1, 4095)),
        ("", ()),
        ("\n", ()),
    ],
)
def test_cpu_list_accepts_the_canonical_form(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    "text",
    [
        " 0",
        "0 ",
        "0\n\n",
        "0\r\n",
        "\n0",
        ",0",
        "0,",
        "0,,1",
        "3-1",  # backwards
        "1-1",  # the kernel prints "1"
        "01",  # leading zero
        "0-03",
        "0-3,2-5",  # overlap
        "0-3,4",  # touching ranges are merged by the kernel
        "0-3,4-7",
        "4,0",  # descending
        "2,2",
        "a",
        "0x1",
        "-1",
        "0-",
        "-3",
        "1-2-3",
        "1:2",
        "0-3:2/4",  # the boot-parameter stride syntax, never printed in sysfs
        "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() but not ASCII
        "99999999999999999999",
    ],
)
def test_cpu_list_rejects_anything_else(text: str) -> None:
    with pytest.raises(TopologyError) as caught:
        parse_cpu_list(text)
    assert caught.value.kind in (TopologyErrorKind.MALFORMED_CPU_LIST, TopologyErrorKind.TOO_MANY_CPUS)


def test_cpu_list_bounds_cpu_ids() -> None:
    with pytest.raises(TopologyError) as caught:
        parse_cpu_list(f"0-{MAX_CPUS}")
    assert caught.value.kind is TopologyErrorKind.TOO_MANY_CPUS
    assert parse_cpu_list("0-7", max_cpus=8) == tuple(range(8))
    with pytest.raises(TopologyError):
        parse_cpu_list("8", max_cpus=8)


@given(st.sets(st.integers(0, MAX_CPUS - 1), max_size=300))
def test_cpu_list_round_trips(cpus: set[int]) -> None:
    text = format_cpu_list(cpus)
    assert parse_cpu_list(text) == tuple(sorted(cpus))
    assert parse_cpu_list(text + "\n") == tuple(sorted(cpus))


@given(st.text(alphabet="0123456789-,\n x", max_size=24))
def test_cpu_list_is_total(text: str) -> None:
    """Every input is either the canonical list of its CPUs or a TopologyError; nothing else escapes."""
    try:
        cpus = parse_cpu_list(text)
    except TopologyError:
        return
    assert format_cpu_list(cpus) == text.removesuffix("\n")


# --- Topology invariants ---------------------------------------------------------


def test_topology_rejects_an_invalid_shape() -> None:
    cases = [
        ((), TopologyErrorKind.NO_CPUS),
        ((Core(0, 0, ()),), TopologyErrorKind.INCONSISTENT),
        ((Core(0, 0, (1, 0)),), TopologyErrorKind.INCONSISTENT),
        ((Core(0, 0, (0, 0)),), TopologyErrorKind.INCONSISTENT),
        ((Core(0, 0, (0, 1)), Core(0, 1, (1, 2))), TopologyErrorKind.INCONSISTENT),
        ((Core(0, 1, (2, 3)), Core(0, 0, (0, 1))), TopologyErrorKind.INCONSISTENT),
        ((Core(0, 0, (0, 1)), Core(0, 1, (2,))), TopologyErrorKind.NON_UNIFORM_SMT),
        ((Core(0, 0, (MAX_CPUS,)),), TopologyErrorKind.TOO_MANY_CPUS),
        ((Core(0, 0, (-1,)),), TopologyErrorKind.TOO_MANY_CPUS),
    ]
    for cores, kind in cases:
        with pytest.raises(TopologyError) as caught:
            Topology(cores)
        assert caught.value.kind is kind, cores


def test_topology_from_sibling_groups_orders_cores() -> None:
    topology = Topology.from_sibling_groups([(5, 1), (4, 0)])
    assert topology.cores == (Core(0, 0, (0, 4)), Core(0, 1, (1, 5)))
    assert topology.smt_width == 2
    assert topology.cpus == (0, 1, 4, 5)


# --- reading trees ---------------------------------------------------------------


def test_reads_a_tree_without_smt(root_dir: Path) -> None:
    root = write_cpu_tree(root_dir, [(0,), (1,), (2,), (3,)])
    topology = read_topology(root)
    assert topology.smt_width == 1
    assert [core.cpus for core in topology.cores] == [(0,), (1,), (2,), (3,)]


def test_reads_a_two_socket_tree_with_smt2(root_dir: Path) -> None:
    # Linux numbers the first thread of every core before the second ones:
    # core k of 8 has CPUs k and k + 8.
    groups = [(k, k + 8) for k in range(8)]
    root = write_cpu_tree(root_dir, groups, package_of_core=lambda index: index // 4)
    topology = read_topology(root)
    assert topology.smt_width == 2
    assert [core.cpus for core in topology.cores] == groups
    assert [core.package_id for core in topology.cores] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topology.cpus == tuple(range(16))


@pytest.mark.parametrize("files", [("core_cpus_list",), ("thread_siblings_list",)])
def test_either_sibling_file_suffices(root_dir: Path, files: tuple[str, ...]) -> None:
    root = write_cpu_tree(root_dir, [(0, 2), (1, 3)], sibling_files=files)
    assert [core.cpus for core in read_topology(root).cores] == [(0, 2), (1, 3)]


def test_reads_only_online_cpus(root_dir: Path) -> None:
    # cpu4..7 exist but are offline (both threads of cores 2 and 3).
    root = write_cpu_tree(root_dir, [(0, 4), (1, 5)], online="0-1,4-5")
    for cpu in (2, 3, 6, 7):
        (root / f"cpu{cpu}").mkdir()  # no topology directory, as for an offline CPU
    assert [core.cpus for core in read_topology(root).cores] == [(0, 4), (1, 5)]


def test_reads_this_host() -> None:
    if not (DEFAULT_CPU_ROOT / "online").exists():
        pytest.skip("no sysfs CPU tree on this machine")
    topology = read_topology()
    assert topology.cpus
    assert all(len(core.cpus) == topology.smt_width for core in topology.cores)


def _damaged(root_dir: Path, relpath: str, content: bytes | None) -> Path:
    root = write_cpu_tree(root_dir, [(0, 2), (1, 3)])
    target = root / relpath
    if content is None:
        target.unlink()
    else:
        target.write_bytes(content)
    return root


@pytest.mark.parametrize(
    ("relpath", "content", "kind"),
    [
        ("online", None, TopologyErrorKind.MISSING_FILE),
        ("online", b"0-3 \n", TopologyErrorKind.MALFORMED_CPU_LIST),
        ("online", b"0-1,1-3\n", TopologyErrorKind.MALFORMED_CPU_LIST),
        ("online", b"\n", TopologyErrorKind.NO_CPUS),
        ("online", b"0-4096\n", TopologyErrorKind.TOO_MANY_CPUS),
        ("online", b"0," * 20000, TopologyErrorKind.FILE_TOO_LARGE),
        ("online", b"0-3\xff\n", TopologyErrorKind.NOT_TEXT),
        ("online", b"0-4\n", TopologyErrorKind.MISSING_FILE),  # cpu4 has no topology
        ("cpu1/topology/core_id", None, TopologyErrorKind.MISSING_FILE),
        ("cpu1/topology/core_id", b"one\n", TopologyErrorKind.MALFORMED_NUMBER),
        ("cpu1/topology/core_id", b"-2\n", TopologyErrorKind.MALFORMED_NUMBER),
        ("cpu1/topology/core_id", b"2147483648\n", TopologyErrorKind.MALFORMED_NUMBER),
        ("cpu1/topology/core_id", b"7" * 40, TopologyErrorKind.FILE_TOO_LARGE),
        ("cpu3/topology/core_id", b"0\n", TopologyErrorKind.INCONSISTENT),  # siblings in different cores
        ("cpu2/topology/physical_package_id", None, TopologyErrorKind.MISSING_FILE),
        ("cpu2/topology/physical_package_id", b"1\n", TopologyErrorKind.INCONSISTENT),
        ("cpu0/topology/core_cpus_list", b"0-1\n", TopologyErrorKind.INCONSISTENT),  # disagrees with alias
        ("cpu0/topology/core_cpus_list", b"0,,2\n", TopologyErrorKind.MALFORMED_CPU_LIST),
    ],
)
def test_rejects_a_damaged_tree(root_dir: Path, relpath: str, content: bytes | None, kind: TopologyErrorKind) -> None:
    root = _damaged(root_dir, relpath, content)
    with pytest.raises(TopologyError) as caught:
        read_topology(root)
    assert caught.value.kind is kind


def test_missing_both_sibling_files_is_rejected(root_dir: Path) -> None:
    root = write_cpu_tree(root_dir, [(0,), (1,)], sibling_files=())
    with pytest.raises(TopologyError) as caught:
        read_topology(root)
    assert caught.value.kind is TopologyErrorKind.MISSING_FILE


def _set_siblings(root: Path, cpu: int, text: str) -> None:
    for name in ("core_cpus_list", "thread_siblings_list"):
        (root / f"cpu{cpu}" / "topology" / name).write_text(text + "\n")


def test_rejects_non_uniform_smt(root_dir: Path) -> None:
    # One thread of core 1 was taken offline: the kernel drops it from the sibling masks.
    root = write_cpu_tree(root_dir, [(0, 2), (1,)], online="0-2")
    with pytest.raises(TopologyError) as caught:
        read_topology(root)
    assert caught.value.kind is TopologyErrorKind.NON_UNIFORM_SMT
    assert "uniform" in str(caught.value)


@pytest.mark.parametrize(
    ("cpu", "siblings"),
    [
        (0, "0"),  # cpu2 still says (0, 2): asymmetric
        (1, "0-1"),  # cpu0 does not list cpu1
        (0, "2"),  # a CPU not among its own siblings
        (0, "0,2,7"),  # an offline sibling
    ],
)
def test_rejects_contradicting_sibling_lists(root_dir: Path, cpu: int, siblings: str) -> None:
    root = write_cpu_tree(root_dir, [(0, 2), (1, 3)])
    _set_siblings(root, cpu, siblings)
    with pytest.raises(TopologyError) as caught:
        read_topology(root)
    assert caught.value.kind is TopologyErrorKind.INCONSISTENT


@st.composite
def sibling_partitions(draw: st.DrawFn) -> list[tuple[int, ...]]:
    """Up to 8 cores of a uniform SMT width, their CPU ids a random sample of 0..47."""
    width = draw(st.integers(1, 4))
    count = draw(st.integers(1, 8))
    cpus = draw(st.lists(st.integers(0, 47), min_size=width * count, max_size=width * count, unique=True))
    groups = [tuple(sorted(cpus[i * width : (i + 1) * width])) for i in range(count)]
    return sorted(groups)


@given(sibling_partitions(), st.integers(1, 3), st.sampled_from(["core_cpus_list", "thread_siblings_list"]))
def test_reading_a_generated_tree_recovers_its_cores(
    groups: list[tuple[int, ...]], packages: int, sibling_file: str
) -> None:
    with scratch_dir() as scratch:
        root = write_cpu_tree(
            Path(scratch), groups, package_of_core=lambda index: index % packages, sibling_files=(sibling_file,)
        )
        topology = read_topology(root)
    assert [core.cpus for core in topology.cores] == groups
    assert [core.core_id for core in topology.cores] == list(range(len(groups)))
    assert [core.package_id for core in topology.cores] == [index % packages for index in range(len(groups))]
    assert topology.smt_width == len(groups[0])
