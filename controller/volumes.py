"""The encrypted-volume data path: nbdkit serves a LUKS volume, decrypted, on one end of a socketpair.

This is the controller-side half of DESIGN.md's "Attach encrypted volume" flow (claims C7, C8, C12).  The
control plane sends a volume's data key wrapped to the host key; the caller unwraps it into a ``bytearray``
and hands it to :meth:`EncryptedVolumes.serve`.  This module starts ``nbdkit -s --filter=luks file`` on one
end of a socketpair and returns the other end, which the caller passes to the agent (SCM_RIGHTS) and the
agent to QEMU (``getfd``, ``blockdev-add`` nbd with ``server.type=fd``).  The host side only ever sees
plaintext blocks of its own volume, never key material, and never opens a connection (claim C1).

Theory of operation
-------------------
Key convention.  A volume data key is 32 random bytes.  The LUKS passphrase of the volume is the key's
64-character lowercase hex encoding, no newline.  The volume is a LUKSv1 file as ``qemu-img create -f luks``
makes it, stored in the configured volume directory under the name ``str(volume_id)`` (the canonical UUID
string); it must be a regular file, never a symbolic link.

Lifecycle of an attachment, keyed by ``(instance id, volume id)``; a volume is attached at most once:

1. **Verify** (:meth:`~EncryptedVolumes.serve`).  The file is opened with ``O_NOFOLLOW`` through the
   volume directory and must be a regular file.  ``qemu-img info`` (no key) must see a LUKS volume whose
   cipher suite nbdkit can decrypt, then ``qemu-img map`` (a read of the first sector, which needs the
   master key) must unlock a key slot with the passphrase.  Refusals are typed (:class:`VolumeErrorReason`)
   and leave nothing behind: no process, no record.
2. **Serve**.  nbdkit starts with the passphrase on an inherited pipe (``passphrase=-FD``), the server end
   of the socketpair as stdin and stdout (``-s``: one client, newstyle), its own session (a Ctrl-C to the
   controller does not reach it) and a minimal environment.  ``serve`` waits until nbdkit has written the
   first 16 bytes of the NBD greeting, which it peeks at without consuming them (QEMU reads them later), so
   a nbdkit that cannot start is a SERVER_FAILED here rather than a broken blockdev-add later.  Then the
   attachment is recorded (memory and the state file) and the client end's descriptor is returned.
3. **Run**.  A daemon reaper thread per attachment waits on a pidfd (and drains nbdkit's stderr, keeping
   the first :data:`_STDERR_KEEP` bytes for the log).  When nbdkit exits on its own (QEMU closed the
   connection: the guest stopped or the volume was detached) the reaper wipes the key and forgets the
   record.
4. **Release** (:meth:`~EncryptedVolumes.release`, :meth:`~EncryptedVolumes.release_instance`).  The key
   is wiped at once.  Then nbdkit is ended: its end of the socketpair is shut down (the controller keeps a
   duplicate of it for exactly this), which nbdkit treats like a client hanging up; if it is still running
   (or the attachment was adopted, so there is no duplicate), SIGTERM, up to 5 s, then SIGKILL.  nbdkit
   1.32.5 ``-s`` ignores SIGTERM while it waits for its client, see :meth:`~EncryptedVolumes._terminate`.
   Signals go through :func:`hostagent.process.kill`, which opens a pidfd and checks the start time, so a
   recycled pid is never signalled.  The record is dropped once the process is gone.  Releasing an unknown
   attachment does nothing.

Where the key lives.  The caller's ``bytearray`` is kept (not copied) in memory for the life of the
attachment and wiped in place when it ends; ``serve`` takes ownership of it on success (on a refusal it
stays the caller's to wipe).  The hex passphrase is built by hand into a second ``bytearray`` (``.hex()``
would make an immutable copy), written into two pipes (``qemu-img``, then nbdkit) and wiped before ``serve``
returns.  It never appears in argv, the environment, the state file, a log line or an exception.  nbdkit
holds the passphrase and the master key in its own memory for as long as it runs, which is the point: it
is "the controller-side encryption process" of claim C8.

What survives a controller restart.  nbdkit does: it is in its own session, and a guest keeps its disk
when the controller restarts or crashes.  The state file ``STATE/volume-attachments.json`` (mode 0600,
replaced atomically: temporary file, fsync, rename, directory fsync) lists instance id, volume id, pid and
start time of each attachment, never key material.  A new :class:`EncryptedVolumes` adopts every recorded
nbdkit that is still the same process (pid and start time, :func:`hostagent.process.is_same_process`) and
drops the other records.  An adopted attachment has *no key in controller memory*: the copy died with the
previous controller process, and only nbdkit still holds it.  It can still be released, and its reaper
still notices its exit.  :meth:`~EncryptedVolumes.close` (a graceful stop) wipes the keys but leaves nbdkit
running for the next controller to adopt.  A nbdkit that was started but not yet recorded when the
controller died cannot outlive it: the client end of its socketpair had not left the controller, so nbdkit
sees end-of-file in the handshake and exits.  A corrupt state file stops the controller at start-up
(SERVER_FAILED naming the file) instead of being ignored, because ignoring it would orphan running nbdkits.

Why the key is checked before nbdkit starts.  nbdkit 1.32.5 (Debian 12) sends the NBD greeting and then,
at NBD_OPT_GO, fails to open the volume when the passphrase unlocks no key slot ("LUKS passphrase is not
correct") or when the cipher suite is one it does not implement (ESSIV, twofish, ...), and every such
failure ends in a SIGSEGV (an upstream bug).  A crashing process that holds the passphrase is exactly what
must not happen, so ``serve`` refuses both cases before nbdkit exists.

Why nbdkit, and what it costs.  Sequential I/O through this path runs at a fraction of a plain file's in the
guest (``python -m bench volume``; measured in docs/performance.md, "Encrypted volume I/O"): reads because
nbdkit 1.32's luks filter makes one 512-byte pread (and pwrite) per LUKS sector, writes because of the NBD
hop itself under TCG.  QEMU's own luks driver (``qemu-storage-daemon``, ``qemu-nbd``) is no faster here
(nettle's AES-XTS, one thread) and would give up properties this module relies on: it needs a listening
socket instead of ``-s`` on a socketpair, and it does not always end when its client goes away (the reaper
and the unknown-outcome handling of ``encrypted_attach.py`` depend on that).  Kernel dm-crypt would put the
key in the kernel and a plaintext device on the host.

Core dumps and ptrace.  :func:`disable_core_dumps`, called once by the controller's ``main``, sets
RLIMIT_CORE to 0 (soft and hard, so no child can raise it again) in the controller process; nbdkit and
qemu-img inherit it, so a crash writes no core file with the passphrase or master key in it.  (A
``preexec_fn`` would be the per-child alternative, but it is unsafe in the threaded gRPC server.)  It also
sets ``prctl(PR_SET_DUMPABLE, 0)`` on the controller: no core dump of the controller at all, and processes
of the same uid can no longer ptrace it or read its ``/proc/PID/mem``.  Limits: ``execve`` resets the
dumpable flag, so nbdkit is dumpable again; and when ``kernel.core_pattern`` pipes to a helper
(systemd-coredump, apport) the kernel does not enforce RLIMIT_CORE, it passes the limit to the helper,
and both of those helpers honour a limit of 0.

Honest limits of wiping memory in Python.  Wiping a ``bytearray`` overwrites that buffer only.  The
unwrap that produced the key may have left ``bytes`` copies (AES-GCM returns ``bytes``) that only the
garbage collector frees and nothing zeroes; freed pages are not zeroed by the allocator; controller memory
can be swapped out (nothing is ``mlock``-ed); the pipe pages that carried the passphrase return to the
kernel unzeroed; and nbdkit's and qemu-img's memory is outside our control.  Wiping narrows the window in
which a memory disclosure of the controller yields the key; it does not close it.

Trust assumption.  The volume directory is writable only by the controller's user.  The file is checked
and then named by path to qemu-img and nbdkit, so whoever can rename files in that directory between the
check and nbdkit's open could substitute another volume; such a writer could equally replace the volume
itself.

Invariants (proved by tests/controller/test_encrypted_volumes.py):
- a refused ``serve`` starts no nbdkit and records nothing;
- no file under the state directory, and neither the argv nor the environment of nbdkit, contains the key
  or its hex encoding;
- after ``release`` or nbdkit's own exit, the caller's key buffer is all zeros and the record is gone;
- the state file lists exactly the live attachments, and a restart adopts exactly the live ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import json
import logging
import os
import resource
import secrets
import select
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hostagent import process
from hostagent.durable import fsync_directory as _fsync_directory

from .envelope import wipe
from .identity import create_private_file
from .volumetool import passphrase_of

__all__ = [
    "KEY_SIZE",
    "STATE_FILE",
    "Attachment",
    "EncryptedVolumes",
    "VolumeErrorReason",
    "VolumeServerError",
    "disable_core_dumps",
]

log = logging.getLogger("passivisor.controller")

KEY_SIZE = 32
"""Size of a volume data key in bytes; the LUKS passphrase is its 64-character lowercase hex."""

STATE_FILE = "volume-attachments.json"
"""The attachment records in the state directory; never key material."""

_STATE_VERSION = 1
_STATE_MAX_BYTES = 1 << 20  # a record is ~150 bytes: a megabyte is thousands of attachments on one host
_STATE_RECORD_KEYS = frozenset({"instance_id", "volume_id", "pid", "start_ticks"})

_EOF_WAIT_S = 2.0  # nbdkit exits within milliseconds of end-of-file on its socket
_TERM_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long (the contract of release())
_KILL_WAIT_S = 5.0  # how long a SIGKILLed process may take to be gone before release() reports failure
_TOOL_TIMEOUT_S = 60.0  # PBKDF2 at qemu-img's default iter-time is ~2 s per active key slot, 8 slots at most
_GREETING_TIMEOUT_S = 10.0
_TOOL_OUTPUT_MAX = 64 * 1024  # qemu-img info is ~2 KiB for a LUKS volume; map prints one 512-byte extent
_DETAIL_MAX = 160  # an excerpt of a tool's message in an exception or a log line
_STDERR_KEEP = 4096  # nbdkit's first words on stderr, for the log; the rest is read and dropped

_NBD_GREETING = b"NBDMAGIC" + b"IHAVEOPT"  # newstyle server greeting (NBD protocol, "Newstyle negotiation")
_KEY_OBJECT = "volkey"  # qemu-img's name for the "--object secret" that reads the passphrase from a pipe

# What nbdkit 1.32.5's luks filter can decrypt (filters/luks/luks-encryption.c, parse_cipher_strings): AES,
# in XTS with a 128- or 256-bit key or in CBC with any AES key size (other pairs have no GnuTLS cipher), IVs
# "plain" or "plain64" (ESSIV is not implemented), and these hashes.  Names as qemu-img info reports them.
# Anything else makes that nbdkit fail at NBD_OPT_GO, which it turns into a SIGSEGV; see the module doc.
_NBDKIT_CIPHERS = frozenset({
    ("aes-128", "xts"), ("aes-256", "xts"),
    ("aes-128", "cbc"), ("aes-192", "cbc"), ("aes-256", "cbc"),
})
_NBDKIT_IVGENS = frozenset({"plain", "plain64"})
_NBDKIT_HASHES = frozenset({"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"})

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


class VolumeErrorReason(enum.Enum):
    KEY_REJECTED = "key_rejected"
    """The data key unlocks no key slot of the volume (or is not a 32-byte key).  One undifferentiated answer."""
    VOLUME_NOT_FOUND = "volume_not_found"
    VOLUME_UNUSABLE = "volume_unusable"
    """Not a regular file, a symbolic link, not LUKS, a cipher nbdkit cannot serve, or already attached."""
    SERVER_FAILED = "server_failed"
    """nbdkit or qemu-img could not run, the state file is corrupt or unwritable, or the server is closed."""


class VolumeServerError(Exception):
    """A refused or failed volume operation.  ``detail`` is short and never contains key material."""

    def __init__(self, reason: VolumeErrorReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Attachment:
    instance_id: uuid.UUID
    volume_id: uuid.UUID
    pid: int
    start_ticks: int


def disable_core_dumps() -> None:
    """Make the controller and every child it starts unable to leave a core file; see the module doc.

    RLIMIT_CORE (soft and hard) becomes 0, which children inherit and cannot raise, and the controller
    becomes non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``), which also keeps processes of the same uid from
    ptracing it or reading its memory.  Irreversible for this process; ``main`` calls it once at start-up.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(code)}")


