"""Signing the chain head: the host's signing key and when to checkpoint (claims C3, C7, C16).

Theory of operation.  A checkpoint is an Ed25519 signature by the host's
signing key over the chain head (``chain.checkpoint_message``), made for the
purpose ``identity.AUDIT_CHECKPOINT`` so that no other use of the key can
produce a valid checkpoint.  The key is the Ed25519 half of the host identity
(``controller/identity.py``: one identity, two key pairs, because X25519 only
agrees keys and cannot sign); its public half is published as
``GetHostIdentityResponse.signing_public_key`` so auditors verify checkpoints
without trusting the log.  The private key never leaves the host identity:
:meth:`CheckpointSigner.for_host` signs through it.

:class:`CheckpointPolicy` says when the log writes a checkpoint: after
``every`` records or ``interval`` seconds, whichever comes first, and only if
records were appended since the last one.  These two numbers bound what can
be cut from the tail of the log unnoticed (see ``log.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from controller.identity import AUDIT_CHECKPOINT, HostIdentity, signed_message

from .chain import AuditError, key_id


class SigningKeyError(AuditError):
    """A published signing key cannot be used; the message says why."""


class CheckpointSigner:
    """The host's audit signing key (implements ``chain.Signer``)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._sign: Callable[[bytes], bytes] = lambda message: private_key.sign(
            signed_message(AUDIT_CHECKPOINT, message))
        self._public_key = private_key.public_key()
        self.key_id = key_id(self._public_key)

    @classmethod
    def generate(cls) -> CheckpointSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def for_host(cls, host: HostIdentity) -> CheckpointSigner:
        """The signer of a host identity: signs with its Ed25519 key, which stays inside ``host``."""
        signer = cls.__new__(cls)
        signer._sign = lambda message: host.sign(message, purpose=AUDIT_CHECKPOINT)
        signer._public_key = host.signing_public_key
        signer.key_id = key_id(signer._public_key)
        return signer

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (RFC 8032), as GetHostIdentity publishes it."""
        return self._public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._sign(message)

    def __repr__(self) -> str:  # never the key, only which key
        return f"CheckpointSigner(key_id={self.key_id.hex()[:16]}...)"


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """An auditor's view of the signing key: the 32 raw bytes of GetHostIdentityResponse.signing_public_key."""
    if len(raw) != 32:
        raise SigningKeyError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


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
