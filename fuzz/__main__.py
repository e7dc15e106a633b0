"""Run the fuzz campaign: ``python -m fuzz --seconds N [--target NAME] [--jobs J] [--list]``.

Each target (``fuzz/fuzz_*.py``) runs in its own process, ``python -m
fuzz.<target>``, under libFuzzer with:

- ``-max_total_time=N`` (``--seconds`` is per target), ``-rss_limit_mb=2048``
  and ``-timeout=10`` (seconds per input; claim C4 says decoding is bounded,
  so a slow input is a finding, kept as a ``timeout-*`` artifact);
- ``-dict=fuzz/<target>.dict`` and the flags in the ``[libfuzzer]`` section of
  ``fuzz/<target>.options`` (OSS-Fuzz's convention; ``max_len`` lives there);
- ``-artifact_prefix=<artifacts>/<target>/``: crash, timeout, oom and leak
  reproducers land there (``<artifacts>`` is ``fuzz/artifacts``, gitignored);
- two corpus directories: first ``<artifacts>/<target>/corpus``, where
  libFuzzer writes the units it finds, then the committed seeds in
  ``fuzz/corpus/<target>``, which are only read.

Per target it prints one line with executions, exec/s, the coverage growth
(libFuzzer's ``cov``/``ft`` from INITED to DONE), new corpus units and
findings.  The findings of a target are the crash-/timeout-/oom-/leak-
artifacts the run created, or one if the child exited non-zero without
leaving an artifact (it could not start, or was killed).  The last line is
exactly ``fuzz: targets=T execs=E crashes=C`` and the exit status is 1 when
C > 0 (2 for a usage error).  Standard library only: atheris is needed in the
children, not here.
"""

from __future__ import annotations

import argparse
import configparser
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")
BASE_FLAGS = ("-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1")
# libFuzzer status lines, e.g. "#4096	pulse  cov: 132 ft: 240 corp: 22/1945b lim: 4096 exec/s: 2048 rss: 49Mb".
STATUS = re.compile(r"^#(\d+)\s+(INITED|DONE|pulse|NEW|REDUCE)\s+(?:cov: (\d+) )?(?:ft: (\d+) )?corp: (\d+)/")
STAT = re.compile(r"^stat::(\w+):\s+(\d+)")


def targets() -> list[str]:
    return sorted(path.stem for path in FUZZ.glob("fuzz_*.py"))


def options(target: str) -> list[str]:
    """libFuzzer flags from fuzz/<target>.options ([libfuzzer] key = value)."""
    path = FUZZ / f"{target}.options"
    if not path.exists():
        return []
    parser = configparser.ConfigParser()
    parser.read(path)
    return [f"-{key}={value}" for key, value in parser.items("libfuzzer")] if parser.has_section("libfuzzer") else []


@dataclass
class Result:
    target: str
    returncode: int = 0
    execs: int = 0
    exec_per_sec: int = 0
    new_units: int = 0
    cov: tuple[int | None, int | None] = (None, None)
    ft: tuple[int | None, int | None] = (None, None)
    corpus: tuple[int | None, int | None] = (None, None)
    findings: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    log: Path | None = None

    @property
    def crashes(self) -> int:
        return len(self.findings) or (1 if self.returncode != 0 else 0)

    def line(self) -> str:
        def growth(name: str, pair: tuple[int | None, int | None]) -> str:
            return f"{name}={pair[0]}->{pair[1]}" if pair[0] is not None else f"{name}=?"

        parts = [
            f"{self.target}:",
            f"execs={self.execs}",
            f"exec/s={self.exec_per_sec}",
            growth("cov", self.cov),
            growth("ft", self.ft),
            growth("corpus", self.corpus),
            f"new_units={self.new_units}",
            f"crashes={self.crashes}",
            f"time={self.seconds:.1f}s",
        ]
        if self.returncode != 0:
            parts.append(f"exit={self.returncode}")
        return " ".join(parts)


