"""Trusted images: signature and hash checked before every boot (claim C14), scrubbing (claim C12).

Every rejection test asserts three things: the reason is REJECTED (or
NOT_FOUND), the message is the one undifferentiated string, and the
destination directory is exactly as it was before the call.  Where the
failed check matters, the test also pins ``detail`` so it cannot pass for the
wrong reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from hostagent.images import (
    DIGEST_SIZE,
    INITRD_FILE,
    KERNEL_FILE,
    MANIFEST_FORMAT,
    MAX_CMDLINE_LENGTH,
    MAX_MANIFEST_SIZE,
    SIGNATURE_CONTEXT,
    SIGNATURE_SIZE,
    ImageError,
    ImageFailure,
    ImageStore,
    KeyFileError,
    Manifest,
    PreparedImage,
    PublishedImage,
    build_manifest,
    generate_signing_key,
    is_blob_name,
    load_private_key,
    load_public_key,
    parse_manifest,
    publish,
    sign_image,
    verify_image_signature,
)
from hostagent.scrub import scrub_file
from hostagent.wire import messages

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KERNEL = b"\x7fKERNEL" + bytes(range(256)) * 40
INITRD = b"\x1f\x8bINITRD" + bytes(range(255, -1, -1)) * 30
CMDLINE = "console=ttyS0 panic=-1 quiet"

Snapshot = dict[str, tuple[bytes, int]]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def manifest_obj(**overrides: object) -> dict[str, object]:
    obj: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "kernel": sha(KERNEL).hex(),
        "initrd": sha(INITRD).hex(),
        "cmdline": CMDLINE,
    }
    obj.update(overrides)
    return obj


def snapshot(directory: Path) -> Snapshot:
    """Name -> (content, mode) of every entry, symlinks not followed."""
    result: Snapshot = {}
    for entry in sorted(directory.iterdir()):
        info = entry.lstat()
        content = os.readlink(entry).encode() if stat.S_ISLNK(info.st_mode) else entry.read_bytes()
        result[entry.name] = (content, info.st_mode)
    return result


class Store:
    """A store directory with an image published in it, a verifier, and a destination directory."""

    def __init__(self, base: Path, **limits: int) -> None:
        self.root = base / "store"
        self.dest = base / "dest"
        self.root.mkdir()
        self.dest.mkdir()
        self.image = publish(self.root, KERNEL, INITRD, CMDLINE, KEY)
        self.verifier = ImageStore(self.root, KEY.public_key(), **limits)

    def blob(self, data_or_digest: bytes) -> Path:
        digest = data_or_digest if len(data_or_digest) == DIGEST_SIZE else sha(data_or_digest)
        return self.root / digest.hex()

    @property
    def manifest(self) -> Path:
        return self.root / self.image.digest.hex()

    def put_manifest(self, data: bytes, key: Ed25519PrivateKey = KEY) -> PublishedImage:
        """Store arbitrary manifest bytes under their hash and sign them, as a careless signer would."""
        digest = sha(data)
        (self.root / digest.hex()).write_bytes(data)
        return PublishedImage(digest, sign_image(digest, key))

    def prepare(self, image: PublishedImage | None = None, dest: Path | None = None) -> PreparedImage:
        image = image or self.image
        return self.verifier.prepare(image.digest, image.signature, dest or self.dest)

    def reject(
        self,
        image: PublishedImage | None = None,
        *,
        reason: ImageFailure = ImageFailure.REJECTED,
        detail: str | None = None,
        dest: Path | None = None,
    ) -> ImageError:
        dest = dest or self.dest
        before = snapshot(dest)
        with pytest.raises(ImageError) as info:
            self.prepare(image, dest)
        assert info.value.reason is reason
        assert str(info.value) == ("image rejected" if reason is ImageFailure.REJECTED else "image not found")
        if detail is not None:
            assert detail in info.value.detail
        assert snapshot(dest) == before
        return info.value


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


@pytest.fixture
def read_counter(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Callable[[], int]]:
    """Count the bytes os.read returns from descriptors open on the inode of a given file."""
    real_read, real_fstat = os.read, os.fstat
    watched: dict[int, int] = {}

    def counting_read(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        ino = real_fstat(fd).st_ino
        if ino in watched:
            watched[ino] += len(data)
        return data

    monkeypatch.setattr(os, "read", counting_read)

    def watch(path: Path) -> Callable[[], int]:
        ino = path.stat().st_ino
        watched[ino] = 0
        return lambda: watched[ino]

    return watch


# --------------------------------------------------------------------------------------------
# The happy path
# --------------------------------------------------------------------------------------------


def test_publish_then_prepare_copies_exactly_the_signed_bytes(store: Store) -> None:
    prepared = store.prepare()
    assert prepared == PreparedImage(
        kernel=store.dest / KERNEL_FILE, initrd=store.dest / INITRD_FILE, cmdline=CMDLINE, digest=store.image.digest
    )
    assert prepared.kernel.read_bytes() == KERNEL
    assert prepared.initrd.read_bytes() == INITRD
    for path in (prepared.kernel, prepared.initrd):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert sorted(os.listdir(store.dest)) == sorted([KERNEL_FILE, INITRD_FILE])


def test_the_digest_is_the_hash_of_the_canonical_manifest_and_the_signature_is_domain_separated(store: Store) -> None:
    expected = canonical(manifest_obj())
    assert store.image.digest == sha(expected)
    assert store.manifest.read_bytes() == expected
    KEY.public_key().verify(store.image.signature, SIGNATURE_CONTEXT + store.image.digest)


def test_publish_writes_only_content_addressed_blobs_and_is_idempotent(store: Store) -> None:
    names = sorted(os.listdir(store.root))
    assert names == sorted({sha(KERNEL).hex(), sha(INITRD).hex(), store.image.digest.hex()})
    assert all(is_blob_name(name) for name in names)  # no temporary file left behind
    again = publish(store.root, KERNEL, INITRD, CMDLINE, KEY)
    assert again.digest == store.image.digest
    assert sorted(os.listdir(store.root)) == names


def test_publish_reads_kernel_and_initrd_from_paths(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (tmp_path / "vmlinuz").write_bytes(KERNEL)
    (tmp_path / "initrd.img").write_bytes(INITRD)
    image = publish(root, tmp_path / "vmlinuz", tmp_path / "initrd.img", CMDLINE, KEY)
    assert image.digest == sha(canonical(manifest_obj()))
    assert (root / sha(KERNEL).hex()).read_bytes() == KERNEL


def test_publish_refuses_a_bad_cmdline_before_writing_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        publish(tmp_path, KERNEL, INITRD, "console=ttyS0\n", KEY)
    assert os.listdir(tmp_path) == []


def test_a_kernel_larger_than_one_chunk_round_trips_and_a_flip_in_its_last_chunk_is_caught(tmp_path: Path) -> None:
    big = os.urandom(2 * 1024 * 1024 + 12345)
    root, dest = tmp_path / "store", tmp_path / "dest"
    root.mkdir()
    dest.mkdir()
    image = publish(root, big, INITRD, CMDLINE, KEY)
    verifier = ImageStore(root, KEY.public_key())
    assert verifier.prepare(image.digest, image.signature, dest).kernel.read_bytes() == big
    flipped = bytearray(big)
    flipped[-1] ^= 1
    (root / sha(big).hex()).write_bytes(bytes(flipped))
    (tmp_path / "dest2").mkdir()
    with pytest.raises(ImageError):
        verifier.prepare(image.digest, image.signature, tmp_path / "dest2")
    assert os.listdir(tmp_path / "dest2") == []


def test_a_blob_exactly_at_the_bound_is_accepted(tmp_path: Path) -> None:
    store = Store(tmp_path, max_kernel_size=len(KERNEL), max_initrd_size=len(INITRD))
    assert store.prepare().kernel.read_bytes() == KERNEL


# --------------------------------------------------------------------------------------------
# Verified on every launch (C14)
# --------------------------------------------------------------------------------------------


def test_every_prepare_rehashes_a_kernel_tampered_after_a_successful_launch(store: Store, tmp_path: Path) -> None:
    store.prepare()
    kernel_blob = store.blob(KERNEL)
    kernel_blob.write_bytes(KERNEL[:-1] + b"X")
    second = tmp_path / "second"
    second.mkdir()
    store.reject(dest=second, detail="kernel blob")
    assert os.listdir(second) == []
    # Repairing the blob makes the image bootable again: no result, good or bad, is cached.
    kernel_blob.write_bytes(KERNEL)
    third = tmp_path / "third"
    third.mkdir()
    assert store.prepare(dest=third).kernel.read_bytes() == KERNEL


@pytest.mark.parametrize("part", ["manifest", "kernel", "initrd"])
@pytest.mark.parametrize("change", ["flip", "truncate", "extend", "empty"])
def test_a_changed_blob_is_rejected(store: Store, part: str, change: str) -> None:
    path = {"manifest": store.manifest, "kernel": store.blob(KERNEL), "initrd": store.blob(INITRD)}[part]
    data = path.read_bytes()
    changed = {
        "flip": data[:7] + bytes([data[7] ^ 0x20]) + data[8:],
        "truncate": data[:-1],
        "extend": data + b"\x00",
        "empty": b"",
    }[change]
    path.write_bytes(changed)
    error = store.reject(detail="does not hash to")
    assert (part == "manifest") == ("manifest blob" in error.detail)


def test_a_missing_kernel_or_initrd_is_rejected_and_the_kernel_copy_is_removed(store: Store) -> None:
    store.blob(INITRD).unlink()
    store.reject(detail="initrd blob")
    store.blob(KERNEL).unlink()
    store.reject(detail="kernel blob")


def test_a_partial_copy_is_zeroed_before_it_is_unlinked(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.blob(INITRD).write_bytes(INITRD + b"!")
    seen: dict[str, bytes] = {}
    real_unlink = os.unlink

    def spying_unlink(path: str, *, dir_fd: int | None = None) -> None:
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
        try:
            seen[path] = os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", spying_unlink)
    store.reject(detail="initrd blob")
    # Both the verified kernel copy and the mismatching initrd copy were zeroed, at their full length.
    assert seen == {KERNEL_FILE: bytes(len(KERNEL)), INITRD_FILE: bytes(len(INITRD) + 1)}


# --------------------------------------------------------------------------------------------
# Signatures: checked first, and indistinguishable from tampering to the peer
# --------------------------------------------------------------------------------------------


def test_a_signature_by_another_key_is_rejected(store: Store) -> None:
    store.reject(PublishedImage(store.image.digest, sign_image(store.image.digest, OTHER_KEY)), detail="signature")


def test_a_signature_over_another_digest_is_rejected(store: Store) -> None:
    other = publish(store.root, KERNEL, INITRD, "console=hvc0", KEY)
    store.reject(PublishedImage(store.image.digest, other.signature), detail="signature")


def test_a_signature_over_the_bare_digest_without_the_context_is_rejected(store: Store) -> None:
    store.reject(PublishedImage(store.image.digest, KEY.sign(store.image.digest)), detail="signature")


@pytest.mark.parametrize(
    ("digest_len", "signature_len"), [(31, SIGNATURE_SIZE), (33, SIGNATURE_SIZE), (32, 63), (32, 65), (0, 0)]
)
def test_wrong_sizes_are_rejected(store: Store, digest_len: int, signature_len: int) -> None:
    digest = (store.image.digest * 2)[:digest_len]
    signature = (store.image.signature * 2)[:signature_len]
    store.reject(PublishedImage(digest, signature), detail="signature")


def test_a_bad_signature_and_a_tampered_blob_look_the_same_to_the_peer(store: Store) -> None:
    bad_signature = store.reject(PublishedImage(store.image.digest, bytes(SIGNATURE_SIZE)))
    store.blob(KERNEL).write_bytes(b"evil")
    tampered = store.reject()
    assert bad_signature.args == tampered.args == ("image rejected",)
    assert bad_signature.detail != tampered.detail
    for error in (bad_signature, tampered):
        assert "KERNEL" not in error.detail and "evil" not in error.detail  # never file contents


def test_an_unsigned_request_touches_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    real_open = os.open

    def spying_open(path: object, *args: object, **kwargs: object) -> int:
        opened.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    verifier = ImageStore(tmp_path / "no-such-store", KEY.public_key())
    monkeypatch.setattr(os, "open", spying_open)
    with pytest.raises(ImageError) as info:
        verifier.prepare(bytes(32), bytes(64), tmp_path / "no-such-dest")
    assert info.value.reason is ImageFailure.REJECTED and "signature" in info.value.detail
    assert opened == []


def test_an_unknown_digest_is_not_found_only_when_signed(store: Store) -> None:
    unknown = sha(b"no such manifest")
    store.reject(PublishedImage(unknown, sign_image(unknown, KEY)), reason=ImageFailure.NOT_FOUND)
    # Unsigned, the same digest is just rejected: no existence oracle without the signing key.
    store.reject(PublishedImage(unknown, sign_image(unknown, OTHER_KEY)), detail="signature")


def test_verify_image_signature_raises_and_returns_nothing() -> None:
    digest = sha(b"x")
    verify_image_signature(KEY.public_key(), digest, sign_image(digest, KEY))  # no boolean to forget to check
    with pytest.raises(ImageError):
        verify_image_signature(OTHER_KEY.public_key(), digest, sign_image(digest, KEY))


def test_the_store_refuses_a_key_that_is_not_ed25519(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        ImageStore(tmp_path, KEY)  # type: ignore[arg-type]


def test_sizes_agree_with_the_wire_format() -> None:
    assert DIGEST_SIZE == messages.DIGEST_SIZE
    assert SIGNATURE_SIZE == messages.SIGNATURE_SIZE


# --------------------------------------------------------------------------------------------
# The manifest grammar
# --------------------------------------------------------------------------------------------

_K, _I = sha(KERNEL).hex(), sha(INITRD).hex()
_GOOD = canonical(manifest_obj())

BAD_MANIFESTS: dict[str, tuple[bytes, str]] = {
    "spaces": (json.dumps(manifest_obj(), sort_keys=True).encode(), "canonical"),
    "key order": (json.dumps(manifest_obj(), separators=(",", ":")).encode(), "canonical"),
    "trailing newline": (_GOOD + b"\n", "canonical"),
    "leading space": (b" " + _GOOD, "canonical"),
    "utf-8 bom": (b"\xef\xbb\xbf" + _GOOD, "JSON"),
    "raw non-ascii cmdline": (_GOOD.replace(CMDLINE.encode(), "consol\u00e9".encode()), "cmdline"),
    "escaped ascii letter": (_GOOD.replace(b"console", b"\\u0063onsole"), "canonical"),
    "duplicate key": (_GOOD[:-1] + b',"cmdline":"x"}', "twice"),
    "duplicate identical key": (_GOOD[:-1] + b',"format":"' + MANIFEST_FORMAT.encode() + b'"}', "twice"),
    "extra key": (canonical(manifest_obj(extra="1")), "exactly the keys"),
    "missing key": (canonical({k: v for k, v in manifest_obj().items() if k != "initrd"}), "exactly the keys"),
    "not an object": (canonical([manifest_obj()]), "exactly the keys"),
    "number value": (canonical(manifest_obj(cmdline=1)), "not a string"),
    "null value": (canonical(manifest_obj(initrd=None)), "not a string"),
    "list value": (canonical(manifest_obj(kernel=[_K])), "not a string"),
    "nan": (_GOOD[:-1] + b',"x":NaN}', "JSON"),
    "wrong format": (canonical(manifest_obj(format="passivisor-image/v2")), "format"),
    "uppercase hex": (canonical(manifest_obj(kernel=_K.upper())), "kernel is not 64"),
    "63 hex": (canonical(manifest_obj(initrd=_I[:-1])), "initrd is not 64"),
    "65 hex": (canonical(manifest_obj(initrd=_I + "0")), "initrd is not 64"),
    "hex with newline": (canonical(manifest_obj(kernel=_K + "\n")), "kernel is not 64"),
    "path traversal": (canonical(manifest_obj(kernel="../" + _K[3:])), "kernel is not 64"),
    "empty cmdline": (canonical(manifest_obj(cmdline="")), "cmdline"),
    "cmdline too long": (canonical(manifest_obj(cmdline="a" * (MAX_CMDLINE_LENGTH + 1))), "cmdline"),
    "cmdline newline": (canonical(manifest_obj(cmdline="quiet\ninit=/bin/sh")), "cmdline"),
    "cmdline tab": (canonical(manifest_obj(cmdline="quiet\tx")), "cmdline"),
    "cmdline nul": (canonical(manifest_obj(cmdline="quiet\x00x")), "cmdline"),
    "cmdline del": (canonical(manifest_obj(cmdline="quiet\x7f")), "cmdline"),
    "cmdline non-ascii": (canonical(manifest_obj(cmdline="consol\u00e9")), "cmdline"),
    "invalid utf-8": (_GOOD.replace(b"quiet", b"qu\xffet"), "JSON"),
    "not json": (b"format=passivisor-image/v1", "JSON"),
    "empty": (b"", "JSON"),
    "deeply nested": (b"[" * 2000 + b"]" * 2000, ""),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_a_signed_but_malformed_manifest_is_rejected(store: Store, name: str) -> None:
    data, detail = BAD_MANIFESTS[name]
    assert len(data) <= MAX_MANIFEST_SIZE
    error = store.reject(store.put_manifest(data), detail=detail)
    assert error.detail.startswith("manifest: ")  # the blob hashed to its signed digest; parsing refused it
    with pytest.raises(ImageError) as info:
        parse_manifest(data)
    assert detail in info.value.detail


@pytest.mark.parametrize("cmdline", ["a", "a" * MAX_CMDLINE_LENGTH, 'root="x y" \\ ~ !#$%&()*+,-./:;<=>?@[]^_`{|}'])
def test_edge_cmdlines_are_accepted(store: Store, cmdline: str) -> None:
    image = publish(store.root, KERNEL, INITRD, cmdline, KEY)
    assert store.prepare(image).cmdline == cmdline


def test_an_oversized_manifest_is_refused_before_it_is_read(
    store: Store, read_counter: Callable[[Path], Callable[[], int]]
) -> None:
    data = canonical(manifest_obj(pad="x" * MAX_MANIFEST_SIZE))
    image = store.put_manifest(data)
    count = read_counter(store.root / image.digest.hex())
    store.reject(image, detail="larger than")
    assert count() == 0
    with pytest.raises(ImageError):
        parse_manifest(data)


def test_build_manifest_refuses_what_the_parser_refuses() -> None:
    for bad in ("", "a\n", "\u00e9", "a" * (MAX_CMDLINE_LENGTH + 1)):
        with pytest.raises(ValueError):
            build_manifest(sha(KERNEL), sha(INITRD), bad)
    with pytest.raises(ValueError):
        build_manifest(sha(KERNEL)[:31], sha(INITRD), CMDLINE)


def test_a_blob_named_in_uppercase_is_never_found(store: Store) -> None:
    kernel_blob = store.blob(KERNEL)
    kernel_blob.rename(store.root / kernel_blob.name.upper())
    store.reject(detail="kernel blob")


# --------------------------------------------------------------------------------------------
# The file system: symlinks, special files, bounds, the destination
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["manifest", "kernel"])
def test_a_symlinked_blob_is_refused_even_when_its_target_is_correct(store: Store, tmp_path: Path, part: str) -> None:
    path = store.manifest if part == "manifest" else store.blob(KERNEL)
    elsewhere = tmp_path / "elsewhere"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    store.reject(detail="cannot open")  # REJECTED, not NOT_FOUND, for the manifest too


def test_a_fifo_or_directory_in_place_of_a_blob_is_refused_without_blocking(store: Store) -> None:
    store.blob(INITRD).unlink()
    os.mkfifo(store.blob(INITRD))
    store.reject(detail="not a regular file")
    store.manifest.unlink()
    store.manifest.mkdir()
    store.reject(detail="not a regular file")


@pytest.mark.parametrize("part", ["kernel", "initrd"])
def test_an_oversized_blob_is_refused_before_it_is_read(
    tmp_path: Path, read_counter: Callable[[Path], Callable[[], int]], part: str
) -> None:
    store = Store(
        tmp_path,
        max_kernel_size=len(KERNEL) - 1 if part == "kernel" else len(KERNEL),
        max_initrd_size=len(INITRD) - 1 if part == "initrd" else len(INITRD),
    )
    count = read_counter(store.blob(KERNEL if part == "kernel" else INITRD))
    store.reject(detail=f"{part} blob")
    assert count() == 0


def test_a_blob_that_grows_after_the_size_check_is_cut_off_at_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_counter: Callable[[Path], Callable[[], int]]
) -> None:
    """fstat says the kernel is small (as if it grew afterwards); reading still stops one byte past the bound."""
    bound = 1000
    store = Store(tmp_path, max_kernel_size=bound)
    kernel_ino = store.blob(KERNEL).stat().st_ino
    real_fstat = os.fstat

    def lying_fstat(fd: int) -> os.stat_result:
        info = real_fstat(fd)
        if info.st_ino != kernel_ino:
            return info
        fields = list(info[:10])
        fields[stat.ST_SIZE] = 10
        return os.stat_result(fields)

    count = read_counter(store.blob(KERNEL))
    monkeypatch.setattr(os, "fstat", lying_fstat)
    store.reject(detail="grew past")
    assert count() == bound + 1


def test_an_existing_kernel_file_in_dest_is_refused_and_left_untouched(store: Store) -> None:
    (store.dest / KERNEL_FILE).write_bytes(b"someone else's file")
    before = snapshot(store.dest)
    with pytest.raises(FileExistsError):
        store.prepare()
    assert snapshot(store.dest) == before


def test_an_existing_initrd_file_in_dest_is_refused_and_the_kernel_copy_removed(store: Store) -> None:
    (store.dest / INITRD_FILE).write_bytes(b"someone else's file")
    before = snapshot(store.dest)
    with pytest.raises(FileExistsError):
        store.prepare()
    assert snapshot(store.dest) == before


def test_a_symlink_in_dest_is_not_followed(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (store.dest / KERNEL_FILE).symlink_to(target)
    before = snapshot(store.dest)
    with pytest.raises(FileExistsError):
        store.prepare()
    assert snapshot(store.dest) == before
    assert target.read_bytes() == b"precious"


def test_a_missing_dest_dir_is_a_host_fault_not_an_image_rejection(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.prepare(dest=tmp_path / "missing")


def test_a_second_prepare_into_the_same_dest_leaves_the_first_copies_intact(store: Store) -> None:
    store.prepare()
    before = snapshot(store.dest)
    with pytest.raises(FileExistsError):
        store.prepare()
    assert snapshot(store.dest) == before


# --------------------------------------------------------------------------------------------
# Scrubbing (C12)
# --------------------------------------------------------------------------------------------


def test_scrub_file_zeroes_the_data_then_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "kernel"
    path.write_bytes(KERNEL)
    witness = tmp_path / "witness"
    os.link(path, witness)  # a second name for the same inode sees what scrubbing wrote
    scrub_file(path)
    assert not path.exists()
    assert witness.read_bytes() == bytes(len(KERNEL))


def test_scrub_file_refuses_symlinks_and_special_files(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError):
        scrub_file(link)
    assert target.read_bytes() == b"precious" and link.is_symlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        scrub_file(fifo)
    assert fifo.exists()


def test_scrub_file_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scrub_file(tmp_path / "gone")
    scrub_file(tmp_path / "gone", missing_ok=True)


def test_scrub_the_prepared_copies(store: Store) -> None:
    prepared = store.prepare()
    scrub_file(prepared.kernel)
    scrub_file(prepared.initrd)
    assert os.listdir(store.dest) == []


# --------------------------------------------------------------------------------------------
# Key files
# --------------------------------------------------------------------------------------------


def test_generated_keys_load_back_and_sign_verifiable_images(store: Store, tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "image.key", tmp_path / "image.pub"
    public = generate_signing_key(private_path, public_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) & 0o022 == 0
    private = load_private_key(private_path)
    assert load_public_key(public_path).public_bytes_raw() == public.public_bytes_raw()
    image = publish(store.root, KERNEL, INITRD, CMDLINE, private)
    verifier = ImageStore(store.root, load_public_key(public_path))
    assert verifier.prepare(image.digest, image.signature, store.dest).cmdline == CMDLINE


def test_generate_signing_key_never_overwrites(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "image.key", tmp_path / "image.pub"
    private_path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        generate_signing_key(private_path, public_path)
    assert private_path.read_bytes() == b"old" and not public_path.exists()
    private_path.unlink()
    public_path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        generate_signing_key(private_path, public_path)
    assert public_path.read_bytes() == b"old" and not private_path.exists()  # no orphan private key


def write_key(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_raw_32_byte_keys_load(tmp_path: Path) -> None:
    private = load_private_key(write_key(tmp_path / "k", KEY.private_bytes_raw(), 0o600))
    public = load_public_key(write_key(tmp_path / "p", KEY.public_key().public_bytes_raw(), 0o644))
    assert private.private_bytes_raw() == KEY.private_bytes_raw()
    assert public.public_bytes_raw() == KEY.public_key().public_bytes_raw()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700 | 0o007])
def test_a_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(write_key(tmp_path / "k", KEY.private_bytes_raw(), mode))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_key_of_mode_0600_or_stricter_loads(tmp_path: Path, mode: int) -> None:
    assert load_private_key(write_key(tmp_path / "k", KEY.private_bytes_raw(), mode)).private_bytes_raw() == (
        KEY.private_bytes_raw()
    )


def _pem_cases() -> Iterator[tuple[str, bytes, bool]]:
    ed448 = Ed448PrivateKey.from_private_bytes(bytes(57))
    pem = serialization.Encoding.PEM
    yield "31 bytes", bytes(31), True
    yield "33 bytes", bytes(33), True
    yield "garbage pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", True
    yield (
        "ed448 private",
        ed448.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        True,
    )
    yield (
        "encrypted private",
        KEY.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")),
        True,
    )
    yield "ed448 public", ed448.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo), False
    yield "huge", b"\x00" * 5000, False


@pytest.mark.parametrize(("name", "data", "private"), list(_pem_cases()), ids=[c[0] for c in _pem_cases()])
def test_malformed_key_files_are_refused(tmp_path: Path, name: str, data: bytes, private: bool) -> None:
    path = write_key(tmp_path / "key", data, 0o600)
    with pytest.raises(KeyFileError):
        (load_private_key if private else load_public_key)(path)
    with pytest.raises(KeyFileError):
        (load_public_key if private else load_private_key)(path)


def test_key_files_behind_symlinks_or_directories_are_refused(tmp_path: Path) -> None:
    real = write_key(tmp_path / "real", KEY.private_bytes_raw(), 0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    for loader in (load_private_key, load_public_key):
        with pytest.raises(KeyFileError):
            loader(link)
        with pytest.raises(KeyFileError):
            loader(tmp_path)
        with pytest.raises(KeyFileError):
            loader(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@given(
    part=st.sampled_from(["manifest", "kernel", "initrd"]),
    position=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_flipped_byte_of_any_blob_is_detected(part: str, position: int, mask: int) -> None:
    with tempfile.TemporaryDirectory() as base:
        store = Store(Path(base))
        path = {"manifest": store.manifest, "kernel": store.blob(KERNEL), "initrd": store.blob(INITRD)}[part]
        data = bytearray(path.read_bytes())
        data[position % len(data)] ^= mask
        path.write_bytes(bytes(data))
        store.reject()
        assert os.listdir(store.dest) == []


@given(
    kernel=st.binary(max_size=3000),
    initrd=st.binary(max_size=3000),
    cmdline=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=200),
)
def test_publish_prepare_round_trip(kernel: bytes, initrd: bytes, cmdline: str) -> None:
    with tempfile.TemporaryDirectory() as base:
        root, dest = Path(base) / "store", Path(base) / "dest"
        root.mkdir()
        dest.mkdir()
        image = publish(root, kernel, initrd, cmdline, KEY)
        prepared = ImageStore(root, KEY.public_key()).prepare(image.digest, image.signature, dest)
        assert (prepared.kernel.read_bytes(), prepared.initrd.read_bytes(), prepared.cmdline) == (
            kernel,
            initrd,
            cmdline,
        )


@given(st.binary(max_size=MAX_MANIFEST_SIZE + 10))
def test_parse_manifest_is_total(data: bytes) -> None:
    """Any bytes give a Manifest or an ImageError, never another exception."""
    try:
        parse_manifest(data)
    except ImageError as error:
        assert error.reason is ImageFailure.REJECTED


@given(
    kernel=st.binary(min_size=32, max_size=32),
    initrd=st.binary(min_size=32, max_size=32),
    cmdline=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64),
    sort_keys=st.booleans(),
    item_sep=st.sampled_from([",", ", ", " ,"]),
    key_sep=st.sampled_from([":", ": ", " :"]),
    indent=st.sampled_from([None, 0, 2]),
)
def test_only_the_canonical_encoding_parses(
    kernel: bytes, initrd: bytes, cmdline: str, sort_keys: bool, item_sep: str, key_sep: str, indent: int | None
) -> None:
    obj = {"format": MANIFEST_FORMAT, "kernel": kernel.hex(), "initrd": initrd.hex(), "cmdline": cmdline}
    data = json.dumps(obj, sort_keys=sort_keys, separators=(item_sep, key_sep), indent=indent).encode()
    if data == build_manifest(kernel, initrd, cmdline):
        assert parse_manifest(data) == Manifest(kernel, initrd, cmdline)
    else:
        with pytest.raises(ImageError):
            parse_manifest(data)


@given(st.text(max_size=80))
def test_blob_names_are_exactly_64_lowercase_hex(name: str) -> None:
    assert is_blob_name(name) == (len(name) == 64 and all(c in "0123456789abcdef" for c in name))
