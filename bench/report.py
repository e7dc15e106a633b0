"""Render benchmark JSON lines as a Markdown table: ``python -m bench.report RESULTS.jsonl``.

``python -m bench > results.jsonl`` keeps every figure of a run; this turns it
into the tables of docs/performance.md, one row per result: the figures, the
ratio, the target the result carries (``target_ratio``: at most;
``target_min_ratio``: at least; ``target_us`` / ``target_exec_s``: an absolute
bound on ``ours``) and whether it was met.  A line that is not a result is an
error, never skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_REQUIRED = ("name", "ours", "baseline", "ratio", "unit")


def verdict(result: dict[str, Any]) -> tuple[str, str]:
    """(the target as text, "met" / "**not met**" / "") for one result."""
    if "target_ratio" in result:
        bound = result["target_ratio"]
        return f"ratio <= {bound}", "met" if result["ratio"] <= bound else "**not met**"
    if "target_min_ratio" in result:
        bound = result["target_min_ratio"]
        return f"ratio >= {bound}", "met" if result["ratio"] >= bound else "**not met**"
    if "target_us" in result:
        bound = result["target_us"]
        return f"ours <= {bound} us", "met" if result["ours"] <= bound else "**not met**"
    if "target_exec_s" in result:
        bound = result["target_exec_s"]
        return f"ours >= {bound} exec/s", "met" if result["ours"] >= bound else "**not met**"
    if "report_if_ratio_below" in result:
        bound = result["report_if_ratio_below"]
        return f"report if ratio < {bound}", "reported" if result["ratio"] < bound else "met"
    return "", ""


def parse(lines: Iterable[str]) -> list[dict[str, Any]]:
    results = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(result, dict) or any(key not in result for key in _REQUIRED):
            raise ValueError(f"line {number}: not a benchmark result (needs {', '.join(_REQUIRED)})")
        results.append(result)
    return results


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| benchmark | ours | baseline | unit | ratio | target | |", "|---|---|---|---|---|---|---|"]
    for result in results:
        target, met = verdict(result)
        rows.append(f"| `{result['name']}` | {result['ours']:g} | {result['baseline']:g} | {result['unit']} "
                    f"| {result['ratio']:g} | {target} | {met} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON lines written by python -m bench")
    args = parser.parse_args(argv)
    try:
        results = parse(args.results.read_text().splitlines())
    except (OSError, ValueError) as exc:
        print(f"bench.report: {args.results}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
