"""Trusted images: a content-addressed store, verified before every boot (claim C14).

Theory of operation
-------------------
The store is one directory of blobs.  Each blob is named by the lowercase hex
SHA-256 of its content: 64 characters from ``0-9a-f`` and nothing else, so a
name can never be a path, a dot file or a temporary file of :func:`publish`.

An *image* is a manifest blob: canonical JSON of exactly four string members::

    {"cmdline":"console=ttyS0","format":"passivisor-image/v1","initrd":"<64 hex>","kernel":"<64 hex>"}

The image digest is the SHA-256 of the manifest bytes.  START_INSTANCE carries
that digest and an Ed25519 signature by the image-signing key over
``SIGNATURE_CONTEXT + digest`` (the context keeps a signature made for this
purpose from being valid for any other message signed with the same key).
Because the manifest names kernel and initrd by digest and holds the kernel
command line, the one signature covers every byte that determines the boot.

:meth:`ImageStore.prepare` runs on every launch and caches nothing; it checks,
in this order, and stops at the first failure:

1. the signature over the digest.  It is cheap and it needs no file, so an
   unsigned request learns nothing about the store (not even whether a digest
   exists) and makes the agent touch no file;
2. the manifest blob: opened by name with ``O_NOFOLLOW`` relative to the store
   directory, a regular file, at most :data:`MAX_MANIFEST_SIZE` bytes; the
   bytes read are hashed and compared with the digest in constant time, and
   only those bytes are parsed (strictly, see :func:`parse_manifest`);
3. kernel, then initrd: each blob is opened the same way and *copied* into the
   destination directory while the very bytes being copied are hashed.  The
   copy is kept only if that hash equals the manifest's digest.  QEMU later
   boots the copy, so it boots exactly the bytes that were verified: a blob
   swapped or rewritten in the store after the check cannot reach the guest
   (no check-then-use race).

Invariants:

- a :class:`PreparedImage` exists only after every check above passed on the
  bytes it names;
- verification raises :class:`ImageError`; nothing here returns a boolean;
- every size is bounded before reading (``fstat``) and again while reading, in
  chunks, so a huge or growing blob costs at most its bound;
- on any failure the destination directory is left as it was: files this call
  created are overwritten with zeros and removed (claim C12), files it did not
  create are never touched;
- a rejection reads as the one undifferentiated "image rejected" to the peer;
  which check failed is in :attr:`ImageError.detail`, for local logs only.
  No message ever contains file contents.

Host-side faults of the destination (it does not exist, a file of the same
name is already there, the disk is full) are not the image's fault: they raise
``OSError`` and must not be reported as IMAGE_REJECTED.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .durable import fsync_directory as _fsync_dir
from .scrub import zero_file

DIGEST_SIZE = 32  # SHA-256; equals hostagent.wire.messages.DIGEST_SIZE (a test checks it)
SIGNATURE_SIZE = 64  # Ed25519; equals hostagent.wire.messages.SIGNATURE_SIZE
KEY_SIZE = 32  # raw Ed25519 public and private keys
SIGNATURE_CONTEXT = b"passivisor/v1 image\x00"

MANIFEST_FORMAT = "passivisor-image/v1"
MAX_MANIFEST_SIZE = 4096
MAX_CMDLINE_LENGTH = 1024
DEFAULT_MAX_KERNEL_SIZE = 256 * 1024 * 1024
DEFAULT_MAX_INITRD_SIZE = 256 * 1024 * 1024

KERNEL_FILE = "kernel"
INITRD_FILE = "initrd"

# Reads and writes go in chunks of this size: large enough to stream at disk
# speed, small enough that a bounded read never overshoots its bound by much.
_CHUNK = 1024 * 1024
# A key file is at most a PEM document of one small key; anything larger is not a key.
_MAX_KEY_FILE_SIZE = 4096
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = frozenset({"format", "kernel", "initrd", "cmdline"})
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ImageFailure(enum.Enum):
    NOT_FOUND = "image_not_found"  # no manifest blob has this digest; the agent answers IMAGE_NOT_FOUND
    REJECTED = "image_rejected"  # any check failed; the agent answers IMAGE_REJECTED


class ImageError(Exception):
    """An image cannot be booted.

    ``str(error)`` is the same for every rejection, whichever check failed
    (a bad signature and a tampered blob look alike to the peer).  ``detail``
    names the failed check for local logs; it never holds file contents.
    """

    def __init__(self, reason: ImageFailure, detail: str) -> None:
        super().__init__("image not found" if reason is ImageFailure.NOT_FOUND else "image rejected")
        self.reason = reason
        self.detail = detail


class KeyFileError(Exception):
    """A key file is missing, malformed, of the wrong type, or (private keys) readable by others."""


def _reject(detail: str) -> NoReturn:
    raise ImageError(ImageFailure.REJECTED, detail)


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: the digests of kernel and initrd and the kernel command line."""

    kernel: bytes
    initrd: bytes
    cmdline: str