def parse(result: Result, output: str) -> None:
    """Fill ``result`` from libFuzzer's output (its stderr)."""
    start: tuple[int | None, ...] | None = None  # the INITED line, else the first status line
    last: tuple[int | None, ...] | None = None
    stats: dict[str, int] = {}
    for line in output.splitlines():
        if match := STATUS.match(line):
            values = tuple(int(v) if v is not None else None for v in match.group(3, 4, 5))
            if start is None or match.group(2) == "INITED":
                start = values
            last = values
            result.execs = max(result.execs, int(match.group(1)))
        elif match := STAT.match(line):
            stats[match.group(1)] = int(match.group(2))
    if start is not None and last is not None:
        result.cov, result.ft, result.corpus = ((start[i], last[i]) for i in range(3))
    result.execs = stats.get("number_of_executed_units", result.execs)
    result.exec_per_sec = stats.get("average_exec_per_sec", 0)
    result.new_units = stats.get("new_units_added", 0)


def findings(directory: Path) -> set[Path]:
    return {path for path in directory.iterdir() if path.name.startswith(FINDING_PREFIXES)}


def run(target: str, seconds: int, artifacts: Path, python: str) -> Result:
    result = Result(target)
    target_artifacts = artifacts / target
    scratch = target_artifacts / "corpus"
    scratch.mkdir(parents=True, exist_ok=True)
    before = findings(target_artifacts)
    command = [
        python, "-m", f"fuzz.{target}",
        f"-max_total_time={seconds}",
        *BASE_FLAGS,
        f"-dict={FUZZ / f'{target}.dict'}",
        f"-artifact_prefix={target_artifacts}/",
        *options(target),
        str(scratch),
        str(FUZZ / "corpus" / target),
    ]
    result.log = target_artifacts / "last-run.log"
    started = time.monotonic()
    try:
        # libFuzzer stops itself after -max_total_time; the limit here only
        # catches a child that hangs outside an input (at start-up, say).
        completed = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", timeout=2 * seconds + 120, check=False)
        output, result.returncode = completed.stdout, completed.returncode
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        output += f"\nfuzz: {target} did not finish within {2 * seconds + 120} s and was killed\n"
        result.returncode = -9
    result.seconds = time.monotonic() - started
    result.log.write_text(" ".join(command) + "\n" + output)
    parse(result, output)
    result.findings = sorted(findings(target_artifacts) - before)
    return result


def report_failure(result: Result) -> None:
    """What to look at when a target found something."""
    for path in result.findings:
        print(f"  {result.target}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
              f"  (replay: python -m fuzz.{result.target} {path})")
    if result.log is not None:
        tail = result.log.read_text(errors="replace").splitlines()[-25:]
        print(f"  {result.target}: last lines of {result.log}:")
        for line in tail:
            print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    available = targets()
    parser = argparse.ArgumentParser(prog="python -m fuzz", description="Run the wire-codec fuzz campaign.")
    parser.add_argument("--seconds", type=int, default=20, help="libFuzzer -max_total_time per target (default 20)")
    parser.add_argument("--target", action="append", choices=available, metavar="NAME",
                        help=f"run only this target (repeatable); one of {', '.join(available)}")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at the same time (default 1)")
    parser.add_argument("--artifacts", type=Path, default=FUZZ / "artifacts",
                        help="where findings and scratch corpora go (default fuzz/artifacts)")
    parser.add_argument("--list", action="store_true", help="print the target names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in available:
            print(name)
        return 0
    if args.seconds < 1 or args.jobs < 1:
        parser.error("--seconds and --jobs must be at least 1")

    selected = args.target or available
    artifacts = args.artifacts.resolve()
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(lambda name: run(name, args.seconds, artifacts, sys.executable), selected):
            results.append(result)
            print(result.line(), flush=True)
            if result.crashes:
                report_failure(result)
    execs = sum(result.execs for result in results)
    crashes = sum(result.crashes for result in results)
    print(f"fuzz: targets={len(results)} execs={execs} crashes={crashes}", flush=True)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
