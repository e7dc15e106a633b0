"""The audit checkpoint signer (the host identity's Ed25519 key) and the checkpoint policy (claims C3, C16)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from controller.audit.checkpoint import (
    CheckpointPolicy,
    CheckpointSigner,
    SigningKeyError,
    public_key_from_bytes,
)
from controller.identity import AUDIT_CHECKPOINT, HostIdentity, verify_signature


def test_the_host_signer_signs_with_the_host_identity_key_for_the_checkpoint_purpose() -> None:
    host = HostIdentity.generate()
    signer = CheckpointSigner.for_host(host)
    assert signer.public_bytes() == host.signing_public_bytes
    assert signer.key_id == hashlib.sha256(host.signing_public_bytes).digest()
    message = b"head"
    signature = signer.sign(message)
    verify_signature(host.signing_public_bytes, signature, message, purpose=AUDIT_CHECKPOINT)  # raises if not
    with pytest.raises(InvalidSignature):  # domain-separated: not a signature of the bare message
        public_key_from_bytes(signer.public_bytes()).verify(signature, message)
    with pytest.raises(InvalidSignature):  # nor one for another purpose
        verify_signature(host.signing_public_bytes, signature, message, purpose="other-purpose")


def test_a_host_signer_and_a_key_signer_make_the_same_signatures() -> None:
    private = Ed25519PrivateKey.generate()
    by_key = CheckpointSigner(private)
    host = HostIdentity(X25519PrivateKey.generate(), private)
    assert CheckpointSigner.for_host(host).sign(b"m") == by_key.sign(b"m")  # Ed25519 is deterministic


def test_the_repr_names_the_key_without_showing_it() -> None:
    private = Ed25519PrivateKey.generate()
    signer = CheckpointSigner(private)
    text = repr(signer)
    assert signer.key_id.hex()[:16] in text
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert raw.hex() not in text and raw.hex()[:16] not in text


def test_public_keys_must_be_32_bytes() -> None:
    with pytest.raises(SigningKeyError):
        public_key_from_bytes(b"\x00" * 31)
    signer = CheckpointSigner.generate()
    assert public_key_from_bytes(signer.public_bytes()) == signer.public_key


def test_the_policy_checkpoints_after_n_records_or_t_seconds() -> None:
    policy = CheckpointPolicy(every=10, interval=5.0)
    assert not policy.due(0, 1000.0)  # nothing to sign
    assert not policy.due(9, 4.9)
    assert policy.due(10, 0.0)
    assert policy.due(1, 5.0)
    assert policy.wait(0, 1.0) is None
    assert policy.wait(3, 1.0) == 4.0
    assert policy.wait(3, 9.0) == 0.0


@pytest.mark.parametrize(("every", "interval"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0)])
def test_the_policy_refuses_nonsense(every: int, interval: float) -> None:
    with pytest.raises(ValueError):
        CheckpointPolicy(every=every, interval=interval)
