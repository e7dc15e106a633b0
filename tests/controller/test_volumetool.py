"""``pvctl volume create`` and ``pvctl volume wrap`` (controller/cli.py, controller/volumetool.py; issue 5, claim C8).

Real components: the real ``qemu-img`` (Debian qemu-utils) creates one 16M LUKS volume for the module through
pvctl (about 2.4 s) and a second one for the ``--json`` output, and opens them with the key file's passphrase;
``controller.envelope`` opens the envelopes pvctl writes.  A fake ``qemu-img`` (a shell script put first on
PATH) stands in where a failure must be provoked: a partial file left behind, the "Unable to get accurate CPU
usage" calibration failure.  No controller runs: the host key is given with ``--host-public-key``, and the
GetHostIdentity tests replace ``Session.call``.  pvctl runs in-process through ``main(argv, stdout, stderr)``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from controller import cli, envelope, volumetool
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.policy import Method

INSTANCE = "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"
OTHER_INSTANCE = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
VOLUME = "11111111-2222-4333-9444-555555555555"
SIZE = 16 << 20
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                    reason="needs qemu-img and qemu-io (Debian package qemu-utils)")


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = self.err.splitlines()
        assert len(lines) == 1 and self.err.endswith("\n"), self.err
        return lines[0]


def pvctl(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return Run(code, out.getvalue(), err.getvalue())


@dataclass
class Host:
    """A host key pair, as the controller's identity would hold it."""

    private: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    def open(self, data: bytes, instance: str = INSTANCE, volume: str = VOLUME) -> bytes:
        """Open an envelope as the controller does: parse, check the binding, unseal."""
        parsed = envelope.parse(data)
        envelope.check_binding(parsed, envelope.host_fingerprint_of(self.public), uuid.UUID(instance),
                               uuid.UUID(volume))
        key = envelope.open_envelope(parsed, self.private.exchange, self.public)
        try:
            return bytes(key)
        finally:
            envelope.wipe(key)


def create_args(directory: Path, host: Host, *extra: str, key_out: bool = True) -> list[str]:
    argv = ["volume", "create", "--volume-id", VOLUME, "--instance-id", INSTANCE, "--size", "16M",
            "--out", str(directory / "volume.luks"), "--envelope-out", str(directory / "volume.envelope"),
            "--host-public-key", host.public.hex(), *extra]
    if key_out:
        argv += ["--key-out", str(directory / "volume.key")]
    return argv


def wrap_args(key_file: Path, envelope_out: Path, *extra: str, host: Host | None = None) -> list[str]:
    argv = ["volume", "wrap", "--key-file", str(key_file), "--volume-id", VOLUME, "--instance-id", OTHER_INSTANCE,
            "--envelope-out", str(envelope_out), *extra]
    if host is not None:
        argv += ["--host-public-key", host.public.hex()]
    return argv


def key_material_forms(key: bytes) -> list[str]:
    """Every spelling of the key a careless print could produce, the LUKS passphrase (its hex) included."""
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode().rstrip("="), key.decode("latin-1"), repr(key)[2:-1]]


def assert_no_key_material(run: Run, key: bytes) -> None:
    for form in key_material_forms(key):
        assert form not in run.out
        assert form not in run.err


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _with_secret(argv: Callable[[str], list[str]], passphrase: bytes | bytearray) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv(secret_object)`` with ``passphrase`` handed over through a pipe, as pvctl does."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, passphrase)
        os.close(write_end)
        return subprocess.run(argv(f"secret,id=s0,file=/dev/fd/{read_end},format=raw"), pass_fds=(read_end,),
                              capture_output=True, check=False, timeout=60)
    finally:
        os.close(read_end)


def qemu_img_info(path: Path, passphrase: bytes | bytearray) -> dict[str, Any]:
    """``qemu-img info`` with the key.  It does not prove the key: info opens without I/O, which reads the
    LUKS header only and never unlocks a key slot, so any passphrase passes (see :func:`unlocks`)."""
    run = _with_secret(lambda secret: [QEMU_IMG or "qemu-img", "info", "--output=json", "--object", secret,
                                       "--image-opts", f"driver=luks,key-secret=s0,file.filename={path}"],
                       passphrase)
    assert run.returncode == 0, run.stderr
    document: dict[str, Any] = json.loads(run.stdout)
    return document


