"""A corrupt policy file or audit log at start-up (issue 6 §3, "Files"; claims C3, C16; docs/reliability.md).

Real components: the ``passivisor-controller`` process, provisioned by ``controller.devhost`` with the
policy in a file of its own (``[controller] policy``).  The agent is provisioned but not started:
the controller reads everything checked here before it first talks to the agent.

Each case starts a controller once with good files (it answers calls and writes its audit log), stops it,
damages one file, and runs the controller again in the foreground.  What is checked:

- the controller refuses to start: it exits with status 1 and its last line names the file's problem
  (the policy key, or the audit record), so an operator knows what to fix;
- nothing it depends on was changed by the refused start: the host keys, the idempotency store's
  tokens, and the audit records already written (the damaged audit files are left byte for byte as
  they were, as evidence);
- after the operator's repair (a corrected policy; ``controller.audit.quarantine`` for the audit log)
  it starts and serves, and its audit chain verifies.

The journal of the agent, the other file the brief names, is covered by
tests/integration/test_agent_restart.py::test_a_corrupt_journal_stops_the_agent_from_starting_and_is_left_alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from controller import identity
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from controller.api.gen.passivisor.v1 import controller_pb2_grpc as pb_grpc
from controller.audit import quarantine, verify_directory
from controller.audit.checkpoint import CheckpointSigner
from controller.devhost import agenthost, controllerhost
from controller.policy import MAX_POLICY_BYTES

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = resources.files("controller").joinpath("default_policy.toml").read_text("utf-8")


@dataclass
class Stopped:
    """A controller that ran once with good files and was stopped."""

    controller: controllerhost.ControllerHost
    policy: Path

    @property
    def audit_dir(self) -> Path:
        return self.controller.state_dir / "audit"

    def signing_key(self) -> Ed25519PublicKey:
        host = identity.load_or_create(self.controller.state_dir / "host.x25519")
        return CheckpointSigner.for_host(host).public_key

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the state directory, by relative path."""
        return {str(path.relative_to(self.controller.state_dir)): path.read_bytes()
                for path in sorted(self.controller.state_dir.rglob("*")) if path.is_file()}

    def run_foreground(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.main", "--config", str(self.controller.config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    def serves(self) -> list[pb.AuditRecord]:
        """Start it, make a call, read the whole audit log, stop it; return the records."""
        process, endpoint = controllerhost.start(self.controller)
        try:
            def stub(role: str) -> pb_grpc.HostControllerStub:
                paths = self.controller.pki.clients[role]
                credentials = grpc.ssl_channel_credentials(self.controller.pki.ca_certificate.read_bytes(),
                                                           paths.key.read_bytes(), paths.certificate.read_bytes())
                channel = grpc.secure_channel(endpoint, credentials,
                                              options=[("grpc.ssl_target_name_override", "localhost")])
                return pb_grpc.HostControllerStub(channel)  # type: ignore[no-untyped-call]

            identity_answer = stub("volume-attacher").GetHostIdentity(pb.GetHostIdentityRequest(), timeout=20)
            assert len(identity_answer.public_key) == 32
            # The call's record is appended without waiting for its fsync; ReadAuditLog serves durable ones.
            deadline = time.monotonic() + 10
            while True:
                page = stub("auditor").ReadAuditLog(pb.ReadAuditLogRequest(max_records=1000), timeout=20)
                if any(r.method == "GetHostIdentity" for r in page.records) or time.monotonic() > deadline:
                    return list(page.records)
                time.sleep(0.05)
        finally:
            assert agenthost.stop(process) == 0


@pytest.fixture
def stopped(tmp_path: Path) -> Iterator[Stopped]:
    agent = agenthost.prepare(tmp_path / "agent", backend="sim", seccomp=False)  # provisioned, never started
    policy = tmp_path / "policy.toml"
    policy.write_text(DEFAULT_POLICY)
    result = Stopped(controllerhost.prepare(tmp_path / "controller", agent, policy=policy), policy)
    records = result.serves()
    assert [r.method for r in records if r.kind != pb.AUDIT_RECORD_KIND_CHECKPOINT
            and r.method != "ReadAuditLog"] == ["AuditLogOpened", "GetHostIdentity"]
    yield result


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal's last line, after checking that the controller exited without listening."""
    assert result.returncode == 1, result.stderr
    assert "ready on" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------------------
# The policy file


def _entry(methods: str) -> str:
    return f'version = 1\n[[principal]]\nuri = "spiffe://a/b"\nmethods = {methods}\nreason = "r"\n'


BAD_POLICIES: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (how to damage the policy file, what the refusal names)
    "not-toml": (lambda p: p.write_text("not toml ["), "<document>: not valid TOML"),
    "truncated": (lambda p: p.write_text(DEFAULT_POLICY[: DEFAULT_POLICY.index("\nmethods = ")]), ".methods"),
    "empty": (lambda p: p.write_text(""), "version: must be 1"),
    "unknown-method": (lambda p: p.write_text(_entry('["RebootInstance"]')),
                       "principal[0] (spiffe://a/b).methods: unknown method 'RebootInstance'"),
    "unknown-key": (lambda p: p.write_text("version = 1\nextra = 1\n"), "extra"),
    "not-utf8": (lambda p: p.write_bytes(DEFAULT_POLICY.encode()[:40] + b"\xff\xfe\n"), "is not UTF-8"),
    "oversized": (lambda p: p.write_text("#" * (MAX_POLICY_BYTES + 1)), f"larger than {MAX_POLICY_BYTES} bytes"),
    "missing": (lambda p: p.unlink(), "cannot read"),
    "a-directory": (lambda p: (p.unlink(), p.mkdir()), "cannot read"),
}