def _printable(raw: bytes, limit: int = _DETAIL_MAX) -> str:
    """A bounded, printable-ASCII excerpt of a tool's message, safe for an exception or a log line."""
    text = "".join(chr(b) if 0x20 <= b < 0x7F else " " for b in raw[: 4 * limit])
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tool_message(stderr: bytes) -> str:
    # qemu-img says "qemu-img: Could not open 'SPEC': REASON"; the reason is what matters.
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else b""
    _, separator, reason = last.rpartition(b"': ")
    return _printable(reason if separator else last) or "no message"


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        view.release()


def _tool_environment() -> dict[str, str]:
    # Children get a minimal environment: nothing of the controller's leaks into them, and messages stay in
    # the C locale that _check_format/_check_key match on.
    return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}


@dataclass(eq=False)
class _Entry:
    """One attachment's process and key.  Mutable fields are guarded by ``EncryptedVolumes._lock``."""

    attachment: Attachment
    pidfd: int
    popen: subprocess.Popen[bytes] | None  # None for a nbdkit adopted from a previous controller
    stderr_fd: int | None
    server: socket.socket | None  # our duplicate of nbdkit's end, kept only to shut it down (None: adopted)
    key: bytearray | None = None  # None once wiped, and for adopted attachments (see the module doc)
    gone: bool = False  # the process has exited (set under the lock by the reaper)
    releasing: bool = False
    exited: threading.Event = field(default_factory=threading.Event)
    stderr_head: bytearray = field(default_factory=bytearray)

    @property
    def ids(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self.attachment.instance_id, self.attachment.volume_id


class EncryptedVolumes:
    """The nbdkit volume server adapter: attachments of encrypted volumes, their processes and keys."""

    def __init__(self, volume_dir: Path, state_dir: Path, *, nbdkit: str = "nbdkit",
                 qemu_img: str = "qemu-img") -> None:
        self._volume_dir = Path(os.path.abspath(volume_dir))  # absolute: it is nbdkit's argv marker
        self._state_dir = Path(state_dir)
        self._state_path = self._state_dir / STATE_FILE
        self._nbdkit = nbdkit
        self._qemu_img = qemu_img
        self._lock = threading.Lock()
        self._entries: dict[tuple[uuid.UUID, uuid.UUID], _Entry] = {}
        self._pending: set[uuid.UUID] = set()  # volume ids with a serve() in progress
        self._closed = False
        if not self._state_dir.is_dir():
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED, f"{self._state_dir} is not a directory")
        self._adopt(self._load())

    # --- queries ---

    def attachments(self) -> list[Attachment]:
        with self._lock:
            return [entry.attachment for entry in self._entries.values()]

    def is_attached(self, instance_id: uuid.UUID, volume_id: uuid.UUID) -> bool:
        with self._lock:
            return (instance_id, volume_id) in self._entries

    # --- commands ---

    def serve(self, instance_id: uuid.UUID, volume_id: uuid.UUID, key: bytearray) -> tuple[Attachment, int]:
        """Verify ``key`` against the volume, start nbdkit, and return the attachment and the client fd.

        The caller sends the returned descriptor to the agent and then closes it.  On success this object
        owns ``key`` (kept, not copied, and wiped when the attachment ends); on a :class:`VolumeServerError`
        nothing was started or recorded and ``key`` is untouched.
        """
        if not isinstance(instance_id, uuid.UUID) or not isinstance(volume_id, uuid.UUID):
            raise TypeError("instance and volume ids are uuid.UUID")
        if type(key) is not bytearray:
            raise TypeError("a data key is passed as a bytearray, so that it can be wiped")
        with self._lock:
            self._check_open()
            for entry in self._entries.values():
                if entry.attachment.volume_id == volume_id:
                    raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE,
                                            f"volume {volume_id} is attached to instance {entry.ids[0]}")
            if volume_id in self._pending:
                raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE,
                                        f"volume {volume_id} is being attached")
            self._pending.add(volume_id)
        try:
            path = self._volume_path(volume_id)
            self._check_format(path)
            if len(key) != KEY_SIZE:
                raise VolumeServerError(VolumeErrorReason.KEY_REJECTED, "the data key does not unlock the volume")
            passphrase = passphrase_of(key)
            try:
                self._check_key(path, passphrase)
                entry, client = self._start(instance_id, volume_id, path, passphrase)
            finally:
                wipe(passphrase)
            try:
                self._await_greeting(client, entry)
                self._record(entry, key)
            except BaseException:
                client.close()
                self._terminate(entry)
                raise
            return entry.attachment, client.detach()
        finally:
            with self._lock:
                self._pending.discard(volume_id)

    def release(self, instance_id: uuid.UUID, volume_id: uuid.UUID) -> None:
        """End the attachment's nbdkit, wipe its key and forget it.  Idempotent."""
        with self._lock:
            self._check_open()
            entry = self._entries.get((instance_id, volume_id))
            if entry is None:
                return
            entry.releasing = True
            if entry.key is not None:
                wipe(entry.key)
                entry.key = None
        self._terminate(entry)
        with self._lock:
            self._forget(entry)  # normally the reaper has done so already, before it signalled the exit

    def release_instance(self, instance_id: uuid.UUID) -> None:
        """Release every attachment of ``instance_id`` (after StopInstance)."""
        with self._lock:
            self._check_open()
            volume_ids = [volume_id for (owner, volume_id) in self._entries if owner == instance_id]
        for volume_id in volume_ids:
            self.release(instance_id, volume_id)

    def close(self) -> None:
        """Controller shutdown: wipe every key in memory, leave nbdkit running for the next controller."""
        with self._lock:
            self._closed = True
            for entry in self._entries.values():
                if entry.key is not None:
                    wipe(entry.key)
                    entry.key = None
                if entry.server is not None:
                    entry.server.close()  # only our duplicate: nbdkit keeps serving through its own
                    entry.server = None

    # --- verification ---

    def _check_open(self) -> None:
        if self._closed:
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED, "the volume server is closed")

    def _volume_path(self, volume_id: uuid.UUID) -> Path:
        """The volume's file: named by the canonical UUID, a regular file, not a symbolic link."""
        name = str(volume_id)
        try:
            dir_fd = os.open(self._volume_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise VolumeServerError(VolumeErrorReason.VOLUME_NOT_FOUND,
                                    f"volume directory {self._volume_dir}: {exc.strerror}") from None
        try:
            # O_NONBLOCK: opening a FIFO must not block; it is refused below like any non-regular file.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise VolumeServerError(VolumeErrorReason.VOLUME_NOT_FOUND, f"volume {name} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE,
                                        f"volume {name} is a symbolic link") from None
            raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE,
                                    f"volume {name}: {exc.strerror}") from None
        finally:
            os.close(dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE, f"volume {name} is not a regular file")
        finally:
            os.close(fd)
        return self._volume_dir / name

    def _run_tool(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        try:
            result = subprocess.run(  # noqa: S603 - a fixed tool, our own arguments, no shell
                argv, stdin=subprocess.DEVNULL, capture_output=True, pass_fds=pass_fds, close_fds=True,
                env=_tool_environment(), timeout=_TOOL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED,
                                    f"{argv[0]} {argv[1]} did not finish in {_TOOL_TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED,
                                    f"cannot run {argv[0]}: {exc.strerror}") from None
        if len(result.stdout) > _TOOL_OUTPUT_MAX:
            raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE, f"{argv[1]}: unexpectedly long output")
        return result

    @staticmethod
    def _spec(path: Path, *, key_object: str | None) -> str:
        # A json: pseudo-filename: any path is safe in JSON, where image-opts would need commas doubled and a
        # plain filename could be read as a protocol ("nbd:...").  The luks driver refuses a non-LUKS file.
        options: dict[str, object] = {"driver": "luks", "file": {"driver": "file", "filename": str(path)}}
        if key_object is not None:
            options["key-secret"] = key_object  # the id of the --object secret, not the secret itself
        return "json:" + json.dumps(options)

    def _check_format(self, path: Path) -> None:
        """A LUKS volume with a cipher suite that nbdkit implements; the key is not involved yet."""
        result = self._run_tool([self._qemu_img, "info", "--output=json", self._spec(path, key_object=None)])
        if result.returncode != 0:
            message = _tool_message(result.stderr)
            if "No such file" in message:
                raise VolumeServerError(VolumeErrorReason.VOLUME_NOT_FOUND, f"volume {path.name} does not exist")
            if "not in LUKS format" in message:
                raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE, f"volume {path.name} is not LUKS")
            raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE, f"volume {path.name}: {message}")
        try:
            info = json.loads(result.stdout)
            is_luks = info["format"] == "luks" and info["format-specific"]["type"] == "luks"
            data = info["format-specific"]["data"]
            cipher, mode, ivgen, hash_alg = (data[name] for name in ("cipher-alg", "cipher-mode", "ivgen-alg",
                                                                     "hash-alg"))
            ivgen_hash = data.get("ivgen-hash-alg")  # qemu-img reports it for ESSIV only
            if not all(isinstance(value, str) for value in (cipher, mode, ivgen, hash_alg, ivgen_hash or "")):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE,
                                    f"volume {path.name}: unreadable qemu-img info output") from None
        if not is_luks:
            raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE, f"volume {path.name} is not LUKS")
        if ((cipher, mode) not in _NBDKIT_CIPHERS or ivgen not in _NBDKIT_IVGENS
                or hash_alg not in _NBDKIT_HASHES or (ivgen_hash is not None and ivgen_hash not in _NBDKIT_HASHES)):
            described = _printable(f"{cipher}-{mode}-{ivgen} {hash_alg}".encode(errors="replace"))
            raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE,
                                    f"volume {path.name}: cipher suite {described} is not supported by nbdkit")

    def _check_key(self, path: Path, passphrase: bytearray) -> None:
        """Raise KEY_REJECTED unless ``passphrase`` unlocks a key slot.

        ``qemu-img info`` opens without I/O and accepts any passphrase, so this reads the first sector with
        ``qemu-img map``, which must decrypt the master key first.
        """
        read_fd, write_fd = os.pipe()
        try:
            try:
                _write_all(write_fd, passphrase)  # 64 bytes: below PIPE_BUF, never blocks
            finally:
                os.close(write_fd)
            result = self._run_tool(
                [self._qemu_img, "map", "--output=json", "--max-length=512",
                 "--object", f"secret,id={_KEY_OBJECT},file=/dev/fd/{read_fd},format=raw",
                 self._spec(path, key_object=_KEY_OBJECT)],
                pass_fds=(read_fd,))
        finally:
            os.close(read_fd)
        if result.returncode == 0:
            return
        message = _tool_message(result.stderr)
        if "Invalid password" in message or "cannot unlock any keyslot" in message:
            raise VolumeServerError(VolumeErrorReason.KEY_REJECTED, "the data key does not unlock the volume")
        if "No such file" in message:
            raise VolumeServerError(VolumeErrorReason.VOLUME_NOT_FOUND, f"volume {path.name} does not exist")
        raise VolumeServerError(VolumeErrorReason.VOLUME_UNUSABLE, f"volume {path.name}: {message}")

    # --- the nbdkit process ---

    def _start(self, instance_id: uuid.UUID, volume_id: uuid.UUID, path: Path,
               passphrase: bytearray) -> tuple[_Entry, socket.socket]:
        """Start nbdkit on a new socketpair; return its entry (reaper running) and the client end."""
        server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        read_fd, write_fd = os.pipe()
        stderr_read, stderr_write = os.pipe()
        started = False
        try:
            try:
                _write_all(write_fd, passphrase)  # 64 bytes, below PIPE_BUF; nbdkit reads to end-of-file
            finally:
                os.close(write_fd)
            # argv names the volume file (the process marker) and the pipe's number, never the key.
            argv = [self._nbdkit, "-s", "--filter=luks", "file", f"file={path}", f"passphrase=-{read_fd}"]
            try:
                popen = subprocess.Popen(  # noqa: S603 - a fixed tool, our own arguments, no shell
                    argv, stdin=server.fileno(), stdout=server.fileno(), stderr=stderr_write,
                    pass_fds=(read_fd,), close_fds=True, start_new_session=True, env=_tool_environment())
            except OSError as exc:
                raise VolumeServerError(VolumeErrorReason.SERVER_FAILED,
                                        f"cannot run {self._nbdkit}: {exc.strerror}") from None
            started = True
        finally:
            os.close(read_fd)
            os.close(stderr_write)
            if not started:
                os.close(stderr_read)
                server.close()
                client.close()
        # Our unreaped child: its pid cannot be reused before the reaper has waited for it.
        pidfd = os.pidfd_open(popen.pid)
        ticks = process.start_ticks(popen.pid)
        entry = _Entry(Attachment(instance_id, volume_id, popen.pid, ticks or 0), pidfd, popen, stderr_read, server)
        self._start_reaper(entry)
        if ticks is None:  # a zombie already
            entry.exited.wait(_KILL_WAIT_S)
            client.close()
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED, f"nbdkit exited: {self._excerpt(entry)}")
        return entry, client

    def _await_greeting(self, client: socket.socket, entry: _Entry) -> None:
        """Wait for nbdkit's NBD greeting and check it, without consuming it (QEMU reads it later)."""
        deadline = time.monotonic() + _GREETING_TIMEOUT_S
        poller = select.poll()
        poller.register(client.fileno(), select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VolumeServerError(VolumeErrorReason.SERVER_FAILED,
                                        f"nbdkit sent no NBD greeting within {_GREETING_TIMEOUT_S:.0f} s")
            poller.poll(int(remaining * 1000) + 1)
            try:
                seen = client.recv(len(_NBD_GREETING), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not seen or not _NBD_GREETING.startswith(seen):
                self._terminate(entry)
                reason = "exited" if not seen else "sent something other than an NBD greeting"
                raise VolumeServerError(VolumeErrorReason.SERVER_FAILED, f"nbdkit {reason}: {self._excerpt(entry)}")
            if len(seen) == len(_NBD_GREETING):
                return
            time.sleep(0.005)  # part of the greeting is there; poll() would return at once until the rest is

    def _record(self, entry: _Entry, key: bytearray) -> None:
        with self._lock:
            self._check_open()
            if entry.gone:
                raise VolumeServerError(VolumeErrorReason.SERVER_FAILED, f"nbdkit exited: {self._excerpt(entry)}")
            self._entries[entry.ids] = entry
            try:
                self._save()
            except VolumeServerError:
                del self._entries[entry.ids]
                raise
            entry.key = key

    def _terminate(self, entry: _Entry) -> None:
        """End nbdkit: shut its socket down if we can, then SIGTERM, up to 5 s, SIGKILL.

        nbdkit 1.32.5 in ``-s`` mode does not act on SIGTERM while it waits for the client (its reads restart
        after EINTR; only a listening nbdkit polls its quit pipe), and after the signal it stops answering
        requests without exiting, so SIGTERM alone means a 5 s wait and a SIGKILL.  End-of-file on its socket
        is what it does handle: it closes the volume and exits at once, as when QEMU disconnects.  We hold a
        duplicate of the server end for attachments this process started (not adopted ones) and shut it
        down first.  Signals go to the recorded process only (pid and start time, through a pidfd).
        """
        if entry.exited.is_set():
            return
        if self._shut_down(entry) and entry.exited.wait(_EOF_WAIT_S):
            return
        pid, ticks = entry.attachment.pid, entry.attachment.start_ticks
        process.kill(pid, ticks, signal.SIGTERM)
        if entry.exited.wait(_TERM_GRACE_S):
            return
        log.warning("nbdkit %d for volume %s ignored SIGTERM; sending SIGKILL", pid, entry.attachment.volume_id)
        process.kill(pid, ticks, signal.SIGKILL)
        if not entry.exited.wait(_KILL_WAIT_S):
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED, f"nbdkit {pid} did not exit after SIGKILL")

    def _shut_down(self, entry: _Entry) -> bool:
        """Shut down nbdkit's end of the socketpair (both directions); False if we do not hold it."""
        with self._lock:  # the reaper closes it under the lock: never shut down a closed, reused descriptor
            if entry.server is None:
                return False
            with contextlib.suppress(OSError):
                entry.server.shutdown(socket.SHUT_RDWR)
            return True

    def _start_reaper(self, entry: _Entry) -> None:
        thread = threading.Thread(target=self._reap, args=(entry,), name=f"nbdkit-reaper-{entry.attachment.pid}",
                                  daemon=True)
        thread.start()

    def _reap(self, entry: _Entry) -> None:
        """The reaper thread: drain stderr until the pidfd reports the exit, then wipe and forget."""
        poller = select.poll()
        poller.register(entry.pidfd, select.POLLIN)
        if entry.stderr_fd is not None:
            poller.register(entry.stderr_fd, select.POLLIN)
        exited = False
        while not exited:
            for fd, _events in poller.poll():
                if fd == entry.pidfd:
                    exited = True
                elif not self._drain(entry):
                    poller.unregister(fd)
        if entry.stderr_fd is not None:
            os.set_blocking(entry.stderr_fd, False)
            while self._drain(entry):
                pass
            os.close(entry.stderr_fd)
        os.close(entry.pidfd)
        status = entry.popen.wait() if entry.popen is not None else None  # reap our child
        with self._lock:
            entry.gone = True
            if entry.server is not None:
                # Closed at once: while we held it, a QEMU still connected would see no end-of-file.
                entry.server.close()
                entry.server = None
            if entry.key is not None:
                wipe(entry.key)
                entry.key = None
            recorded = self._entries.get(entry.ids) is entry
            if recorded and not self._closed:  # after close() the records belong to the next controller
                self._forget(entry)
        if recorded and not entry.releasing:
            # A process that never made it into the records (a failed serve) is reported by serve's exception.
            log.info("nbdkit %d for volume %s of instance %s exited (status %s): %s", entry.attachment.pid,
                     entry.attachment.volume_id, entry.attachment.instance_id, status, self._excerpt(entry))
        entry.exited.set()

    @staticmethod
    def _drain(entry: _Entry) -> bool:
        """Read one chunk of stderr, keeping the head; False at end-of-file (or, non-blocking, when empty)."""
        assert entry.stderr_fd is not None
        try:
            chunk = os.read(entry.stderr_fd, 4096)
        except OSError:  # BlockingIOError when non-blocking and empty
            return False
        if not chunk:
            return False
        room = _STDERR_KEEP - len(entry.stderr_head)
        if room > 0:
            entry.stderr_head += chunk[:room]
        return True

    @staticmethod
    def _excerpt(entry: _Entry) -> str:
        return _printable(bytes(entry.stderr_head)) or "no message"

    def _forget(self, entry: _Entry) -> None:
        """Drop ``entry`` if it is still the recorded one and persist; under the lock."""
        if self._entries.get(entry.ids) is not entry:
            return
        del self._entries[entry.ids]
        try:
            self._save()
        except VolumeServerError as exc:
            # The record of a dead process is dropped at the next start (its pid no longer matches).
            log.error("could not persist the end of attachment %s/%s: %s", *entry.ids, exc.detail)

    # --- persistence ---

    def _save(self) -> None:
        """Replace the state file atomically with the current records; under the lock."""
        records = sorted(
            ({"instance_id": str(e.attachment.instance_id), "volume_id": str(e.attachment.volume_id),
              "pid": e.attachment.pid, "start_ticks": e.attachment.start_ticks} for e in self._entries.values()),
            key=lambda record: (record["instance_id"], record["volume_id"]))
        data = json.dumps({"version": _STATE_VERSION, "attachments": records}, indent=1).encode() + b"\n"
        temporary = self._state_path.with_name(f".{STATE_FILE}.{secrets.token_hex(8)}.tmp")
        try:
            create_private_file(temporary, data)  # O_EXCL, O_NOFOLLOW, mode 0600, fsynced
            try:
                os.replace(temporary, self._state_path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            _fsync_directory(self._state_dir)
        except OSError as exc:
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED,
                                    f"cannot write {self._state_path}: {exc.strerror}") from None

    def _corrupt(self, why: str) -> VolumeServerError:
        return VolumeServerError(VolumeErrorReason.SERVER_FAILED, f"{self._state_path} is corrupt: {why}")

    def _load(self) -> list[Attachment]:
        try:
            fd = os.open(self._state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise VolumeServerError(VolumeErrorReason.SERVER_FAILED,
                                    f"cannot open {self._state_path}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._corrupt("not a regular file")
            raw = b""
            while len(raw) <= _STATE_MAX_BYTES:  # capped: the file is ours, but a bound costs nothing
                chunk = os.read(fd, _STATE_MAX_BYTES + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
        finally:
            os.close(fd)
        if len(raw) > _STATE_MAX_BYTES:
            raise self._corrupt(f"larger than {_STATE_MAX_BYTES} bytes")
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            raise self._corrupt("not JSON") from None
        if not isinstance(document, dict) or set(document) != {"version", "attachments"}:
            raise self._corrupt("expected an object with version and attachments")
        if document["version"] != _STATE_VERSION or not isinstance(document["attachments"], list):
            raise self._corrupt(f"expected version {_STATE_VERSION} and a list of attachments")
        attachments: list[Attachment] = []
        for index, record in enumerate(document["attachments"]):
            attachment = self._parse_record(record, index)
            if any(a.volume_id == attachment.volume_id for a in attachments):
                raise self._corrupt(f"attachment {index}: volume {attachment.volume_id} appears twice")
            attachments.append(attachment)
        return attachments

    def _parse_record(self, record: object, index: int) -> Attachment:
        if not isinstance(record, dict) or set(record) != _STATE_RECORD_KEYS:
            raise self._corrupt(f"attachment {index}: expected the keys {', '.join(sorted(_STATE_RECORD_KEYS))}")
        ids = []
        for name in ("instance_id", "volume_id"):
            text = record[name]
            try:
                value = uuid.UUID(text) if isinstance(text, str) else None
            except ValueError:
                value = None
            if value is None or str(value) != text:
                raise self._corrupt(f"attachment {index}: {name} is not a canonical UUID")
            ids.append(value)
        pid, ticks = record["pid"], record["start_ticks"]
        if type(pid) is not int or pid < 2 or type(ticks) is not int or ticks < 1:
            raise self._corrupt(f"attachment {index}: pid and start_ticks must be positive integers")
        return Attachment(ids[0], ids[1], pid, ticks)

    def _adopt(self, recorded: list[Attachment]) -> None:
        """Adopt every recorded nbdkit that still runs; drop (and persist the loss of) the others."""
        with self._lock:
            for attachment in recorded:
                try:
                    pidfd = os.pidfd_open(attachment.pid)  # first: from here on the pidfd names one process
                except OSError:
                    log.info("dropping attachment %s/%s: nbdkit %d is gone", attachment.instance_id,
                             attachment.volume_id, attachment.pid)
                    continue
                if not process.is_same_process(attachment.pid, attachment.start_ticks):
                    os.close(pidfd)
                    log.info("dropping attachment %s/%s: pid %d is gone or another process now",
                             attachment.instance_id, attachment.volume_id, attachment.pid)
                    continue
                entry = _Entry(attachment, pidfd, None, None, None)
                self._entries[entry.ids] = entry
                log.info("adopted nbdkit %d serving volume %s to instance %s (its key is not in this process)",
                         attachment.pid, attachment.volume_id, attachment.instance_id)
            if len(self._entries) != len(recorded):
                self._save()
            for entry in self._entries.values():
                self._start_reaper(entry)