def unlocks(path: Path, passphrase: bytes | bytearray) -> subprocess.CompletedProcess[bytes]:
    """Read the first sector through the LUKS layer (qemu-io, qemu-utils): this needs a key slot unlocked."""
    return _with_secret(lambda secret: [QEMU_IO or "qemu-io", "-r", "--object", secret, "--image-opts",
                                        f"driver=luks,key-secret=s0,file.filename={path}", "-c", "read 0 512"],
                        passphrase)


@dataclass
class Call:
    argv: list[str]
    kwargs: dict[str, Any]


class SubprocessSpy:
    """Records every ``subprocess.run`` (argv and keyword arguments) and runs it for real."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.calls: list[Call] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> Any:
        self.calls.append(Call(list(argv), dict(kwargs)))
        return self.real(argv, **kwargs)


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test in which pvctl must refuse before running anything."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"subprocess.run was called: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


# -- the volume the module creates with the real qemu-img -------------------------------------------------------


@dataclass
class Created:
    directory: Path
    host: Host
    run: Run
    calls: list[Call]
    key: bytes  # read back from --key-out

    @property
    def volume(self) -> Path:
        return self.directory / "volume.luks"

    @property
    def envelope_path(self) -> Path:
        return self.directory / "volume.envelope"

    @property
    def key_path(self) -> Path:
        return self.directory / "volume.key"


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> Created:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("needs qemu-img and qemu-io (Debian package qemu-utils)")
    directory = tmp_path_factory.mktemp("volume")
    host = Host()
    spy = SubprocessSpy(subprocess.run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", spy)
        run = pvctl(*create_args(directory, host))
    assert run.code == 0, run.err
    return Created(directory, host, run, spy.calls, (directory / "volume.key").read_bytes())


@needs_qemu_img
def test_the_volume_is_luks_and_the_key_file_unlocks_it(created: Created) -> None:
    assert len(created.key) == envelope.DATA_KEY_SIZE
    info = qemu_img_info(created.volume, created.key.hex().encode())
    assert info["format"] == "luks"
    assert info["virtual-size"] == SIZE
    suite = info["format-specific"]["data"]
    # The suite the controller's volume server (nbdkit's luks filter) can decrypt.
    assert (suite["cipher-alg"], suite["cipher-mode"], suite["ivgen-alg"], suite["hash-alg"]) == (
        "aes-256", "xts", "plain64", "sha256")
    opened = unlocks(created.volume, created.key.hex().encode())
    assert opened.returncode == 0, opened.stderr
    assert b"read 512/512 bytes at offset 0" in opened.stdout


@needs_qemu_img
def test_another_key_or_a_passphrase_with_a_newline_does_not_unlock_it(created: Created) -> None:
    other = unlocks(created.volume, os.urandom(32).hex().encode())
    assert other.returncode != 0
    assert b"Invalid password, cannot unlock any keyslot" in other.stderr
    # The convention is the 64 hex digits and nothing else: a trailing newline is another passphrase.
    newline = unlocks(created.volume, created.key.hex().encode() + b"\n")
    assert b"Invalid password, cannot unlock any keyslot" in newline.stderr


@needs_qemu_img
def test_the_envelope_opens_to_the_key_and_is_what_attach_sends(created: Created) -> None:
    data = created.envelope_path.read_bytes()
    assert len(data) == envelope.ENVELOPE_SIZE
    assert created.host.open(data) == created.key
    assert cli._read_envelope(created.envelope_path) == data  # attach --envelope-file reads these very bytes
    with pytest.raises(envelope.EnvelopeError) as refused:
        created.host.open(data, instance=OTHER_INSTANCE)
    assert refused.value.kind is envelope.EnvelopeErrorKind.WRONG_INSTANCE


@needs_qemu_img
def test_the_passphrase_reaches_qemu_img_through_a_pipe_only(created: Created) -> None:
    assert created.calls, "qemu-img was not run through subprocess.run"
    for call in created.calls:
        argv = call.argv
        assert argv[:5] == [QEMU_IMG, "create", "-q", "-f", "luks"]
        assert argv[-2:] == [str(created.volume.absolute()), str(SIZE)]
        assert argv[argv.index("-o") + 1] == (f"key-secret=sec0,iter-time={volumetool.DEFAULT_ITER_TIME_MS},"
                                               "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256")
        secret = argv[argv.index("--object") + 1]
        assert secret.startswith("secret,id=sec0,file=/dev/fd/") and "data=" not in secret
        descriptor = int(secret.removeprefix("secret,id=sec0,file=/dev/fd/").removesuffix(",format=raw"))
        assert call.kwargs["pass_fds"] == (descriptor,)
        assert "input" not in call.kwargs
        environment = call.kwargs.get("env") or os.environ
        for form in key_material_forms(created.key):
            assert not any(form in arg for arg in argv)
            assert not any(form in value for value in environment.values())


@needs_qemu_img
def test_the_outputs_are_private(created: Created) -> None:
    assert mode_of(created.volume) == 0o600
    assert mode_of(created.envelope_path) == 0o600
    assert mode_of(created.key_path) == 0o600


@needs_qemu_img
def test_the_human_output_names_the_files_and_never_the_key(created: Created) -> None:
    assert created.run.err == ""
    assert created.run.out.splitlines() == [
        f"volume_path       {created.volume}",
        f"size_bytes        {SIZE}",
        f"volume_id         {VOLUME}",
        f"instance_id       {INSTANCE}",
        f"host_fingerprint  {hashlib.sha256(created.host.public).hexdigest()}",
        "host_key_source   --host-public-key",
        f"envelope_file     {created.envelope_path}",
        f"key_file          {created.key_path}",
    ]
    assert_no_key_material(created.run, created.key)
    wrapped = created.envelope_path.read_bytes()
    assert base64.b64encode(wrapped).decode() not in created.run.out


@needs_qemu_img
def test_json_is_one_document_with_the_envelope_and_never_the_key(tmp_path: Path) -> None:
    host = Host()
    run = pvctl(*create_args(tmp_path, host, "--json", key_out=False))
    assert run.code == 0, run.err
    document = json.loads(run.out)
    wrapped = (tmp_path / "volume.envelope").read_bytes()
    assert document == {
        "volume_path": str(tmp_path / "volume.luks"), "size_bytes": SIZE, "volume_id": VOLUME,
        "instance_id": INSTANCE, "host_fingerprint": hashlib.sha256(host.public).hexdigest(),
        "host_key_source": "--host-public-key", "envelope_file": str(tmp_path / "volume.envelope"),
        "key_file": None, "envelope_base64": base64.b64encode(wrapped).decode(),
    }
    key = host.open(wrapped)
    assert_no_key_material(run, key)
    assert unlocks(tmp_path / "volume.luks", key.hex().encode()).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.envelope", "volume.luks"]


# -- refusals before anything runs --------------------------------------------------------------------------------


def test_an_existing_out_is_refused_and_left_unchanged(tmp_path: Path, no_subprocess: None) -> None:
    existing = tmp_path / "volume.luks"
    existing.write_bytes(b"somebody's data")
    existing.chmod(0o644)
    before = os.stat(existing)
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == cli.EXIT_USAGE
    assert run.error_line == f"pvctl: usage: volume create: {existing} exists; refusing to overwrite it"
    after = os.stat(existing)
    assert existing.read_bytes() == b"somebody's data"
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (before.st_ino, before.st_mode, before.st_mtime_ns)
    assert [p.name for p in tmp_path.iterdir()] == ["volume.luks"]


@pytest.mark.parametrize("name", ["volume.envelope", "volume.key"])
def test_an_existing_envelope_or_key_output_is_refused_before_qemu_img_runs(
        tmp_path: Path, name: str, no_subprocess: None) -> None:
    (tmp_path / name).write_bytes(b"kept")
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == cli.EXIT_USAGE
    assert run.error_line.endswith(f"{tmp_path / name} exists; refusing to overwrite it")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"kept"


def test_one_file_for_two_outputs_is_refused(tmp_path: Path, no_subprocess: None) -> None:
    argv = [*create_args(tmp_path, Host(), key_out=False), "--key-out", str(tmp_path / "volume.envelope")]
    run = pvctl(*argv)
    assert run.code == cli.EXIT_USAGE
    assert "is named for two outputs" in run.error_line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", ["0", "16m", "16MB", "16 M", " 16M", "-16M", "+16M", "0x10M", "1e6", "16.5M",
                                  "016M", "", "M", "1023K", "2T", "1025G", "1048577", "99999999999999999999M",
                                  "\uff11\uff16M"])  # fullwidth digits
def test_a_bad_size_is_refused_before_anything_runs(tmp_path: Path, size: str, no_subprocess: None) -> None:
    argv = create_args(tmp_path, Host())
    argv[argv.index("--size") + 1] = size
    run = pvctl(*argv)
    assert run.code == cli.EXIT_USAGE
    assert run.error_line.startswith("pvctl: usage: volume create: argument --size: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, size", [("1M", 1 << 20), ("16M", SIZE), ("1024K", 1 << 20), ("1048576", 1 << 20),
                                        ("3G", 3 << 30), ("1T", 1 << 40), ("1049088", (1 << 20) + 512)])
def test_sizes_in_qemu_img_units(text: str, size: int) -> None:
    assert volumetool.parse_size(text) == size


@pytest.mark.parametrize("iter_time", ["0", "49", "10001", "-50", "50.0", "5e1", "fifty", ""])
def test_a_bad_iter_time_is_refused_before_anything_runs(tmp_path: Path, iter_time: str, no_subprocess: None) -> None:
    run = pvctl(*create_args(tmp_path, Host(), "--iter-time-ms", iter_time))
    assert run.code == cli.EXIT_USAGE
    assert run.error_line.startswith("pvctl: usage: volume create: argument --iter-time-ms: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["00" * 31 + "0", "zz" * 32, "00" * 33, "0x" + "00" * 31])
def test_a_host_public_key_that_is_not_64_hex_digits_is_refused(
        tmp_path: Path, text: str, no_subprocess: None) -> None:
    argv = create_args(tmp_path, Host())
    argv[argv.index("--host-public-key") + 1] = text
    run = pvctl(*argv)
    assert run.code == cli.EXIT_USAGE
    assert "argument --host-public-key: an X25519 public key is 32 bytes" in run.error_line
    assert list(tmp_path.iterdir()) == []


def test_a_low_order_host_key_is_refused_before_qemu_img_runs(tmp_path: Path, no_subprocess: None) -> None:
    argv = create_args(tmp_path, Host())
    argv[argv.index("--host-public-key") + 1] = "00" * 32  # the all-zero point: no one holds its private key
    run = pvctl(*argv)
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: volume create: the host public key cannot be used: ")
    assert list(tmp_path.iterdir()) == []


def test_a_host_key_and_connection_options_together_are_refused(tmp_path: Path, no_subprocess: None) -> None:
    run = pvctl(*create_args(tmp_path, Host(), "--endpoint", "127.0.0.1:1"))
    assert run.code == cli.EXIT_USAGE
    assert "--host-public-key and --endpoint" in run.error_line
    assert list(tmp_path.iterdir()) == []


def test_without_qemu_img_nothing_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            no_subprocess: None) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: volume create: qemu-img is not on PATH")
    assert [p.name for p in tmp_path.iterdir()] == ["empty-path"]


# -- qemu-img failures, with a fake qemu-img --------------------------------------------------------------------

FAKE_QEMU_IMG = r"""#!/bin/sh
# A stand-in for qemu-img create: counts its runs, keeps the secret it was given through /dev/fd/N, and fails
# the first $FAKE_FAILS runs with $FAKE_MESSAGE after writing a partial file (removing it if $FAKE_REMOVES=1).
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_DIR/count"
for arg; do
    case $arg in secret,*) fd=${arg#*file=/dev/fd/}; fd=${fd%%,*};; esac
done
cat "/dev/fd/$fd" > "$FAKE_DIR/secret.$n"
eval "path=\${$(($# - 1))}"
if [ "$n" -le "$FAKE_FAILS" ]; then
    printf partial > "$path"
    if [ "$FAKE_REMOVES" = 1 ]; then rm -f "$path"; fi
    echo "qemu-img: $path: $FAKE_MESSAGE" >&2
    exit 1
fi
printf 'LUKS\272\276 fake' > "$path"
"""


@dataclass
class FakeQemuImg:
    directory: Path  # its records
    monkeypatch: pytest.MonkeyPatch

    def fail(self, times: int, message: str, *, removes: bool) -> None:
        self.monkeypatch.setenv("FAKE_FAILS", str(times))
        self.monkeypatch.setenv("FAKE_MESSAGE", message)
        self.monkeypatch.setenv("FAKE_REMOVES", "1" if removes else "0")

    @property
    def runs(self) -> int:
        count = self.directory / "count"
        return int(count.read_text()) if count.exists() else 0

    def secret(self, run: int) -> bytes:
        return (self.directory / f"secret.{run}").read_bytes()


@pytest.fixture
def fake_qemu_img(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> FakeQemuImg:
    bin_dir = tmp_path_factory.mktemp("fakebin")
    records = tmp_path_factory.mktemp("fakerecords")
    script = bin_dir / "qemu-img"
    script.write_text(FAKE_QEMU_IMG)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_DIR", str(records))
    fake = FakeQemuImg(records, monkeypatch)
    fake.fail(0, "", removes=False)
    return fake


@pytest.mark.parametrize("removes", [False, True], ids=["partial-file-left", "qemu-img-removes-it"])
def test_a_failed_qemu_img_leaves_nothing_and_says_why_in_one_line(
        tmp_path: Path, fake_qemu_img: FakeQemuImg, removes: bool) -> None:
    fake_qemu_img.fail(1, "Could not write the LUKS header: No space left on device", removes=removes)
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line == (f"pvctl: volume create: qemu-img create failed (exit status 1): "
                              f"{(tmp_path / 'volume.luks').absolute()}: Could not write the LUKS header: "
                              "No space left on device")
    assert fake_qemu_img.runs == 1
    assert list(tmp_path.iterdir()) == []


def test_the_calibration_failure_is_retried_with_the_whole_passphrase_each_time(
        tmp_path: Path, fake_qemu_img: FakeQemuImg) -> None:
    fake_qemu_img.fail(2, "Unable to get accurate CPU usage", removes=False)
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == 0, run.err
    assert fake_qemu_img.runs == 3
    key = (tmp_path / "volume.key").read_bytes()
    for attempt in (1, 2, 3):  # a fresh pipe per attempt, holding exactly the 64 hex digits
        assert fake_qemu_img.secret(attempt) == key.hex().encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.envelope", "volume.key", "volume.luks"]


def test_a_calibration_failure_that_persists_gives_up(tmp_path: Path, fake_qemu_img: FakeQemuImg) -> None:
    fake_qemu_img.fail(volumetool.CALIBRATION_ATTEMPTS, "Unable to get accurate CPU usage", removes=True)
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.endswith("Unable to get accurate CPU usage")
    assert fake_qemu_img.runs == volumetool.CALIBRATION_ATTEMPTS
    assert list(tmp_path.iterdir()) == []


class KeptBuffers:
    """Keeps the key and passphrase buffers volumetool makes, to check afterwards that they were wiped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.buffers: list[bytearray] = []
        real_key, real_passphrase = volumetool.new_data_key, volumetool.passphrase_of

        def new_data_key() -> bytearray:
            return self.keep(real_key())

        def passphrase_of(key: bytearray) -> bytearray:
            return self.keep(real_passphrase(key))

        monkeypatch.setattr(volumetool, "new_data_key", new_data_key)
        monkeypatch.setattr(volumetool, "passphrase_of", passphrase_of)

    def keep(self, buffer: bytearray) -> bytearray:
        assert any(buffer)
        self.buffers.append(buffer)
        return buffer

    def all_wiped(self) -> bool:
        return bool(self.buffers) and all(not any(b) for b in self.buffers)


@pytest.mark.parametrize("fails", [0, 1])
def test_the_key_and_passphrase_are_wiped_on_success_and_on_failure(
        tmp_path: Path, fake_qemu_img: FakeQemuImg, monkeypatch: pytest.MonkeyPatch, fails: int) -> None:
    kept = KeptBuffers(monkeypatch)
    fake_qemu_img.fail(fails, "Could not create the image", removes=False)
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == (cli.EXIT_FAILED if fails else cli.EXIT_OK)
    assert len(kept.buffers) == 2
    assert kept.all_wiped()


def test_a_failed_envelope_write_removes_the_volume_and_the_key_file(
        tmp_path: Path, fake_qemu_img: FakeQemuImg, monkeypatch: pytest.MonkeyPatch) -> None:
    real = volumetool.create_private_file

    def full_disk_for_envelopes(path: Path, data: bytes | bytearray, **kwargs: Any) -> None:
        if path.name == "volume.envelope":
            raise OSError(28, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(volumetool, "create_private_file", full_disk_for_envelopes)
    run = pvctl(*create_args(tmp_path, Host()))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line == f"pvctl: volume create: cannot create {tmp_path / 'volume.envelope'}: " \
                             "No space left on device"
    assert fake_qemu_img.runs == 1
    assert list(tmp_path.iterdir()) == []


# -- volume wrap ----------------------------------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.key"
    path.write_bytes(os.urandom(envelope.DATA_KEY_SIZE))
    path.chmod(0o600)
    return path


def test_wrap_makes_an_envelope_that_opens_to_the_key_file(tmp_path: Path, key_file: Path) -> None:
    host = Host()
    out = tmp_path / "other.envelope"
    run = pvctl(*wrap_args(key_file, out, host=host))
    assert run.code == 0, run.err
    assert host.open(out.read_bytes(), instance=OTHER_INSTANCE) == key_file.read_bytes()
    assert mode_of(out) == 0o600
    assert f"host_fingerprint  {hashlib.sha256(host.public).hexdigest()}" in run.out.splitlines()
    assert_no_key_material(run, key_file.read_bytes())


def test_wrap_json_carries_the_envelope_and_never_the_key(tmp_path: Path, key_file: Path) -> None:
    host = Host()
    out = tmp_path / "other.envelope"
    run = pvctl(*wrap_args(key_file, out, "--json", host=host))
    assert run.code == 0, run.err
    document = json.loads(run.out)
    assert base64.b64decode(document["envelope_base64"]) == out.read_bytes()
    assert document["instance_id"] == OTHER_INSTANCE
    assert document["host_fingerprint"] == hashlib.sha256(host.public).hexdigest()
    assert_no_key_material(run, key_file.read_bytes())


def test_wrap_wipes_the_key_it_read(tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[bytearray] = []
    real = volumetool.read_key_file

    def keep(path: Path) -> bytearray:
        kept.append(real(path))
        return kept[-1]

    monkeypatch.setattr(volumetool, "read_key_file", keep)
    assert pvctl(*wrap_args(key_file, tmp_path / "e", host=Host())).code == 0
    assert len(kept) == 1 and not any(kept[0])


@pytest.mark.parametrize("problem, expected", [
    ("short", "has the wrong size; expected exactly 32 bytes"),
    ("long", "has the wrong size; expected exactly 32 bytes"),
    ("readable", "has mode 0644; a private key must be 0600"),
    ("symlink", "is a symbolic link; refusing to follow it"),
    ("missing", "cannot open"),
    ("directory", "is not a regular file"),
])
def test_an_unusable_key_file_is_refused_and_nothing_is_written(
        tmp_path: Path, key_file: Path, problem: str, expected: str) -> None:
    path = tmp_path / "bad.key"
    if problem in ("short", "long"):
        path.write_bytes(os.urandom(31 if problem == "short" else 33))
        path.chmod(0o600)
    elif problem == "readable":
        path.write_bytes(os.urandom(32))
        path.chmod(0o644)
    elif problem == "symlink":
        path.symlink_to(key_file)
    elif problem == "directory":
        path.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    run = pvctl(*wrap_args(path, tmp_path / "out.envelope", host=Host()))
    assert run.code == cli.EXIT_USAGE
    assert run.error_line.startswith("pvctl: usage: volume wrap: key file: ")
    assert expected in run.error_line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_wrap_refuses_an_existing_envelope_out(tmp_path: Path, key_file: Path) -> None:
    out = tmp_path / "out.envelope"
    out.write_bytes(b"old envelope")
    run = pvctl(*wrap_args(key_file, out, host=Host()))
    assert run.code == cli.EXIT_USAGE
    assert run.error_line.endswith(f"{out} exists; refusing to overwrite it")
    assert out.read_bytes() == b"old envelope"


# -- the host key from GetHostIdentity ------------------------------------------------------------------------------


@dataclass
class FakeIdentityCalls:
    """What ``Session.call`` answers instead of a controller (a response or an RpcFailure), and what it was asked."""

    answers: list[Any] = field(default_factory=list)
    methods: list[Method] = field(default_factory=list)


@pytest.fixture
def identity_calls(monkeypatch: pytest.MonkeyPatch) -> FakeIdentityCalls:
    fake = FakeIdentityCalls()

    def call(self: cli.Session, method: Method, request: Any, **kwargs: Any) -> Any:
        fake.methods.append(method)
        answer = fake.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(cli.Session, "call", call)
    return fake


def test_without_a_host_key_pvctl_asks_get_host_identity(
        tmp_path: Path, key_file: Path, identity_calls: FakeIdentityCalls) -> None:
    host = Host()
    identity_calls.answers.append(pb.GetHostIdentityResponse(public_key=host.public,
                                                        fingerprint=hashlib.sha256(host.public).digest()))
    out = tmp_path / "out.envelope"
    run = pvctl(*wrap_args(key_file, out))
    assert run.code == 0, run.err
    assert identity_calls.methods == [Method.GET_HOST_IDENTITY]
    assert f"host_fingerprint  {hashlib.sha256(host.public).hexdigest()}" in run.out.splitlines()
    assert "host_key_source   GetHostIdentity" in run.out.splitlines()
    assert host.open(out.read_bytes(), instance=OTHER_INSTANCE) == key_file.read_bytes()


def test_a_failed_get_host_identity_is_one_line_with_its_code(
        tmp_path: Path, key_file: Path, identity_calls: FakeIdentityCalls) -> None:
    identity_calls.answers.append(cli.RpcFailure(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    run = pvctl(*wrap_args(key_file, tmp_path / "out.envelope"))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line == "pvctl: UNAVAILABLE: GetHostIdentity: failed to connect to all addresses"
    assert not (tmp_path / "out.envelope").exists()


def test_a_fingerprint_that_is_not_the_hash_of_the_key_is_refused(
        tmp_path: Path, key_file: Path, identity_calls: FakeIdentityCalls) -> None:
    host = Host()
    identity_calls.answers.append(pb.GetHostIdentityResponse(public_key=host.public, fingerprint=bytes(32)))
    run = pvctl(*wrap_args(key_file, tmp_path / "out.envelope"))
    assert run.code == cli.EXIT_FAILED
    assert run.error_line.startswith("pvctl: volume wrap: the controller's fingerprint is not the SHA-256")
    assert not (tmp_path / "out.envelope").exists()


# -- the passphrase convention ----------------------------------------------------------------------------------


@given(st.binary(min_size=32, max_size=32))
def test_the_passphrase_is_the_lowercase_hex_of_the_key(key: bytes) -> None:
    passphrase = volumetool.passphrase_of(bytearray(key))
    assert type(passphrase) is bytearray
    assert passphrase == key.hex().encode("ascii")


@pytest.mark.parametrize("key", [bytearray(31), bytearray(33), bytes(32), "00" * 32])
def test_the_passphrase_needs_a_32_byte_bytearray(key: Any) -> None:
    with pytest.raises(ValueError, match="a data key is a bytearray of 32 bytes"):
        volumetool.passphrase_of(key)
