"""Profiles of the crash-fault tests, and their report at the end of the session.

``PASSIVISOR_FAULTS`` selects the profile:

- unset or ``fast`` (``make test``): a handful of kill points, chosen to cover each kind of crash
  (controller between intent and answer, controller after the answer, agent before and after its
  journal, the VMM or sysfs ahead of the journal), in well under a minute;
- ``long``: every hit of every kill point of ``faults/points.py`` by both long sequences of
  ``faults/harness.py`` (about 400 runs, about 14 minutes on two cores).

``PASSIVISOR_FAULTS_REPORT=FILE`` also writes the figures as JSON to FILE.  The figures (runs, kill
points that fired, violations, wall time) are printed at the end of the pytest session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from faults.harness import Report

PROFILE = os.environ.get("PASSIVISOR_FAULTS", "fast")
if PROFILE not in ("fast", "long"):
    raise pytest.UsageError(f"PASSIVISOR_FAULTS is 'fast' or 'long', not {PROFILE!r}")

REPORTS: list[tuple[str, Report]] = []


@pytest.fixture
def fault_report() -> Any:
    """Call with (title, report) to have the figures printed at the end of the session."""
    def keep(title: str, report: Report) -> None:
        REPORTS.append((title, report))
        target = os.environ.get("PASSIVISOR_FAULTS_REPORT")
        if target:
            Path(target).write_text(json.dumps({
                "title": title, "profile": PROFILE, "runs": len(report.runs), "kill_points_fired": report.fired,
                "violations": report.violations, "known_bug_violations": report.known,
                "wall_time_s": round(report.seconds, 1),
                "not_reached": [r.label for r in report.runs if r.point and not r.fired],
                "tolerated": [f"[{r.label}] {t}" for r in report.runs for t in r.tolerated],
            }, indent=1) + "\n")
    return keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, report in REPORTS:
        terminalreporter.section(f"crash faults: {title}")
        for line in report.summary().splitlines():
            terminalreporter.write_line(line)
