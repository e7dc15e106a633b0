"""The host identity: the key pair that makes this controller *this* host (DESIGN.md claims C7, C8; issue 4 §9).

Theory of operation
-------------------
The host identity is a *pair* of key pairs, generated on first start and kept for the life of the host:

- an **X25519** key pair for key agreement.  The control plane wraps each volume data key to its public
  key (X25519 + HKDF-SHA256 + AES-256-GCM, the encrypted-volume flow), so only this controller can unwrap
  it (claim C8).  GetHostIdentity publishes the public key and its fingerprint.
- an **Ed25519** key pair for signatures.  X25519 is a Diffie-Hellman function and cannot sign, so the
  audit log's checkpoint records (issue 4 §5: the chain head signed by the host key, which makes a cut
  tail detectable) are signed with this second key.

Both public keys have a fingerprint: the lowercase hex SHA-256 of the 32 raw public-key bytes
(:func:`fingerprint_of`).  The envelope's associated data binds the X25519 fingerprint.

On disk each private key is its own file of exactly 32 raw bytes (the RFC 7748 / RFC 8032 private-key
encoding), by convention ``STATE/host.x25519`` and ``STATE/host.ed25519`` (:func:`default_signing_path`).

Invariants
----------
- A private key file is created only with ``O_CREAT | O_EXCL`` and mode 0600 (a temporary name, then a
  hard link to the final name, which also refuses to replace an existing file), so a reader never sees a
  half-written key and nothing is ever overwritten.
- A private key file is read only if it is a regular file (not a symbolic link: ``O_NOFOLLOW``), owned by
  the effective user, with no group or other permission bits, and exactly 32 bytes long.  The checks run
  on the open descriptor, so the file cannot be swapped between check and read.
- The X25519 file is written last on first start: its presence marks a complete identity.  One file without
  the other is refused rather than repaired, because a silently regenerated key would orphan every wrapped
  volume key (X25519) or every signed checkpoint (Ed25519).
- Private keys live in memory only as ``cryptography`` key objects.  No method returns private-key bytes,
  ``repr`` shows fingerprints only, and a :class:`HostIdentity` refuses to be pickled.  Error messages name
  the file and the reason, never its content.
- Signatures are domain-separated by a ``purpose`` string, so a signature made for one use (an audit
  checkpoint) can never be replayed as another.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

# One wipe for every secret buffer of the controller (key files here, unsealed data keys there).
from controller.envelope import wipe as _wipe
from hostagent.durable import fsync_directory as _fsync_directory

__all__ = [
    "AUDIT_CHECKPOINT",
    "KEY_SIZE",
    "HostIdentity",
    "KeyFileError",
    "create_private_file",
    "default_signing_path",
    "fingerprint_of",
    "load_or_create",
    "read_private_file",
    "signed_message",
    "verify_signature",
]

KEY_SIZE = 32
"""Raw size of an X25519 or Ed25519 private or public key (RFC 7748, RFC 8032)."""

AUDIT_CHECKPOINT = "audit-checkpoint"
"""The signature purpose of the audit log's checkpoint records (issue 4 §5)."""

SIGNING_SUFFIX = ".ed25519"
_SIGNATURE_DOMAIN = b"passivisor host signature v1\x00"
_PRIVATE_MODE = 0o600

_Key = TypeVar("_Key", X25519PrivateKey, Ed25519PrivateKey)


class KeyFileError(Exception):
    """A private key file is missing, unsafe or malformed.  The message names the file, never its content."""


def fingerprint_of(public_bytes: bytes) -> str:
    """Return the fingerprint of a raw 32-byte X25519 or Ed25519 public key: SHA-256, lowercase hex."""
    if type(public_bytes) is not bytes or len(public_bytes) != KEY_SIZE:
        raise ValueError(f"a public key is {KEY_SIZE} raw bytes")
    return hashlib.sha256(public_bytes).hexdigest()


