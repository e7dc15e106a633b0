"""QEMU as an unprivileged user (claim C15): what the backend shares with QEMU's group, and nothing more.

Without QEMU. Where a process must really run as another user (the agent's own situation, as root), the
"VMM" is a shell script the backend starts in QEMU's place: it reports what it can and cannot do from
inside, then exits, so that the launch fails with its words in the error. The access model the backend
uses for its own checks (:meth:`RunAs.may`) is compared with the kernel's answers, obtained by a
process running as that identity.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hostagent import process
from hostagent.backend import BackendError, BackendFailure, LaunchSpec, VmRecord
from hostagent.backends.qemu import QemuBackend, RunAs, process_ids

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="starting a process as another user needs root, as the agent has")


def _unused(in_use: set[int], start: int = 61_000) -> int:
    while start in in_use:
        start += 1
    return start


@pytest.fixture(scope="module")
def ids() -> RunAs:
    """QEMU's identity: ``passivisor-qemu`` if it exists, else ids no account uses (the backend needs none)."""
    with_name = [entry for entry in pwd.getpwall() if entry.pw_name == "passivisor-qemu"]
    if with_name and ROOT:
        return RunAs.lookup("passivisor-qemu")
    uid = _unused({entry.pw_uid for entry in pwd.getpwall()})
    # Not root: the test may only give files its own group, so that plays QEMU's group.
    gid = _unused({entry.gr_gid for entry in grp.getgrall()}) if ROOT else os.getgid()
    return RunAs(uid, gid, name="test-qemu")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory outside pytest's tmp_path (0700 and root's), so that QEMU's user can reach into it."""
    path = Path(tempfile.mkdtemp(prefix="pvp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode(path: Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def spec_in(runtime_root: Path) -> LaunchSpec:
    """A runtime directory as the service leaves it: 0700, with the image store's 0600 copies inside."""
    runtime_dir = runtime_root / uuid.uuid4().hex[:8]  # short: socket paths have 107 bytes
    runtime_dir.mkdir(mode=0o700)
    for name in ("kernel", "initrd"):
        (runtime_dir / name).write_bytes(name.encode())
        (runtime_dir / name).chmod(0o600)
    return LaunchSpec(uuid.uuid4(), 1, 128, (sorted(os.sched_getaffinity(0))[0],), runtime_dir / "kernel",
                      runtime_dir / "initrd", "console=ttyS0", runtime_dir)  # fmt: skip


# --- the identity --------------------------------------------------------------------------


def test_root_and_roots_group_are_refused() -> None:
    for uid, gid, groups in ((0, 5, ()), (5, 0, ()), (5, 5, (7, 0)), (-1, 5, ())):
        with pytest.raises(ValueError, match="root"):
            RunAs(uid, gid, groups)
    with pytest.raises(ValueError, match="root"):
        RunAs.lookup(pwd.getpwuid(0).pw_name)
    with pytest.raises(KeyError):
        RunAs.lookup("no-such-user-passivisor")


@needs_root
def test_the_access_model_agrees_with_the_kernel(ids: RunAs, scratch: Path) -> None:
    """``RunAs.may`` against access(2) in a process that really has that identity (files only)."""
    scratch.chmod(0o755)
    other_gid = _unused({entry.gr_gid for entry in grp.getgrall()} | {ids.gid}, 62_000)
    supplementary = _unused({entry.gr_gid for entry in grp.getgrall()} | {ids.gid, other_gid}, 63_000)
    who = RunAs(ids.uid, ids.gid, (supplementary,), "probe")
    cases: list[Path] = []
    for owner in (who.uid, 0):
        for group in (who.gid, supplementary, other_gid):
            for bits in (0o000, 0o700, 0o070, 0o007, 0o640, 0o604, 0o460, 0o406, 0o066, 0o750, 0o705, 0o111):
                path = scratch / f"f{len(cases)}"
                path.write_bytes(b"")
                os.chown(path, owner, group)
                path.chmod(bits)
                cases.append(path)
    script = (
        'for f in "$@"; do r=-; w=-; x=-; [ -r "$f" ] && r=r; [ -w "$f" ] && w=w; [ -x "$f" ] && x=x; '
        'echo "$r$w$x"; done'
    )
    out = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *map(str, cases)],
        user=who.uid,
        group=who.gid,
        extra_groups=list(who.groups),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    model = ["".join(c if who.may(os.stat(p), b) else "-" for c, b in (("r", 4), ("w", 2), ("x", 1))) for p in cases]
    assert len(out) == len(cases) and model == out


# --- the runtime root and directory ----------------------------------------------------------


def test_the_runtime_root_becomes_search_only_for_qemus_group(ids: RunAs, scratch: Path) -> None:
    QemuBackend(run_as=ids).prepare_runtime_root(scratch)
    assert mode(scratch) == (0o710, os.geteuid(), ids.gid)


def test_without_a_user_nothing_is_shared(scratch: Path) -> None:
    before = mode(scratch)
    QemuBackend().prepare_runtime_root(scratch)
    spec = spec_in(scratch)
    assert QemuBackend()._share_runtime_dir(spec) is None
    assert mode(scratch) == before and mode(spec.runtime_dir)[0] == 0o700 and mode(spec.kernel)[0] == 0o600


def test_a_runtime_root_qemu_cannot_reach_is_refused(ids: RunAs, tmp_path: Path) -> None:
    """tmp_path sits below a 0700 directory of the test's user: QEMU's user cannot get through it."""
    root = tmp_path / "instances"
    root.mkdir()
    with pytest.raises(PermissionError, match=f"cannot reach {root}: .* is mode 0700"):
        QemuBackend(run_as=ids).prepare_runtime_root(root)


def test_the_runtime_directory_shares_the_image_copies_and_nothing_else(ids: RunAs, scratch: Path) -> None:
    spec = spec_in(scratch)
    (spec.runtime_dir / "console.log").write_bytes(b"guest output")
    (spec.runtime_dir / "console.log").chmod(0o600)
    assert QemuBackend(run_as=ids)._share_runtime_dir(spec) == ids.gid
    me = os.geteuid()
    assert mode(spec.runtime_dir) == (0o710, me, ids.gid)  # search only: no listing, no creating
    assert mode(spec.kernel) == mode(spec.initrd) == (0o640, me, ids.gid)  # read only
    assert mode(spec.runtime_dir / "console.log")[0] == 0o600  # not QEMU's business


def test_a_symlink_in_place_of_the_kernel_copy_is_not_followed(ids: RunAs, scratch: Path) -> None:
    spec = spec_in(scratch)
    outside = scratch / "secret"
    outside.write_bytes(b"secret")
    outside.chmod(0o600)
    spec.kernel.unlink()
    spec.kernel.symlink_to(outside)
    with pytest.raises(OSError):
        QemuBackend(run_as=ids)._share_runtime_dir(spec)
    assert mode(outside)[0] == 0o600 and mode(outside)[2] == os.getegid()


def test_launch_refuses_what_qemus_user_could_not_open_and_creates_nothing(ids: RunAs, scratch: Path) -> None:
    backend = QemuBackend("sh", run_as=ids)  # never started: the checks come first
    hidden_root = scratch / "in"  # scratch is still 0700: prepare_runtime_root has not run
    hidden_root.mkdir()
    spec = spec_in(hidden_root)
    with pytest.raises(BackendError) as unreachable:
        asyncio.run(backend.launch(spec))
    assert unreachable.value.failure is BackendFailure.LAUNCH_FAILED and "cannot reach" in unreachable.value.detail
    assert mode(spec.runtime_dir)[0] == 0o700 and mode(spec.kernel)[0] == 0o600  # untouched

    backend.prepare_runtime_root(scratch)
    foreign_kernel = scratch / "vmlinuz"  # a kernel outside the runtime directory must be readable already
    foreign_kernel.write_bytes(b"kernel")
    foreign_kernel.chmod(0o600)
    spec = replace(spec_in(scratch), kernel=foreign_kernel)
    with pytest.raises(BackendError) as unreadable:
        asyncio.run(backend.launch(spec))
    assert unreadable.value.failure is BackendFailure.LAUNCH_FAILED
    assert f"cannot read {foreign_kernel}: mode 0600" in unreadable.value.detail
    assert mode(spec.runtime_dir)[0] == 0o700  # nothing shared, nothing created
    assert sorted(p.name for p in spec.runtime_dir.iterdir()) == ["initrd", "kernel"]


FAKE_QEMU = """#!/bin/sh
# Plays QEMU: report, on one line, what this process is and what it may do, then exit 3.
rt={rt}
root={root}
try() {{ if "$@" >/dev/null 2>&1; then echo ok; else echo denied; fi; }}
echo "ids=$(id -u):$(id -g):$(id -G | tr ' ' ,)" \\
  "kernel=$(try cat $rt/kernel) initrd=$(try cat $rt/initrd) list=$(try ls $rt) create=$(try touch $rt/planted)" \\
  "log=$(try cat $rt/qemu.log) secret=$(try cat $root/secret) root=$(try ls $root)" \\
  "monitor=$(try test -w $rt/qmp.sock) console=$(try test -w $rt/console.sock)"
exit 3
"""


@needs_root
def test_qemu_starts_as_its_user_and_gets_exactly_what_the_vm_needs(ids: RunAs, scratch: Path) -> None:
    bin_dir = Path(tempfile.mkdtemp(prefix="pvb-"))
    try:
        bin_dir.chmod(0o755)
        backend = QemuBackend(str(bin_dir / "fake-qemu"), run_as=ids, launch_timeout_s=10)
        backend.prepare_runtime_root(scratch)
        (scratch / "secret").write_bytes(b"another instance's business")
        (scratch / "secret").chmod(0o640)  # even group-readable for root's group: QEMU is not in it
        spec = spec_in(scratch)
        script = bin_dir / "fake-qemu"
        script.write_text(FAKE_QEMU.format(rt=spec.runtime_dir, root=scratch))
        script.chmod(0o755)
        with pytest.raises(BackendError) as said:
            asyncio.run(backend.launch(spec))
    finally:
        shutil.rmtree(bin_dir)
    assert said.value.failure is BackendFailure.LAUNCH_FAILED and "status 3" in said.value.detail
    assert (
        f"ids={ids.uid}:{ids.gid}:{','.join(map(str, (ids.gid, *ids.groups)))} kernel=ok initrd=ok list=denied "
        "create=denied log=denied secret=denied root=denied monitor=ok console=ok"
    ) in said.value.detail
    assert not spec.runtime_dir.exists()  # scrubbed after the failed launch


# --- adopt ------------------------------------------------------------------------------------


async def _socket_mode_during_adopt(backend: QemuBackend, record: VmRecord) -> tuple[int, int, int]:
    """Start an adopt (nobody will reconnect), look at the monitor socket it listens on, let it fail."""
    adopting = asyncio.ensure_future(backend.adopt(record))
    assert record.monitor is not None
    for _ in range(200):
        if record.monitor.exists():
            break
        await asyncio.sleep(0.01)
    seen = mode(record.monitor)
    with pytest.raises(BackendError) as failed:
        await adopting
    assert failed.value.failure is BackendFailure.MONITOR_FAILED
    return seen


@needs_root
def test_adopt_shares_the_sockets_with_the_group_qemu_really_runs_with(
    ids: RunAs, scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_in(scratch)
    for run_as, configured in ((ids, ids), (ids, None), (None, ids)):
        child = subprocess.Popen(["sleep", "60"], start_new_session=True, **_as(run_as))
        try:
            ticks = process.start_ticks(child.pid)
            assert ticks is not None
            record = VmRecord(spec.instance_id, child.pid, ticks, spec.runtime_dir, spec.runtime_dir / "qmp.sock")
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                seen = asyncio.run(_socket_mode_during_adopt(QemuBackend(run_as=configured, adopt_timeout_s=0.5),
                                                             record))  # fmt: skip
            if run_as is None:  # QEMU as root, from before [qemu] user was set: private socket, and a warning
                assert process_ids(child.pid) == (0, 0)
                assert seen == (0o600, 0, 0) and "runs as uid 0 gid 0, not as the configured" in caplog.text
            else:
                assert process_ids(child.pid) == (ids.uid, ids.gid)
                assert seen == (0o660, 0, ids.gid) and "not as the configured" not in caplog.text
            assert child.poll() is None  # a failed adopt leaves the VM alone
        finally:
            child.kill()
            child.wait()


def _as(run_as: RunAs | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}
