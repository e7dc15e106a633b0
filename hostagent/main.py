"""passivisor-agent: start the passive host agent from agent.toml.

Start-up order matters for the passivity claims (C1, C6, C15): everything
that needs privileges or files outside the state directories happens first
(configuration, channel secret, image-signing key, CPU topology, SR-IOV
discovery, the journal, QEMU's user and its access to the runtime directory,
binding the listening socket); then the seccomp filter is installed; only
then does the agent adopt running VMs and accept its first connection.  From
that point on the process cannot create a socket of any family but AF_UNIX.

QEMU runs as the unprivileged ``[qemu] user`` (C15).  The name is resolved
here, before the filter, because the lookup goes through NSS, whose modules
may need sockets the filter forbids.  Without it QEMU runs as the agent's own
user, and the agent says so in a warning at every start.

SIGTERM and SIGINT stop the listener and detach from the VMs without stopping
them, so the agent can be restarted or upgraded under running guests (C10).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import journal as journal_mod
from .backend import VmBackend
from .channel import ChannelError, load_secret
from .config import AgentConfig, ConfigError
from .config import load as load_config
from .images import ImageStore, KeyFileError, load_public_key
from .inventory import allocator as alloc
from .inventory import cpu, sriov
from .server import AgentServer, Limits
from .service import AgentService

if TYPE_CHECKING:
    from .backends.qemu import RunAs

log = logging.getLogger("passivisor.agent")


class StartupError(Exception):
    """The agent cannot start; the message says what to fix."""


def _backend(config: AgentConfig) -> VmBackend[Any]:
    if config.backend == "sim":
        from .backends.sim import SimBackend

        return SimBackend()
    from .backends.qemu import QemuBackend

    backend = QemuBackend(qemu_binary=config.qemu_binary, accel=config.qemu_accel, run_as=_qemu_user(config))
    try:
        backend.prepare_runtime_root(config.runtime_dir)
    except OSError as exc:
        raise StartupError(f"[agent] runtime_dir: {exc}") from None
    return backend


def _qemu_user(config: AgentConfig) -> RunAs | None:
    """The identity QEMU runs as: ``[qemu] user`` resolved, or None (the agent's own, with a warning)."""
    from .backends.qemu import RunAs

    if config.qemu_user is None:
        log.warning("[qemu] user is not set: QEMU runs as the agent's uid %d; claim C15 (unprivileged "
                    "VMM) is weakened", os.geteuid())
        return None
    try:
        run_as = RunAs.lookup(config.qemu_user)
    except KeyError:
        raise StartupError(f"[qemu] user {config.qemu_user!r} does not exist; create it with `useradd --system "
                           f"--no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
                           f"{config.qemu_user}` (`make deps` does, as root)") from None
    except ValueError as exc:
        raise StartupError(f"[qemu] user {config.qemu_user!r}: {exc}") from None
    if os.geteuid() != 0:
        raise StartupError(f"[qemu] user {config.qemu_user!r}: starting QEMU as another user needs an agent "
                           "running as root")
    log.info("QEMU runs as %s", run_as)
    if config.qemu_accel != "tcg":
        _check_kvm_access(run_as, config.qemu_accel)
    return run_as


def _check_kvm_access(run_as: RunAs, accel: str, kvm: Path = Path("/dev/kvm")) -> None:
    """Warn when QEMU's user cannot open /dev/kvm: a slow guest (auto) or a failed launch (kvm) follows."""
    try:
        info = kvm.stat()
    except OSError:
        return  # no KVM on this host: nothing a user or group could change
    if not run_as.may(info, 6):
        outcome = "guests fall back to TCG" if accel == "auto" else "launches will fail"
        log.warning("QEMU's user %s cannot open %s (mode %04o, owner %d:%d): %s; add the user to its group",
                    run_as, kvm, info.st_mode & 0o7777, info.st_uid, info.st_gid, outcome)


_STATE_LOCK: list[int] = []  # the lock lives as long as the process


def _lock_state_dir(state_dir: Path) -> None:
    """One agent per state directory: a second one would adopt the same VMs and steal the socket."""
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another agent is running on {state_dir}") from None
    _STATE_LOCK.append(fd)


def build(config: AgentConfig) -> tuple[AgentService, AgentServer]:
    """Everything that reads configuration, keys, sysfs and the journal (before the sandbox)."""
    for directory in (config.state_dir, config.runtime_dir, config.volume_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _lock_state_dir(config.state_dir)
    try:
        secret = load_secret(config.channel_secret_file)
        public_key = load_public_key(config.image_signing_public_key)
        topology = cpu.read_topology(config.sysfs_root / "devices" / "system" / "cpu")
        allocator = alloc.CoreAllocator(topology, memory_budget_mib=config.memory_budget_mib,
                                        reserved_cpus=config.reserved_cpus)
        sysfs = sriov.HostSysfs(config.sysfs_root)
        wanted = [sriov.parse_bdf(text) for text in config.sriov_pfs] or None
        pool = sriov.VfPool(sriov.discover_pfs(sysfs, wanted))
        state = journal_mod.Journal(config.state_dir).load()
    except (ChannelError, KeyFileError, cpu.TopologyError, alloc.AllocatorError, sriov.SriovError,
            journal_mod.JournalError) as exc:
        raise StartupError(str(exc)) from None
    service = AgentService(
        state=state, journal=journal_mod.Journal(config.state_dir), backend=_backend(config), allocator=allocator,
        # reprobe: a VF whose assignment is rolled back or released goes back to
        # its host driver, so a refused assignment leaves sysfs as it found it.
        vf_pool=pool, vf_binder=sriov.SysfsVfBinder(sysfs, reprobe=True),
        images=ImageStore(config.image_store, public_key),
        volume_dir=config.volume_dir, runtime_root=config.runtime_dir)
    limits = Limits(config.handshake_timeout_s, config.idle_timeout_s, config.frame_timeout_s)
    server = AgentServer(service, socket_path=config.socket, secret=secret, controller_uid=config.controller_uid,
                         limits=limits)
    return service, server


# Network client and server libraries the agent must never load (claim C1).  asyncio
# itself imports ``ssl`` and pathlib imports ``urllib.parse``; neither opens a
# connection, and the seccomp filter makes IP sockets impossible anyway.
NETWORK_MODULES = ("grpc", "http.client", "http.server", "urllib.request", "requests", "httpx", "aiohttp",
                   "urllib3", "socketserver", "xmlrpc.client", "ftplib", "smtplib", "poplib", "imaplib",
                   "telnetlib", "nntplib")


def verify_passivity() -> None:
    """Prove the filter is in force: an attempt to create an IP socket must fail (claims C1, C15)."""
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "unknown error")
        log.info("seccomp filter installed and verified: socket(AF_INET) refused (%s)", name)
        return
    probe.close()
    raise StartupError("the seccomp filter did not stop socket(AF_INET); refusing to run")


def log_modules() -> None:
    """SIGUSR1: log the loaded top-level modules, so an audit can check no network client is loaded."""
    names = sorted(sys.modules)
    network = [name for name in names if any(name == n or name.startswith(n + ".") for n in NETWORK_MODULES)]
    log.info("loaded modules (%d): %s; network modules: %s", len(names), " ".join(names),
             " ".join(network) or "none")


async def run(config: AgentConfig) -> None:
    service, server = build(config)
    server.bind()
    if config.seccomp:
        from . import sandbox

        sandbox.install()
        verify_passivity()
    else:
        log.warning("seccomp is disabled in the configuration")
    report = await service.recover()
    log.info("recovered: %d adopted, %d ended, %d mismatches",
             len(report.adopted), len(report.ended), len(report.mismatches))
    for mismatch in report.mismatches:
        log.warning("reconcile mismatch: %s", mismatch)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.stop)
    loop.add_signal_handler(signal.SIGUSR1, log_modules)
    log.info("listening on %s (backend %s)", config.socket, config.backend)
    print(f"passivisor-agent: ready on {config.socket}", file=sys.stderr, flush=True)
    try:
        await server.serve()
    finally:
        await service.detach()
        log.info("stopped; running instances were left running")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="passivisor-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="path to agent.toml")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"passivisor-agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(config))
    except StartupError as exc:
        print(f"passivisor-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
