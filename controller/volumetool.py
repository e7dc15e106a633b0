"""Encrypted volume files and volume key files, for ``pvctl volume create`` and ``pvctl volume wrap`` (issue 5; C8).

Theory of operation
-------------------
An encrypted volume is a LUKSv1 image made by ``qemu-img create -f luks``.  Its only secret is a **data key**
of :data:`~controller.envelope.DATA_KEY_SIZE` (32) random bytes.  The LUKS passphrase is derived from it by
one fixed rule, :func:`passphrase_of` (the key's 64 lowercase hex digits, no newline), so that whoever holds
the data key (the controller, after unwrapping an envelope) can open the volume.  The control plane never
stores the data key in the clear next to the volume: it keeps the **envelope**, the key wrapped to the host's
X25519 public key and bound to one instance and one volume (:func:`controller.envelope.wrap`), which
``pvctl attach --envelope-file`` sends as ``AttachVolumeRequest.envelope``.  Optionally the operator keeps the
raw key in a private key file, to re-wrap it later for another instance or host (:func:`wrap_key_file`).

``create_encrypted_volume`` runs in this order, so that a failure leaves nothing behind:

1. check every output path (absent, distinct, in an existing directory) and find ``qemu-img``;
2. generate the data key and wrap it (a host key that cannot be used fails here, before any file exists);
3. reserve the volume file with ``O_CREAT | O_EXCL`` and let ``qemu-img create`` write the LUKS image into it
   (aes-256-xts-plain64, sha256: named, not left to qemu-img's defaults);
4. write the key file (if asked for), then the envelope file, each 0600 with ``O_EXCL``.

Any failure in 3 or 4 removes what this run created (only a file that is still the one it created: the
device and inode are compared first, so a file someone else put at the same path is never removed), and
the key is gone with the process, so a volume without its envelope could never be opened anyway.  The
envelope is written last: its presence marks a complete volume.

Invariants
----------
- The passphrase reaches ``qemu-img`` only through a pipe, named on the command line as ``/dev/fd/N``
  (``secret,file=...``).  Never through argv (``/proc/PID/cmdline`` is world-readable) or the environment
  (readable by the same user through ``/proc/PID/environ``, and often logged).
- Nothing is overwritten: every output is created with ``O_EXCL``; the volume, key and envelope files are 0600.
- The data key and the passphrase live in ``bytearray`` buffers that are wiped on every path (best effort: the
  ``bytes`` that ``secrets.token_bytes`` returns, and ``cryptography``'s internal copies, cannot be wiped).
- Error messages (:class:`VolumeToolError`) are one line and never hold key material.

Key derivation cost (``iter-time``)
-----------------------------------
LUKS stretches the passphrase with PBKDF2, tuned by ``iter-time``: the milliseconds of CPU time one key-slot
unlock should cost.  Stretching exists to slow down guessing of a *human* passphrase.  This passphrase is a
full-entropy 256-bit random key, which no amount of guessing can find, so stretching adds no security and only
slows every attach (opening the volume runs PBKDF2 twice: the key slot, then the master-key digest).  The
default is therefore :data:`DEFAULT_ITER_TIME_MS` = 50 ms (about 50 ms for the slot and a few for the digest
per unlock).  It is also the lowest value accepted.  That floor is this project's choice (the tested value), not
a security requirement and not a qemu-img limit: qemu-img accepts 10 ms.

Creating an image takes about 2.4 s whatever the iter-time, because ``qemu-img`` first measures how fast this
CPU runs PBKDF2 (twice, for about a second each).  That measurement sometimes fails at once with "Unable to get
accurate CPU usage" when the kernel's per-thread CPU-time accounting is coarse (it read zero elapsed time for
its first, short probe).  This does not depend on the iter-time (seen at 50 and at 10 ms alike, in about one
run out of eight on a 2-core VM, qemu-img 7.2), so :func:`create_volume` retries that one failure, up to
:data:`CALIBRATION_ATTEMPTS` times in all.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller import envelope
from controller.envelope import DATA_KEY_SIZE
from controller.identity import KeyFileError, create_private_file, read_private_file
from hostagent.durable import fsync_directory

__all__ = [
    "CALIBRATION_ATTEMPTS",
    "DATA_KEY_SIZE",
    "DEFAULT_ITER_TIME_MS",
    "MAX_ITER_TIME_MS",
    "MAX_SIZE",
    "MIN_ITER_TIME_MS",
    "MIN_SIZE",
    "CreatedVolume",
    "UnusablePath",
    "VolumeToolError",
    "check_new_paths",
    "create_encrypted_volume",
    "create_volume",
    "find_qemu_img",
    "new_data_key",
    "parse_size",
    "passphrase_of",
    "read_key_file",
    "wrap_key_file",
]

DEFAULT_ITER_TIME_MS = 50
"""PBKDF2 time per key-slot unlock.  Short on purpose: the passphrase is a 256-bit random key (module doc)."""
MIN_ITER_TIME_MS = 50
MAX_ITER_TIME_MS = 10_000

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"([1-9][0-9]{0,15})([KMGT]?)")
MIN_SIZE = 1 << 20  # 1M
MAX_SIZE = 1 << 40  # 1T
SECTOR = 512  # qemu-img rounds a LUKS payload up to whole sectors; we ask for an exact size instead

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT = 300.0  # about 2.4 s normally, plus the iter-time; a hung qemu-img is killed
CALIBRATION_ATTEMPTS = 5
_CALIBRATION_FAILURE = "Unable to get accurate CPU usage"
_SECRET_ID = "sec0"  # noqa: S105 - the id of a QEMU secret object, not a secret
# Named rather than left to qemu-img's defaults (today the same), so that another qemu-img cannot make a volume
# the controller's volume server (nbdkit's luks filter: AES-XTS or -CBC, plain/plain64 IVs, no ESSIV) cannot open.
_CIPHER_SUITE = "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256"
_MAX_QEMU_MESSAGE = 500
_HEX_DIGITS = b"0123456789abcdef"


class VolumeToolError(Exception):
    """A volume operation failed.  The message is one line and never holds key material."""


class UnusablePath(VolumeToolError):
    """An output exists (nothing is overwritten) or an input file is unusable; nothing was changed."""


def parse_size(text: str) -> int:
    """A volume size in bytes from ``N[K|M|G|T]`` (binary units, as qemu-img reads them); ValueError otherwise.

    Strict on purpose: digits without sign, leading zero, spaces, fraction or lowercase unit; a whole number of
    512-byte sectors; between :data:`MIN_SIZE` and :data:`MAX_SIZE`.  qemu-img is then given the byte count,
    never the operator's text.
    """
    found = _SIZE.fullmatch(text)
    if found is None:
        raise ValueError(f"{text[:32]!r} is not a size: expected a positive integer with an optional K, M, G "
                         "or T suffix (e.g. 16M)")
    size = int(found.group(1)) * _SIZE_UNITS[found.group(2)]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"{text} is not between 1M and 1T")
    if size % SECTOR:
        raise ValueError(f"{text} is not a whole number of {SECTOR}-byte sectors")
    return size


def new_data_key() -> bytearray:
    """A fresh data key of :data:`DATA_KEY_SIZE` random bytes, in a buffer the caller wipes after use."""
    return bytearray(secrets.token_bytes(DATA_KEY_SIZE))


def passphrase_of(key: bytearray) -> bytearray:
    """The LUKS passphrase of a volume whose data key is ``key``: its 64 lowercase hex digits, no newline.

    This is the one definition of the convention: ``controller/volumes.py`` (which opens the volumes this
    module creates) must call this function rather than re-derive the passphrase.  The digits are written into
    a new ``bytearray`` one by one (``bytes.hex`` would leave an unwipeable ``str``); the caller wipes it.
    """
    if not isinstance(key, bytearray) or len(key) != DATA_KEY_SIZE:
        raise ValueError(f"a data key is a bytearray of {DATA_KEY_SIZE} bytes")
    passphrase = bytearray(2 * DATA_KEY_SIZE)
    for index, byte in enumerate(key):
        passphrase[2 * index] = _HEX_DIGITS[byte >> 4]
        passphrase[2 * index + 1] = _HEX_DIGITS[byte & 0x0F]
    return passphrase


# --------------------------------------------------------------------------------------------------------------
# Files this run creates, removed again if the run fails


_Identity = tuple[int, int]  # (st_dev, st_ino)


def _identity_of(path: Path) -> _Identity | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _remove_if_ours(path: Path, identity: _Identity) -> None:
    # Only the file this run created: one that qemu-img already removed, or that someone else put at the same
    # path since, stays.  (A swap between this check and the unlink is not defended against; the output
    # directory is the operator's own.)
    if _identity_of(path) == identity:
        path.unlink(missing_ok=True)


@dataclass
class _Created:
    files: list[tuple[Path, _Identity]]

    def add(self, path: Path) -> None:
        identity = _identity_of(path)
        if identity is not None:
            self.files.append((path, identity))


@contextmanager
def _all_or_nothing() -> Iterator[_Created]:
    created = _Created([])
    try:
        yield created
    except BaseException:
        for path, identity in reversed(created.files):
            _remove_if_ours(path, identity)
        raise


def check_new_paths(*paths: Path | None) -> None:
    """Refuse (:class:`UnusablePath`) an output that exists, two outputs that are one file, or a missing directory.

    A check before any work, for a clear early error; ``O_EXCL`` at creation stays the authority.
    """
    seen: set[Path] = set()
    for path in paths:
        if path is None:
            continue
        absolute = Path(os.path.abspath(path))
        if absolute in seen:
            raise UnusablePath(f"{path} is named for two outputs")
        seen.add(absolute)
        if os.path.lexists(absolute):
            raise UnusablePath(f"{path} exists; refusing to overwrite it")
        if not absolute.parent.is_dir():
            raise UnusablePath(f"the directory of {path} does not exist")


def _write_new_private(path: Path, data: bytes | bytearray) -> None:
    try:
        create_private_file(path, data)
    except FileExistsError:
        raise UnusablePath(f"{path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise VolumeToolError(f"cannot create {path}: {exc.strerror}") from None


# --------------------------------------------------------------------------------------------------------------
# qemu-img


def find_qemu_img() -> str:
    found = shutil.which(QEMU_IMG)
    if found is None:
        raise VolumeToolError(f"{QEMU_IMG} is not on PATH (Debian: apt-get install qemu-utils)")
    return found


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _qemu_img_create(qemu_img: str, path: Path, size: int, passphrase: bytearray,
                     iter_time_ms: int) -> subprocess.CompletedProcess[bytes]:
    read_end, write_end = os.pipe()
    try:
        # 64 bytes fit in any pipe buffer, so the whole passphrase is written (and the write end closed, which
        # gives qemu-img its end of file) before qemu-img starts.
        try:
            _write_all(write_end, passphrase)
        finally:
            os.close(write_end)
        argv = [
            qemu_img, "create", "-q", "-f", "luks",
            "--object", f"secret,id={_SECRET_ID},file=/dev/fd/{read_end},format=raw",
            "-o", f"key-secret={_SECRET_ID},iter-time={iter_time_ms},{_CIPHER_SUITE}",
            # Absolute, so qemu-img cannot read a "proto:" or "json:" prefix into the file name.
            os.path.abspath(path), str(size),
        ]
        try:
            return subprocess.run(  # noqa: S603 - argv built from validated values, no shell
                argv, pass_fds=(read_end,), stdin=subprocess.DEVNULL, capture_output=True,
                timeout=QEMU_IMG_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise VolumeToolError(f"{QEMU_IMG} create did not finish within {QEMU_IMG_TIMEOUT:g} s") from None
        except OSError as exc:
            raise VolumeToolError(f"cannot run {qemu_img}: {exc.strerror}") from None
    finally:
        os.close(read_end)


def _qemu_message(stderr: bytes) -> str:
    text = " ".join(stderr.decode("utf-8", "replace").split())
    text = text.removeprefix(f"{QEMU_IMG}: ")
    return text if len(text) <= _MAX_QEMU_MESSAGE else text[: _MAX_QEMU_MESSAGE - 3] + "..."


def create_volume(path: Path, size: int, key: bytearray, *, iter_time_ms: int = DEFAULT_ITER_TIME_MS,
                  qemu_img: str | None = None) -> None:
    """Create the LUKSv1 image ``path`` of ``size`` bytes, opened by :func:`passphrase_of` ``(key)``.

    ``path`` must not exist: it is reserved with ``O_EXCL`` (mode 0600) and then written by ``qemu-img
    create``.  On failure nothing is left at ``path`` that this call created.  ``iter_time_ms`` is LUKS's
    PBKDF2 time per unlock, at least :data:`MIN_ITER_TIME_MS`; see the module doc for why it is short.
    """
    if not MIN_SIZE <= size <= MAX_SIZE or size % SECTOR:
        raise ValueError("size out of range; use parse_size")
    if not MIN_ITER_TIME_MS <= iter_time_ms <= MAX_ITER_TIME_MS:
        raise ValueError(f"iter_time_ms is {MIN_ITER_TIME_MS}..{MAX_ITER_TIME_MS}")
    binary = qemu_img if qemu_img is not None else find_qemu_img()
    passphrase = passphrase_of(key)
    try:
        for attempt in range(1, CALIBRATION_ATTEMPTS + 1):
            identity = _reserve(path)
            try:
                result = _qemu_img_create(binary, path, size, passphrase, iter_time_ms)
                if result.returncode == 0:
                    _sync_reserved(path, identity)
            except BaseException:
                _remove_if_ours(path, identity)
                raise
            if result.returncode == 0:
                return
            # qemu-img removes the file it failed to create; this covers a version that does not.
            _remove_if_ours(path, identity)
            message = _qemu_message(result.stderr)
            if _CALIBRATION_FAILURE not in message or attempt == CALIBRATION_ATTEMPTS:
                raise VolumeToolError(f"{QEMU_IMG} create failed (exit status {result.returncode}): "
                                      f"{message or '(no message)'}")
    finally:
        envelope.wipe(passphrase)
    raise AssertionError("unreachable")


def _sync_reserved(path: Path, identity: _Identity) -> None:
    """Flush what qemu-img wrote to disk, after checking that ``path`` is still the file reserved."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeToolError(f"cannot open {path} after {QEMU_IMG} wrote it: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != identity:
            raise VolumeToolError(f"{path} was replaced while {QEMU_IMG} wrote it")
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directories(*paths: Path | None) -> None:
    for directory in {Path(os.path.abspath(path)).parent for path in paths if path is not None}:
        fsync_directory(directory)


