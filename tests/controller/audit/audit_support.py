"""Helpers shared by the audit tests (imported by name: pytest puts this directory on sys.path)."""

from __future__ import annotations

from pathlib import Path

from controller.audit.chain import Decision, Outcome
from controller.audit.checkpoint import CheckpointPolicy, CheckpointSigner
from controller.audit.log import LOG_NAME, AuditLog

PRINCIPAL = "spiffe://controlplane/instance-manager"
START = "/passivisor.v1.HostController/StartInstance"
DESCRIBE = "/passivisor.v1.HostController/DescribeInstance"


def populate(log: AuditLog, calls: int = 3) -> None:
    """A realistic mix: mutating calls (intent + outcome), a read-only call, refused calls."""
    for index in range(calls):
        intent = log.begin(PRINCIPAL, START, {"instance_id": f"i-{index}", "client_token": f"tok-{index}"})
        log.finish(intent, Outcome.OK, {"state": "RUNNING"})
        log.append(PRINCIPAL, DESCRIBE, {"instance_id": f"i-{index}"}, Decision.ALLOWED, Outcome.OK)
        log.append("spiffe://controlplane/telemetry", START, {}, Decision.DENIED, Outcome.PERMISSION_DENIED)


def build_closed_log(directory: Path, signer: CheckpointSigner, *, calls: int = 3, every: int = 5) -> list[bytes]:
    """A closed log with checkpoints inside it; returns its lines (with newlines)."""
    directory.mkdir(exist_ok=True)
    with AuditLog(directory, signer, durable=False, policy=CheckpointPolicy(every=every, interval=3600)) as log:
        populate(log, calls)
    return (directory / LOG_NAME).read_bytes().splitlines(keepends=True)