@dataclass(frozen=True)
class PreparedImage:
    """Verified copies, ready to boot: QEMU gets ``-kernel kernel -initrd initrd -append cmdline``."""

    kernel: Path
    initrd: Path
    cmdline: str
    digest: bytes


@dataclass(frozen=True)
class PublishedImage:
    """What START_INSTANCE needs to name an image: its digest and the signature over it."""

    digest: bytes
    signature: bytes


# --------------------------------------------------------------------------------------------
# Names, signatures, manifests
# --------------------------------------------------------------------------------------------


def is_blob_name(name: str) -> bool:
    """True for exactly the names a blob may have: 64 lowercase hex characters."""
    return _BLOB_NAME.fullmatch(name) is not None


def signing_message(digest: bytes) -> bytes:
    """The message the image-signing key signs for an image: context, then the 32 raw digest bytes."""
    if type(digest) is not bytes or len(digest) != DIGEST_SIZE:
        raise ValueError(f"an image digest is {DIGEST_SIZE} bytes")
    return SIGNATURE_CONTEXT + digest


def sign_image(digest: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """Sign an image digest (dev tooling and tests; production keys sign elsewhere)."""
    return private_key.sign(signing_message(digest))


def verify_image_signature(public_key: Ed25519PublicKey, digest: bytes, signature: bytes) -> None:
    """Raise :class:`ImageError` (REJECTED) unless ``signature`` signs ``digest`` under ``public_key``."""
    if type(digest) is not bytes or len(digest) != DIGEST_SIZE:
        _reject("signature: the digest is not 32 bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        _reject("signature: the signature is not 64 bytes")
    try:
        public_key.verify(signature, signing_message(digest))
    except InvalidSignature:
        _reject("signature: does not verify under the image-signing key")


def build_manifest(kernel: bytes, initrd: bytes, cmdline: str) -> bytes:
    """The canonical manifest bytes for an image; raises ``ValueError`` for values no parser accepts."""
    for part in (kernel, initrd):
        if type(part) is not bytes or len(part) != DIGEST_SIZE:
            raise ValueError(f"kernel and initrd digests are {DIGEST_SIZE} bytes")
    problem = _cmdline_problem(cmdline)
    if problem is not None:
        raise ValueError(problem)
    obj = {"format": MANIFEST_FORMAT, "kernel": kernel.hex(), "initrd": initrd.hex(), "cmdline": cmdline}
    data = _canonical(obj)
    if len(data) > MAX_MANIFEST_SIZE:  # pragma: no cover - 1024 printable characters escape to < 2100 bytes
        raise ValueError("manifest too large")
    return data


def parse_manifest(unverified_manifest: bytes) -> Manifest:
    """Parse manifest bytes strictly; any input either gives a :class:`Manifest` or raises ImageError.

    Strict means: at most :data:`MAX_MANIFEST_SIZE` bytes of UTF-8 JSON, one
    object with exactly the four keys, no key twice, every value a string, and
    the bytes equal to the canonical encoding (sorted keys, no spaces), so one
    image has exactly one digest.  Callers in the boot path parse only bytes
    whose hash they already compared with a signed digest.
    """
    if type(unverified_manifest) is not bytes or len(unverified_manifest) > MAX_MANIFEST_SIZE:
        _reject("manifest: not bytes or larger than the bound")
    try:
        text = unverified_manifest.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        # ValueError covers UnicodeDecodeError, JSONDecodeError, duplicate keys, NaN and Infinity, and
        # oversized integers; RecursionError a deeply nested document.  The detail says which kind only.
        _reject("manifest: not strict UTF-8 JSON or a key occurs twice")
    if type(obj) is not dict or set(obj) != _MANIFEST_KEYS:
        _reject("manifest: not an object with exactly the keys format, kernel, initrd, cmdline")
    if not all(type(value) is str for value in obj.values()):
        _reject("manifest: a value is not a string")
    if obj["format"] != MANIFEST_FORMAT:
        _reject("manifest: unknown format")
    for part in ("kernel", "initrd"):
        if not is_blob_name(obj[part]):
            _reject(f"manifest: {part} is not 64 lowercase hex characters")
    problem = _cmdline_problem(obj["cmdline"])
    if problem is not None:
        _reject(f"manifest: {problem}")
    if _canonical(obj) != unverified_manifest:
        _reject("manifest: not in canonical encoding")
    return Manifest(kernel=bytes.fromhex(obj["kernel"]), initrd=bytes.fromhex(obj["initrd"]), cmdline=obj["cmdline"])


def _canonical(obj: dict[str, str]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey("duplicate key")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _cmdline_problem(cmdline: object) -> str | None:
    """Why ``cmdline`` is not a valid kernel command line, or None.

    Printable ASCII only (0x20..0x7e): QEMU receives it as one argv element,
    never through a shell, but control characters and non-ASCII have no place
    in a kernel command line and would make logs of it ambiguous.
    """
    if type(cmdline) is not str:
        return "cmdline is not a string"
    if not 1 <= len(cmdline) <= MAX_CMDLINE_LENGTH:
        return f"cmdline must be 1..{MAX_CMDLINE_LENGTH} characters"
    if not all(" " <= char <= "~" for char in cmdline):
        return "cmdline must be printable ASCII"
    return None


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ImageStore:
    """Verifies images from a content-addressed directory and copies them out for booting."""

    def __init__(
        self,
        root: Path,
        public_key: Ed25519PublicKey,
        *,
        max_kernel_size: int = DEFAULT_MAX_KERNEL_SIZE,
        max_initrd_size: int = DEFAULT_MAX_INITRD_SIZE,
    ) -> None:
        if not isinstance(public_key, Ed25519PublicKey):
            raise TypeError("the image-signing key must be an Ed25519 public key")
        if max_kernel_size < 0 or max_initrd_size < 0:
            raise ValueError("size bounds must not be negative")
        self.root = Path(root)
        self._public_key = public_key
        self.max_kernel_size = max_kernel_size
        self.max_initrd_size = max_initrd_size

    def prepare(self, digest: bytes, signature: bytes, dest_dir: Path) -> PreparedImage:
        """Verify the image ``digest`` and copy its kernel and initrd into ``dest_dir``.

        Runs every check on every call (claim C14).  Raises :class:`ImageError`
        when the image is unsigned, unknown, tampered with, malformed or too
        large, and ``OSError`` for faults of ``dest_dir``; in both cases
        ``dest_dir`` is left as it was.
        """
        verify_image_signature(self._public_key, digest, signature)
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            _reject(f"store: cannot open the store directory: {exc.strerror}")
        try:
            manifest = self._read_manifest(root_fd, digest)
            dest_fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                created: list[str] = []
                try:
                    for name, part_digest, bound in (
                        (KERNEL_FILE, manifest.kernel, self.max_kernel_size),
                        (INITRD_FILE, manifest.initrd, self.max_initrd_size),
                    ):
                        self._copy_verified(root_fd, part_digest, bound, dest_fd, name, created)
                except BaseException:
                    for name in created:
                        _scrub_at(dest_fd, name)
                    raise
            finally:
                os.close(dest_fd)
        finally:
            os.close(root_fd)
        dest = Path(dest_dir)
        return PreparedImage(
            kernel=dest / KERNEL_FILE, initrd=dest / INITRD_FILE, cmdline=manifest.cmdline, digest=digest
        )

    def _read_manifest(self, root_fd: int, digest: bytes) -> Manifest:
        name = digest.hex()
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=root_fd)
        except FileNotFoundError:
            raise ImageError(ImageFailure.NOT_FOUND, f"store: no manifest blob {name}") from None
        except OSError as exc:
            _reject(f"store: cannot open manifest blob {name}: {exc.strerror}")
        try:
            size = _regular_size(fd, f"manifest blob {name}")
            if size > MAX_MANIFEST_SIZE:
                _reject(f"store: manifest blob {name} is larger than {MAX_MANIFEST_SIZE} bytes")
            data = bytearray()
            # Read one byte past the bound: a blob that grew after fstat is caught, not truncated.
            while len(data) <= MAX_MANIFEST_SIZE:
                chunk = _read(fd, MAX_MANIFEST_SIZE + 1 - len(data), f"manifest blob {name}")
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        if len(data) > MAX_MANIFEST_SIZE:
            _reject(f"store: manifest blob {name} is larger than {MAX_MANIFEST_SIZE} bytes")
        if not hmac.compare_digest(hashlib.sha256(data).digest(), digest):
            _reject(f"store: manifest blob {name} does not hash to its name")
        return parse_manifest(bytes(data))

    def _copy_verified(
        self, root_fd: int, digest: bytes, bound: int, dest_fd: int, dest_name: str, created: list[str]
    ) -> None:
        """Copy blob ``digest`` to ``dest_name`` while hashing the copied bytes; keep it only if they match.

        ``created`` gets ``dest_name`` as soon as the file exists, so the caller
        can scrub it whatever happens next.
        """
        name = digest.hex()
        label = f"{dest_name} blob {name}"
        try:
            src = os.open(name, _READ_FLAGS, dir_fd=root_fd)
        except OSError as exc:
            _reject(f"store: cannot open {label}: {exc.strerror}")
        try:
            if _regular_size(src, label) > bound:
                _reject(f"store: {label} is larger than {bound} bytes")
            dst = os.open(
                dest_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dest_fd
            )
            created.append(dest_name)
            try:
                hasher = hashlib.sha256()
                copied = 0
                while True:
                    # Never ask for more than one byte past the bound (see _read_manifest).
                    chunk = _read(src, min(_CHUNK, bound + 1 - copied), label)
                    if not chunk:
                        break
                    copied += len(chunk)
                    if copied > bound:
                        _reject(f"store: {label} grew past {bound} bytes while being read")
                    hasher.update(chunk)
                    _write_all(dst, chunk)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        if not hmac.compare_digest(hasher.digest(), digest):
            _reject(f"store: {label} does not hash to the digest in the manifest")


def _regular_size(fd: int, label: str) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        _reject(f"store: {label} is not a regular file")
    return info.st_size


def _read(fd: int, size: int, label: str) -> bytes:
    try:
        return os.read(fd, size)
    except OSError as exc:
        _reject(f"store: cannot read {label}: {exc.strerror}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _scrub_at(dir_fd: int, name: str) -> None:
    """Zero and unlink a file this module created; best effort, because it runs while unwinding."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode):
                zero_file(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------
# Publishing (dev tooling and tests)
# --------------------------------------------------------------------------------------------


def publish(
    root: Path, kernel: bytes | Path, initrd: bytes | Path, cmdline: str, private_key: Ed25519PrivateKey
) -> PublishedImage:
    """Write kernel, initrd and manifest blobs into the store and sign the image.

    ``kernel`` and ``initrd`` are the contents or paths to read them from.
    Every blob is written atomically (temporary file, fsync, rename, fsync of
    the directory), so a reader never sees a blob under its name that is not
    complete.  Publishing an image twice is harmless: same names, same bytes.
    """
    problem = _cmdline_problem(cmdline)
    if problem is not None:  # checked before any blob is written
        raise ValueError(problem)
    root = Path(root)
    kernel_digest = _store_blob(root, kernel)
    initrd_digest = _store_blob(root, initrd)
    digest = _store_blob(root, build_manifest(kernel_digest, initrd_digest, cmdline))
    return PublishedImage(digest=digest, signature=sign_image(digest, private_key))


def _store_blob(root: Path, content: bytes | Path) -> bytes:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".publish-")
    try:
        try:
            hasher = hashlib.sha256()
            if isinstance(content, bytes):
                hasher.update(content)
                _write_all(fd, content)
            else:
                with open(content, "rb") as source:
                    while chunk := source.read(_CHUNK):
                        hasher.update(chunk)
                        _write_all(fd, chunk)
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = hasher.digest()
        os.replace(tmp, root / digest.hex())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(root)
    return digest


# --------------------------------------------------------------------------------------------
# Key files
# --------------------------------------------------------------------------------------------


def _read_key_file(path: Path, *, private: bool) -> bytes:
    """Read a small regular key file without following symlinks; private ones must be 0600 or stricter."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise KeyFileError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if private and info.st_mode & 0o077:
            raise KeyFileError(f"{path} is accessible to group or others (chmod 600)")
        if info.st_size > _MAX_KEY_FILE_SIZE:
            raise KeyFileError(f"{path} is too large to be a key file")
        data = os.read(fd, _MAX_KEY_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"{path} is too large to be a key file")
    return data


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN ")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load the image-verification key: 32 raw bytes or a PEM SubjectPublicKeyInfo."""
    data = _read_key_file(path, private=False)
    if _is_pem(data):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise KeyFileError(f"{path} is not a valid PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} is not an Ed25519 public key")
        return key
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"{path} is neither PEM nor a raw {KEY_SIZE}-byte key")
    try:
        return Ed25519PublicKey.from_public_bytes(data)
    except ValueError:
        raise KeyFileError(f"{path} is not a valid Ed25519 public key") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the image-signing key: 32 raw bytes or an unencrypted PEM PKCS#8 key; mode 0600 or stricter."""
    data = _read_key_file(path, private=True)
    if _is_pem(data):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # TypeError: the key is encrypted.  The message never repeats key material.
            raise KeyFileError(f"{path} is not a valid unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} is not an Ed25519 private key")
        return key
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"{path} is neither PEM nor a raw {KEY_SIZE}-byte key")
    return Ed25519PrivateKey.from_private_bytes(data)


def generate_signing_key(path_private: Path, path_public: Path) -> Ed25519PublicKey:
    """Create a new image-signing key pair as PEM files (private 0600, public 0644); neither may exist."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create_file(path_private, private_pem, 0o600)
    try:
        _create_file(path_public, public_pem, 0o644)
    except BaseException:
        Path(path_private).unlink(missing_ok=True)
        raise
    return key.public_key()


def _create_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never reuse or truncate an existing file; the umask can only remove bits from ``mode``.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    os.close(fd)
