"""Facts about VMM processes, for backends: identity across restarts and exit.

A pid alone does not identify a process across an agent restart, because
pids are reused. The pair (pid, start time in clock ticks since boot, field
22 of /proc/PID/stat) does. Exit is observed through a pidfd, which works
for children and for processes a previous agent started (adopted after a
live update, claim C10) alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

_PROC = Path("/proc")


def start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces or
    # parentheses itself; the fields after the last ')' are plain numbers.
    fields = stat[stat.rfind(b")") + 2:].split()
    state, ticks = fields[0], fields[19]
    if state in (b"Z", b"X"):
        return None  # a zombie has exited; it only waits to be reaped
    return int(ticks)


def is_same_process(pid: int, ticks: int) -> bool:
    return start_ticks(pid) == ticks


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child; a no-op for adopted processes."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def wait_exit(pid: int) -> None:
    """Return once ``pid`` has exited (it may already have)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        reap(pid)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        reap(pid)


def kill(pid: int, ticks: int, signum: int) -> bool:
    """Signal the process if it is still the one we started; True if the signal was sent.

    The pidfd is opened first and the start time checked after: once the
    pidfd exists it names that one process, so a pid reused in between can
    never receive the signal.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not is_same_process(pid, ticks):
            return False
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True


def find_by_argument(needle: bytes) -> list[int]:
    """Pids of processes with ``needle`` inside one of their command-line arguments.

    Used at recovery to find a VMM process that was spawned but never
    journaled (the agent died in between): its argv names its runtime directory.
    """
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()[:65536].split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(needle in argument for argument in argv):
            found.append(int(entry.name))
    return found
