"""The QEMU backend: real QEMU processes, driven over QMP, behind :class:`hostagent.backend.VmBackend`.

Theory of operation
-------------------
One :class:`QemuVm` handle per VM. Its lifecycle is a small state machine; every public operation
names the states it accepts (the runstate guard of qemu.qmp, STYLE.md):

============  ==========================================================================
state         meaning
============  ==========================================================================
STARTING      ``launch``/``adopt`` in progress: QEMU may run, the monitor is not ready yet
RUNNING       monitor open, exit watched; device operations and ``stop`` are accepted
DETACHED      ``detach_monitors`` dropped the connections; QEMU runs on, unwatched (C10)
EXITED        the process ended, was reaped if it was our child, its runtime files scrubbed
============  ==========================================================================

``launch`` (STARTING -> RUNNING): the agent binds the monitor and console sockets in the runtime
directory *before* it starts QEMU, so QEMU's first connection attempt finds them (C1: QEMU
connects, the agent only listens). QEMU is started in its own session (``setsid``) with a minimal
environment and no inherited descriptors, so an agent that crashes or is SIGKILLed takes no VM with
it (C10). It starts with its vCPUs stopped (``-S``): the agent accepts the monitor connection from
exactly that pid, negotiates QMP, pins every QEMU thread to the instance's cores and each vCPU
thread to its own core (``query-cpus-fast``; QEMU itself may not, ``-sandbox resourcecontrol=deny``),
and only then lets the guest run (``cont``), so no guest instruction ever executes on a core of
another instance (C9). Any failure kills QEMU, scrubs what was created, and raises LAUNCH_FAILED
(or TIMEOUT).

Privileges (C15): with ``run_as`` (``[qemu] user``), QEMU is *started* as that unprivileged user:
uid, primary gid and the user's supplementary groups set before exec, so it never holds root (rather
than ``-runas``, which starts as root and drops later; ``-sandbox elevateprivileges=deny`` would
forbid that anyway). The agent keeps ownership of every file and gives QEMU's group the least one
VM needs: the runtime root and the VM's runtime directory 0710 (search only: no listing, no
creating), the monitor and console sockets 0660 (connect(2) needs write permission on the socket
inode), and the agent's verified copies of the kernel and initrd 0640; the logs stay 0600, because
QEMU writes its own through an inherited descriptor and never sees the console log. Raw volume files
are never opened by QEMU: the agent opens them (O_RDWR, or O_RDONLY for a read-only volume, since
QEMU matches the access mode), passes the descriptor with SCM_RIGHTS into an fdset (QMP ``add-fd``),
and QEMU's file driver opens ``/dev/fdset/N``, which duplicates it; the set is removed at once
(``remove-fd``), so the block node holds the only copy and ``blockdev-del`` closes it. NBD sockets
are passed the same way (``getfd``). Pinning and signals come from the root agent, which may act on
another user's threads. On ``adopt`` the sockets are shared with the group the running QEMU really
has (``/proc/PID/status``), not the configured one, so a changed ``[qemu] user`` never strands a
running VM (C10); the difference is logged. Limit: all QEMUs share that one user, so a QEMU taken
over by its guest may signal another and, unless Yama's ptrace_scope forbids it, read its memory
through /proc/PID/mem (the agent's seccomp filter stops ptrace and process_vm_readv, not that); the
user protects the host from QEMU, not one QEMU from another.

Exit: a pidfd, watched by the event loop, tells when QEMU ends, whether it is our child or was
adopted from a previous agent. The backend then reaps it (if it is our child), lets the monitor
deliver its last events (the ``SHUTDOWN`` event says whether the guest powered off), closes the
monitor and console, and scrubs the runtime directory (C12). ``wait_exit`` and ``stop`` return only
after that.

Devices: a hot-plugged device sits alone on one of a fixed set of PCIe root ports (a volume is a
raw node over a passed descriptor, see "Privileges"). Which ports are in use is read from QEMU's
device tree (``qom-list``/``qom-get parent_bus``), never from what the guest programmed into PCI
config space (``query-pci``), because the guest is untrusted. Device operations on one VM are
serialized by a lock, except the wait for the guest to release an unplugged device, which holds no
lock. Plugging is all-or-nothing: a refused ``device_add`` rolls back its ``blockdev-add``. An
unplug the guest does not complete in time raises TIMEOUT and leaves the device plugged and
listed, with the unplug still requested; if the guest completes it later, the ``DEVICE_DELETED``
event removes the device from the record and the backend deletes the block node, so the state
stays consistent without a retry.

Live update (C10): ``detach_monitors`` closes the monitor and console connections and stops
listening, leaving QEMU running. QEMU retries its connections once a second (``reconnect=1``);
while nobody listens, it drops what the guest writes to its serial port (the guest never blocks
on it). ``adopt`` checks that the journaled (pid, start ticks) still names a live
process (else GONE), listens again at the same paths, accepts QEMU's reconnection (again from that
pid only), and rebuilds the device list from QEMU's device tree.

Every wait on QEMU has a timeout. The two exceptions are deliberate: ``wait_exit`` waits for the
VM's end, which may be months away, and the console reader follows the guest for the VM's life;
both end when the VM ends or the monitors are detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import process
from ..backend import BackendError, BackendFailure, ExitInfo, LaunchSpec, VmBackend, VmRecord, VolumeSpec
from ..scrub import scrub_tree, zero_file
from ..wire.messages import PciAddress, StopMode
from .console import DEFAULT_CONSOLE_CAP, BoundedLog
from .qemu_cmdline import (
    VOLUME_DEVICE_PREFIX,
    VOLUME_NODE_PREFIX,
    Accel,
    QemuOptions,
    RuntimePaths,
    build_argv,
    check_pci_address,
    is_managed_device,
    nbd_fd_name,
    root_port_ids,
    vf_device_id,
    volume_device_id,
    volume_node_name,
)
from .qmp import (
    CommandFailed,
    Monitor,
    MonitorClosed,
    MonitorError,
    MonitorProtocolError,
    MonitorTimeout,
    PeerListener,
    bounded,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# QEMU's own diagnostics (stdout/stderr) go to a file QEMU appends to; the agent empties it when it
# grows past this, so that no VM can fill the disk through warnings.
QEMU_LOG_CAP = 256 * 1024
CONSOLE_READ_CHUNK = 4096
_APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_QEMU_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
# Every QEMU this process started and has not reaped yet, by pid: process-wide, because a handle
# may be dropped (detach_monitors) and the VM adopted again by another backend in this process.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_PARENT_BUS = re.compile(r"/machine/peripheral/([A-Za-z][A-Za-z0-9_.-]*)/\1")


@dataclass(frozen=True)
class RunAs:
    """The unprivileged identity QEMU runs as (claim C15): never root, never root's group.

    ``groups`` are the user's supplementary groups as the group database lists them (none for the
    user ``make deps`` creates); an operator who wants KVM where /dev/kvm is ``root:kvm 0660`` adds
    the user to ``kvm``, and that is all QEMU gets besides its primary group.
    """

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0 or any(g <= 0 for g in self.groups):
            raise ValueError(f"QEMU must not run as root or in root's group ({self})")

    @classmethod
    def lookup(cls, user: str) -> RunAs:
        """``user``'s uid, primary group and supplementary groups; KeyError if there is no such user.

        Call it before the agent's seccomp filter is installed: the lookup goes through NSS, whose
        modules may open sockets the filter forbids.
        """
        entry = pwd.getpwnam(user)
        groups = sorted(set(os.getgrouplist(user, entry.pw_gid)) - {entry.pw_gid})
        return cls(entry.pw_uid, entry.pw_gid, tuple(groups), user)

    def __str__(self) -> str:
        return f"{self.name or 'user'} (uid {self.uid}, gid {self.gid}, groups {list(self.groups)})"

    def may(self, info: os.stat_result, bits: int) -> bool:
        """Whether this identity gets all of ``bits`` (4 read, 2 write, 1 search) on a file with ``info``.

        As the kernel decides from the mode: the owner's bits if it owns the file, else the group's
        if it is in the file's group, else the others'. POSIX ACLs are not read: the agent sets none.
        """
        if info.st_uid == self.uid:
            granted = info.st_mode >> 6
        elif info.st_gid == self.gid or info.st_gid in self.groups:
            granted = info.st_mode >> 3
        else:
            granted = info.st_mode
        return granted & bits == bits

    def check_reachable(self, directory: Path) -> None:
        """PermissionError unless this identity may search every directory from / down to ``directory``."""
        real = Path(os.path.realpath(directory))
        for step in (*reversed(real.parents), real):
            info = os.stat(step)
            if not self.may(info, 1):
                raise PermissionError(
                    f"QEMU's user {self} cannot reach {real}: {step} is mode {stat.S_IMODE(info.st_mode):04o}, "
                    f"owner {info.st_uid}:{info.st_gid}"
                )

    def check_readable(self, path: Path) -> None:
        """PermissionError unless this identity may open ``path`` for reading."""
        self.check_reachable(path.parent)
        info = os.stat(path)
        if not self.may(info, 4):
            raise PermissionError(f"QEMU's user {self} cannot read {path}: mode {stat.S_IMODE(info.st_mode):04o}, "
                                  f"owner {info.st_uid}:{info.st_gid}")  # fmt: skip


def share_with_group(path: Path, gid: int, mode: int) -> None:
    """Give the agent-owned ``path`` the group ``gid`` and then ``mode``, never following a symlink.

    The group changes first, so no intermediate state grants the new mode to the old group.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = os.open(path, flags)
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def process_ids(pid: int) -> tuple[int, int]:
    """(uid, gid) that ``pid`` opens files with: the filesystem fields of /proc/PID/status."""
    ids: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, values = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = int(values.split()[3])  # real, effective, saved, filesystem
    return ids["Uid"], ids["Gid"]


