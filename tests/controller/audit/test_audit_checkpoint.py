"""The audit signing key file and the checkpoint policy (claims C3, C16)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from controller.audit.checkpoint import (
    CheckpointPolicy,
    CheckpointSigner,
    SigningKeyError,
    load_or_create_signing_key,
    public_key_from_bytes,
)


def test_the_key_is_created_once_with_mode_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.pem"
    created = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_signing_key(path)
    assert again.public_bytes() == created.public_bytes()
    assert again.key_id == hashlib.sha256(created.public_bytes()).digest()
    message = b"head"
    public_key_from_bytes(created.public_bytes()).verify(again.sign(message), message)  # raises if not


def test_the_repr_names_the_key_without_showing_it(tmp_path: Path) -> None:
    signer = load_or_create_signing_key(tmp_path / "k.pem")
    pem = (tmp_path / "k.pem").read_text()
    text = repr(signer)
    assert signer.key_id.hex()[:16] in text
    assert not any(line in text for line in pem.splitlines()[1:-1])


@pytest.mark.parametrize("problem", ["mode", "symlink", "garbage", "not ed25519", "too large", "directory"])
def test_unusable_key_files_are_refused(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "k.pem"
    if problem == "mode":
        load_or_create_signing_key(path)
        path.chmod(0o640)
    elif problem == "symlink":
        load_or_create_signing_key(tmp_path / "real.pem")
        path.symlink_to(tmp_path / "real.pem")
    elif problem == "garbage":
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
        path.chmod(0o600)
    elif problem == "not ed25519":
        other = generate_private_key(SECP256R1())
        path.write_bytes(other.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        path.chmod(0o600)
    elif problem == "too large":
        path.write_bytes(b"x" * 10_000)
        path.chmod(0o600)
    else:
        path.mkdir()
    before = None if problem == "directory" else os.stat(path, follow_symlinks=False)
    with pytest.raises(SigningKeyError):
        load_or_create_signing_key(path)
    if before is not None:  # a refused key file is left as it was: never replaced by a new key
        after = os.stat(path, follow_symlinks=False)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                                     before.st_mtime_ns)


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
