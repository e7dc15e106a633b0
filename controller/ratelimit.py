"""Rate limits against request floods and thrashing (claim C11).

Pure domain code: no grpc, no sockets, no asyncio.  The clock is injected.

Theory of operation.  Every call is charged to two token buckets: one per
principal, and, for calls that act on an instance, one per instance id that
every principal shares, so a flood of Start/Stop on one instance is refused
even when it comes from several principals.  A call is admitted only if both
buckets hold a token; then both are charged.  A refused call charges nothing
and changes nothing (no bucket is created, refilled, reordered or evicted).

Each bucket is kept in its GCRA form (the generic cell rate algorithm, ITU-T
I.371): one integer, the theoretical arrival time ``tat`` in nanoseconds.
With emission interval ``T = 1/rate`` and tolerance ``tau = (burst - 1) * T``,
a call at ``now`` is admitted iff ``now >= tat - tau``; admission sets
``tat = max(tat, now) + T``.  This is exactly a token bucket of capacity
``burst`` refilled at ``rate``, but in integer arithmetic, so the bound below
holds exactly rather than up to rounding.  The rate is quantised to a whole
number of nanoseconds per token (``BucketSpec.interval_ns``).

Invariants (proved by tests/controller/test_ratelimit.py):
- in any window of length ``t``, one bucket admits at most ``burst + t / T``
  calls;
- a refusal leaves the limiter exactly as it was: the admissions that follow
  are the same as if the refused call had never been made;
- after a refusal, the same call made ``retry_after`` later is admitted
  (when nothing else was admitted in between);
- memory is bounded: a bucket whose ``tat <= now`` is full, hence identical
  to a fresh one, and is dropped; each kind of bucket is also capped in
  number (least recently admitted first).  Evicting a bucket that is not yet
  full forgets its debt; that only happens when more than ``max_buckets``
  keys of one kind were admitted within one refill period, is counted in
  ``premature_evictions``, and new instance keys can only appear as fast as
  the principal buckets admit calls.

Time must not go backwards (use a monotonic clock); if an injected clock
does, the buckets simply refill no faster, never faster.
"""

from __future__ import annotations

import enum
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

NS_PER_S = 1_000_000_000
MAX_RATE_PER_S = 1_000_000.0
MAX_BURST = 1_000_000
DEFAULT_MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class BucketSpec:
    """A token bucket: ``rate_per_s`` tokens per second, at most ``burst`` stored (the first burst)."""

    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        rate_ok = type(self.rate_per_s) in (int, float) and 0 < self.rate_per_s <= MAX_RATE_PER_S
        if not rate_ok or math.isnan(self.rate_per_s):
            raise ValueError(f"rate_per_s must be a number in (0, {MAX_RATE_PER_S:g}]")
        if type(self.burst) is not int or not 1 <= self.burst <= MAX_BURST:
            raise ValueError(f"burst must be an integer in [1, {MAX_BURST}]")

    @property
    def interval_ns(self) -> int:
        """The emission interval T: nanoseconds per token (the rate, quantised)."""
        return max(1, round(NS_PER_S / self.rate_per_s))

    @property
    def tolerance_ns(self) -> int:
        return (self.burst - 1) * self.interval_ns


# Defaults sized for one control plane driving one host.  A Start/Stop pair per instance every few seconds
# is normal; ten in a burst is already thrashing.  Benchmarks and busy deployments configure their own.
DEFAULT_PRINCIPAL = BucketSpec(rate_per_s=50.0, burst=100)
DEFAULT_INSTANCE = BucketSpec(rate_per_s=2.0, burst=10)


class BucketKind(enum.Enum):
    PRINCIPAL = "principal"
    INSTANCE = "instance"


class RateLimited(Exception):
    """The call was refused; nothing was charged.  Maps to RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, bucket: BucketKind, key: str, retry_after_ns: int) -> None:
        super().__init__(f"rate limited by the {bucket.value} bucket of {key}; retry after "
                         f"{retry_after_ns / NS_PER_S:.3f} s")
        self.bucket = bucket
        self.key = key
        self.retry_after_ns = retry_after_ns

    @property
    def retry_after_seconds(self) -> float:
        return self.retry_after_ns / NS_PER_S

    @property
    def retry_after_ms(self) -> int:
        """Rounded up, so that a client that waits this long is admitted."""
        return -(-self.retry_after_ns // 1_000_000)


class _Table:
    """The buckets of one kind: key -> tat (ns), least recently admitted first."""

    def __init__(self, spec: BucketSpec, max_buckets: int) -> None:
        self.spec = spec
        self.max_buckets = max_buckets
        self.tats: OrderedDict[Hashable, int] = OrderedDict()
        self.premature_evictions = 0

    def wait_ns(self, key: Hashable, now: int) -> int:
        """How long until ``key`` admits a call: 0 if it would now.  Reads only."""
        tat = self.tats.get(key, now)  # an absent bucket is full
        return max(0, tat - self.spec.tolerance_ns - now)

    def charge(self, key: Hashable, now: int) -> None:
        tat = self.tats.pop(key, now)
        self.tats[key] = max(tat, now) + self.spec.interval_ns
        self._evict(now)

    def _evict(self, now: int) -> None:
        # Full buckets are indistinguishable from absent ones: dropping them changes no decision.
        while self.tats:
            oldest_key, oldest_tat = next(iter(self.tats.items()))
            if oldest_tat > now:
                break
            del self.tats[oldest_key]
        while len(self.tats) > self.max_buckets:
            self.tats.popitem(last=False)
            self.premature_evictions += 1


class RateLimiter:
    """Per-principal and per-instance token buckets.  Thread-safe."""

    def __init__(
        self,
        principal: BucketSpec = DEFAULT_PRINCIPAL,
        instance: BucketSpec = DEFAULT_INSTANCE,
        *,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if type(max_buckets) is not int or max_buckets < 1:
            raise ValueError("max_buckets must be a positive integer")
        self._tables = {
            BucketKind.PRINCIPAL: _Table(principal, max_buckets),
            BucketKind.INSTANCE: _Table(instance, max_buckets),
        }
        self._clock = clock
        self._lock = threading.Lock()

    def check(self, principal: str, instance_id: uuid.UUID | None, now_ns: int | None = None) -> None:
        """Admit one call or raise :class:`RateLimited` (charging nothing).

        Pass ``instance_id`` for calls that change an instance (``policy.METHODS[m].mutating`` and an
        instance id in the request), None otherwise, so that polling DescribeInstance while waiting for a
        guest does not use up the budget that protects the instance from Start/Stop thrashing.
        ``now_ns`` defaults to the injected clock (``time.monotonic_ns``).
        """
        with self._lock:
            now = self._clock() if now_ns is None else now_ns
            keys: list[tuple[BucketKind, Hashable]] = [(BucketKind.PRINCIPAL, principal)]
            if instance_id is not None:
                keys.append((BucketKind.INSTANCE, instance_id))
            waits = [(self._tables[kind].wait_ns(key, now), kind, key) for kind, key in keys]
            # The binding bucket is the one that needs the longest wait: after it, both admit.
            wait, kind, key = max(waits, key=lambda w: w[0])
            if wait > 0:
                raise RateLimited(kind, str(key), wait)
            for kind, key in keys:
                self._tables[kind].charge(key, now)

    def bucket_count(self, kind: BucketKind) -> int:
        with self._lock:
            return len(self._tables[kind].tats)

    def premature_evictions(self, kind: BucketKind) -> int:
        """Buckets dropped by the cap before they were full (for a metric; should stay 0)."""
        with self._lock:
            return self._tables[kind].premature_evictions
