"""Host CPU topology, read strictly from sysfs (claim C9).

Theory of operation
-------------------
The allocator hands out *physical cores*, never single hardware threads, so
that two instances never share a core's caches and execution units through
SMT siblings (C9).  This module turns the kernel's view of the CPUs into a
frozen :class:`Topology`: a tuple of :class:`Core` values, each holding the
sorted ids of its SMT sibling CPUs.

Sources, below a configurable root (default ``/sys/devices/system/cpu``):

- ``online``: the online CPUs, in the kernel's cpulist format ("0-3,8-11");
- ``cpuN/topology/core_cpus_list`` (or its older alias ``thread_siblings_list``;
  when both exist they must agree): the SMT siblings of CPU N;
- ``cpuN/topology/physical_package_id`` and ``core_id``: where the core sits.

The files come from the kernel, but the agent still parses them as untrusted
text (C4): every read is capped, every number bounded, and the cpulist grammar
is the canonical one the kernel prints (``bitmap_print_list``): ascending,
disjoint, non-adjacent ranges, no leading zeros, no blanks.  Anything else is a
:class:`TopologyError` with a :class:`TopologyErrorKind`; no other exception
escapes :func:`read_topology` for any content of the tree.

Invariants of a :class:`Topology` (checked when it is built, whatever builds it):

1. it has at least one core and at most :data:`MAX_CPUS` CPUs;
2. every core's CPUs are sorted, distinct and within ``0..MAX_CPUS-1``;
3. no CPU belongs to two cores;
4. every core has the same number of threads (the SMT width);
5. cores are ordered by their lowest CPU id, which makes allocation
   deterministic ("lowest free cores first").
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CPU_ROOT = Path("/sys/devices/system/cpu")

# The kernel's NR_CPUS tops out at 8192 on x86-64 distribution kernels; one host
# agent managing more than 4096 CPUs is beyond this project's scope, and the
# bound keeps every loop below linear in a small constant.
MAX_CPUS = 4096
# A cpulist for MAX_CPUS CPUs in its worst shape ("0,2,4,...") is about 20 KiB;
# a one-number file is a few bytes.  Reads are capped so that a bogus file (or a
# symlink to something huge, in a fabricated tree) cannot make the agent buffer much.
MAX_CPULIST_BYTES = 32 * 1024
MAX_NUMBER_BYTES = 32
# The kernel prints these ids as a C int; -1 means "unknown" on some platforms.
_MAX_TOPOLOGY_ID = 2**31 - 1

_CPU_NUMBER = re.compile(r"0|[1-9][0-9]{0,4}")
_TOPOLOGY_ID = re.compile(r"-1|0|[1-9][0-9]{0,9}")


class TopologyErrorKind(enum.Enum):
    """Why the CPU topology was refused.  Closed set."""

    MISSING_FILE = "missing_file"  # a file the kernel always provides is absent
    UNREADABLE = "unreadable"  # present but not readable (permissions, not a file, ...)
    FILE_TOO_LARGE = "file_too_large"  # above its read cap
    MALFORMED_CPU_LIST = "malformed_cpu_list"  # not the canonical cpulist grammar
    MALFORMED_NUMBER = "malformed_number"  # an id that is not a bounded decimal
    NOT_TEXT = "not_text"  # bytes that are not ASCII
    TOO_MANY_CPUS = "too_many_cpus"  # a CPU id at or above MAX_CPUS
    NO_CPUS = "no_cpus"  # nothing online
    INCONSISTENT = "inconsistent"  # sibling lists that contradict each other or ``online``
    NON_UNIFORM_SMT = "non_uniform_smt"  # cores with different thread counts


class TopologyError(Exception):
    """The CPU topology could not be read or violates an invariant."""

    def __init__(self, kind: TopologyErrorKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Core:
    """One physical core: the host CPU ids of its SMT siblings, sorted."""

    package_id: int
    core_id: int
    cpus: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Topology:
    """The host's physical cores.  See the module docstring for the invariants."""

    cores: tuple[Core, ...]

    def __post_init__(self) -> None:
        if not self.cores:
            raise TopologyError(TopologyErrorKind.NO_CPUS, "no cores")
        seen: set[int] = set()
        for core in self.cores:
            if not core.cpus or list(core.cpus) != sorted(set(core.cpus)):
                raise TopologyError(TopologyErrorKind.INCONSISTENT, f"core CPUs not sorted and distinct: {core.cpus}")
            if core.cpus[0] < 0 or core.cpus[-1] >= MAX_CPUS:
                raise TopologyError(TopologyErrorKind.TOO_MANY_CPUS, f"CPU id out of 0..{MAX_CPUS - 1}: {core.cpus}")
            if seen.intersection(core.cpus):
                raise TopologyError(TopologyErrorKind.INCONSISTENT, f"CPUs in two cores: {core.cpus}")
            seen.update(core.cpus)
        widths = {len(core.cpus) for core in self.cores}
        if len(widths) != 1:
            raise TopologyError(
                TopologyErrorKind.NON_UNIFORM_SMT,
                f"cores have different thread counts {sorted(widths)}; an SMT width must be uniform",
            )
        firsts = [core.cpus[0] for core in self.cores]
        if firsts != sorted(firsts):
            raise TopologyError(TopologyErrorKind.INCONSISTENT, "cores not ordered by their lowest CPU")

    @property
    def smt_width(self) -> int:
        """Hardware threads per core (1 without SMT, usually 2 with it)."""
        return len(self.cores[0].cpus)

    @property
    def cpus(self) -> tuple[int, ...]:
        """All CPUs of the topology, sorted."""
        return tuple(sorted(cpu for core in self.cores for cpu in core.cpus))

    @classmethod
    def from_sibling_groups(cls, groups: Iterable[Iterable[int]], *, package_id: int = 0) -> Topology:
        """Build a topology from sibling groups (tests, fixed configurations): core ids are positions."""
        ordered = sorted((tuple(sorted(group)) for group in groups), key=lambda cpus: cpus[0] if cpus else -1)
        return cls(tuple(Core(package_id, index, cpus) for index, cpus in enumerate(ordered)))


