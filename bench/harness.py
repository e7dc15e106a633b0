"""Shared measuring code: interleaved, batched, median-of-rounds comparisons.

Theory of operation.  A benchmark compares *ours* with a *baseline* doing the
same job on the same input.  The machine is shared and noisy, so the two are
never timed in separate phases, where a burst of load would land on one side
only.  Instead:

1. Each function is calibrated on its own: its batch size is the number of
   calls that take about ``Profile.batch_ns`` (the calibration doubles as the
   warm-up).  Batching keeps ``time.perf_counter_ns`` overhead and resolution
   out of the per-call figure; the Python loop around the call remains and is
   the same for both sides.
2. Rounds alternate: ours then baseline, then baseline then ours, and so on,
   so neither side always runs in the other's wake (caches, frequency).
3. Each round yields one per-call time per side; the reported figure is the
   median over all rounds, which ignores the rounds a noisy neighbour spoiled.

The cyclic garbage collector is off while a comparison runs, as in ``timeit``:
its pauses land on whichever side happened to allocate the triggering object.

Output contract (DESIGN.md, "Public contracts"): one JSON object per result
with ``name``, ``ours``, ``baseline``, ``ratio`` (= ours / baseline, computed
from the printed, rounded figures) and ``unit``, plus optional extras.
"""

from __future__ import annotations

import gc
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_NS_PER_UNIT = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


@dataclass(frozen=True)
class Profile:
    """How hard to measure; ``--quick`` trades precision for a few seconds in total."""

    batch_ns: int  # target duration of one batch of calls
    rounds: int  # interleaved rounds; each gives one sample per side


FULL = Profile(batch_ns=1_000_000, rounds=201)
QUICK = Profile(batch_ns=1_000_000, rounds=31)


@dataclass(frozen=True)
class Result:
    """One line of benchmark output."""

    name: str
    ours: float
    baseline: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return round(self.ours / self.baseline, 3)

    def to_json(self) -> str:
        line = {"name": self.name, "ours": self.ours, "baseline": self.baseline,
                "ratio": self.ratio, "unit": self.unit}
        line.update(self.extra)
        return json.dumps(line)

    def describe(self) -> str:
        return (f"{self.name:<34} ours {self.ours:>10.3f} {self.unit}   "
                f"baseline {self.baseline:>9.3f} {self.unit}   x{self.ratio:.2f}")


def _significant(value: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits: more would be noise, fewer would blur the ratio."""
    return float(f"{value:.{digits}g}")


def _batch(fn: Callable[[Any], Any], arg: Any, n: int) -> int:
    """Nanoseconds taken by ``n`` calls of ``fn(arg)``."""
    calls = itertools.repeat(arg, n)
    start = time.perf_counter_ns()
    for a in calls:
        fn(a)
    return time.perf_counter_ns() - start


def _calibrate(fn: Callable[[Any], Any], arg: Any, batch_ns: int) -> int:
    """Number of calls that take about ``batch_ns``; also warms ``fn`` up."""
    n = 1
    while True:
        elapsed = _batch(fn, arg, n)
        if elapsed >= batch_ns // 4:
            return max(1, round(n * batch_ns / max(elapsed, 1)))
        n *= 2


def compare(name: str, ours: Callable[[Any], Any], baseline: Callable[[Any], Any], arg: Any, *,
            profile: Profile, unit: str = "us", **extra: Any) -> Result:
    """Median per-call time of ``ours(arg)`` and ``baseline(arg)``, measured interleaved."""
    scale = _NS_PER_UNIT[unit]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        n_ours = _calibrate(ours, arg, profile.batch_ns)
        n_base = _calibrate(baseline, arg, profile.batch_ns)
        ours_ns: list[float] = []
        base_ns: list[float] = []
        for round_no in range(profile.rounds):
            if round_no % 2 == 0:
                ours_ns.append(_batch(ours, arg, n_ours) / n_ours)
                base_ns.append(_batch(baseline, arg, n_base) / n_base)
            else:
                base_ns.append(_batch(baseline, arg, n_base) / n_base)
                ours_ns.append(_batch(ours, arg, n_ours) / n_ours)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Result(
        name=name,
        ours=_significant(statistics.median(ours_ns) / scale),
        baseline=_significant(statistics.median(base_ns) / scale),
        unit=unit,
        extra={"samples": profile.rounds, **extra},
    )
