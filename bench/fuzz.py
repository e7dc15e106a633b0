"""Fuzzing throughput of every target: ``python -m bench fuzz``.

For each target the campaign knows (``fuzz/fuzz_*.py``, ``python -m fuzz --list``), ``fuzz.<target>``
is its exec/s under libFuzzer (``ours``) beside the same atheris runner (``fuzz._harness.fuzz``:
``atheris.Setup`` and ``atheris.Fuzz``) on a trivial target that only consumes its input with
``atheris.FuzzedDataProvider`` (``baseline``), with the same flags: the campaign's own (timeout, RSS
limit, the target's dictionary and ``.options``, such as ``max_len``) and the same seed corpus.  The
trivial target has no coverage to gain, so libFuzzer keeps none of the seeds and mutates small
inputs: the baseline is atheris' raw speed, the cost of one execution with nothing in it, and the
ratio is the share of that speed the target keeps.  The issue's own bar is absolute, at least
10,000 exec/s per target (``target_exec_s``).

Both sides run as the campaign runs a target, in a process of their own for ``seconds`` (3 with
``--quick``, 15 otherwise), one after the other, the order alternating from target to target
(``harness.py``, point 2).  The target side *is* the campaign: ``fuzz.__main__.run``, with a scratch
directory for corpus and artifacts, so every run starts from the committed seeds alone and leaves
nothing in ``fuzz/artifacts``; the baseline is built from the runner's flags and read with its
parser (``fuzz.__main__.parse``).  The figure is libFuzzer's own ``average_exec_per_sec``: runs
divided by whole seconds since the process started, start-up (imports, the seed corpus) included.
Both sides pay that alike, but with short runs the whole-second rounding shows: expect a few tens of
percent of noise with ``--quick``.

A target that finds something is not a benchmark failure to hide: its findings are copied to
``fuzz/artifacts/<target>/`` (where ``python -m fuzz`` leaves them), reported on stderr with
the runner's own report, and ``python -m bench fuzz`` exits non-zero after printing its results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fuzz import __main__ as campaign

from .harness import Profile, Result

TARGET_EXEC_S = 10_000  # issue 7, item 1: every target at least this fast

# The trivial target: the campaign's atheris entry point around a function that consumes its input.
_TRIVIAL = (
    "import atheris\n"
    "from fuzz._harness import fuzz\n"
    "fuzz(lambda data: atheris.FuzzedDataProvider(data).ConsumeBytes(len(data)))\n"
)


def seconds_of(profile: Profile) -> int:
    return 3 if profile.rounds < 100 else 15


def run_baseline(target: str, seconds: int, artifacts: Path, python: str = sys.executable) -> campaign.Result:
    """The trivial target with the flags, dictionary and seeds ``campaign.run`` gives ``target``."""
    result = campaign.Result(f"trivial-for-{target}")
    scratch = artifacts / result.target
    corpus = scratch / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    command = [
        python, "-c", _TRIVIAL,
        f"-max_total_time={seconds}",
        *campaign.BASE_FLAGS,
        f"-dict={campaign.FUZZ / f'{target}.dict'}",
        f"-artifact_prefix={scratch}/",
        *campaign.options(target),
        str(corpus),
        str(campaign.FUZZ / "corpus" / target),
    ]
    started = time.monotonic()
    completed = subprocess.run(command, cwd=campaign.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", timeout=2 * seconds + 120, check=False)
    result.seconds = time.monotonic() - started
    result.returncode = completed.returncode
    campaign.parse(result, completed.stdout)
    if result.returncode != 0 or result.exec_per_sec <= 0:
        tail = "\n".join(completed.stdout.splitlines()[-20:])
        raise RuntimeError(f"the trivial target for {target} exited with {result.returncode} "
                           f"at {result.exec_per_sec} exec/s:\n{tail}")
    return result


def _keep_findings(result: campaign.Result) -> None:
    """Copy a target's findings to where the campaign keeps them, and print the campaign's report."""
    kept = campaign.FUZZ / "artifacts" / result.target
    kept.mkdir(parents=True, exist_ok=True)
    for path in result.findings:
        shutil.copy2(path, kept / path.name)
    print(f"bench fuzz: {result.target} found {result.crashes}; findings copied to {kept}", file=sys.stderr)
    campaign.report_failure(result)


def run(profile: Profile, targets: list[str] | None = None) -> Iterator[Result]:
    seconds = seconds_of(profile)
    found: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pv-bench-fuzz-") as scratch:
        artifacts = Path(scratch)
        for index, target in enumerate(targets or campaign.targets()):
            ours: campaign.Result | None = None
            baseline: campaign.Result | None = None
            for side in ("ours", "baseline") if index % 2 == 0 else ("baseline", "ours"):
                if side == "ours":
                    ours = campaign.run(target, seconds, artifacts, sys.executable)
                else:
                    baseline = run_baseline(target, seconds, artifacts)
            assert ours is not None and baseline is not None
            print(f"  {ours.line()}\n  {baseline.line()}", file=sys.stderr, flush=True)
            if ours.crashes:
                _keep_findings(ours)
                found.append(target)
            if ours.exec_per_sec <= 0:
                raise RuntimeError(f"{target} reported no exec/s (exit {ours.returncode}); see the lines above")
            yield Result(f"fuzz.{target}", ours.exec_per_sec, baseline.exec_per_sec, "exec/s",
                         {"samples": 1, "seconds": seconds, "execs": ours.execs, "baseline_execs": baseline.execs,
                          "new_units": ours.new_units, "crashes": ours.crashes, "target_exec_s": TARGET_EXEC_S})
    if found:
        raise SystemExit(f"bench fuzz: FAILED: {', '.join(found)} found crashes (see above)")
