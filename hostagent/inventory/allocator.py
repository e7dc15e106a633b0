"""Core-exclusive CPU and memory allocator (claim C9).

Theory of operation
-------------------
An instance gets whole physical cores: every SMT sibling of each core it
holds, and no other instance ever runs on those cores, so no two instances
share a core's caches, buffers or execution units (C9).  Memory is a plain
budget in MiB; which pages back it is QEMU's business (memory merging is off
in the launcher, so instances never share pages either).

The allocator is pure bookkeeping: no I/O, no clock, no threads.  The agent
calls it under its own command serialisation and journals what it returns
(claim C10); :meth:`CoreAllocator.restore` rebuilds the state from that
journal after a restart.  It is not thread-safe.

State: a map instance -> :class:`Allocation`, and the owner of each held core.

Invariants (checked by the model-based tests in tests/inventory/):

1. a core is held by at most one instance, and reserved cores by none;
2. held cores + free cores = every non-reserved core of the topology;
3. the memory held is the sum of the allocations and never exceeds the budget;
4. an allocation's ``cpus`` are whole cores, in ascending core order, each
   core's siblings adjacent, so ``len(cpus) == vcpus`` and vCPU ``i`` is pinned
   to ``cpus[i]`` (consecutive vCPUs are SMT siblings, matching a guest
   topology of ``threads=smt_width``);
5. every refusal raises an :class:`AllocatorError` subclass and changes nothing:
   all checks run before the first mutation;
6. :meth:`~CoreAllocator.release` returns exactly the allocation that was
   made, and choice is deterministic: the lowest free cores first.

Reserved cores: the configuration names host CPUs (``reserved_cpus``) that the
host itself keeps (the agent, the controller, interrupts).  The whole core of
each such CPU is reserved, since handing its sibling to a guest would make the
guest share a core with the host.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from .cpu import Core, Topology


@dataclass(frozen=True, slots=True)
class Allocation:
    """What one instance holds: host CPUs (whole cores, in pinning order) and memory."""

    instance_id: uuid.UUID
    cpus: tuple[int, ...]
    memory_mib: int

    @property
    def vcpus(self) -> int:
        return len(self.cpus)


@dataclass(frozen=True, slots=True)
class AllocatorSnapshot:
    """Counts for metrics (CORES_TOTAL/FREE, MEMORY_TOTAL/FREE_MIB) and the held allocations.

    ``cores_total`` counts allocatable cores only; reserved cores are in ``cores_reserved``.
    """

    cores_total: int
    cores_free: int
    cores_reserved: int
    smt_width: int
    memory_total_mib: int
    memory_free_mib: int
    allocations: tuple[Allocation, ...]


class AllocatorError(Exception):
    """Base of every refusal by the allocator.  A refusal never changes state."""


class AllocatorConfigError(AllocatorError):
    """The allocator cannot be built from this configuration (budget, reserved CPUs)."""


class InvalidVcpuCount(AllocatorError):
    """The vCPU count is not a positive integer."""

    def __init__(self, vcpus: object) -> None:
        super().__init__(f"vcpus must be a positive integer, got {vcpus!r}")
        self.vcpus = vcpus


class VcpuCountNotMultipleOfSmtWidth(AllocatorError):
    """Whole cores only: the vCPU count must be a multiple of the host's SMT width."""

    def __init__(self, vcpus: int, smt_width: int) -> None:
        super().__init__(f"{vcpus} vCPUs is not a multiple of the SMT width {smt_width}")
        self.vcpus = vcpus
        self.smt_width = smt_width


class InvalidMemorySize(AllocatorError):
    """The memory size is not a positive integer."""

    def __init__(self, memory_mib: object) -> None:
        super().__init__(f"memory_mib must be a positive integer, got {memory_mib!r}")
        self.memory_mib = memory_mib


class InsufficientCores(AllocatorError):
    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"{requested} cores requested, {free} free")
        self.requested = requested
        self.free = free


class InsufficientMemory(AllocatorError):
    def __init__(self, requested_mib: int, free_mib: int) -> None:
        super().__init__(f"{requested_mib} MiB requested, {free_mib} MiB free")
        self.requested_mib = requested_mib
        self.free_mib = free_mib


