"""Rate limits (claim C11): the admission bound, refusals that charge nothing, exact retry hints, bounded
memory.  Time is a fake integer clock in nanoseconds throughout."""

from __future__ import annotations

import threading
import uuid
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.ratelimit import (
    DEFAULT_INSTANCE,
    DEFAULT_PRINCIPAL,
    NS_PER_S,
    BucketKind,
    BucketSpec,
    RateLimited,
    RateLimiter,
)

PRINCIPALS = ("spiffe://controlplane/instance-manager", "spiffe://controlplane/volume-attacher",
              "spiffe://controlplane/network-manager")
INSTANCES = (uuid.UUID("6f1c2a4e-0b7d-4c1e-9a53-2f0d8e6b1c77"), uuid.UUID("0a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"),
             uuid.UUID("11111111-2222-4333-8444-555555555555"))

Call = tuple[int, int, int | None]  # (time advance in ns, principal index, instance index or None)

specs = st.builds(BucketSpec, rate_per_s=st.sampled_from([0.5, 1.0, 3.0, 7.0, 1000.0, 1e6]) | st.floats(0.1, 1e4),
                  burst=st.integers(1, 6))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[BucketSpec, BucketSpec, list[Call]]:
    principal, instance = draw(specs), draw(specs)
    step = max(principal.interval_ns, instance.interval_ns)
    calls = draw(st.lists(st.tuples(st.integers(0, 2 * step) | st.just(0), st.integers(0, 2),
                                    st.none() | st.integers(0, 2)), max_size=60))
    return principal, instance, calls


Outcome = tuple[int, int, int | None, RateLimited | None]  # (time, principal, instance, refusal or None)


def run(limiter: RateLimiter, calls: list[Call]) -> list[Outcome]:
    """Feed the calls; return (time, principal, instance, refusal or None) for each."""
    now, log = 0, list[Outcome]()
    for advance, who, instance in calls:
        now += advance
        try:
            limiter.check(PRINCIPALS[who], None if instance is None else INSTANCES[instance], now_ns=now)
            log.append((now, who, instance, None))
        except RateLimited as refusal:
            log.append((now, who, instance, refusal))
    return log


def admissions_respect_the_bound(times: list[int], spec: BucketSpec) -> None:
    """In every window [times[i], times[j]]: admissions <= burst + length / T, in exact integers."""
    for i in range(len(times)):
        for j in range(i, len(times)):
            count = j - i + 1
            assert (count - spec.burst) * spec.interval_ns <= times[j] - times[i], (i, j, times)


@given(scenarios())
def test_no_bucket_ever_admits_more_than_burst_plus_rate_times_t(scenario: tuple[BucketSpec, BucketSpec,
                                                                                  list[Call]]) -> None:
    principal, instance, calls = scenario
    log = run(RateLimiter(principal, instance, clock=lambda: 0), calls)
    admitted = [entry for entry in log if entry[3] is None]
    for who in range(3):
        admissions_respect_the_bound([t for t, w, _, _ in admitted if w == who], principal)
    for iid in range(3):
        # The instance bucket is shared by every principal.
        admissions_respect_the_bound([t for t, _, i, _ in admitted if i == iid], instance)


@given(scenarios())
def test_refusals_charge_nothing(scenario: tuple[BucketSpec, BucketSpec, list[Call]]) -> None:
    """Replaying only the admitted calls gives the same admissions and leaves the limiter in the same state."""
    principal, instance, calls = scenario
    full, admitted_only = RateLimiter(principal, instance), RateLimiter(principal, instance)
    log = run(full, calls)
    now = 0
    for (advance, who, iid), (_, _, _, refusal) in zip(calls, log, strict=True):
        now += advance
        if refusal is None:
            admitted_only.check(PRINCIPALS[who], None if iid is None else INSTANCES[iid], now_ns=now)
    # Same state: every possible next call is decided the same way by both.
    for who in range(3):
        for iid in (None, 0, 1, 2):
            outcomes: list[tuple[BucketKind, str, int] | None] = []
            for limiter in (full, admitted_only):  # the probes change both limiters alike
                try:
                    limiter.check(PRINCIPALS[who], None if iid is None else INSTANCES[iid], now_ns=now)
                    outcomes.append(None)
                except RateLimited as refusal:
                    outcomes.append((refusal.bucket, refusal.key, refusal.retry_after_ns))
            assert outcomes[0] == outcomes[1]


