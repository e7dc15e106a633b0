"""The host identity key pair (controller/identity.py; issue 4 §9, claim C8).

Everything here runs against real files in a temporary directory: creation on first start, persistence
across reloads, and every refusal (loose modes, symbolic links, wrong sizes, half identities), each
showing that the files on disk did not change.  Known-answer vectors: RFC 7748 §6.1 (X25519) and
RFC 8032 §7.1 test 1 (Ed25519); their fingerprints were computed with ``sha256sum``.
"""

from __future__ import annotations

import copy
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from controller.identity import (
    AUDIT_CHECKPOINT,
    HostIdentity,
    KeyFileError,
    default_signing_path,
    fingerprint_of,
    load_or_create,
    read_private_file,
    verify_signature,
)

RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC7748_FINGERPRINT = "300c9c9603b92a4b39ed3958bf9240114804db4fd373012c0ca47432d63425ae"
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_FINGERPRINT = "21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "host.x25519"


def write_key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def snapshot(directory: Path) -> dict[str, tuple[int, bytes | str]]:
    """Names, modes and contents (or link targets) of every entry: the state a refusal must not change."""
    result: dict[str, tuple[int, bytes | str]] = {}
    for entry in sorted(directory.iterdir()):
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            result[entry.name] = (info.st_mode, os.readlink(entry))
        elif stat.S_ISREG(info.st_mode):
            result[entry.name] = (info.st_mode, entry.read_bytes())
        else:
            result[entry.name] = (info.st_mode, "")
    return result


# -- first start and reload ------------------------------------------------------------------------------------


def test_first_start_creates_both_keys_as_0600_files_of_32_bytes(key_path: Path) -> None:
    identity = load_or_create(key_path)

    signing_path = key_path.with_name("host.ed25519")
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["host.ed25519", "host.x25519"]  # no temp left
    for path in (key_path, signing_path):
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == 32
    assert len(identity.public_bytes) == 32
    assert len(identity.signing_public_bytes) == 32
    assert identity.fingerprint == fingerprint_of(identity.public_bytes)
    assert len(identity.fingerprint) == 64 and int(identity.fingerprint, 16) >= 0
    assert identity.signing_fingerprint != identity.fingerprint


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o027])
def test_created_keys_are_0600_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        load_or_create(tmp_path / "host.x25519")
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}


def test_reload_returns_the_same_identity(key_path: Path) -> None:
    first = load_or_create(key_path)
    before = snapshot(key_path.parent)

    second = load_or_create(key_path)

    assert snapshot(key_path.parent) == before  # loading writes nothing
    assert second.public_bytes == first.public_bytes
    assert second.fingerprint == first.fingerprint
    assert second.signing_public_bytes == first.signing_public_bytes
    # The reloaded private keys are the same keys: the same shared secret and mutually verifiable signatures.
    sender = X25519PrivateKey.generate()
    assert second.exchange(sender.public_key()) == first.exchange(sender.public_key())
    assert sender.exchange(first.public_key) == first.exchange(sender.public_key())
    signature = second.sign(b"chain head", purpose=AUDIT_CHECKPOINT)
    verify_signature(first.signing_public_bytes, signature, b"chain head", purpose=AUDIT_CHECKPOINT)


