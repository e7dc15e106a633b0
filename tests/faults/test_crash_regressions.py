"""Regression tests for the crash-consistency bugs the fault harness found (issue 6, section 1).

Real components: the controller and agent processes of ``faults/harness.py`` (sim backend, real nbdkit and
qemu-img, mTLS), one host shared by the module.  Each test is one run of the harness, a short sequence with
one kill point, and asserts that no invariant was violated; it also checks that the process died during
the operation the test is about, so that a change to the sequence or to the production code cannot turn
it into a test that passes without crashing anything.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults.harness import InstanceModel, Plan, Rig, Runner, execute, host, make_volume
from faults.points import BY_NAME

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nbdkit") is None or shutil.which("qemu-img") is None,
                       reason="nbdkit and qemu-img are installed by `make deps` (Debian nbdkit, qemu-utils)"),
]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytearray]:
    return make_volume(tmp_path_factory.mktemp("volume") / "template.luks")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory,
           volume: tuple[Path, bytearray]) -> Iterator[tuple[Rig, InstanceModel]]:
    with host(tmp_path_factory.mktemp("faults") / "host", volume) as rig_and_survivor:
        yield rig_and_survivor


# The agent died after changing the VMM (and, for a VF, sysfs) and before journaling the change.  Before
# the fix its next incarnation adopted the VM with a device list the journal did not have: the retried
# attach was refused forever (DEVICE_REJECTED: the device id was taken), the retried detach or release
# likewise, and a RECONCILE_MISMATCH event was all that was left.  Fixed in hostagent/service.py
# (_reconcile_devices: undo the unanswered attach, finish the unanswered detach).
VMM_AHEAD_OF_JOURNAL = [
    ("agent:volume-plugged", 1, "plain", "attach(A,P1)"),
    ("agent:volume-plugged", 1, "encrypted", "attach_enc(A,E1)"),
    ("agent:volume-unplugged", 1, "plain", "detach(A,P1)"),
    ("agent:volume-unplugged", 1, "encrypted", "detach(A,E1)"),
    ("agent:vf-plugged", 1, "vf", "assign_vf(A)"),
    ("agent:vf-unplugged", 1, "vf", "release_vf(A)"),
    ("agent:vf-unbound", 1, "vf", "release_vf(A)"),
    ("agent:journal-saving", 4, "plain", "attach(A,P1)"),  # the 4th save: start-up, STARTING, RUNNING, attach
    ("agent:journal-saving", 5, "vf", "release_vf(A)"),
]


@pytest.mark.parametrize(("point", "n", "sequence", "during"), VMM_AHEAD_OF_JOURNAL,
                         ids=[f"{p}@{n}-{s}" for p, n, s, _ in VMM_AHEAD_OF_JOURNAL])
def test_a_device_command_the_agent_died_in_is_undone_or_finished_when_it_restarts(
        shared: tuple[Rig, InstanceModel], point: str, n: int, sequence: str, during: str) -> None:
    result = Runner(*shared, sequence, BY_NAME[point], n).run()
    assert result.fired == [f"{point}@{n}"] and result.killed_during == [during], result
    assert result.violations == [] and result.known == []


# The agent journaled an encrypted attach (the VMM holds the NBD socket) and died before answering.  The
# controller saw UNAVAILABLE and ended the volume's nbdkit, so the guest's disk was cut while the agent,
# and the retry's ALREADY_EXISTS, said it was attached.  Fixed in controller/encrypted_attach.py (an
# unknown outcome leaves nbdkit to end by itself when nobody holds its socket).
ENCRYPTED_ATTACH_ANSWER_LOST = [
    ("agent:journal-saved", 4, "encrypted", "attach_enc(A,E1)"),
    ("agent:answered", 3, "encrypted", "attach_enc(A,E1)"),  # start, describe, attach
]


@pytest.mark.parametrize(("point", "n", "sequence", "during"), ENCRYPTED_ATTACH_ANSWER_LOST,
                         ids=[f"{p}@{n}" for p, n, _, _ in ENCRYPTED_ATTACH_ANSWER_LOST])
def test_an_encrypted_attach_whose_answer_was_lost_keeps_its_server(
        shared: tuple[Rig, InstanceModel], point: str, n: int, sequence: str, during: str) -> None:
    result = Runner(*shared, sequence, BY_NAME[point], n).run()
    assert result.fired == [f"{point}@{n}"] and result.killed_during == [during], result
    assert result.tolerated == [f"{during}: retry answered ALREADY_EXISTS"]
    assert result.violations == [] and result.known == []


# AssignVirtualFunction after a crash between the agent assigning the VF and the client token completing: the
# retry with the same token is executed again (controller/idempotency.py: an interrupted token is handed out as
# New), and the agent must recognise the repetition.  It does by the assignment's name: the instance already
# holds a VF of that PF with that MAC and VLAN, so it answers with that VF (hostagent/state.py, check_assign).
# Before the fix the retry assigned a second VF (K1 in the report).
VF_ASSIGN_ANSWER_LOST = [
    ("controller:agent-answered", 2, "vf", "assign_vf(A)"),  # mutating calls: start, assign
    ("agent:answered", 3, "vf", "assign_vf(A)"),  # start, describe, assign
]


@pytest.mark.parametrize(("point", "n", "sequence", "during"), VF_ASSIGN_ANSWER_LOST,
                         ids=[f"{p}@{n}" for p, n, _, _ in VF_ASSIGN_ANSWER_LOST])
def test_a_retried_vf_assignment_assigns_one_vf(tmp_path: Path, volume: tuple[Path, bytearray], point: str,
                                                n: int, sequence: str, during: str) -> None:
    report = execute(tmp_path, [Plan(point, n, sequence)], volume=volume)  # a host of its own: it breaks it
    (result,) = report.runs
    assert result.fired == [f"{point}@{n}"] and result.killed_during == [during], result
    assert result.known == []
    assert result.violations == []


# A read-only call (and a refusal, and the replay of a completed token) is answered only once its audit
# record is durable (controller/grpc_service.py, _record).  The kill lands just before the group commit that
# would write a DescribeInstance's record: the client must see the call fail, never an answer without a record
# (claim C3).  Before the fix the record rode on the next batch and the answer left first (K2 in the report).
def test_an_answered_read_has_its_audit_record(tmp_path: Path, volume: tuple[Path, bytearray]) -> None:
    point, n = "controller:read-record-unwritten", 1
    report = execute(tmp_path, [Plan(point, n, "plain")], volume=volume)
    (result,) = report.runs
    assert result.fired == [f"{point}@{n}"] and result.killed_during == ["describe"], result
    assert result.known == []
    assert result.violations == []