class InstanceAlreadyAllocated(AllocatorError):
    def __init__(self, instance_id: uuid.UUID) -> None:
        super().__init__(f"instance {instance_id} already holds an allocation")
        self.instance_id = instance_id


class InstanceNotAllocated(AllocatorError):
    def __init__(self, instance_id: uuid.UUID) -> None:
        super().__init__(f"instance {instance_id} holds no allocation")
        self.instance_id = instance_id


class RestoreRejected(AllocatorError):
    """A journal's allocations contradict the topology, the configuration or each other.

    The whole restore is refused; the allocator keeps its previous (empty) state.
    """

    def __init__(self, detail: str, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(detail if instance_id is None else f"instance {instance_id}: {detail}")
        self.detail = detail
        self.instance_id = instance_id


def _is_positive_int(value: object) -> bool:
    # bool is an int subclass; True vCPUs is a bug in the caller, not a count.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class CoreAllocator:
    """Hands out whole physical cores and memory; see the module docstring."""

    def __init__(self, topology: Topology, *, memory_budget_mib: int, reserved_cpus: Iterable[int]) -> None:
        if not _is_positive_int(memory_budget_mib):
            raise AllocatorConfigError(f"memory budget must be a positive integer, got {memory_budget_mib!r}")
        core_index_of_cpu = {cpu: index for index, core in enumerate(topology.cores) for cpu in core.cpus}
        reserved = frozenset(reserved_cpus)
        unknown = sorted(cpu for cpu in reserved if cpu not in core_index_of_cpu)
        if unknown:
            raise AllocatorConfigError(f"reserved CPUs {unknown} are not online CPUs of this host")
        self._topology = topology
        self._budget_mib = memory_budget_mib
        self._core_index_of_cpu = core_index_of_cpu
        self._reserved_cores = frozenset(core_index_of_cpu[cpu] for cpu in reserved)
        self._allocatable = tuple(i for i in range(len(topology.cores)) if i not in self._reserved_cores)
        # Mutable state: exactly these two maps and the memory counter.
        self._allocations: dict[uuid.UUID, Allocation] = {}
        self._owner_of_core: dict[int, uuid.UUID] = {}
        self._memory_used_mib = 0

    # --- queries ---------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def smt_width(self) -> int:
        return self._topology.smt_width

    @property
    def reserved_cores(self) -> tuple[Core, ...]:
        return tuple(self._topology.cores[i] for i in sorted(self._reserved_cores))

    @property
    def cores_free(self) -> int:
        return len(self._allocatable) - len(self._owner_of_core)

    @property
    def memory_free_mib(self) -> int:
        return self._budget_mib - self._memory_used_mib

    def allocation_of(self, instance_id: uuid.UUID) -> Allocation | None:
        return self._allocations.get(instance_id)

    def free_cores(self) -> tuple[Core, ...]:
        return tuple(self._topology.cores[i] for i in self._allocatable if i not in self._owner_of_core)

    def snapshot(self) -> AllocatorSnapshot:
        return AllocatorSnapshot(
            cores_total=len(self._allocatable),
            cores_free=self.cores_free,
            cores_reserved=len(self._reserved_cores),
            smt_width=self.smt_width,
            memory_total_mib=self._budget_mib,
            memory_free_mib=self.memory_free_mib,
            allocations=tuple(sorted(self._allocations.values(), key=lambda a: a.cpus[0])),
        )

    # --- commands --------------------------------------------------------------

    def allocate(self, instance_id: uuid.UUID, vcpus: int, memory_mib: int) -> Allocation:
        """Give ``instance_id`` ``vcpus // smt_width`` whole cores and ``memory_mib`` of the budget.

        Checks, in this order (the first failing one is raised, nothing changes):
        :class:`InstanceAlreadyAllocated`, :class:`InvalidVcpuCount`,
        :class:`VcpuCountNotMultipleOfSmtWidth`, :class:`InvalidMemorySize`,
        :class:`InsufficientCores`, :class:`InsufficientMemory`.
        """
        if instance_id in self._allocations:
            raise InstanceAlreadyAllocated(instance_id)
        if not _is_positive_int(vcpus):
            raise InvalidVcpuCount(vcpus)
        if vcpus % self.smt_width:
            raise VcpuCountNotMultipleOfSmtWidth(vcpus, self.smt_width)
        if not _is_positive_int(memory_mib):
            raise InvalidMemorySize(memory_mib)
        wanted = vcpus // self.smt_width
        free = [i for i in self._allocatable if i not in self._owner_of_core]
        if wanted > len(free):
            raise InsufficientCores(wanted, len(free))
        if memory_mib > self.memory_free_mib:
            raise InsufficientMemory(memory_mib, self.memory_free_mib)
        chosen = free[:wanted]
        allocation = Allocation(
            instance_id=instance_id,
            cpus=tuple(cpu for i in chosen for cpu in self._topology.cores[i].cpus),
            memory_mib=memory_mib,
        )
        # Commit: no check may follow this line.
        for i in chosen:
            self._owner_of_core[i] = instance_id
        self._memory_used_mib += memory_mib
        self._allocations[instance_id] = allocation
        return allocation

    def release(self, instance_id: uuid.UUID) -> Allocation:
        """Return everything ``instance_id`` holds; :class:`InstanceNotAllocated` if it holds nothing."""
        allocation = self._allocations.get(instance_id)
        if allocation is None:
            raise InstanceNotAllocated(instance_id)
        for i in self._core_indexes(allocation):
            del self._owner_of_core[i]
        self._memory_used_mib -= allocation.memory_mib
        del self._allocations[instance_id]
        return allocation

    def restore(self, allocations: Iterable[Allocation]) -> None:
        """Rebuild the state from journaled allocations, all or nothing.

        Only an allocator that holds nothing can be restored (a restore never
        silently drops what is held).  Each allocation must name whole,
        known, non-reserved cores in canonical order (as :meth:`allocate`
        produces them), no core may appear twice, no instance twice, and the
        memory must fit the budget; otherwise :class:`RestoreRejected` and
        nothing changes.
        """
        if self._allocations:
            raise RestoreRejected("the allocator already holds allocations")
        owner_of_core: dict[int, uuid.UUID] = {}
        by_instance: dict[uuid.UUID, Allocation] = {}
        memory = 0
        for allocation in allocations:
            if allocation.instance_id in by_instance:
                raise RestoreRejected("appears twice", allocation.instance_id)
            if not _is_positive_int(allocation.memory_mib):
                raise RestoreRejected(f"memory {allocation.memory_mib!r} is not positive", allocation.instance_id)
            indexes = self._canonical_core_indexes(allocation)
            for i in indexes:
                if i in self._reserved_cores:
                    raise RestoreRejected(f"holds reserved core {self._topology.cores[i].cpus}", allocation.instance_id)
                if i in owner_of_core:
                    raise RestoreRejected(
                        f"shares core {self._topology.cores[i].cpus} with instance {owner_of_core[i]}",
                        allocation.instance_id,
                    )
                owner_of_core[i] = allocation.instance_id
            memory += allocation.memory_mib
            by_instance[allocation.instance_id] = allocation
        if memory > self._budget_mib:
            raise RestoreRejected(f"{memory} MiB held exceeds the budget of {self._budget_mib} MiB")
        self._allocations = by_instance
        self._owner_of_core = owner_of_core
        self._memory_used_mib = memory

    # --- helpers ---------------------------------------------------------------

    def _core_indexes(self, allocation: Allocation) -> list[int]:
        width = self.smt_width
        return [self._core_index_of_cpu[allocation.cpus[k]] for k in range(0, len(allocation.cpus), width)]

    def _canonical_core_indexes(self, allocation: Allocation) -> list[int]:
        """The cores of a journaled allocation, if its CPUs are exactly what allocate() would have produced."""
        cpus = allocation.cpus
        width = self.smt_width
        if not cpus or len(cpus) % width:
            raise RestoreRejected(f"{len(cpus)} CPUs is not a positive number of whole cores", allocation.instance_id)
        indexes: list[int] = []
        for k in range(0, len(cpus), width):
            index = self._core_index_of_cpu.get(cpus[k])
            if index is None or self._topology.cores[index].cpus != cpus[k : k + width]:
                raise RestoreRejected(f"CPUs {cpus[k : k + width]} are not a core of this host", allocation.instance_id)
            if indexes and index <= indexes[-1]:
                raise RestoreRejected("cores not in ascending order", allocation.instance_id)
            indexes.append(index)
        return indexes