class VmState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DETACHED = "detached"
    EXITED = "exited"


class _ProcessExited(Exception):
    """QEMU ended while the backend was waiting for something else from it."""


class QemuVm:
    """The handle of one QEMU VM (see the module docstring for its states)."""

    def __init__(
        self, instance_id: uuid.UUID, pid: int, ticks: int, paths: RuntimePaths, pidfd: int
    ) -> None:
        self.instance_id = instance_id
        self.pid = pid
        self.ticks = ticks
        self.paths = paths
        self.state = VmState.STARTING
        self.monitor = Monitor(f"vm-{instance_id}")
        self.lock = asyncio.Lock()
        self.devices: dict[str, None] = {}  # managed device ids, in plug order
        self.nodes: set[str] = set()  # block nodes this backend added
        self.unplug_requested: set[str] = set()  # device_del sent, DEVICE_DELETED not yet seen
        self.stop_requested = False
        self.shutdown: Mapping[str, Any] | None = None  # data of the SHUTDOWN event, if one came
        self.console_log: BoundedLog | None = None
        self._pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        #: done as soon as the pidfd reports that the process ended
        self.process_exited: asyncio.Future[None] = self._loop.create_future()
        #: set once the exit has been handled (reaped, scrubbed), with the ExitInfo
        self.ended: asyncio.Future[ExitInfo] = self._loop.create_future()
        self.ended.add_done_callback(_consume_exception)
        self._unplug_waiters: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._console_listener: PeerListener | None = None
        self._loop.add_reader(pidfd, self._on_pidfd)

    @property
    def record(self) -> VmRecord:
        return VmRecord(
            instance_id=self.instance_id,
            pid=self.pid,
            pid_start_ticks=self.ticks,
            runtime_dir=self.paths.runtime_dir,
            monitor=self.paths.monitor,
            devices=tuple(self.devices),
        )

    # --- process -----------------------------------------------------------------------

    def _on_pidfd(self) -> None:
        self._stop_watching()
        if not self.process_exited.done():
            self.process_exited.set_result(None)

    def _stop_watching(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)

    def close_pidfd(self) -> None:
        self._stop_watching()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def kill(self) -> None:
        """SIGKILL through the pidfd: it names this process even if the pid has been reused."""
        if self._pidfd >= 0 and not self.process_exited.done():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def reap(self) -> int | None:
        """Collect the exit status if QEMU is a child of this process; None for an adopted process.

        A QEMU launched by this process is reaped through its Popen even when another handle (an
        adopting backend in the same process) notices the exit, so that Popen never mistakes a
        reaped child for a running one.
        """
        child = _CHILDREN.pop(self.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=1)
            return None
        process.reap(self.pid)
        return None

    async def race_exit(self, aw: Awaitable[T], timeout: float, what: str, *, grace: float = 0.0) -> T:
        """``await aw``, but raise _ProcessExited if QEMU ends first and MonitorTimeout after ``timeout``.

        ``grace``: how long ``aw`` may go on after QEMU ended, to fail by itself rather than be cancelled.
        """
        task = asyncio.ensure_future(aw)
        watched: set[asyncio.Future[Any]] = {task, self.process_exited}
        try:
            done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        if self.process_exited.done() and grace > 0:
            await asyncio.wait({task}, timeout=grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self.process_exited.done():
            raise _ProcessExited(what)
        raise MonitorTimeout(f"{what}: nothing within {timeout} s")

    async def wait_ended(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), timeout)
        except TimeoutError:
            return False
        except BackendError:
            return True  # ended by detach: nothing more to wait for on this handle
        return True

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("vm %s: task %s failed", self.instance_id, task.get_name(), exc_info=task.exception())

    async def cancel_tasks(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # --- events (called from the monitor's reader task: quick, never raising) ----------

    def on_event(self, name: str, data: Mapping[str, Any]) -> None:
        if name == "SHUTDOWN":
            self.shutdown = dict(data)
        elif name == "DEVICE_DELETED":
            device = data.get("device")
            if isinstance(device, str) and device in self.devices:
                self._device_gone(device)

    def _device_gone(self, device: str) -> None:
        self.devices.pop(device, None)
        waiter = self._unplug_waiters.get(device)
        if waiter is not None:
            waiter.set()
        elif device in self.unplug_requested and device.startswith(VOLUME_DEVICE_PREFIX):
            # The detach that asked for this unplug timed out; finish its work now (module docstring).
            self.spawn(self._delete_orphan_node(device), "orphan-node")
        self.unplug_requested.discard(device)

    async def _delete_orphan_node(self, device: str) -> None:
        node = _node_of(device)
        async with self.lock:
            if node in self.nodes and self.monitor.is_open:
                try:
                    await self.monitor.execute("blockdev-del", {"node-name": node}, timeout=10)
                    self.nodes.discard(node)
                except MonitorError as exc:
                    log.warning("vm %s: late blockdev-del of %s failed: %s", self.instance_id, node, exc)

    def unplug_waiter(self, device: str) -> asyncio.Event:
        return self._unplug_waiters.setdefault(device, asyncio.Event())

    def drop_unplug_waiter(self, device: str) -> None:
        self._unplug_waiters.pop(device, None)

    # --- console -----------------------------------------------------------------------

    def start_console(self, listener: PeerListener, cap: int) -> None:
        self._console_listener = listener
        self.console_log = BoundedLog(self.paths.console_log, cap)
        self.spawn(self._console_pump(self._console_listener, self.console_log), "console")

    async def _console_pump(self, listener: PeerListener, console: BoundedLog) -> None:
        """Append what QEMU's serial port sends to the bounded log, for the VM's life.

        QEMU reconnects (``reconnect=1``) if the connection drops, so the pump accepts again.
        """
        loop = asyncio.get_running_loop()
        last_cap_check = 0.0
        write_failed = False
        while True:
            conn = await listener.accept(self.pid, timeout=None)
            try:
                while True:
                    data = await loop.sock_recv(conn, CONSOLE_READ_CHUNK)
                    if not data:
                        break
                    try:
                        console.write(data)
                        write_failed = False
                    except OSError as exc:  # disk full, say: drop console bytes, never block the guest
                        if not write_failed:  # once per episode: the guest must not flood the agent's log
                            log.warning("vm %s: console log write failed: %s", self.instance_id, exc)
                        write_failed = True
                    now = time.monotonic()
                    if now - last_cap_check > 1.0:
                        last_cap_check = now
                        _cap_file(self.paths.qemu_log, QEMU_LOG_CAP)
            except OSError as exc:
                log.info("vm %s: console connection ended: %s", self.instance_id, exc)
            finally:
                conn.close()

    def close_console(self) -> None:
        if self._console_listener is not None:
            self._console_listener.close(unlink=True)
            self._console_listener = None
        if self.console_log is not None:
            self.console_log.close()


def _consume_exception(fut: asyncio.Future[ExitInfo]) -> None:
    # A detached handle's ``ended`` carries an exception nobody may await; mark it retrieved.
    if not fut.cancelled():
        fut.exception()


def _node_of(device: str) -> str:
    return volume_node_name(uuid.UUID(hex=device[len(VOLUME_DEVICE_PREFIX) :]))


def _cap_file(path: Path, cap: int) -> None:
    """Empty ``path`` when it is larger than ``cap``. QEMU appends (O_APPEND), so it carries on at 0."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_size > cap:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                zero_file(fd)
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)


def _open_volume_file(path: Path, read_only: bool, volume_id: uuid.UUID) -> int:
    """Open a raw volume file for QEMU, in the access mode QEMU will ask the fdset for.

    Never follows a symlink, never blocks (a FIFO planted at the path is refused, not waited on),
    and checks the type of what was opened rather than of what the path named a moment earlier.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _fail(BackendFailure.DEVICE_REJECTED, f"volume file for {volume_id}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _fail(BackendFailure.DEVICE_REJECTED, f"volume file for {volume_id} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_head(path: Path, limit: int = 2048) -> str:
    try:
        with path.open("rb") as f:
            return f.read(limit).decode(errors="replace").strip()
    except OSError:
        return ""


def _fail(failure: BackendFailure, detail: str) -> BackendError:
    return BackendError(failure, bounded(detail, 400))


class QemuBackend:
    """:class:`~hostagent.backend.VmBackend` on real QEMU (see the module docstring)."""

    name = "qemu"

    def __init__(
        self,
        qemu_binary: str = "qemu-system-x86_64",
        accel: str = "tcg",
        *,
        cpu_model: str | None = None,
        hotplug_ports: int | None = None,
        console_cap: int = DEFAULT_CONSOLE_CAP,
        launch_timeout_s: float = 30.0,
        adopt_timeout_s: float = 10.0,
        command_timeout_s: float = 10.0,
        unplug_timeout_s: float = 30.0,
        quit_timeout_s: float = 10.0,
        kill_timeout_s: float = 10.0,
        run_as: RunAs | None = None,
    ) -> None:
        """``run_as``: the unprivileged user QEMU runs as (the agent must be root); None: the agent's own."""
        options: dict[str, Any] = {}
        if cpu_model is not None:
            options["cpu_model"] = cpu_model
        if hotplug_ports is not None:
            options["hotplug_ports"] = hotplug_ports
        self.options = QemuOptions(binary=qemu_binary, accel=Accel(accel), **options)
        self.console_cap = console_cap
        self.launch_timeout_s = launch_timeout_s
        self.adopt_timeout_s = adopt_timeout_s
        self.command_timeout_s = command_timeout_s
        self.unplug_timeout_s = unplug_timeout_s
        self.quit_timeout_s = quit_timeout_s
        self.kill_timeout_s = kill_timeout_s
        self.run_as = run_as
        self._vms: set[QemuVm] = set()

    def prepare_runtime_root(self, root: Path) -> None:
        """Let QEMU's user reach the VMs' runtime directories below ``root`` (once, at start-up).

        ``root`` gets QEMU's group and mode 0710: search only, so QEMU can neither list it nor
        create anything in it. PermissionError if QEMU's user cannot reach ``root`` through its
        ancestors; OSError for other faults. Nothing to do when QEMU runs as the agent's user.
        """
        if self.run_as is None:
            return
        share_with_group(root, self.run_as.gid, 0o710)
        self.run_as.check_reachable(root)

    # --- launch ------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> QemuVm:
        """Start a VM; returns a RUNNING handle once QMP is ready and the vCPUs run pinned.

        Raises LAUNCH_FAILED or TIMEOUT, and then no process and no runtime file is left.
        """
        paths = RuntimePaths.for_dir(spec.runtime_dir)
        binary = shutil.which(self.options.binary)
        if binary is None:
            raise _fail(BackendFailure.LAUNCH_FAILED, f"QEMU binary {self.options.binary!r} not found")
        try:
            argv = build_argv(spec, replace(self.options, binary=binary), paths)
            for part in (spec.kernel, spec.initrd):
                if not part.is_file():
                    raise ValueError(f"{part} is not a file")
            self._check_access(spec)
        except (ValueError, OSError) as exc:
            raise _fail(BackendFailure.LAUNCH_FAILED, str(exc)) from exc

        vm: QemuVm | None = None
        listener: PeerListener | None = None
        console: PeerListener | None = None
        child: subprocess.Popen[bytes] | None = None
        started = time.monotonic()
        try:
            spec.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            group = self._share_runtime_dir(spec)
            # Both sockets listen before QEMU starts, so its first connection attempts succeed.
            listener = PeerListener(paths.monitor, group)
            console = PeerListener(paths.console, group)
            log_fd = os.open(paths.qemu_log, _APPEND_FLAGS, 0o600)  # QEMU writes to it through the fd only
            run_as = self.run_as
            try:
                child = subprocess.Popen(  # noqa: S603 - argv built from validated values, no shell
                    argv, executable=binary, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                    close_fds=True, start_new_session=True, env=_QEMU_ENV,
                    # Started unprivileged rather than told to drop privileges (-runas): QEMU never
                    # holds root, and its -sandbox elevateprivileges=deny forbids set*id anyway (C15).
                    user=run_as.uid if run_as else None, group=run_as.gid if run_as else None,
                    extra_groups=list(run_as.groups) if run_as else None,
                )  # fmt: skip
            finally:
                os.close(log_fd)
            _CHILDREN[child.pid] = child
            pidfd = os.pidfd_open(child.pid)
            ticks = process.start_ticks(child.pid)
            vm = QemuVm(spec.instance_id, child.pid, ticks if ticks is not None else -1, paths, pidfd)
            if ticks is None:
                raise _ProcessExited("start")
            vm.start_console(console, self.console_cap)  # accepted in the background, for the VM's life
            console = None
            remaining = self.launch_timeout_s - (time.monotonic() - started)
            sock = await vm.race_exit(listener.accept(vm.pid, remaining), remaining, "monitor connection")
            listener.close(unlink=True)
            listener = None
            remaining = self.launch_timeout_s - (time.monotonic() - started)
            # grace: with QEMU gone the handshake fails by itself (EOF) at once, and qemu.qmp
            # complains loudly when it is cancelled in the middle of its own cleanup.
            await vm.race_exit(vm.monitor.start(sock, remaining), remaining, "QMP negotiation", grace=1.0)
            vm.monitor.tap(("SHUTDOWN", "DEVICE_DELETED"), vm.on_event)
            await self._pin(vm, spec.host_cpus)
            await vm.race_exit(self._execute(vm, "cont"), self.command_timeout_s, "cont")
        except BaseException as exc:
            for unused in (listener, console):
                if unused is not None:
                    unused.close(unlink=True)
            if vm is not None and isinstance(exc, Exception) and not isinstance(exc, _ProcessExited):
                # A monitor that hangs up during launch usually means QEMU is dying: let it finish,
                # so that the error says why (its exit status and message) and not just "EOF".
                await asyncio.wait({vm.process_exited}, timeout=1.0)
                if vm.process_exited.done():
                    exc = _ProcessExited(str(exc))
            said = await self._abort_launch(vm, child, paths)
            if isinstance(exc, _ProcessExited):
                raise _fail(BackendFailure.LAUNCH_FAILED, f"QEMU exited during launch: {said}") from exc
            if isinstance(exc, BackendError):
                if exc.failure in (BackendFailure.LAUNCH_FAILED, BackendFailure.TIMEOUT):
                    raise
                raise _fail(BackendFailure.LAUNCH_FAILED, f"launch: {exc}") from exc
            if isinstance(exc, MonitorTimeout):
                raise _fail(BackendFailure.TIMEOUT, f"launch: {exc}") from exc
            if isinstance(exc, MonitorError | OSError):
                raise _fail(BackendFailure.LAUNCH_FAILED, f"launch: {exc}") from exc
            raise
        vm.state = VmState.RUNNING
        self._vms.add(vm)
        vm.spawn(self._watch_exit(vm), "exit")
        log.info("vm %s: QEMU pid %d ready in %.2f s", spec.instance_id, vm.pid, time.monotonic() - started)
        return vm

    def _check_access(self, spec: LaunchSpec) -> None:
        """Before anything is created: can QEMU's user reach the runtime directory and read the image?

        Files the agent owns in the runtime directory are shared with QEMU's group by
        :meth:`_share_runtime_dir`; a kernel or initrd elsewhere must already be readable.
        """
        if self.run_as is None:
            return
        self.run_as.check_reachable(spec.runtime_dir.parent)
        for part in (spec.kernel, spec.initrd):
            if part.parent != spec.runtime_dir:
                self.run_as.check_readable(part)

    def _share_runtime_dir(self, spec: LaunchSpec) -> int | None:
        """Give QEMU's group the least the VM needs; returns that group (None: QEMU runs as the agent).

        The runtime directory becomes 0710 (search only: QEMU reaches its sockets and image, and can
        neither list the directory nor create anything in it), the agent's verified copies of the
        kernel and initrd 0640 (read). The sockets get 0660 when they are bound; the logs stay 0600,
        since QEMU writes its own through an inherited descriptor and never sees the console log.
        """
        if self.run_as is None:
            return None
        gid = self.run_as.gid
        share_with_group(spec.runtime_dir, gid, 0o710)
        for part in (spec.kernel, spec.initrd):
            if part.parent == spec.runtime_dir:
                share_with_group(part, gid, 0o640)
        return gid

    async def _abort_launch(self, vm: QemuVm | None, child: subprocess.Popen[bytes] | None, paths: RuntimePaths) -> str:
        """Undo a launch: kill QEMU, wait for it, close everything, scrub the runtime directory.

        Returns QEMU's exit status and the start of what it printed, read before the scrub.
        """
        if vm is not None:
            vm.kill()
            await vm.monitor.close()
            await vm.cancel_tasks()
            vm.close_console()
            try:
                await asyncio.wait_for(asyncio.shield(vm.process_exited), self.kill_timeout_s)
            except TimeoutError:
                log.error("vm %s: QEMU pid %d did not die after SIGKILL", vm.instance_id, vm.pid)
            vm.close_pidfd()
            vm.state = VmState.EXITED
        if child is not None:
            _CHILDREN.pop(child.pid, None)
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=self.kill_timeout_s)
        said = _read_head(paths.qemu_log)
        status = child.returncode if child is not None else None
        scrub_tree(paths.runtime_dir)
        return f"status {status}; {said or 'no message'}"

    async def _pin(self, vm: QemuVm, host_cpus: tuple[int, ...]) -> None:
        """Pin every QEMU thread to the instance's cores, then each vCPU thread to its own (C9)."""
        cpus = await self._execute(vm, "query-cpus-fast")
        if not isinstance(cpus, list) or len(cpus) != len(host_cpus):
            raise MonitorProtocolError(f"query-cpus-fast listed {bounded(cpus, 80)}, expected {len(host_cpus)} vCPUs")
        wanted: dict[int, set[int]] = {}
        for cpu in cpus:
            index, tid = (cpu.get("cpu-index"), cpu.get("thread-id")) if isinstance(cpu, dict) else (None, None)
            if not (isinstance(index, int) and isinstance(tid, int) and 0 <= index < len(host_cpus)):
                raise MonitorProtocolError(f"query-cpus-fast: malformed entry {bounded(cpu, 80)}")
            # The thread id comes from QEMU: never let it name a thread of another process.
            if not (Path(f"/proc/{vm.pid}/task") / str(tid)).exists():
                raise MonitorProtocolError(f"query-cpus-fast: thread {tid} is not a thread of QEMU pid {vm.pid}")
            wanted.setdefault(tid, set()).add(host_cpus[index])  # single-threaded TCG: one thread, all CPUs
        everything = set(host_cpus)
        for task in os.listdir(f"/proc/{vm.pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(task), everything)
        for tid, mask in wanted.items():
            os.sched_setaffinity(tid, mask)

    # --- adopt -------------------------------------------------------------------------

    async def adopt(self, record: VmRecord) -> QemuVm:
        """Take over a VM a previous agent started; returns a RUNNING handle.

        GONE if the journaled (pid, start ticks) is not a live process; MONITOR_FAILED if QEMU does
        not reconnect in time. A failed adopt leaves QEMU as it was (running) and its files in place.
        """
        if record.monitor is None:
            raise _fail(BackendFailure.MONITOR_FAILED, "the record names no monitor socket")
        paths = RuntimePaths.for_dir(record.runtime_dir)
        if record.monitor != paths.monitor:
            paths = RuntimePaths(record.runtime_dir, record.monitor, paths.console, paths.console_log, paths.qemu_log)
        try:
            pidfd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            raise _fail(BackendFailure.GONE, f"QEMU pid {record.pid} is not running") from None
        # The pidfd now names one process for good; the start time says whether it is ours.
        if process.start_ticks(record.pid) != record.pid_start_ticks:
            os.close(pidfd)
            raise _fail(BackendFailure.GONE, f"pid {record.pid} is no longer the QEMU process that was journaled")
        vm = QemuVm(record.instance_id, record.pid, record.pid_start_ticks, paths, pidfd)
        listener: PeerListener | None = None
        try:
            group = self._group_of(vm)
            listener = PeerListener(paths.monitor, group)
            sock = await vm.race_exit(listener.accept(vm.pid, self.adopt_timeout_s), self.adopt_timeout_s,
                                      "monitor reconnection")  # fmt: skip
            listener.close(unlink=True)
            listener = None
            timeout = self.command_timeout_s
            await vm.race_exit(vm.monitor.start(sock, timeout), timeout, "QMP negotiation", grace=1.0)
            vm.monitor.tap(("SHUTDOWN", "DEVICE_DELETED"), vm.on_event)
            status = await self._execute(vm, "query-status")
            plugged = await self._plugged(vm)
            vm.nodes = await self._our_nodes(vm)
            vm.devices = dict.fromkeys(d for d in record.devices if d in plugged)
            vm.devices.update(dict.fromkeys(plugged))
            if set(vm.devices) != set(record.devices):
                log.warning("vm %s: journal lists devices %s, QEMU has %s", record.instance_id,
                            sorted(record.devices), sorted(vm.devices))  # fmt: skip
            vm.start_console(PeerListener(paths.console, group), self.console_cap)
        except BaseException as exc:
            # Adopt failed: leave QEMU exactly as it was (running, or gone), drop only our side.
            if listener is not None:
                listener.close(unlink=True)
            await vm.monitor.close()
            await vm.cancel_tasks()
            vm.close_console()
            vm.close_pidfd()
            vm.state = VmState.DETACHED
            if isinstance(exc, _ProcessExited):
                raise _fail(BackendFailure.GONE, f"QEMU pid {record.pid} exited during adopt") from exc
            if isinstance(exc, MonitorTimeout):
                raise _fail(BackendFailure.MONITOR_FAILED, f"adopt: QEMU did not reconnect: {exc}") from exc
            if isinstance(exc, MonitorError | OSError):
                raise _fail(BackendFailure.MONITOR_FAILED, f"adopt: {exc}") from exc
            raise
        vm.state = VmState.RUNNING
        self._vms.add(vm)
        vm.spawn(self._watch_exit(vm), "exit")
        log.info("vm %s: adopted QEMU pid %d (%s)", record.instance_id, vm.pid,
                 bounded(status.get("status") if isinstance(status, dict) else status, 32))  # fmt: skip
        return vm

    def _group_of(self, vm: QemuVm) -> int | None:
        """The group an adopted QEMU's sockets are shared with: the one it really runs with.

        The process, not the configuration, decides: an agent restarted with another ``[qemu] user``
        (or none) must still let its running VMs reconnect (C10). A difference is logged, since such
        a VM keeps its old identity until it is restarted (C15, C16).
        """
        uid, gid = process_ids(vm.pid)
        configured = (self.run_as.uid, self.run_as.gid) if self.run_as else None
        if configured is not None and (uid, gid) != configured:
            log.warning("vm %s: QEMU pid %d runs as uid %d gid %d, not as the configured %s, until it is restarted",
                        vm.instance_id, vm.pid, uid, gid, self.run_as)  # fmt: skip
        return None if uid == 0 or (uid, gid) == (os.geteuid(), os.getegid()) else gid

    async def _plugged(self, vm: QemuVm) -> dict[str, str | None]:
        """Managed devices in QEMU's device tree, with the root port each sits on (None if elsewhere)."""
        children = await self._execute(vm, "qom-list", {"path": "/machine/peripheral"})
        if not isinstance(children, list):
            raise MonitorProtocolError("qom-list did not return a list")
        found: dict[str, str | None] = {}
        for child in children:
            name = child.get("name") if isinstance(child, dict) else None
            if not isinstance(name, str) or not is_managed_device(name):
                continue
            bus = await self._execute(vm, "qom-get", {"path": f"/machine/peripheral/{name}", "property": "parent_bus"})
            match = _PARENT_BUS.fullmatch(bus) if isinstance(bus, str) else None
            found[name] = match.group(1) if match else None
        return found

    async def _our_nodes(self, vm: QemuVm) -> set[str]:
        nodes = await self._execute(vm, "query-named-block-nodes", {"flat": True})
        if not isinstance(nodes, list):
            raise MonitorProtocolError("query-named-block-nodes did not return a list")
        names = {n.get("node-name") for n in nodes if isinstance(n, dict)}
        return {n for n in names if isinstance(n, str) and n.startswith(VOLUME_NODE_PREFIX)}

    # --- exit --------------------------------------------------------------------------

    async def _watch_exit(self, vm: QemuVm) -> None:
        await asyncio.shield(vm.process_exited)
        status = vm.reap()
        try:
            # QEMU's last words (the SHUTDOWN event) may still sit in the monitor socket: read to EOF.
            await vm.monitor.wait_closed(2.0)
            await vm.monitor.close()
            await vm.cancel_tasks()
            vm.close_console()
            vm.close_pidfd()
            scrub_tree(vm.paths.runtime_dir)
        except Exception:  # the VM has ended whatever happens here: never leave wait_exit hanging
            log.exception("vm %s: cleaning up after QEMU pid %d failed", vm.instance_id, vm.pid)
        vm.state = VmState.EXITED
        self._vms.discard(vm)
        shutdown = vm.shutdown or {}
        guest_poweroff = shutdown.get("guest") is True and shutdown.get("reason") == "guest-shutdown"
        info = ExitInfo(vm.instance_id, requested=vm.stop_requested, guest_poweroff=guest_poweroff)
        log.info("vm %s: QEMU pid %d ended (status %s, shutdown %s)", vm.instance_id, vm.pid, status,
                 bounded(dict(shutdown), 120))  # fmt: skip
        if not vm.ended.done():
            vm.ended.set_result(info)

    async def wait_exit(self, handle: QemuVm) -> ExitInfo:
        """Any state; completes once the VM has ended and its runtime directory is scrubbed.

        On a handle whose monitors were detached, raises MONITOR_FAILED instead: adopt the VM again
        to follow it.
        """
        vm = self._vm(handle)
        return await asyncio.shield(vm.ended)

    # --- stop --------------------------------------------------------------------------

    async def stop(self, handle: QemuVm, mode: StopMode, timeout_s: float) -> None:
        """RUNNING (EXITED: nothing to do). GRACEFUL: ACPI power-down, up to ``timeout_s`` for the guest;
        then (and at once with FORCE) QMP ``quit``; SIGKILL as the last resort. Returns once ended."""
        vm = self._vm(handle)
        if vm.state is VmState.EXITED:
            return
        if vm.state is not VmState.RUNNING:
            raise _fail(BackendFailure.MONITOR_FAILED, f"vm {vm.instance_id} is {vm.state.value}; adopt it first")
        vm.stop_requested = True
        if mode is StopMode.GRACEFUL:
            try:
                await self._execute(vm, "system_powerdown")
            except MonitorError as exc:
                log.warning("vm %s: system_powerdown failed (%s); quitting", vm.instance_id, exc)
            else:
                if await vm.wait_ended(timeout_s):
                    return
                log.info("vm %s: guest did not power off within %s s; quitting", vm.instance_id, timeout_s)
        try:
            await self._execute(vm, "quit")
        except MonitorError as exc:  # QEMU may close the monitor before its answer: that is success
            log.info("vm %s: quit: %s", vm.instance_id, exc)
        if await vm.wait_ended(self.quit_timeout_s):
            return
        log.warning("vm %s: QEMU did not quit within %s s; SIGKILL", vm.instance_id, self.quit_timeout_s)
        vm.kill()
        if not await vm.wait_ended(self.kill_timeout_s):
            raise _fail(BackendFailure.TIMEOUT, f"QEMU pid {vm.pid} still running after SIGKILL")

    # --- volumes -----------------------------------------------------------------------

    async def attach_volume(self, handle: QemuVm, volume: VolumeSpec) -> None:
        """RUNNING. blockdev-add (raw over a passed file descriptor, or over NBD on a passed socket) +
        device_add virtio-blk-pci on a free root port; all or nothing (DEVICE_REJECTED, TIMEOUT, ...)."""
        vm = self._running(handle)
        device, node = volume_device_id(volume.volume_id), volume_node_name(volume.volume_id)
        if (volume.path is None) == (volume.socket_fd is None):
            raise _fail(BackendFailure.DEVICE_REJECTED, "a volume needs exactly one of a file path and a socket")
        file_fd = -1
        if volume.path is not None:
            file_fd = _open_volume_file(volume.path, volume.read_only, volume.volume_id)
        else:
            assert volume.socket_fd is not None
            try:
                is_sock = stat.S_ISSOCK(os.fstat(volume.socket_fd).st_mode)
            except OSError:
                is_sock = False
            if not is_sock:
                raise _fail(BackendFailure.DEVICE_REJECTED, "the volume descriptor is not a socket")
        try:
            async with vm.lock:
                self._check_absent(vm, device)
                port = await self._free_port(vm)
                if node in vm.nodes:  # left behind by an unplug that completed without us
                    await self._execute(vm, "blockdev-del", {"node-name": node})
                    vm.nodes.discard(node)
                fdset: int | None = None
                if file_fd >= 0:
                    # QEMU gets the open file, never the path: the volume needs no permission for
                    # QEMU's user (C15), and QEMU cannot be pointed at another file.
                    adding = vm.monitor.add_fd(file_fd, device, timeout=self.command_timeout_s)
                    fdset = await self._call(vm, adding, refused=BackendFailure.DEVICE_REJECTED, what=device)
                    file: dict[str, object] = {"driver": "file", "filename": f"/dev/fdset/{fdset}"}
                else:
                    assert volume.socket_fd is not None
                    fdname = nbd_fd_name(volume.volume_id)
                    passing = vm.monitor.pass_fd(volume.socket_fd, fdname, timeout=self.command_timeout_s)
                    await self._call(vm, passing, refused=BackendFailure.DEVICE_REJECTED, what=device)
                    # QMP SocketAddress type "fd": the name of a descriptor passed with getfd.
                    file = {"driver": "nbd", "server": {"type": "fd", "str": fdname}}
                blockdev = {"driver": "raw", "node-name": node, "read-only": volume.read_only, "file": file}
                try:
                    await self._execute(vm, "blockdev-add", blockdev, refused=BackendFailure.DEVICE_REJECTED,
                                        what=device)  # fmt: skip
                except BackendError:
                    if volume.socket_fd is not None:  # the named descriptor was not consumed: close it
                        with contextlib.suppress(MonitorError):
                            await self._execute(vm, "closefd", {"fdname": nbd_fd_name(volume.volume_id)})
                    raise
                finally:
                    if fdset is not None:
                        await self._remove_fdset(vm, fdset)
                vm.nodes.add(node)
                # virtio-blk serial: at most 20 bytes; lets the guest tell volumes apart (/sys/block/*/serial).
                serial = volume.volume_id.hex[:20]
                blk = {"driver": "virtio-blk-pci", "id": device, "drive": node, "bus": port, "serial": serial}
                await self._plug(vm, device, blk, rollback_node=node)
        finally:
            if file_fd >= 0:
                os.close(file_fd)

    async def _remove_fdset(self, vm: QemuVm, fdset: int) -> None:
        """Drop QEMU's fdset copy of a volume file once blockdev-add has opened it (or failed to).

        The block node keeps its own duplicate, closed by blockdev-del; QEMU then frees the empty set.
        A failure here leaves one descriptor in QEMU until the VM ends, which is logged, not fatal.
        """
        try:
            await self._execute(vm, "remove-fd", {"fdset-id": fdset})
        except BackendError as exc:
            log.warning("vm %s: remove-fd %d failed: %s", vm.instance_id, fdset, exc)

    async def detach_volume(self, handle: QemuVm, volume_id: uuid.UUID) -> None:
        """RUNNING. device_del, wait for DEVICE_DELETED, blockdev-del (TIMEOUT: see the module docstring)."""
        vm = self._running(handle)
        device, node = volume_device_id(volume_id), volume_node_name(volume_id)
        await self._unplug(vm, device)
        async with vm.lock:
            if node in vm.nodes:
                await self._execute(vm, "blockdev-del", {"node-name": node})
                vm.nodes.discard(node)

    # --- VFs ---------------------------------------------------------------------------

    async def attach_vf(self, handle: QemuVm, vf: PciAddress) -> None:
        """RUNNING. device_add vfio-pci (the VF is already bound to vfio-pci); refused: DEVICE_REJECTED."""
        vm = self._running(handle)
        try:
            check_pci_address(vf)
        except ValueError as exc:
            raise _fail(BackendFailure.DEVICE_REJECTED, str(exc)) from exc
        device = vf_device_id(vf)
        async with vm.lock:
            self._check_absent(vm, device)
            port = await self._free_port(vm)
            await self._plug(vm, device, {"driver": "vfio-pci", "host": str(vf), "id": device, "bus": port})

    async def detach_vf(self, handle: QemuVm, vf: PciAddress) -> None:
        """RUNNING. device_del and wait for DEVICE_DELETED."""
        vm = self._running(handle)
        await self._unplug(vm, vf_device_id(vf))

    # --- device plumbing ---------------------------------------------------------------

    @staticmethod
    def _check_absent(vm: QemuVm, device: str) -> None:
        if device in vm.devices:
            raise _fail(BackendFailure.DEVICE_REJECTED, f"duplicate device id {device}")

    async def _free_port(self, vm: QemuVm) -> str:
        used = {port for port in (await self._plugged(vm)).values() if port is not None}
        for port in root_port_ids(self.options.hotplug_ports):
            if port not in used:
                return port
        raise _fail(BackendFailure.DEVICE_REJECTED, f"all {self.options.hotplug_ports} hot-plug ports are in use")

    async def _plug(
        self, vm: QemuVm, device: str, arguments: Mapping[str, object], rollback_node: str | None = None
    ) -> None:
        """device_add, all or nothing: on any failure the device is absent and ``rollback_node`` deleted."""
        try:
            await self._execute(vm, "device_add", arguments, refused=BackendFailure.DEVICE_REJECTED, what=device)
        except BackendError as exc:
            # A timeout or a lost answer leaves QEMU's state unknown: look before rolling back.
            if exc.failure is not BackendFailure.DEVICE_REJECTED:
                try:
                    if device in await self._plugged(vm):
                        vm.devices[device] = None
                        return
                except BackendError:
                    raise exc from None
            if rollback_node is not None:
                try:
                    await self._execute(vm, "blockdev-del", {"node-name": rollback_node})
                    vm.nodes.discard(rollback_node)
                except BackendError as rollback:
                    log.error("vm %s: rollback blockdev-del %s failed: %s", vm.instance_id, rollback_node, rollback)
            raise
        vm.devices[device] = None

    async def _unplug(self, vm: QemuVm, device: str) -> None:
        """device_del and wait for the guest to let go (DEVICE_DELETED), without holding the lock."""
        if device not in vm.devices:
            raise _fail(BackendFailure.DEVICE_REJECTED, f"no device {device}")
        waiter = vm.unplug_waiter(device)
        try:
            async with vm.lock:
                pending = device in vm.unplug_requested
                vm.unplug_requested.add(device)  # before the request: the event may beat the answer
                try:
                    await self._execute(vm, "device_del", {"id": device}, refused=BackendFailure.DEVICE_REJECTED)
                except BackendError as exc:
                    cause = exc.__cause__
                    if isinstance(cause, CommandFailed) and cause.error_class == "DeviceNotFound":
                        vm.devices.pop(device, None)  # already gone: nothing to wait for
                        vm.unplug_requested.discard(device)
                        return
                    # QEMU refuses to repeat an unplug request still pending; wait for that one instead.
                    if not (isinstance(cause, CommandFailed) and pending):
                        if not pending:
                            vm.unplug_requested.discard(device)
                        raise
            try:
                await asyncio.wait_for(waiter.wait(), self.unplug_timeout_s)
            except TimeoutError:
                raise _fail(
                    BackendFailure.TIMEOUT,
                    f"the guest did not release {device} within {self.unplug_timeout_s} s; it stays plugged "
                    "and the unplug stays requested",
                ) from None
        finally:
            vm.drop_unplug_waiter(device)

    # --- live update -------------------------------------------------------------------

    async def detach_monitors(self) -> None:
        """Every RUNNING VM -> DETACHED: connections closed, listeners gone, QEMU untouched (C10)."""
        for vm in list(self._vms):
            vm.state = VmState.DETACHED
            vm.close_pidfd()
            await vm.cancel_tasks()
            await vm.monitor.close()
            vm.close_console()
            if not vm.ended.done():
                vm.ended.set_exception(
                    _fail(BackendFailure.MONITOR_FAILED, "monitor detached (live update); adopt the VM to follow it")
                )
            self._vms.discard(vm)

    # --- helpers -----------------------------------------------------------------------

    def _vm(self, handle: QemuVm) -> QemuVm:
        if not isinstance(handle, QemuVm):  # the service passes handles back untyped at run time
            raise TypeError(f"not a QEMU handle: {type(handle).__name__}")
        return handle

    def _running(self, handle: QemuVm) -> QemuVm:
        vm = self._vm(handle)
        if vm.state is VmState.EXITED or vm.process_exited.done():
            raise _fail(BackendFailure.GONE, f"instance {vm.instance_id} is not running")
        if vm.state is not VmState.RUNNING:
            raise _fail(BackendFailure.MONITOR_FAILED, f"instance {vm.instance_id} is {vm.state.value}")
        return vm

    async def _execute(
        self, vm: QemuVm, command: str, arguments: Mapping[str, object] | None = None, *,
        refused: BackendFailure = BackendFailure.MONITOR_FAILED, what: str = "",
    ) -> Any:  # fmt: skip
        """One QMP command, its failures mapped to BackendError (see :meth:`_call`)."""
        return await self._call(
            vm, vm.monitor.execute(command, arguments, timeout=self.command_timeout_s), refused=refused, what=what
        )

    async def _call(
        self, vm: QemuVm, aw: Awaitable[T], *, refused: BackendFailure = BackendFailure.MONITOR_FAILED, what: str = ""
    ) -> T:
        """Await a monitor operation and map its MonitorError to a BackendError, keeping it as the cause.

        QEMU refusing a command is ``refused`` (DEVICE_REJECTED on device paths, with QEMU's error
        class and description); a lost monitor is GONE if the process ended, MONITOR_FAILED if not.
        """
        prefix = f"{what}: " if what else ""
        try:
            return await aw
        except CommandFailed as exc:
            raise _fail(refused, f"{prefix}{exc}") from exc
        except MonitorTimeout as exc:
            raise _fail(BackendFailure.TIMEOUT, f"{prefix}{exc}") from exc
        except MonitorClosed as exc:
            gone = vm.process_exited.done() or not process.is_same_process(vm.pid, vm.ticks)
            raise _fail(BackendFailure.GONE if gone else BackendFailure.MONITOR_FAILED, f"{prefix}{exc}") from exc
        except MonitorError as exc:  # a protocol failure
            raise _fail(BackendFailure.MONITOR_FAILED, f"{prefix}{exc}") from exc


if TYPE_CHECKING:  # mypy proves that QemuBackend honours the contract
    _conforms: VmBackend[QemuVm] = QemuBackend()
