"""``python -m bench fuzz``: every fuzz target beside the trivial target, through the real runner.

Starts what the benchmark starts: each atheris target as ``python -m fuzz`` runs it, and the trivial
target with the same flags, one second each.  As in test_bench_cli.py, no speed is asserted: only
the output contract (one result per target the campaign knows, exec/s, positive figures, the
issue's bar in the extras), and that the baseline gets each target's flags and seeds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# bench/ is a tool run from the checkout (``python -m bench``), not an installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fuzz as bench_fuzz  # noqa: E402
from bench.harness import QUICK  # noqa: E402
from fuzz import __main__ as campaign  # noqa: E402

pytest.importorskip("atheris")


@pytest.fixture(scope="module")
def results() -> list[bench_fuzz.Result]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_fuzz, "seconds_of", lambda profile: 1)
        return list(bench_fuzz.run(QUICK))


def test_one_result_per_campaign_target(results: list[bench_fuzz.Result]) -> None:
    assert [result.name for result in results] == [f"fuzz.{target}" for target in campaign.targets()]
    assert len(results) >= 4


def test_figures_are_exec_per_second_with_the_issue_bar(results: list[bench_fuzz.Result]) -> None:
    for result in results:
        line = result.to_json()
        assert result.unit == "exec/s", line
        assert result.ours > 0 and result.baseline > 0, line
        assert result.extra["target_exec_s"] == 10_000, line
        assert result.extra["crashes"] == 0, line
        assert result.extra["execs"] > 0 and result.extra["baseline_execs"] > 0, line
        assert result.ratio == round(result.ours / result.baseline, 3)


def test_the_trivial_target_is_faster_than_any_real_one(results: list[bench_fuzz.Result]) -> None:
    # The baseline does nothing but take its input: every real target does more per execution.
    for result in results:
        assert result.ratio < 1, result.to_json()


def test_the_baseline_gets_the_targets_flags_and_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        output = ("Done 5000 runs in 2 second(s)\n"
                  "stat::number_of_executed_units: 5000\nstat::average_exec_per_sec:     2500\n")
        return subprocess.CompletedProcess(command, 0, output)

    monkeypatch.setattr(bench_fuzz.subprocess, "run", fake_run)
    result = bench_fuzz.run_baseline("fuzz_stream", 2, tmp_path)
    assert (result.execs, result.exec_per_sec) == (5000, 2500)
    (command,) = seen
    assert command[1] == "-c" and "fuzz._harness" in command[2]
    assert command[3:] == ["-max_total_time=2", *campaign.BASE_FLAGS, f"-dict={campaign.FUZZ / 'fuzz_stream.dict'}",
                           f"-artifact_prefix={tmp_path / 'trivial-for-fuzz_stream'}/",
                           *campaign.options("fuzz_stream"), str(tmp_path / "trivial-for-fuzz_stream" / "corpus"),
                           str(campaign.FUZZ / "corpus" / "fuzz_stream")]
    assert any(flag.startswith("-max_len=") for flag in command)


def test_a_baseline_that_runs_nothing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_fuzz.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "ImportError: atheris\n"))
    with pytest.raises(RuntimeError, match="exited with 1"):
        bench_fuzz.run_baseline("fuzz_stream", 2, tmp_path)


def test_the_trivial_target_really_runs(tmp_path: Path) -> None:
    result = bench_fuzz.run_baseline("fuzz_to_agent", 1, tmp_path)
    assert result.exec_per_sec > 0 and result.returncode == 0