def signed_message(purpose: str, message: bytes) -> bytes:
    """The exact bytes an Ed25519 signature for ``purpose`` covers (what :meth:`HostIdentity.sign` signs)."""
    # The purpose is length-prefixed so that no (purpose, message) pair can collide with another.
    encoded = purpose.encode("ascii")
    if not encoded or len(encoded) > 255 or not encoded.replace(b"-", b"").isalnum():
        raise ValueError("a signature purpose is 1 to 255 ASCII letters, digits and dashes")
    return _SIGNATURE_DOMAIN + bytes([len(encoded)]) + encoded + message


def verify_signature(signing_public_bytes: bytes, signature: bytes, message: bytes, *, purpose: str) -> None:
    """Verify a signature made by :meth:`HostIdentity.sign`; raise ``cryptography.exceptions.InvalidSignature``.

    Like ``cryptography``'s own verifiers this raises instead of returning a boolean, so a forgotten check
    cannot pass silently.
    """
    if type(signing_public_bytes) is not bytes or len(signing_public_bytes) != KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {KEY_SIZE} raw bytes")
    public_key = Ed25519PublicKey.from_public_bytes(signing_public_bytes)
    public_key.verify(signature, signed_message(purpose, message))


class HostIdentity:
    """The host's X25519 key-agreement key and Ed25519 signing key, held in memory only."""

    __slots__ = ("_agreement_key", "_public_bytes", "_signing_key", "_signing_public_bytes")

    def __init__(self, agreement_key: X25519PrivateKey, signing_key: Ed25519PrivateKey) -> None:
        if not isinstance(agreement_key, X25519PrivateKey) or not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError("a host identity is an X25519 private key and an Ed25519 private key")
        self._agreement_key = agreement_key
        self._signing_key = signing_key
        self._public_bytes = agreement_key.public_key().public_bytes_raw()
        self._signing_public_bytes = signing_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> HostIdentity:
        """A fresh identity that exists only in memory (tests; :func:`load_or_create` persists one)."""
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> X25519PublicKey:
        return self._agreement_key.public_key()

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte X25519 public key, as GetHostIdentity publishes it."""
        return self._public_bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of :attr:`public_bytes`, lowercase hex: the host fingerprint that envelopes bind."""
        return fingerprint_of(self._public_bytes)

    @property
    def signing_public_key(self) -> Ed25519PublicKey:
        return self._signing_key.public_key()

    @property
    def signing_public_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key that verifies audit checkpoints."""
        return self._signing_public_bytes

    @property
    def signing_fingerprint(self) -> str:
        return fingerprint_of(self._signing_public_bytes)

    def exchange(self, peer_public_key: X25519PublicKey) -> bytes:
        """X25519 key agreement with a sender's ephemeral public key (the envelope unwrap, claim C8).

        The result is a shared secret, not the private key; the caller derives a wrapping key from it with
        HKDF and must not keep it.  ``cryptography`` raises ``ValueError`` for a low-order peer point (an
        all-zero shared secret), which the caller reports as a malformed envelope.
        """
        return self._agreement_key.exchange(peer_public_key)

    def sign(self, message: bytes, *, purpose: str) -> bytes:
        """Sign ``message`` for ``purpose`` (for example :data:`AUDIT_CHECKPOINT`) with the Ed25519 key."""
        return self._signing_key.sign(signed_message(purpose, message))

    def __repr__(self) -> str:
        return f"HostIdentity(fingerprint={self.fingerprint!r}, signing_fingerprint={self.signing_fingerprint!r})"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # Pickling would serialize the private keys; refuse it so they cannot leak into a cache or a queue.
        raise TypeError("a HostIdentity holds private keys and cannot be pickled or copied")


def default_signing_path(path: Path) -> Path:
    """The Ed25519 key file beside the X25519 key file ``path``: ``host.x25519`` -> ``host.ed25519``."""
    signing_path = Path(path).with_suffix(SIGNING_SUFFIX)
    if signing_path == Path(path):
        raise ValueError(f"{path}: the X25519 key file must not end in {SIGNING_SUFFIX}")
    return signing_path


def load_or_create(path: Path, signing_path: Path | None = None) -> HostIdentity:
    """Load the host identity, or generate and persist it on first start.

    ``path`` is the X25519 private key file; ``signing_path`` the Ed25519 one (default
    :func:`default_signing_path`).  Neither existing: a new identity is generated and written (0600,
    ``O_EXCL``).  Both existing: they are loaded under the checks of :func:`read_private_file`.  Only one
    existing: :class:`KeyFileError`, see the module's invariants.  The parent directory must exist.
    """
    path = Path(path)
    signing_path = default_signing_path(path) if signing_path is None else Path(signing_path)
    if signing_path == path:
        raise ValueError("the X25519 and Ed25519 key files must differ")
    have_agreement, have_signing = os.path.lexists(path), os.path.lexists(signing_path)
    if not have_agreement and not have_signing:
        return _create(path, signing_path)
    if not have_agreement:
        raise KeyFileError(
            f"{path} is missing but {signing_path} exists; refusing to create a new identity beside an old key"
        )
    if not have_signing:
        raise KeyFileError(f"{signing_path} is missing but {path} exists; refusing to replace a signing key")
    return HostIdentity(
        _with_private_bytes(path, X25519PrivateKey.from_private_bytes),
        _with_private_bytes(signing_path, Ed25519PrivateKey.from_private_bytes),
    )


def _with_private_bytes(path: Path, build: Callable[[bytes], _Key]) -> _Key:
    data = read_private_file(path, size=KEY_SIZE)
    try:
        return build(bytes(data))
    finally:
        _wipe(data)


def _create(path: Path, signing_path: Path) -> HostIdentity:
    identity = HostIdentity.generate()
    # The signing key first and the X25519 key last: a crash in between leaves "X25519 missing", which
    # load_or_create refuses loudly instead of publishing an identity whose signing key changes later.
    _install_private_key(signing_path, identity._signing_key.private_bytes_raw())
    _install_private_key(path, identity._agreement_key.private_bytes_raw())
    return identity


def _install_private_key(path: Path, data: bytes) -> None:
    """Write ``data`` to a new 0600 file under a temporary name, then hard-link it to ``path``.

    ``link`` fails if ``path`` exists, so an existing key is never replaced, and ``path`` appears only once
    its content is complete and on disk.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    create_private_file(temporary, data)
    try:
        try:
            os.link(temporary, path, follow_symlinks=False)
        except FileExistsError:
            raise KeyFileError(f"{path} appeared while the host identity was being created") from None
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def create_private_file(path: Path, data: bytes | bytearray, *, dir_fd: int | None = None) -> None:
    """Create a new file of mode 0600 holding ``data``: ``O_EXCL`` (never reuse or truncate), ``O_NOFOLLOW``.

    With ``dir_fd``, ``path`` is relative to that directory descriptor.  On any failure the file is removed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, _PRIVATE_MODE, dir_fd=dir_fd)
    try:
        os.fchmod(fd, _PRIVATE_MODE)  # the umask can only have removed bits; make the mode exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path, dir_fd=dir_fd)
        raise
    os.close(fd)


def read_private_file(path: Path, *, size: int | None = None, max_size: int = 64 * 1024) -> bytearray:
    """Read a secret file after checking it through its open descriptor; the caller wipes the result.

    Refused (:class:`KeyFileError`): a symbolic link, anything but a regular file, a file not owned by the
    effective user, any group or other permission bit, a size other than ``size`` (when given) or above
    ``max_size``.  The result is a ``bytearray`` so that the caller can overwrite it after use.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO cannot block
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"{path} is a symbolic link; refusing to follow it") from None
        raise KeyFileError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyFileError(f"{path} is not owned by the user running the controller")
        if info.st_mode & 0o077:
            raise KeyFileError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; a private key must be 0600")
        limit = max_size if size is None else size
        if (size is not None and info.st_size != size) or info.st_size > limit:
            expected = f"exactly {size} bytes" if size is not None else f"at most {max_size} bytes"
            raise KeyFileError(f"{path} has the wrong size; expected {expected}")
        data = bytearray(limit + 1)  # one spare byte detects a file that grew after fstat
        length = 0
        while length < len(data):
            count = os.readv(fd, [memoryview(data)[length:]])
            if count == 0:
                break
            length += count
    finally:
        os.close(fd)
    if length > limit or (size is not None and length != size):
        _wipe(data)
        raise KeyFileError(f"{path} changed size while it was read")
    result = data[:length]
    _wipe(data)
    return result
