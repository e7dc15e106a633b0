"""Signing the chain head: the host's audit signing key and when to checkpoint (claims C3, C7, C16).

Theory of operation.  A checkpoint is an Ed25519 signature by the host's
audit signing key over the chain head (``chain.checkpoint_message``).  The
key is a second host key beside the X25519 identity key, because X25519 only
agrees keys and cannot sign; its public half is published as
``GetHostIdentityResponse.signing_public_key`` so auditors verify checkpoints
without trusting the log.  The private key lives in one file (PKCS#8 PEM,
mode 0600, created with O_EXCL so two starts cannot race to different keys)
and never leaves the controller.

:class:`CheckpointPolicy` says when the log writes a checkpoint: after
``every`` records or ``interval`` seconds, whichever comes first, and only if
records were appended since the last one.  These two numbers bound what can
be cut from the tail of the log unnoticed (see ``log.py``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from .chain import AuditError, key_id

MAX_KEY_FILE_BYTES = 4096


class SigningKeyError(AuditError):
    """The signing key file cannot be used; the message says why."""


class CheckpointSigner:
    """The host's audit signing key (implements ``chain.Signer``)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self.key_id = key_id(self._public_key)

    @classmethod
    def generate(cls) -> CheckpointSigner:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (RFC 8032), as GetHostIdentity publishes it."""
        return self._public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:  # never the key, only which key
        return f"CheckpointSigner(key_id={self.key_id.hex()[:16]}...)"


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """An auditor's view of the signing key: the 32 raw bytes of GetHostIdentityResponse.signing_public_key."""
    if len(raw) != 32:
        raise SigningKeyError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_or_create_signing_key(path: Path) -> CheckpointSigner:
    """The signing key at ``path``; created (mode 0600) when there is no file yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _load(path)
    except OSError as exc:
        raise SigningKeyError(f"cannot create {path}: {exc.strerror}") from None
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return CheckpointSigner(private_key)


def _load(path: Path) -> CheckpointSigner:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # ELOOP for a symlink, EACCES, ...
        raise SigningKeyError(f"cannot open {path}: {exc.strerror}") from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_mode & 0o077:
        os.close(fd)
        raise SigningKeyError(f"{path} must be a regular file of mode 0600 (found {status.st_mode:o})")
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        private_key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} does not hold an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(private_key).__name__}, not an Ed25519 key")
    return CheckpointSigner(private_key)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Checkpoint after ``every`` records or ``interval`` seconds, whichever comes first."""

    every: int = 1000
    interval: float = 10.0

    def __post_init__(self) -> None:
        if type(self.every) is not int or self.every < 1:
            raise ValueError("every must be a positive integer")
        if not self.interval > 0:
            raise ValueError("interval must be positive")

    def due(self, unsigned: int, elapsed: float) -> bool:
        """Whether to checkpoint now, ``unsigned`` records and ``elapsed`` seconds after the last checkpoint."""
        return unsigned >= self.every or (unsigned > 0 and elapsed >= self.interval)

    def wait(self, unsigned: int, elapsed: float) -> float | None:
        """Seconds until a checkpoint falls due with no further record, or None when none will."""
        if unsigned == 0:
            return None
        return max(0.0, self.interval - elapsed)