@pytest.mark.parametrize(("damage", "named"), BAD_POLICIES.values(), ids=BAD_POLICIES.keys())
def test_a_corrupt_policy_file_stops_the_controller_from_starting(stopped: Stopped, damage: Callable[[Path], None],
                                                                  named: str) -> None:
    before = stopped.snapshot()
    damage(stopped.policy)
    line = refused(stopped.run_foreground())
    assert line.startswith("passivisor-controller: cannot start: "), line
    assert named in line, line
    assert "Traceback" not in line

    after = stopped.snapshot()
    for name in ("host.x25519", "host.ed25519"):
        assert after[name] == before[name]
    # The refused start changed nothing: every input is read before any state is opened.
    assert after == before
    verify_directory(stopped.audit_dir, stopped.signing_key())

    if stopped.policy.is_dir():
        stopped.policy.rmdir()
    stopped.policy.write_text(DEFAULT_POLICY)  # the operator's repair
    records = stopped.serves()
    assert [r.method for r in records if r.kind != pb.AUDIT_RECORD_KIND_CHECKPOINT][:2] == [
        "AuditLogOpened", "GetHostIdentity"]
    verify_directory(stopped.audit_dir, stopped.signing_key())


def test_a_policy_that_grants_nothing_starts_and_denies_every_call(stopped: Stopped) -> None:
    """Not corrupt, but the edge of the format: no principal at all.  Deny by default (claim C3)."""
    stopped.policy.write_text("version = 1\n")
    process, endpoint = controllerhost.start(stopped.controller)
    try:
        paths = stopped.controller.pki.clients["volume-attacher"]
        credentials = grpc.ssl_channel_credentials(stopped.controller.pki.ca_certificate.read_bytes(),
                                                   paths.key.read_bytes(), paths.certificate.read_bytes())
        with grpc.secure_channel(endpoint, credentials,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.HostControllerStub(channel).GetHostIdentity(  # type: ignore[no-untyped-call]
                    pb.GetHostIdentityRequest(), timeout=20)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert agenthost.stop(process) == 0


# --------------------------------------------------------------------------------------------------------------
# The audit log


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


BAD_AUDIT_LOGS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    # case: (how to damage audit.log, what the refusal names)
    "flipped-byte": (_flip, "audit record "),
    "deleted-record": (lambda d: b"".join(_lines(d)[:1] + _lines(d)[2:]), "audit record 2: record 2 is missing"),
    "swapped-records": (lambda d: b"".join([_lines(d)[0], _lines(d)[2], _lines(d)[1], *_lines(d)[3:]]),
                        "audit record 2: record 2 is missing"),
    "junk-line-appended": (lambda d: d + b"not a record\n", "not valid JSON"),
    "tail-cut": (lambda d: b"".join(_lines(d)[:-1]), "the tail was cut"),
    "emptied": (lambda d: b"", "the tail was cut"),
}


def _damage_audit(stopped: Stopped, damage: Callable[[bytes], bytes]) -> None:
    log = stopped.audit_dir / "audit.log"
    good = log.read_bytes()
    assert len(_lines(good)) >= 5  # genesis, opened, call, (reads), closing checkpoint
    bad = damage(good)
    assert bad != good
    log.write_bytes(bad)


@pytest.mark.parametrize(("damage", "named"), BAD_AUDIT_LOGS.values(), ids=BAD_AUDIT_LOGS.keys())
def test_a_corrupt_audit_log_stops_the_controller_and_is_left_as_evidence(stopped: Stopped,
                                                                          damage: Callable[[bytes], bytes],
                                                                          named: str) -> None:
    _damage_audit(stopped, damage)
    before = stopped.snapshot()
    stats = {path: path.stat() for path in stopped.audit_dir.iterdir()}

    line = refused(stopped.run_foreground())
    assert named in line, line

    assert stopped.snapshot() == before  # nothing written: not the damaged log, not the keys, not the tokens
    for path, stat in stats.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    moved = quarantine(stopped.audit_dir)  # the operator's repair: keep the evidence, start a new chain
    assert sorted(path.read_bytes() for path in moved) == sorted(
        before[f"audit/{name}"] for name in ("audit.log", "audit.head") if f"audit/{name}" in before)
    records = stopped.serves()
    assert records[0].kind == pb.AUDIT_RECORD_KIND_CHECKPOINT and records[0].sequence == 1  # a new genesis
    verify_directory(stopped.audit_dir, stopped.signing_key())


def test_a_deleted_audit_head_stops_the_controller(stopped: Stopped) -> None:
    head = stopped.audit_dir / "audit.head"
    head.unlink()
    before = stopped.snapshot()
    line = refused(stopped.run_foreground())
    assert "audit.head is missing but audit.log holds" in line, line
    assert stopped.snapshot() == before


def test_a_torn_final_line_is_repaired_and_reported(stopped: Stopped) -> None:
    """The one damage a crash causes, and the one the controller repairs (controller/audit/log.py, Opening)."""
    log = stopped.audit_dir / "audit.log"
    good = log.read_bytes()
    log.write_bytes(good + b'{"decision":"ALLO')
    records = stopped.serves()
    assert log.read_bytes().startswith(good)
    [opened] = [r for r in records if r.method == "AuditLogOpened" and r.sequence > len(_lines(good))]
    assert opened.parameters["torn_tail_bytes"] == str(len(b'{"decision":"ALLO'))
    verify_directory(stopped.audit_dir, stopped.signing_key())


def test_a_corrupt_audit_log_is_refused_in_one_line_without_a_traceback(stopped: Stopped) -> None:
    _damage_audit(stopped, _flip)
    result = stopped.run_foreground()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("passivisor-controller: cannot start: audit record "), result.stderr