def _reserve(path: Path) -> _Identity:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UnusablePath(f"{path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise VolumeToolError(f"cannot create {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return info.st_dev, info.st_ino


# --------------------------------------------------------------------------------------------------------------
# The two operations


@dataclass(frozen=True)
class CreatedVolume:
    """What :func:`create_encrypted_volume` made.  Holds the envelope (wrapped, safe to show), never the key."""

    path: Path
    size: int
    envelope_path: Path
    key_path: Path | None
    envelope: bytes


def create_encrypted_volume(*, path: Path, size: int, volume_id: uuid.UUID, instance_id: uuid.UUID,
                            host_public: bytes, envelope_path: Path, key_path: Path | None = None,
                            iter_time_ms: int = DEFAULT_ITER_TIME_MS) -> CreatedVolume:
    """Create a volume with a fresh data key, its envelope file and (if ``key_path``) its key file; all or none.

    The envelope wraps the key to ``host_public`` (the host's raw X25519 public key) for ``instance_id`` and
    ``volume_id``.  Raises :class:`UnusablePath` when an output exists (nothing changed),
    :class:`VolumeToolError` when qemu-img or a write fails or ``host_public`` cannot be used.
    """
    check_new_paths(path, envelope_path, key_path)
    qemu_img = find_qemu_img()
    key = new_data_key()
    try:
        wrapped = _wrap(key, host_public, instance_id, volume_id)
        try:
            with _all_or_nothing() as created:
                create_volume(path, size, key, iter_time_ms=iter_time_ms, qemu_img=qemu_img)
                created.add(path)
                if key_path is not None:
                    _write_new_private(key_path, key)
                    created.add(key_path)
                _write_new_private(envelope_path, wrapped)
                created.add(envelope_path)
                _fsync_directories(path, key_path, envelope_path)
        except OSError as exc:  # what the steps do not name themselves: a failed fsync, no descriptor left
            raise VolumeToolError(f"creating {path} failed: {exc.strerror or exc}") from None
    finally:
        envelope.wipe(key)
    return CreatedVolume(path, size, envelope_path, key_path, wrapped)


def _wrap(key: bytearray, host_public: bytes, instance_id: uuid.UUID, volume_id: uuid.UUID) -> bytes:
    try:
        return envelope.wrap(key, host_public, instance_id, volume_id)
    except ValueError as exc:  # not 32 bytes, or a low-order point whose shared secret would be all zero
        raise VolumeToolError(f"the host public key cannot be used: {exc}") from None
    except envelope.EnvelopeError as exc:  # an id the envelope format refuses (its detail names the field)
        raise VolumeToolError(f"cannot wrap the key: {exc.detail}") from None


def read_key_file(path: Path) -> bytearray:
    """The data key in ``path``: exactly :data:`DATA_KEY_SIZE` raw bytes, a regular 0600 file of ours.

    The checks are those of the host's own private key files (:func:`controller.identity.read_private_file`).
    The caller wipes the result.
    """
    try:
        return read_private_file(path, size=DATA_KEY_SIZE)
    except KeyFileError as exc:
        raise UnusablePath(f"key file: {exc}") from None


def wrap_key_file(*, key_path: Path, volume_id: uuid.UUID, instance_id: uuid.UUID, host_public: bytes,
                  envelope_path: Path) -> bytes:
    """Wrap the data key of ``key_path`` for ``instance_id``/``volume_id`` and ``host_public``; write the envelope.

    This re-wraps a volume's key for another instance or another host.  Returns the envelope written.
    """
    check_new_paths(envelope_path)
    key = read_key_file(key_path)
    try:
        wrapped = _wrap(key, host_public, instance_id, volume_id)
    finally:
        envelope.wipe(key)
    with _all_or_nothing() as created:
        _write_new_private(envelope_path, wrapped)
        created.add(envelope_path)
        try:
            _fsync_directories(envelope_path)
        except OSError as exc:
            raise VolumeToolError(f"cannot flush the directory of {envelope_path}: {exc.strerror}") from None
    return wrapped
