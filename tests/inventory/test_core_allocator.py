"""The core-exclusive allocator (claim C9): examples, every refusal, and a model-based state machine."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hostagent.inventory import (
    Allocation,
    AllocatorConfigError,
    AllocatorError,
    CoreAllocator,
    InstanceAlreadyAllocated,
    InstanceNotAllocated,
    InsufficientCores,
    InsufficientMemory,
    InvalidMemorySize,
    InvalidVcpuCount,
    RestoreRejected,
    Topology,
    VcpuCountNotMultipleOfSmtWidth,
)

A, B, C = (uuid.UUID(int=n) for n in (1, 2, 3))


def smt2_host(*, memory: int = 8192, reserved: tuple[int, ...] = (0,)) -> CoreAllocator:
    """Eight cores, two threads each, Linux numbering: core k = CPUs (k, k + 8)."""
    topology = Topology.from_sibling_groups([(k, k + 8) for k in range(8)])
    return CoreAllocator(topology, memory_budget_mib=memory, reserved_cpus=reserved)


# --- examples --------------------------------------------------------------------------


def test_allocates_whole_cores_lowest_first_and_skips_reserved_ones() -> None:
    allocator = smt2_host()
    first = allocator.allocate(A, 4, 1024)
    assert first == Allocation(A, (1, 9, 2, 10), 1024)
    assert first.vcpus == 4
    second = allocator.allocate(B, 2, 512)
    assert second.cpus == (3, 11)
    snapshot = allocator.snapshot()
    assert (snapshot.cores_total, snapshot.cores_free, snapshot.cores_reserved) == (7, 4, 1)
    assert (snapshot.memory_total_mib, snapshot.memory_free_mib) == (8192, 8192 - 1536)
    assert snapshot.allocations == (first, second)
    assert snapshot.smt_width == 2


def test_reserving_one_thread_reserves_its_whole_core() -> None:
    allocator = smt2_host(reserved=(8,))  # the sibling of CPU 0
    assert [core.cpus for core in allocator.reserved_cores] == [(0, 8)]
    assert allocator.allocate(A, 2, 64).cpus == (1, 9)


def test_release_returns_exactly_what_was_taken_and_frees_it() -> None:
    allocator = smt2_host()
    taken = allocator.allocate(A, 6, 2048)
    before_b = allocator.allocate(B, 2, 64)
    assert allocator.release(A) == taken
    assert allocator.allocation_of(A) is None
    assert allocator.allocation_of(B) == before_b
    # The freed cores are the lowest free ones again.
    assert allocator.allocate(C, 6, 64).cpus == taken.cpus


def test_can_hand_out_every_non_reserved_core() -> None:
    allocator = smt2_host()
    allocation = allocator.allocate(A, 14, 8192)
    assert sorted(allocation.cpus) == [cpu for cpu in range(16) if cpu not in (0, 8)]
    assert allocator.cores_free == 0
    assert allocator.memory_free_mib == 0


def _refused(allocator: CoreAllocator, error: type[AllocatorError], *args: object) -> AllocatorError:
    before = allocator.snapshot()
    free_before = allocator.free_cores()
    with pytest.raises(error) as caught:
        allocator.allocate(*args)  # type: ignore[arg-type]
    assert allocator.snapshot() == before
    assert allocator.free_cores() == free_before
    return caught.value


def test_every_allocation_refusal_changes_nothing() -> None:
    allocator = smt2_host(memory=4096)
    allocator.allocate(A, 4, 1024)
    _refused(allocator, InstanceAlreadyAllocated, A, 2, 64)
    _refused(allocator, InvalidVcpuCount, B, 0, 64)
    _refused(allocator, InvalidVcpuCount, B, -2, 64)
    _refused(allocator, InvalidVcpuCount, B, True, 64)
    _refused(allocator, InvalidVcpuCount, B, 2.0, 64)
    error = _refused(allocator, VcpuCountNotMultipleOfSmtWidth, B, 3, 64)
    assert isinstance(error, VcpuCountNotMultipleOfSmtWidth) and error.smt_width == 2
    _refused(allocator, InvalidMemorySize, B, 2, 0)
    _refused(allocator, InvalidMemorySize, B, 2, -1)
    cores = _refused(allocator, InsufficientCores, B, 12, 64)
    assert isinstance(cores, InsufficientCores) and (cores.requested, cores.free) == (6, 5)
    memory = _refused(allocator, InsufficientMemory, B, 2, 3073)
    assert isinstance(memory, InsufficientMemory) and (memory.requested_mib, memory.free_mib) == (3073, 3072)
    # Exactly what is left still fits.
    assert allocator.allocate(B, 10, 3072).cpus == (3, 11, 4, 12, 5, 13, 6, 14, 7, 15)


def test_refusals_are_checked_in_the_documented_order() -> None:
    allocator = smt2_host(memory=64)
    allocator.allocate(A, 2, 64)
    _refused(allocator, InstanceAlreadyAllocated, A, 3, 10**9)  # before the vCPU and memory checks
    _refused(allocator, VcpuCountNotMultipleOfSmtWidth, B, 3, 0)  # before the memory check
    _refused(allocator, InsufficientCores, B, 100, 10**9)  # cores before memory


def test_release_of_an_unknown_instance_changes_nothing() -> None:
    allocator = smt2_host()
    allocator.allocate(A, 2, 64)
    before = allocator.snapshot()
    with pytest.raises(InstanceNotAllocated):
        allocator.release(B)
    assert allocator.snapshot() == before
    allocator.release(A)
    with pytest.raises(InstanceNotAllocated):
        allocator.release(A)  # a second release is refused, not double-freed
    assert allocator.cores_free == 7


@pytest.mark.parametrize(
    ("memory", "reserved"),
    [(0, (0,)), (-1, (0,)), (True, (0,)), (1024, (16,)), (1024, (0, -1))],
)
def test_rejects_a_bad_configuration(memory: int, reserved: tuple[int, ...]) -> None:
    with pytest.raises(AllocatorConfigError):
        smt2_host(memory=memory, reserved=reserved)


def test_without_smt_any_positive_count_works() -> None:
    allocator = CoreAllocator(Topology.from_sibling_groups([(0,), (1,), (2,)]), memory_budget_mib=64, reserved_cpus=())
    assert allocator.allocate(A, 3, 64).cpus == (0, 1, 2)


# --- restore ------------------------------------------------------------------------------


def test_restore_rebuilds_the_same_state() -> None:
    original = smt2_host()
    original.allocate(A, 4, 1024)
    original.allocate(B, 2, 512)
    original.release(A)
    original.allocate(C, 2, 256)
    restored = smt2_host()
    restored.restore(original.snapshot().allocations)
    assert restored.snapshot() == original.snapshot()
    assert restored.free_cores() == original.free_cores()
    # ... and it keeps behaving the same.
    assert restored.allocate(A, 2, 64) == original.allocate(A, 2, 64)


GOOD = Allocation(A, (1, 9), 1024)


@pytest.mark.parametrize(
    "journal",
    [
        pytest.param([GOOD, Allocation(B, (1, 9), 64)], id="overlap"),
        pytest.param([GOOD, Allocation(B, (2, 10, 1, 9), 64)], id="partial-overlap"),
        pytest.param([GOOD, Allocation(A, (2, 10), 64)], id="instance-twice"),
        pytest.param([Allocation(A, (0, 8), 64)], id="reserved-core"),
        pytest.param([Allocation(A, (1,), 64)], id="half-a-core"),
        pytest.param([Allocation(A, (1, 10), 64)], id="threads-of-two-cores"),
        pytest.param([Allocation(A, (9, 1), 64)], id="siblings-out-of-order"),
        pytest.param([Allocation(A, (2, 10, 1, 9), 64)], id="cores-out-of-order"),
        pytest.param([Allocation(A, (1, 9, 1, 9), 64)], id="core-twice"),
        pytest.param([Allocation(A, (16, 17), 64)], id="unknown-cpus"),
        pytest.param([Allocation(A, (), 64)], id="no-cpus"),
        pytest.param([Allocation(A, (1, 9), 0)], id="no-memory"),
        pytest.param([GOOD, Allocation(B, (2, 10), 8192 - 1023)], id="over-budget"),
    ],
)
def test_a_bad_journal_is_rejected_whole_and_changes_nothing(journal: list[Allocation]) -> None:
    allocator = smt2_host()
    before = allocator.snapshot()
    with pytest.raises(RestoreRejected):
        allocator.restore(journal)
    assert allocator.snapshot() == before
    # Nothing was half-restored: the good entry is still free to take.
    assert allocator.allocate(C, 2, 64).cpus == (1, 9)


def test_restore_into_a_used_allocator_is_refused() -> None:
    allocator = smt2_host()
    allocator.allocate(A, 2, 64)
    before = allocator.snapshot()
    with pytest.raises(RestoreRejected):
        allocator.restore([Allocation(B, (2, 10), 64)])
    assert allocator.snapshot() == before


# --- the model-based state machine -----------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Drive a CoreAllocator and a dictionary model side by side; every answer and refusal must agree.

    The model: which core indexes and how much memory each instance holds.  The
    expected choice is recomputed from the model alone (lowest free cores first).
    """

    @initialize(data=st.data())
    def build(self, data: st.DataObject) -> None:
        width = data.draw(st.integers(1, 3), label="smt width")
        count = data.draw(st.integers(1, 8), label="cores")
        numbering = data.draw(st.permutations(range(width * count)), label="cpu numbering")
        groups = [numbering[k * width : (k + 1) * width] for k in range(count)]
        self.topology = Topology.from_sibling_groups(groups)
        self.reserved_cpus = data.draw(st.sets(st.sampled_from(self.topology.cpus), max_size=2), label="reserved")
        self.budget = data.draw(st.integers(1, 4096), label="budget")
        self.allocator = CoreAllocator(self.topology, memory_budget_mib=self.budget, reserved_cpus=self.reserved_cpus)
        self.reserved = {i for i, core in enumerate(self.topology.cores) if self.reserved_cpus & set(core.cpus)}
        self.model: dict[uuid.UUID, tuple[list[int], Allocation]] = {}
        self.seen: list[uuid.UUID] = []

    def _pick_instance(self, data: st.DataObject) -> uuid.UUID:
        reuse: bool = data.draw(st.booleans(), label="reuse an id")
        if reuse and self.seen:
            return data.draw(st.sampled_from(self.seen), label="known id")
        instance = data.draw(st.uuids(), label="new id")
        self.seen.append(instance)
        return instance

    def _free(self) -> list[int]:
        held = {i for indexes, _ in self.model.values() for i in indexes}
        return [i for i in range(len(self.topology.cores)) if i not in self.reserved and i not in held]

    def _memory_used(self) -> int:
        return sum(allocation.memory_mib for _, allocation in self.model.values())

    @rule(data=st.data(), vcpus=st.integers(-1, 26), memory=st.integers(-1, 2048))
    def allocate(self, data: st.DataObject, vcpus: int, memory: int) -> None:
        instance = self._pick_instance(data)
        width = self.topology.smt_width
        free = self._free()
        expected: type[AllocatorError] | None
        if instance in self.model:
            expected = InstanceAlreadyAllocated
        elif vcpus <= 0:
            expected = InvalidVcpuCount
        elif vcpus % width:
            expected = VcpuCountNotMultipleOfSmtWidth
        elif memory <= 0:
            expected = InvalidMemorySize
        elif vcpus // width > len(free):
            expected = InsufficientCores
        elif memory > self.budget - self._memory_used():
            expected = InsufficientMemory
        else:
            expected = None
        before = self.allocator.snapshot()
        if expected is not None:
            with pytest.raises(expected):
                self.allocator.allocate(instance, vcpus, memory)
            assert self.allocator.snapshot() == before
            return
        allocation = self.allocator.allocate(instance, vcpus, memory)
        chosen = free[: vcpus // width]
        assert allocation == Allocation(
            instance, tuple(cpu for i in chosen for cpu in self.topology.cores[i].cpus), memory
        )
        self.model[instance] = (chosen, allocation)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        instance = self._pick_instance(data)
        if instance not in self.model:
            before = self.allocator.snapshot()
            with pytest.raises(InstanceNotAllocated):
                self.allocator.release(instance)
            assert self.allocator.snapshot() == before
            return
        _, taken = self.model.pop(instance)
        assert self.allocator.release(instance) == taken

    @rule()
    def restart(self) -> None:
        """The agent restarts: a fresh allocator restored from the journal replaces the old one."""
        fresh = CoreAllocator(self.topology, memory_budget_mib=self.budget, reserved_cpus=self.reserved_cpus)
        fresh.restore(self.allocator.snapshot().allocations)
        assert fresh.snapshot() == self.allocator.snapshot()
        self.allocator = fresh

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def corrupted_journal_is_rejected(self, data: st.DataObject) -> None:
        journal = list(self.allocator.snapshot().allocations)
        victim = data.draw(st.sampled_from(journal), label="victim")
        corruption = data.draw(st.sampled_from(["duplicate-cores", "duplicate-id", "over-budget"]))
        if corruption == "duplicate-cores":
            journal.append(Allocation(uuid.uuid4(), victim.cpus, 1))
        elif corruption == "duplicate-id":
            journal.append(victim)
        else:
            journal.append(Allocation(victim.instance_id, victim.cpus, victim.memory_mib + self.budget))
            journal.remove(victim)
        fresh = CoreAllocator(self.topology, memory_budget_mib=self.budget, reserved_cpus=self.reserved_cpus)
        empty = fresh.snapshot()
        with pytest.raises(RestoreRejected):
            fresh.restore(journal)
        assert fresh.snapshot() == empty
        with pytest.raises(RestoreRejected):
            self.allocator.restore(journal)  # a used allocator refuses any restore

    @invariant()
    def no_core_is_shared_or_reserved(self) -> None:
        held: list[int] = []
        for allocation in self.allocator.snapshot().allocations:
            assert len(allocation.cpus) % self.topology.smt_width == 0
            held.extend(allocation.cpus)
        assert len(held) == len(set(held)), "a CPU is held twice"
        reserved_cpus = {cpu for i in self.reserved for cpu in self.topology.cores[i].cpus}
        assert not reserved_cpus & set(held)
        # Whole cores only: a held CPU's siblings are held by the same instance.
        for allocation in self.allocator.snapshot().allocations:
            for cpu in allocation.cpus:
                core = next(core for core in self.topology.cores if cpu in core.cpus)
                assert set(core.cpus) <= set(allocation.cpus)

    @invariant()
    def free_plus_held_is_every_non_reserved_core(self) -> None:
        free = {core.cpus for core in self.allocator.free_cores()}
        held = {core for indexes, _ in self.model.values() for core in (self.topology.cores[i].cpus for i in indexes)}
        everything = {core.cpus for i, core in enumerate(self.topology.cores) if i not in self.reserved}
        assert not free & held
        assert free | held == everything
        assert self.allocator.cores_free == len(free)

    @invariant()
    def matches_the_model(self) -> None:
        snapshot = self.allocator.snapshot()
        assert sorted(snapshot.allocations, key=lambda a: a.instance_id) == sorted(
            (allocation for _, allocation in self.model.values()), key=lambda a: a.instance_id
        )
        assert snapshot.memory_free_mib == self.budget - self._memory_used() >= 0
        assert snapshot.cores_total == len(self.topology.cores) - len(self.reserved)


TestAllocatorMachine = AllocatorMachine.TestCase
