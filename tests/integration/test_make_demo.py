"""`make demo BACKEND=sim` runs the whole pvctl scenario and leaves nothing running."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.devhost import demo
from hostagent import process


def test_the_demo_runs_end_to_end_and_cleans_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "demo"
    assert demo.main(["--backend", "sim", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "state      RUNNING" in out and "state      STOPPED" in out
    assert "ATTACHED" in out and "DETACHED" in out
    assert "pvctl: FAILED_PRECONDITION: agent refused: PF_NOT_FOUND" in out
    assert "pvctl: PERMISSION_DENIED: StopInstance is not granted to spiffe://controlplane/telemetry" in out
    assert "pvctl: PERMISSION_DENIED: envelope refused: instance_id: bound to another instance" in out
    assert "audit chain OK:" in out
    assert out.rstrip().endswith("demo: done")
    assert not (directory / "dev.json").exists()
    assert process.find_by_argument(str(directory).encode()) == []
