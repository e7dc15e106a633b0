"""Fixtures for the audit tests: a signing key, and logs in a temporary state directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.audit.checkpoint import CheckpointSigner
from controller.audit.log import AuditLog


@pytest.fixture(scope="session")
def signer() -> CheckpointSigner:
    return CheckpointSigner.generate()


@pytest.fixture
def open_log(tmp_path: Path, signer: CheckpointSigner) -> Iterator[Callable[..., AuditLog]]:
    """Open logs in ``tmp_path/state`` (or a given directory); every one is closed at the end."""
    logs: list[AuditLog] = []

    def opener(directory: Path | None = None, **options: object) -> AuditLog:
        directory = directory or tmp_path / "state"
        directory.mkdir(exist_ok=True)
        options.setdefault("durable", False)
        log = AuditLog(directory, signer, **options)  # type: ignore[arg-type]
        logs.append(log)
        return log

    yield opener
    for log in logs:
        log.close()
