"""Benchmarks: ``python -m bench [NAME ...] [--quick] [--list]``.

Each benchmark is a module with ``run(profile) -> Iterator[Result]`` (see
``harness.py``); each result is printed as one JSON line on stdout with
``name``, ``ours``, ``baseline``, ``ratio`` and ``unit`` (DESIGN.md, "Public
contracts").  Progress goes to stderr, so stdout can be piped into a tool.

Modules are imported only when selected, so one benchmark's dependencies (a
QEMU binary, a running controller) never slow down or break another.
"""

from __future__ import annotations

from typing import NamedTuple


class Benchmark(NamedTuple):
    module: str  # imported lazily; must define run(profile) -> Iterator[Result]
    summary: str  # one line for --list


# The closed set of benchmark names.  Adding a benchmark is one line here.
BENCHMARKS: dict[str, Benchmark] = {
    "wire": Benchmark("bench.wire", "agent-channel codec: decode/encode of every message vs hand-written struct code"),
    "agent": Benchmark("bench.agent", "authenticated PING through the agent vs a raw Unix-socket echo"),
    "controller": Benchmark("bench.controller", "audited Describe vs bare mTLS call; Start/Stop ops/s, fsync on/off"),
    "start": Benchmark("bench.start", "StartInstance to guest ready, AttachVolume to disk seen; vs QEMU by hand"),
    "fuzz": Benchmark("bench.fuzz", "exec/s of every fuzz target vs the same atheris runner on a trivial target"),
    "volume": Benchmark("bench.volume", "sequential write/read inside a guest: encrypted volume vs plain raw file"),
    "load": Benchmark("bench.load", "64 mixed-role clients under the shipped rate limits (sim), then a qemu lifecycle "
                                    "loop: latency vs one client, RSS at end vs start"),
    "scale": Benchmark("bench.scale", "1,000 sim instances: latency, RSS; 1M audit records; agent restart with 50"),
}