@given(scenarios())
def test_decisions_match_a_continuous_token_bucket_in_exact_arithmetic(
        scenario: tuple[BucketSpec, BucketSpec, list[Call]]) -> None:
    """An independent model: tokens refill continuously at 1/T per ns, capped at burst (Fractions)."""
    principal, instance, calls = scenario
    model: dict[tuple[str, object], tuple[Fraction, int]] = {}

    def tokens(kind: str, key: object, spec: BucketSpec, now: int) -> Fraction:
        stored, since = model.get((kind, key), (Fraction(spec.burst), now))
        return min(Fraction(spec.burst), stored + Fraction(now - since, spec.interval_ns))

    for now, who, iid, refusal in run(RateLimiter(principal, instance), calls):
        buckets = [("principal", who, principal)] + ([] if iid is None else [("instance", iid, instance)])
        levels = [(tokens(kind, key, spec, now), kind, key, spec) for kind, key, spec in buckets]
        if all(level >= 1 for level, *_ in levels):
            assert refusal is None
            for level, kind, key, _ in levels:
                model[(kind, key)] = (level - 1, now)
        else:
            assert refusal is not None
            waits = [((1 - level) * spec.interval_ns, kind) for level, kind, _, spec in levels if level < 1]
            longest = max(wait for wait, _ in waits)
            assert refusal.retry_after_ns == longest
            assert refusal.bucket.value in {kind for wait, kind in waits if wait == longest}


@given(scenarios(), st.integers(0, 2), st.none() | st.integers(0, 2))
def test_waiting_the_retry_hint_is_exactly_enough(scenario: tuple[BucketSpec, BucketSpec, list[Call]], who: int,
                                                 iid: int | None) -> None:
    principal, instance, calls = scenario
    limiter = RateLimiter(principal, instance)
    now = sum(advance for advance, _, _ in calls)
    run(limiter, calls)
    instance_id = None if iid is None else INSTANCES[iid]
    while True:  # exhaust, then check the hint
        try:
            limiter.check(PRINCIPALS[who], instance_id, now_ns=now)
        except RateLimited as refusal:
            wait = refusal.retry_after_ns
            break
    assert wait > 0
    with pytest.raises(RateLimited):
        limiter.check(PRINCIPALS[who], instance_id, now_ns=now + wait - 1)
    limiter.check(PRINCIPALS[who], instance_id, now_ns=now + wait)


def test_a_flood_on_one_instance_is_refused_across_principals() -> None:
    limiter = RateLimiter(BucketSpec(1000.0, 1000), BucketSpec(1.0, 3))
    for i in range(3):
        limiter.check(PRINCIPALS[i % 3], INSTANCES[0], now_ns=0)
    for who in PRINCIPALS:
        with pytest.raises(RateLimited) as info:
            limiter.check(who, INSTANCES[0], now_ns=0)
        assert info.value.bucket is BucketKind.INSTANCE
        assert info.value.key == str(INSTANCES[0])
        assert info.value.retry_after_ns == NS_PER_S
    # Other instances and calls on no instance are unaffected.
    limiter.check(PRINCIPALS[0], INSTANCES[1], now_ns=0)
    limiter.check(PRINCIPALS[0], None, now_ns=0)


def test_principals_have_independent_buckets() -> None:
    limiter = RateLimiter(BucketSpec(1.0, 2), BucketSpec(1000.0, 1000))
    limiter.check(PRINCIPALS[0], None, now_ns=0)
    limiter.check(PRINCIPALS[0], None, now_ns=0)
    with pytest.raises(RateLimited) as info:
        limiter.check(PRINCIPALS[0], INSTANCES[0], now_ns=0)
    assert (info.value.bucket, info.value.key) == (BucketKind.PRINCIPAL, PRINCIPALS[0])
    limiter.check(PRINCIPALS[1], None, now_ns=0)


def test_a_refusal_creates_no_bucket_and_charges_no_instance() -> None:
    limiter = RateLimiter(BucketSpec(1.0, 1), BucketSpec(1.0, 1))
    limiter.check(PRINCIPALS[0], None, now_ns=0)
    before = (limiter.bucket_count(BucketKind.PRINCIPAL), limiter.bucket_count(BucketKind.INSTANCE))
    with pytest.raises(RateLimited):
        limiter.check(PRINCIPALS[0], INSTANCES[0], now_ns=0)
    assert (limiter.bucket_count(BucketKind.PRINCIPAL), limiter.bucket_count(BucketKind.INSTANCE)) == before
    limiter.check(PRINCIPALS[1], INSTANCES[0], now_ns=0)  # the instance's one token is still there


