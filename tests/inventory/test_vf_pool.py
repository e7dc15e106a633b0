"""The VF pool: examples, every refusal, and a model-based state machine (issue 3, section 6)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hostagent.inventory import (
    NoFreeVf,
    PfNotFound,
    PhysicalFunction,
    Vf,
    VfAssignment,
    VfNotAssigned,
    VfPool,
    VfPoolConfigError,
    VfPoolError,
    VfRestoreRejected,
    parse_bdf,
)
from hostagent.wire import PciAddress

A, B = uuid.UUID(int=1), uuid.UUID(int=2)
PF0 = parse_bdf("0000:03:00.0")
PF1 = parse_bdf("0000:81:00.0")


def make_pf(pf: PciAddress, count: int, *, first_device: int = 2) -> PhysicalFunction:
    vfs = tuple(
        Vf(pf, index, PciAddress(pf.domain, pf.bus, first_device + index // 8, index % 8)) for index in range(count)
    )
    return PhysicalFunction(pf, total_vfs=max(count, 8), vfs=vfs)


def two_pfs() -> VfPool:
    return VfPool([make_pf(PF1, 2), make_pf(PF0, 3)])


def test_acquire_takes_the_lowest_free_index() -> None:
    pool = two_pfs()
    first = pool.acquire(A, PF0)
    assert first == Vf(PF0, 0, parse_bdf("0000:03:02.0"))
    assert pool.acquire(B, PF0).index == 1
    assert pool.acquire(A, PF0).index == 2
    assert pool.holder_of(first.address) == A
    assert pool.held_by(A) == (first, Vf(PF0, 2, parse_bdf("0000:03:02.2")))
    pool.release(A, first.address)
    assert pool.acquire(B, PF0) == first  # the freed index is the lowest again
    snapshot = pool.snapshot()
    assert (snapshot.vfs_total, snapshot.vfs_free) == (5, 2)
    assert [pf.address for pf in pool.pfs] == [PF0, PF1]


def test_release_returns_exactly_the_vf_taken() -> None:
    pool = two_pfs()
    taken = pool.acquire(A, PF1)
    assert pool.release(A, taken.address) == taken
    assert pool.holder_of(taken.address) is None


def test_release_all_returns_every_vf_of_the_instance() -> None:
    pool = two_pfs()
    mine = {pool.acquire(A, PF0), pool.acquire(A, PF1)}
    theirs = pool.acquire(B, PF0)
    assert set(pool.release_all(A)) == mine
    assert pool.release_all(A) == ()
    assert pool.snapshot().assignments == (VfAssignment(B, theirs),)


def _refused(pool: VfPool, error: type[VfPoolError], call: str, *args: object) -> None:
    before = pool.snapshot()
    with pytest.raises(error):
        getattr(pool, call)(*args)
    assert pool.snapshot() == before


def test_every_refusal_changes_nothing() -> None:
    pool = two_pfs()
    held = pool.acquire(A, PF1)
    _refused(pool, PfNotFound, "acquire", B, parse_bdf("0000:04:00.0"))
    _refused(pool, PfNotFound, "acquire", B, held.address)  # a VF is not a PF
    pool.acquire(B, PF1)
    _refused(pool, NoFreeVf, "acquire", B, PF1)
    _refused(pool, VfNotAssigned, "release", B, held.address)  # held by someone else
    _refused(pool, VfNotAssigned, "release", A, parse_bdf("0000:03:02.1"))  # free
    _refused(pool, VfNotAssigned, "release", A, parse_bdf("0000:09:00.0"))  # unknown
    _refused(pool, VfNotAssigned, "release", A, PF1)  # a PF is not a VF


def test_a_pf_without_vfs_has_no_free_vf() -> None:
    pool = VfPool([make_pf(PF0, 0)])
    _refused(pool, NoFreeVf, "acquire", A, PF0)


def test_rejects_inconsistent_pfs() -> None:
    pf = make_pf(PF0, 2)
    bad_index = PhysicalFunction(PF0, 2, (pf.vfs[1], pf.vfs[0]))
    wrong_parent = PhysicalFunction(PF1, 2, pf.vfs)
    shared_vf = PhysicalFunction(PF1, 1, (Vf(PF1, 0, pf.vfs[0].address),))
    vf_is_pf = PhysicalFunction(PF1, 1, (Vf(PF1, 0, PF0),))
    for pfs in ([pf, pf], [bad_index], [wrong_parent], [pf, shared_vf], [pf, vf_is_pf]):
        with pytest.raises(VfPoolConfigError):
            VfPool(pfs)


def test_restore_rebuilds_the_same_state() -> None:
    pool = two_pfs()
    pool.acquire(A, PF0)
    pool.acquire(B, PF0)
    pool.acquire(A, PF1)
    pool.release(A, parse_bdf("0000:03:02.0"))
    fresh = two_pfs()
    fresh.restore(pool.snapshot().assignments)
    assert fresh.snapshot() == pool.snapshot()
    assert fresh.acquire(A, PF0) == pool.acquire(A, PF0)


@pytest.mark.parametrize(
    "journal",
    [
        pytest.param([VfAssignment(A, Vf(PF0, 0, parse_bdf("0000:03:02.0")))] * 2, id="twice"),
        pytest.param(
            [
                VfAssignment(A, Vf(PF0, 0, parse_bdf("0000:03:02.0"))),
                VfAssignment(B, Vf(PF0, 0, parse_bdf("0000:03:02.0"))),
            ],
            id="two-holders",
        ),
        pytest.param([VfAssignment(A, Vf(PF0, 1, parse_bdf("0000:03:02.0")))], id="wrong-index"),
        pytest.param([VfAssignment(A, Vf(PF1, 0, parse_bdf("0000:03:02.0")))], id="wrong-pf"),
        pytest.param([VfAssignment(A, Vf(PF0, 7, parse_bdf("0000:03:02.7")))], id="unknown-vf"),
    ],
)
def test_a_bad_journal_is_rejected_whole(journal: list[VfAssignment]) -> None:
    pool = two_pfs()
    before = pool.snapshot()
    with pytest.raises(VfRestoreRejected):
        pool.restore([VfAssignment(B, Vf(PF1, 0, parse_bdf("0000:81:02.0"))), *journal])
    assert pool.snapshot() == before


def test_restore_into_a_used_pool_is_refused() -> None:
    pool = two_pfs()
    pool.acquire(A, PF0)
    _refused(pool, VfRestoreRejected, "restore", [])


class VfPoolMachine(RuleBasedStateMachine):
    """A VfPool against a model: a dict from VF address to holder."""

    @initialize(counts=st.lists(st.integers(0, 4), min_size=1, max_size=3))
    def build(self, counts: list[int]) -> None:
        self.functions = [make_pf(PciAddress(0, 0x10 + n, 0, 0), count) for n, count in enumerate(counts)]
        self.pool = VfPool(self.functions)
        self.model: dict[PciAddress, uuid.UUID] = {}
        self.instances = [uuid.UUID(int=n) for n in range(1, 4)]
        self.every_vf = {vf.address: vf for pf in self.functions for vf in pf.vfs}

    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        instance = data.draw(st.sampled_from(self.instances))
        known = [pf.address for pf in self.functions]
        pf_address = data.draw(st.sampled_from([*known, PciAddress(0, 0xFF, 0, 0)]), label="pf")
        before = self.pool.snapshot()
        function = next((pf for pf in self.functions if pf.address == pf_address), None)
        if function is None:
            with pytest.raises(PfNotFound):
                self.pool.acquire(instance, pf_address)
            assert self.pool.snapshot() == before
            return
        free = [vf for vf in function.vfs if vf.address not in self.model]
        if not free:
            with pytest.raises(NoFreeVf):
                self.pool.acquire(instance, pf_address)
            assert self.pool.snapshot() == before
            return
        assert self.pool.acquire(instance, pf_address) == free[0]
        self.model[free[0].address] = instance

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        instance = data.draw(st.sampled_from(self.instances))
        addresses = [*self.every_vf, PciAddress(0, 0xFE, 0, 0)]
        address = data.draw(st.sampled_from(addresses), label="vf")
        if self.model.get(address) != instance:
            before = self.pool.snapshot()
            with pytest.raises(VfNotAssigned):
                self.pool.release(instance, address)
            assert self.pool.snapshot() == before
            return
        del self.model[address]
        assert self.pool.release(instance, address) == self.every_vf[address]

    @rule(data=st.data())
    def release_all(self, data: st.DataObject) -> None:
        instance = data.draw(st.sampled_from(self.instances))
        expected = {self.every_vf[a] for a, holder in self.model.items() if holder == instance}
        assert set(self.pool.release_all(instance)) == expected
        self.model = {a: holder for a, holder in self.model.items() if holder != instance}

    @rule()
    def restart(self) -> None:
        fresh = VfPool(self.functions)
        fresh.restore(self.pool.snapshot().assignments)
        assert fresh.snapshot() == self.pool.snapshot()
        self.pool = fresh

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def doubled_journal_is_rejected(self, data: st.DataObject) -> None:
        journal = list(self.pool.snapshot().assignments)
        victim = data.draw(st.sampled_from(journal))
        fresh = VfPool(self.functions)
        with pytest.raises(VfRestoreRejected):
            fresh.restore([*journal, VfAssignment(uuid.uuid4(), victim.vf)])
        assert fresh.snapshot().assignments == ()

    @invariant()
    def matches_the_model(self) -> None:
        snapshot = self.pool.snapshot()
        held = [assignment.vf.address for assignment in snapshot.assignments]
        assert len(held) == len(set(held)), "a VF is held twice"
        assert {a.vf.address: a.instance_id for a in snapshot.assignments} == self.model
        assert snapshot.vfs_total == len(self.every_vf)
        assert snapshot.vfs_free + len(held) == snapshot.vfs_total
        for instance in self.instances:
            assert {vf.address for vf in self.pool.held_by(instance)} == {
                a for a, holder in self.model.items() if holder == instance
            }


TestVfPoolMachine = VfPoolMachine.TestCase
