"""Provision and start a development host agent in one directory.

Used by the end-to-end tests now and by ``pvctl dev up`` later.  ``prepare``
writes the channel secret, a fresh image-signing key pair, one signed image
(the tiny guest for the qemu backend, placeholder blobs for sim), the
directories and an agent.toml.  ``start`` launches ``passivisor-agent`` in the
background and waits for its ready line.  Nothing here weakens the agent: it
runs with the same configuration checks, seccomp filter and key handling as in
production.  With the qemu backend, QEMU runs as the system user
``passivisor-qemu`` (claim C15) when that user exists (``make deps`` creates it
as root) and the agent runs as root; otherwise it runs as the agent, and the
agent's log says that C15 is weakened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hostagent.channel import load_secret, write_secret
from hostagent.images import generate_signing_key, load_private_key, publish

SIM_CMDLINE = "console=ttyS0 panic=-1 quiet"
READY_MARK = "passivisor-agent: ready on "
QEMU_USER = "passivisor-qemu"  # the Makefile's QEMU_USER


@dataclass(frozen=True)
class AgentHost:
    directory: Path
    config: Path
    socket: Path
    secret_file: Path
    signing_key: Path
    volume_dir: Path
    runtime_dir: Path
    state_dir: Path
    image_digest: bytes
    image_signature: bytes
    log: Path

    def secret(self) -> bytes:
        return load_secret(self.secret_file)


def prepare(directory: Path, *, backend: str = "sim", sysfs_root: Path = Path("/sys"),
            reserved_cpus: tuple[int, ...] = (), memory_budget_mib: int = 4096, accel: str = "tcg",
            seccomp: bool = True, idle_timeout_s: float = 300.0, frame_timeout_s: float = 2.0,
            handshake_timeout_s: float = 2.0, qemu_user: str | None = QEMU_USER, guest_mode: str = "marker",
            bench_mib: int | None = None) -> AgentHost:
    """``qemu_user``: the ``[qemu] user`` to configure, if that user exists and the agent will be root.

    ``guest_mode`` and ``bench_mib`` (qemu backend) choose the development guest's image
    (``controller.devhost.guest.GuestMode``: "marker", the default, or "bench").
    """
    directory = directory.absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys, images = directory / "keys", directory / "images"
    state, volumes = directory / "state", directory / "volumes"
    # Instances' Unix sockets live below the runtime directory, and socket
    # paths are limited to 107 bytes: keep it short whatever DIR is.
    run = Path(tempfile.gettempdir()) / f"pv-{hashlib.sha256(bytes(directory)).hexdigest()[:12]}"
    for path in (keys, images, state, run, volumes):
        path.mkdir(mode=0o700, exist_ok=True)
    secret_file = keys / "channel.key"
    if not secret_file.exists():
        write_secret(secret_file, secrets.token_bytes(32))
    private, public = keys / "image-signing.key", keys / "image-signing.pub"
    if not private.exists():
        generate_signing_key(private, public)
    if backend == "qemu":
        from .guest import GuestMode, build_guest

        guest = build_guest(mode=GuestMode(guest_mode), bench_mib=bench_mib)
        image = publish(images, guest.kernel, guest.initramfs, guest.cmdline, load_private_key(private))
    else:
        image = publish(images, b"sim kernel\n", b"sim initrd\n", SIM_CMDLINE, load_private_key(private))
    config = directory / "agent.toml"
    cpus = ", ".join(str(cpu) for cpu in reserved_cpus)
    user_line = f'user = "{qemu_user}"\n' if backend == "qemu" and _usable_qemu_user(qemu_user) else ""
    config.write_text(f"""\
[agent]
socket = "{directory / 'agent.sock'}"
state_dir = "{state}"
runtime_dir = "{run}"
volume_dir = "{volumes}"
channel_secret_file = "{secret_file}"
controller_uid = {os.getuid()}
backend = "{backend}"
log_level = "info"

[limits]
handshake_timeout_s = {handshake_timeout_s}
idle_timeout_s = {idle_timeout_s}
frame_timeout_s = {frame_timeout_s}

[host]
sysfs_root = "{sysfs_root}"
reserved_cpus = [{cpus}]
memory_budget_mib = {memory_budget_mib}

[images]
store = "{images}"
signing_public_key = "{public}"

[qemu]
accel = "{accel}"
{user_line}
[sandbox]
seccomp = {'true' if seccomp else 'false'}
""")
    return AgentHost(directory, config, directory / "agent.sock", secret_file, private, volumes, run, state,
                     image.digest, image.signature, directory / "agent.log")


def _usable_qemu_user(name: str | None) -> bool:
    """Whether the agent, started by this process, can run QEMU as ``name``: it exists, and we are root."""
    if name is None or os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def start(host: AgentHost, *, timeout: float = 30.0, wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start the agent in its own session, logging to ``host.log``; return once it listens.

    ``wrapper`` runs the agent under another program (e.g. ``strace -f -o FILE``).
    """
    offset = host.log.stat().st_size if host.log.exists() else 0
    with open(host.log, "ab") as log:
        child = subprocess.Popen(  # noqa: S603 - fixed argv
            [*wrapper, sys.executable, "-m", "hostagent.main", "--config", str(host.config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = host.log.read_bytes()[offset:].decode(errors="replace")
        if READY_MARK in text:
            return child
        if child.poll() is not None:
            raise RuntimeError(f"passivisor-agent exited with {child.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    stop(child)
    raise RuntimeError("passivisor-agent did not become ready in time")


def stop(child: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int:
    """SIGTERM (the agent detaches from running VMs and exits), then SIGKILL if it hangs.

    The signal goes to the agent's process group (``start`` gives it its own
    session), so a wrapper such as strace and the agent under it both get it.
    VMs are not in that group: they keep running, as on a live update.
    """
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return child.returncode


def kill_vms(host: AgentHost) -> int:
    """SIGKILL every VM process of ``host`` (its argv names the runtime directory); returns how many.

    For test teardown: stopping the agent deliberately leaves VMs running (live update).
    """
    from hostagent import process

    killed = 0
    for pid in process.find_by_argument(str(host.runtime_dir).encode()):
        ticks = process.start_ticks(pid)
        if ticks is not None and process.kill(pid, ticks, signal.SIGKILL):
            killed += 1
    return killed


def remove_runtime_dir(runtime_dir: Path) -> bool:
    """Remove an agent's runtime directory (``AgentHost.runtime_dir``) unless a VM process still uses it.

    ``prepare`` makes it below the temp dir, outside ``AgentHost.directory``, to
    keep socket paths short, so removing that directory alone leaves it behind.
    Returns whether it is gone.  Call it after the agent has stopped
    (``pvctl dev down``, test teardown).
    """
    from hostagent import process

    if process.find_by_argument(str(runtime_dir).encode()):
        return False
    shutil.rmtree(runtime_dir, ignore_errors=True)
    return not runtime_dir.exists()


def discard(host: AgentHost) -> int:
    """Test and benchmark teardown, after the agent stopped: kill ``host``'s VMs, remove its runtime directory.

    Returns how many VM processes were still running (``kill_vms``).
    """
    from hostagent import process

    killed = kill_vms(host)
    deadline = time.monotonic() + 5.0  # SIGKILLed VMs vanish once their new parent has reaped them
    while process.find_by_argument(str(host.runtime_dir).encode()) and time.monotonic() < deadline:
        time.sleep(0.02)
    remove_runtime_dir(host.runtime_dir)
    return killed