def test_retry_hint_units() -> None:
    refusal = RateLimited(BucketKind.PRINCIPAL, "p", 1_500_000_001)
    assert refusal.retry_after_seconds == 1.500000001
    assert refusal.retry_after_ms == 1501  # rounded up: waiting this long is enough
    assert RateLimited(BucketKind.PRINCIPAL, "p", 2_000_000).retry_after_ms == 2
    assert "principal" in str(refusal)


def test_idle_buckets_are_dropped_once_full() -> None:
    spec = BucketSpec(10.0, 2)  # refills completely in 200 ms
    limiter = RateLimiter(spec, spec)
    for i, iid in enumerate(INSTANCES):
        limiter.check(PRINCIPALS[i], iid, now_ns=0)
    assert limiter.bucket_count(BucketKind.PRINCIPAL) == 3
    assert limiter.bucket_count(BucketKind.INSTANCE) == 3
    limiter.check(PRINCIPALS[0], None, now_ns=100_000_000)  # at 100 ms the others are full again: dropped
    assert limiter.bucket_count(BucketKind.PRINCIPAL) == 1
    assert limiter.bucket_count(BucketKind.INSTANCE) == 3  # dropped lazily, on the next admission of that kind
    limiter.check(PRINCIPALS[1], INSTANCES[0], now_ns=100_000_000)
    assert limiter.bucket_count(BucketKind.INSTANCE) == 1
    assert limiter.premature_evictions(BucketKind.INSTANCE) == 0


def test_the_number_of_buckets_is_capped() -> None:
    limiter = RateLimiter(BucketSpec(1e6, 1_000_000), BucketSpec(0.001, 1), max_buckets=8)
    for n in range(100):
        limiter.check(PRINCIPALS[0], uuid.UUID(int=n), now_ns=n)
        assert limiter.bucket_count(BucketKind.INSTANCE) <= 8
    assert limiter.premature_evictions(BucketKind.INSTANCE) == 100 - 8
    # The most recently admitted instances are remembered (least recently admitted go first).
    with pytest.raises(RateLimited):
        limiter.check(PRINCIPALS[0], uuid.UUID(int=99), now_ns=100)


def test_a_clock_that_goes_backwards_never_refills_faster() -> None:
    limiter = RateLimiter(BucketSpec(1.0, 1), DEFAULT_INSTANCE)
    limiter.check(PRINCIPALS[0], None, now_ns=10 * NS_PER_S)
    with pytest.raises(RateLimited) as info:
        limiter.check(PRINCIPALS[0], None, now_ns=5 * NS_PER_S)
    assert info.value.retry_after_ns == 6 * NS_PER_S


def test_the_injected_clock_is_used() -> None:
    now = [0]
    limiter = RateLimiter(BucketSpec(1.0, 1), DEFAULT_INSTANCE, clock=lambda: now[0])
    limiter.check(PRINCIPALS[0], None)
    with pytest.raises(RateLimited):
        limiter.check(PRINCIPALS[0], None)
    now[0] = NS_PER_S
    limiter.check(PRINCIPALS[0], None)


def test_concurrent_checks_admit_exactly_the_burst() -> None:
    limiter = RateLimiter(BucketSpec(1.0, 50), DEFAULT_INSTANCE, clock=lambda: 0)
    admitted: list[int] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(20):
            try:
                limiter.check(PRINCIPALS[0], None)
                admitted.append(1)
            except RateLimited:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 50


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1.0, 1), (float("nan"), 1), (float("inf"), 1), (2e6, 1),
                                             ("1", 1), (1.0, 0), (1.0, 1.5), (1.0, True), (1.0, 2_000_000)])
def test_bucket_specs_are_validated(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        BucketSpec(rate, burst)


def test_rates_are_quantised_to_whole_nanoseconds() -> None:
    assert BucketSpec(3.0, 1).interval_ns == 333_333_333
    assert BucketSpec(1e6, 1).interval_ns == 1000
    assert BucketSpec(2.0, 5).tolerance_ns == 4 * 500_000_000
    assert DEFAULT_PRINCIPAL.burst >= 1 and DEFAULT_INSTANCE.burst >= 1
    with pytest.raises(ValueError):
        RateLimiter(max_buckets=0)
