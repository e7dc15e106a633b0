"""Command line: ``python -m bench [NAME ...] [--quick] [--list]``.

Without names every registered benchmark runs, in registry order.  An unknown
name is a usage error (exit status 2) reported before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from . import BENCHMARKS
from .harness import FULL, QUICK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run benchmarks; each result is one JSON line on stdout "
                    "(name, ours, baseline, ratio = ours / baseline, unit). Progress goes to stderr.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds: a few seconds in total")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, benchmark in BENCHMARKS.items():
            print(f"{name}\t{benchmark.summary}")
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        # parser.error prints usage and the message to stderr and exits with status 2.
        parser.error(f"unknown benchmark {', '.join(map(repr, unknown))} (known: {', '.join(BENCHMARKS)})")
    names = list(dict.fromkeys(args.names)) or list(BENCHMARKS)
    profile = QUICK if args.quick else FULL
    for name in names:
        module = importlib.import_module(BENCHMARKS[name].module)
        started = time.perf_counter()
        print(f"bench: {name} ({'quick' if args.quick else 'full'}: {profile.rounds} interleaved rounds)",
              file=sys.stderr)
        count = 0
        for result in module.run(profile):
            print(result.to_json(), flush=True)
            print(f"  {result.describe()}", file=sys.stderr, flush=True)
            count += 1
        print(f"bench: {name}: {count} results in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
