"""``python -m bench.report``: benchmark JSON lines to the Markdown table of docs/performance.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report


def line(**fields: object) -> str:
    return json.dumps({"name": "x", "ours": 2.0, "baseline": 1.0, "ratio": 2.0, "unit": "us", **fields})


@pytest.mark.parametrize(("extra", "target", "met"), [
    ({}, "", ""),
    ({"target_ratio": 2}, "ratio <= 2", "met"),
    ({"target_ratio": 1.5}, "ratio <= 1.5", "**not met**"),
    ({"target_min_ratio": 0.5}, "ratio >= 0.5", "met"),
    ({"target_min_ratio": 3}, "ratio >= 3", "**not met**"),
    ({"target_us": 20}, "ours <= 20 us", "met"),
    ({"target_us": 1}, "ours <= 1 us", "**not met**"),
    ({"target_exec_s": 1}, "ours >= 1 exec/s", "met"),
    ({"target_exec_s": 10_000}, "ours >= 10000 exec/s", "**not met**"),
    ({"report_if_ratio_below": 0.5}, "report if ratio < 0.5", "met"),
    ({"report_if_ratio_below": 3}, "report if ratio < 3", "reported"),
])
def test_each_kind_of_target_is_judged(extra: dict[str, object], target: str, met: str) -> None:
    (result,) = report.parse([line(**extra)])
    assert report.verdict(result) == (target, met)
    assert report.table([result]).splitlines()[2] == f"| `x` | 2 | 1 | us | 2 | {target} | {met} |"


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", json.dumps({"name": "x", "ours": 1})])
def test_a_line_that_is_not_a_result_is_an_error(bad: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(line() + "\n\n" + bad + "\n")
    assert report.main([str(path)]) == 1
    assert "line 3" in capsys.readouterr().err