def test_two_hosts_get_different_identities(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_or_create(tmp_path / "a" / "host.x25519")
    b = load_or_create(tmp_path / "b" / "host.x25519")
    assert a.public_bytes != b.public_bytes
    assert a.signing_public_bytes != b.signing_public_bytes


def test_known_answer_keys_load_to_the_rfc_public_keys_and_fingerprints(key_path: Path) -> None:
    write_key(key_path, RFC7748_PRIVATE)
    write_key(default_signing_path(key_path), RFC8032_SECRET)

    identity = load_or_create(key_path)

    assert identity.public_bytes == RFC7748_PUBLIC
    assert identity.fingerprint == RFC7748_FINGERPRINT
    assert identity.signing_public_bytes == RFC8032_PUBLIC
    assert identity.signing_fingerprint == RFC8032_FINGERPRINT


def test_an_explicit_signing_path_is_used(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path / "identity.key", tmp_path / "audit-signing.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-signing.key", "identity.key"]
    again = load_or_create(tmp_path / "identity.key", tmp_path / "audit-signing.key")
    assert again.signing_public_bytes == identity.signing_public_bytes


def test_default_signing_path() -> None:
    assert default_signing_path(Path("/state/host.x25519")) == Path("/state/host.ed25519")
    assert default_signing_path(Path("/state/host")) == Path("/state/host.ed25519")
    with pytest.raises(ValueError):
        default_signing_path(Path("/state/host.ed25519"))


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["x25519", "ed25519"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o610])
def test_a_private_key_file_with_loose_mode_is_refused(key_path: Path, which: str, mode: int) -> None:
    load_or_create(key_path)
    target = key_path if which == "x25519" else default_signing_path(key_path)
    target.chmod(mode)
    before = snapshot(key_path.parent)

    with pytest.raises(KeyFileError, match="mode") as caught:
        load_or_create(key_path)

    assert str(target) in str(caught.value)
    assert snapshot(key_path.parent) == before


def test_a_stricter_mode_is_accepted(key_path: Path) -> None:
    created = load_or_create(key_path)
    key_path.chmod(0o400)
    assert load_or_create(key_path).public_bytes == created.public_bytes


def test_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    load_or_create(real / "host.x25519")
    (tmp_path / "host.x25519").symlink_to(real / "host.x25519")
    (tmp_path / "host.ed25519").symlink_to(real / "host.ed25519")
    before = snapshot(tmp_path)

    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create(tmp_path / "host.x25519")

    assert snapshot(tmp_path) == before


def test_a_dangling_symbolic_link_is_not_replaced_by_a_new_key(tmp_path: Path) -> None:
    """A link to a missing file must not make the controller create a key at the link's target."""
    (tmp_path / "host.x25519").symlink_to(tmp_path / "target")
    (tmp_path / "host.ed25519").symlink_to(tmp_path / "target2")
    before = snapshot(tmp_path)

    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create(tmp_path / "host.x25519")

    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64, 4096])
def test_a_key_file_of_the_wrong_size_is_refused_without_showing_its_content(key_path: Path, size: int) -> None:
    load_or_create(key_path)
    # Distinctive fixed bytes: random ones that short can occur in the message (its path) by chance.
    content = (b"\xc3\x9f\xd7\x1b" * 1024)[:size]
    key_path.write_bytes(content)
    before = snapshot(key_path.parent)

    with pytest.raises(KeyFileError, match="wrong size") as caught:
        load_or_create(key_path)

    message = str(caught.value)
    assert str(key_path) in message
    if len(content) >= 4:
        assert content[:4].hex() not in message and repr(content[:4])[2:-1] not in message
    assert snapshot(key_path.parent) == before


def test_a_directory_or_fifo_in_place_of_a_key_is_refused(key_path: Path) -> None:
    load_or_create(key_path)
    key_path.unlink()
    os.mkfifo(key_path, 0o600)  # O_NONBLOCK: opening it must not hang the controller
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create(key_path)
    key_path.unlink()
    key_path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_or_create(key_path)