def parse_cpu_list(text: str, *, max_cpus: int = MAX_CPUS) -> tuple[int, ...]:
    """Parse the kernel's canonical cpulist ("0-3,8-11", with an optional final newline).

    Returns the CPU ids, sorted.  The empty list (an empty file, as ``offline``
    often is) is valid here; callers decide whether they accept it.  Raises
    :class:`TopologyError` for anything but the canonical grammar.
    """
    body = text[:-1] if text.endswith("\n") else text
    if body == "":
        return ()
    cpus: list[int] = []
    previous_end = -2
    for item in body.split(","):
        bounds = item.split("-")
        if len(bounds) > 2 or not all(_CPU_NUMBER.fullmatch(bound) for bound in bounds):
            raise TopologyError(TopologyErrorKind.MALFORMED_CPU_LIST, f"bad range {item[:16]!r}")
        first, last = int(bounds[0]), int(bounds[-1])
        if len(bounds) == 2 and first >= last:
            # The kernel prints a one-CPU range as "N", never "N-N", and never backwards.
            raise TopologyError(TopologyErrorKind.MALFORMED_CPU_LIST, f"non-canonical range {item!r}")
        if first <= previous_end + 1:
            raise TopologyError(
                TopologyErrorKind.MALFORMED_CPU_LIST, f"range {item!r} overlaps, touches or precedes the previous one"
            )
        if last >= max_cpus:
            raise TopologyError(TopologyErrorKind.TOO_MANY_CPUS, f"CPU {last} at or above the limit {max_cpus}")
        cpus.extend(range(first, last + 1))
        previous_end = last
    return tuple(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The canonical cpulist of a set of CPU ids (inverse of :func:`parse_cpu_list`, without newline)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        parts.append(str(ordered[index]) if end == index else f"{ordered[index]}-{ordered[end]}")
        index = end + 1
    return ",".join(parts)


def _read_capped(path: Path, limit: int) -> str:
    """Read a small text file, at most ``limit`` bytes, as ASCII; every failure is a :class:`TopologyError`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError as error:
        raise TopologyError(TopologyErrorKind.MISSING_FILE, str(path)) from error
    except OSError as error:
        raise TopologyError(TopologyErrorKind.UNREADABLE, f"{path}: {error.strerror}") from error
    if len(data) > limit:
        raise TopologyError(TopologyErrorKind.FILE_TOO_LARGE, f"{path} is larger than {limit} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as error:
        raise TopologyError(TopologyErrorKind.NOT_TEXT, f"{path} is not ASCII") from error


def _read_id(path: Path) -> int:
    text = _read_capped(path, MAX_NUMBER_BYTES)
    body = text[:-1] if text.endswith("\n") else text
    if not _TOPOLOGY_ID.fullmatch(body) or int(body) > _MAX_TOPOLOGY_ID:
        raise TopologyError(TopologyErrorKind.MALFORMED_NUMBER, f"{path}: {body[:16]!r}")
    return int(body)


def _read_siblings(topology_dir: Path) -> tuple[int, ...]:
    core_cpus = topology_dir / "core_cpus_list"
    thread_siblings = topology_dir / "thread_siblings_list"
    found = [path for path in (core_cpus, thread_siblings) if os.path.lexists(path)]
    if not found:
        raise TopologyError(TopologyErrorKind.MISSING_FILE, f"{core_cpus} (nor {thread_siblings.name})")
    lists = [parse_cpu_list(_read_capped(path, MAX_CPULIST_BYTES)) for path in found]
    if len(lists) == 2 and lists[0] != lists[1]:
        raise TopologyError(TopologyErrorKind.INCONSISTENT, f"{topology_dir}: core_cpus_list != thread_siblings_list")
    return lists[0]


def read_topology(root: Path = DEFAULT_CPU_ROOT) -> Topology:
    """Read the online CPUs under ``root`` and group them into physical cores.

    Raises :class:`TopologyError` when a file is missing, malformed or too
    large, when sibling lists disagree (CPU A lists B as a sibling but B does
    not list A, or a listed sibling is offline), or when the SMT width is not
    uniform (for example one thread of a core was taken offline).
    """
    online = parse_cpu_list(_read_capped(root / "online", MAX_CPULIST_BYTES))
    if not online:
        raise TopologyError(TopologyErrorKind.NO_CPUS, f"{root / 'online'} lists no CPU")
    online_set = frozenset(online)
    siblings_of: dict[int, tuple[int, ...]] = {}
    location_of: dict[int, tuple[int, int]] = {}
    for cpu in online:
        topology_dir = root / f"cpu{cpu}" / "topology"
        siblings = _read_siblings(topology_dir)
        if cpu not in siblings:
            raise TopologyError(TopologyErrorKind.INCONSISTENT, f"cpu{cpu} is not among its own siblings {siblings}")
        if not online_set.issuperset(siblings):
            raise TopologyError(TopologyErrorKind.INCONSISTENT, f"cpu{cpu} lists offline siblings {siblings}")
        siblings_of[cpu] = siblings
        location_of[cpu] = (_read_id(topology_dir / "physical_package_id"), _read_id(topology_dir / "core_id"))
    cores: list[Core] = []
    for cpu in online:
        siblings = siblings_of[cpu]
        # Checking every CPU (not only the lowest of each group) makes the groups
        # a partition of ``online``: no CPU is left out and none is in two cores.
        for sibling in siblings:
            if siblings_of[sibling] != siblings:
                raise TopologyError(
                    TopologyErrorKind.INCONSISTENT,
                    f"cpu{cpu} lists siblings {siblings} but cpu{sibling} lists {siblings_of[sibling]}",
                )
            if location_of[sibling] != location_of[cpu]:
                raise TopologyError(
                    TopologyErrorKind.INCONSISTENT,
                    f"siblings cpu{cpu} and cpu{sibling} report different package/core ids",
                )
        if siblings[0] == cpu:
            package_id, core_id = location_of[cpu]
            cores.append(Core(package_id, core_id, siblings))
    return Topology(tuple(cores))