def test_a_key_file_owned_by_another_user_is_refused(key_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root; the check itself runs in every other test")
    load_or_create(key_path)
    os.chown(key_path, 65534, 65534)
    with pytest.raises(KeyFileError, match="not owned"):
        load_or_create(key_path)


@pytest.mark.parametrize("missing", ["x25519", "ed25519"])
def test_half_an_identity_is_refused_and_not_repaired(key_path: Path, missing: str) -> None:
    load_or_create(key_path)
    (key_path if missing == "x25519" else default_signing_path(key_path)).unlink()
    before = snapshot(key_path.parent)

    with pytest.raises(KeyFileError, match="missing"):
        load_or_create(key_path)

    assert snapshot(key_path.parent) == before


def test_a_missing_parent_directory_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_or_create(tmp_path / "absent" / "host.x25519")
    assert list(tmp_path.iterdir()) == []


def test_read_private_file_returns_a_wipeable_buffer(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k", b"s" * 32)
    data = read_private_file(path, size=32)
    assert isinstance(data, bytearray) and data == b"s" * 32
    with pytest.raises(KeyFileError, match="wrong size"):
        read_private_file(path, max_size=31)


# -- private keys stay private -----------------------------------------------------------------------------------


def test_no_public_attribute_or_repr_exposes_a_private_key(key_path: Path) -> None:
    write_key(key_path, RFC7748_PRIVATE)
    write_key(default_signing_path(key_path), RFC8032_SECRET)
    identity = load_or_create(key_path)

    values = [getattr(identity, name) for name in dir(identity) if not name.startswith("_")]
    exposed = [value for value in values if isinstance(value, bytes | bytearray | str)]
    assert exposed  # the scan sees the public bytes and fingerprints, so it could see a private key too
    for secret in (RFC7748_PRIVATE, RFC8032_SECRET):
        for value in [*exposed, repr(identity), str(identity)]:
            assert secret not in (value if isinstance(value, bytes | bytearray) else value.encode())
            assert secret.hex() not in (value.hex() if isinstance(value, bytes | bytearray) else value)


def test_an_identity_cannot_be_pickled_or_copied() -> None:
    identity = HostIdentity.generate()
    with pytest.raises(TypeError):
        pickle.dumps(identity)
    with pytest.raises(TypeError):
        copy.copy(identity)
    with pytest.raises(TypeError):
        copy.deepcopy(identity)


def test_the_constructor_takes_only_the_right_key_types() -> None:
    with pytest.raises(TypeError):
        HostIdentity(X25519PrivateKey.generate(), X25519PrivateKey.generate())  # type: ignore[arg-type]


# -- signatures and fingerprints -----------------------------------------------------------------------------------


def test_signatures_are_bound_to_purpose_message_and_key() -> None:
    identity = HostIdentity.generate()
    signature = identity.sign(b"seq=41 head=abc", purpose=AUDIT_CHECKPOINT)

    verify_signature(identity.signing_public_bytes, signature, b"seq=41 head=abc", purpose=AUDIT_CHECKPOINT)
    with pytest.raises(InvalidSignature):
        verify_signature(identity.signing_public_bytes, signature, b"seq=41 head=abd", purpose=AUDIT_CHECKPOINT)
    with pytest.raises(InvalidSignature):
        verify_signature(identity.signing_public_bytes, signature, b"seq=41 head=abc", purpose="host-attestation")
    with pytest.raises(InvalidSignature):
        other = HostIdentity.generate()
        verify_signature(other.signing_public_bytes, signature, b"seq=41 head=abc", purpose=AUDIT_CHECKPOINT)
    # Domain separation: the raw Ed25519 signature of the bare message is not what sign() produces.
    with pytest.raises(InvalidSignature):
        identity.signing_public_key.verify(signature, b"seq=41 head=abc")


@pytest.mark.parametrize("purpose", ["", "has space", "x" * 256, "ünicode", "nul\x00"])
def test_a_malformed_purpose_is_refused(purpose: str) -> None:
    with pytest.raises(ValueError):
        HostIdentity.generate().sign(b"m", purpose=purpose)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 31, b"\x00" * 33, "00" * 32])
def test_fingerprint_of_takes_exactly_32_raw_bytes(bad: object) -> None:
    with pytest.raises(ValueError):
        fingerprint_of(bad)  # type: ignore[arg-type]


def test_fingerprint_known_answers() -> None:
    assert fingerprint_of(RFC7748_PUBLIC) == RFC7748_FINGERPRINT
    assert fingerprint_of(RFC8032_PUBLIC) == RFC8032_FINGERPRINT
