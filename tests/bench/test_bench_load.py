"""``python -m bench load``: how answers are judged, and a short run on the sim backend.

The fast tests check the judging (``classify``, the retrying ``Client``, the exit on unexpected
errors) with fake answers.  The slow ones start what the benchmark starts: a sim-backend
``passivisor-agent`` and a ``passivisor-controller`` (TLS on port 0, the development PKI, the shipped
rate limits) and 8 clients for 3 s.  As in test_bench_cli.py, no timing is asserted: only that
every figure is reported and that nothing but the expected refusals happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
# bench/ is a tool run from the checkout (``python -m bench``), not an installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402
from bench.harness import QUICK, Result  # noqa: E402
from controller.api.gen.passivisor.v1 import controller_pb2 as pb  # noqa: E402

RE, FP = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION


class _Answer(grpc.RpcError):
    """A refused call as a grpc stub raises it: status code, details, trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str = "", metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def _rate_limited(ms: int = 20) -> _Answer:
    return _Answer(RE, "rate limit of the principal reached", (("retry-after-ms", str(ms)),))


# --- judging answers -------------------------------------------------------------------


@pytest.mark.parametrize("method", list(load.METHODS))
def test_a_rate_limit_refusal_is_expected_for_every_method(method: str) -> None:
    assert load.classify(method, _rate_limited(20)) is load.Verdict.RATE_LIMITED
    assert load.retry_after_s(_rate_limited(20)) == 0.02


def test_resource_exhausted_without_a_retry_hint_is_unexpected() -> None:
    # The agent's INSUFFICIENT_CORES: the host ran out of something, which under this load means a leak.
    assert load.classify("start", _Answer(RE, "agent refused: INSUFFICIENT_CORES")) is load.Verdict.UNEXPECTED


def test_failed_precondition_is_expected_only_for_a_vf_on_a_host_without_sriov() -> None:
    assert load.classify("assign_vf", _Answer(FP, "agent refused: PF_NOT_FOUND")) is load.Verdict.NO_SRIOV
    assert load.classify("assign_vf", _Answer(FP, "agent refused: INVALID_STATE")) is load.Verdict.UNEXPECTED
    assert load.classify("attach", _Answer(FP, "agent refused: PF_NOT_FOUND")) is load.Verdict.UNEXPECTED
    assert load.classify("stop", _Answer(FP, "agent refused: INVALID_STATE")) is load.Verdict.UNEXPECTED


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c not in (grpc.StatusCode.OK, RE, FP)],
                         ids=lambda c: c.name)
def test_every_other_code_is_unexpected(code: grpc.StatusCode) -> None:
    for method in load.METHODS:
        assert load.classify(method, _Answer(code, "agent refused: PF_NOT_FOUND",
                                             (("retry-after-ms", "5"),))) is load.Verdict.UNEXPECTED


class _Stub:
    """Every method answers from one script: each item is raised if it is an exception, else returned."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls = 0

    def __getattr__(self, method: str) -> Any:
        def call(request: Any, timeout: float) -> Any:
            self.calls += 1
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item

        return call


def test_a_client_retries_a_refused_call_and_times_only_the_admitted_one() -> None:
    unexpected: list[load.Unexpected] = []
    tally = load.Tally()
    stub = _Stub([_rate_limited(1), _rate_limited(1), "answer"])
    client = load.Client("instance-manager#0", "sim", stub, unexpected, tally)
    assert client.call("describe", object()) == "answer"
    assert stub.calls == 3
    assert tally.codes["describe"] == {"RESOURCE_EXHAUSTED": 2, "OK": 1}
    assert len(tally.latencies["describe"]) == 1
    assert unexpected == []


def test_a_client_stops_on_an_unexpected_answer_and_records_it() -> None:
    unexpected: list[load.Unexpected] = []
    tally = load.Tally()
    client = load.Client("instance-manager#3", "sim", _Stub([_Answer(grpc.StatusCode.INTERNAL, "boom")]),
                         unexpected, tally)
    with pytest.raises(load.Failed):
        client.call("describe", object())
    assert unexpected == [load.Unexpected("sim", "describe", "INTERNAL", "boom", "instance-manager#3")]
    assert tally.codes["describe"] == {"INTERNAL": 1}
    assert "describe" not in tally.latencies


def test_a_client_refused_past_the_end_of_the_window_gives_up_without_effect() -> None:
    stub = _Stub([_rate_limited(60_000)])
    client = load.Client("auditor#0", "sim", stub, [], load.Tally())
    client.deadline = 0.0  # long past: waiting a minute would overrun it
    assert client.call("describe", object()) is None
    assert stub.calls == 1


def test_a_vf_refused_for_want_of_sriov_is_timed_and_answers_none() -> None:
    tally = load.Tally()
    client = load.Client("network-manager#0", "sim", _Stub([_Answer(FP, "agent refused: PF_NOT_FOUND")]), [], tally)
    assert client.call("assign_vf", object()) is None
    assert tally.codes["assign_vf"] == {"FAILED_PRECONDITION": 1}
    assert len(tally.latencies["assign_vf"]) == 1


def test_unexpected_errors_exit_non_zero_listing_each_kind() -> None:
    errors = [load.Unexpected("sim", "describe", "DEADLINE_EXCEEDED", "Deadline Exceeded", f"instance-manager#{i}")
              for i in range(3)] + [load.Unexpected("qemu", "attach", "MARKER_MISMATCH", "marker X", "volume-attacher")]
    with pytest.raises(SystemExit) as info:
        load.check(errors)
    message = info.value.code
    assert isinstance(message, str)  # SystemExit with a message exits with status 1 and prints it
    assert "4 unexpected error(s)" in message
    assert "3 x sim describe: DEADLINE_EXCEEDED: Deadline Exceeded (first: instance-manager#0)" in message
    assert "1 x qemu attach: MARKER_MISMATCH: marker X" in message
    load.check([])  # nothing unexpected: no exit


def _fake_phases(monkeypatch: pytest.MonkeyPatch, sim: load.PhaseReport, qemu: load.PhaseReport | None) -> None:
    monkeypatch.setattr(load, "run_sim", lambda root, **kwargs: sim)
    monkeypatch.setattr(load, "run_qemu", lambda root, **kwargs: qemu)
    monkeypatch.setattr(load.shutil, "which", lambda name: None if qemu is None else f"/usr/bin/{name}")


def test_run_prints_every_result_before_it_exits_on_an_unexpected_error(monkeypatch: pytest.MonkeyPatch) -> None:
    figure = Result("load.p50_describe", 2.0, 1.0, "ms")
    bad = load.Unexpected("qemu", "stop", "INTERNAL", "agent refused: BACKEND_FAILURE", "instance-manager")
    _fake_phases(monkeypatch, load.PhaseReport([figure]), load.PhaseReport([figure], [bad]))
    results = load.run(QUICK)
    assert next(results) is figure
    assert next(results) is figure
    with pytest.raises(SystemExit, match="qemu stop: INTERNAL"):
        next(results)


def test_run_without_qemu_skips_the_lifecycle_loop_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    figure = Result("load.p50_describe", 2.0, 1.0, "ms")
    _fake_phases(monkeypatch, load.PhaseReport([figure]), None)
    assert list(load.run(QUICK)) == [figure]
    assert "QEMU is absent" in capsys.readouterr().err


def _events(instance_id: str, *kinds: int, reason: int = pb.EVENT_REASON_REQUESTED) -> Any:
    return pb.PollEventsResponse(next_cursor=10 + len(kinds), events=[
        pb.Event(cursor=10 + n, kind=kind, instance_id=instance_id, reason=reason)
        for n, kind in enumerate(kinds, 1)])


def test_a_qemu_cycle_must_leave_exactly_its_four_events() -> None:
    owned = load.Owned("0b6d3c9e-8f8a-4a52-9b7e-2f1d1c3e4a5b")
    good = _events(owned.instance_id, *load.CYCLE_EVENTS)
    assert load._expect_cycle_events(load.Client("telemetry", "qemu", _Stub([good]), []), owned, 10) == 14
    for bad in (_events(owned.instance_id, *load.CYCLE_EVENTS[:3]),  # the stop left no event
                _events(owned.instance_id, *load.CYCLE_EVENTS, reason=pb.EVENT_REASON_GUEST_POWEROFF),
                _events("1b6d3c9e-8f8a-4a52-9b7e-2f1d1c3e4a5b", *load.CYCLE_EVENTS)):
        unexpected: list[load.Unexpected] = []
        with pytest.raises(load.Failed):
            load._expect_cycle_events(load.Client("telemetry", "qemu", _Stub([bad]), unexpected), owned, 10)
        assert [u.code for u in unexpected] == ["EVENTS_MISMATCH"]


def test_memory_and_cpu_are_read_from_proc_and_a_gone_process_reads_none() -> None:
    rss, cpu = load.vm_rss_kib(os.getpid()), load.cpu_seconds(os.getpid())
    assert rss is not None and rss > 1024 and cpu is not None and cpu > 0
    assert load.machine_cpu_seconds() >= cpu
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert load.vm_rss_kib(gone.pid) is None and load.cpu_seconds(gone.pid) is None


def _admitted(**counts: int) -> load.Tally:
    tally = load.Tally()
    for method, count in counts.items():
        for _ in range(count):
            tally.record(method, "OK", 0.001)
    return tally


def test_admissions_within_the_shipped_buckets_pass_the_limit_check() -> None:
    unexpected: list[load.Unexpected] = []
    # In 10 s: a principal's bucket allows 100 + 50 * 10 = 600 calls, an instance's 10 + 2 * 10 = 30.
    limits = load._check_limits([_admitted(start=15, stop=15, describe=300), _admitted(list=270)],
                                [load.IM, load.IM], 10.0, unexpected)
    assert unexpected == []
    assert limits == {"admitted_by_principal": {load.IM: 600}, "principal_bound": 600,
                      "most_per_instance": 30, "instance_bound": 30}


def test_admissions_beyond_a_bucket_are_unexpected() -> None:
    unexpected: list[load.Unexpected] = []
    load._check_limits([_admitted(attach=16, detach=15), _admitted(read_audit_log=601)], [load.VA, load.AUD],
                       10.0, unexpected)
    assert [(u.code, u.who) for u in unexpected] == [("LIMIT_EXCEEDED", load.VA), ("LIMIT_EXCEEDED", load.AUD)]
    assert "31 mutating calls on one instance" in unexpected[0].details
    assert "601 calls of auditor" in unexpected[1].details


def test_percentile_stays_within_the_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 99) == pytest.approx(99.01)
    assert load.percentile([7.0], 99) == 7.0


def test_the_mix_of_64_clients() -> None:
    roles = [load.ROLE_PATTERN[i % len(load.ROLE_PATTERN)] for i in range(64)]
    assert {role: roles.count(role) for role in set(roles)} == {
        load.IM: 24, load.VA: 16, load.TEL: 8, load.AUD: 8, load.NM: 8}


# --- a short run for real ----------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> load.PhaseReport:
    return load.run_sim(tmp_path_factory.mktemp("load") / "sim", clients=8, seconds=3, baseline_rounds=10)


def _by_name(report: load.PhaseReport) -> dict[str, Result]:
    return {result.name: result for result in report.results}


@pytest.mark.slow
def test_short_load_meets_no_unexpected_error(short_run: load.PhaseReport) -> None:
    assert short_run.unexpected == [], load.failure_message(short_run.unexpected)


@pytest.mark.slow
def test_short_load_reports_latency_of_every_method_under_load_and_alone(short_run: load.PhaseReport) -> None:
    results = _by_name(short_run)
    for method in load.METHODS:
        p50, p99 = results[f"load.p50_{method}"], results[f"load.p99_{method}"]
        for figure in (p50, p99):
            assert figure.unit == "ms"
            assert figure.ours > 0 and figure.baseline > 0
            assert figure.extra["samples"] > 0 and figure.extra["baseline_samples"] > 0
            assert figure.extra["calls"] == sum(figure.extra["codes"].values())
        assert p99.ours >= p50.ours and p99.baseline >= p50.baseline


@pytest.mark.slow
def test_short_load_vf_requests_are_only_the_expected_refusal(short_run: load.PhaseReport) -> None:
    codes = short_run.load.codes["assign_vf"]
    assert codes["FAILED_PRECONDITION"] > 0
    assert set(codes) <= {"FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}


@pytest.mark.slow
def test_short_load_reports_rss_of_controller_and_agent(short_run: load.PhaseReport) -> None:
    results = _by_name(short_run)
    for name in ("load.rss_controller", "load.rss_agent"):
        rss = results[name]
        assert rss.unit == "MiB"
        assert rss.ours > 0 and rss.baseline > 0
        assert rss.extra["max_mib"] >= max(rss.ours, rss.baseline) and rss.extra["rss_samples"] >= 2
    admitted = results["load.admitted_per_s"]
    assert admitted.baseline == 5 * 50.0  # five roles, the shipped 50 calls/s each
    assert admitted.extra["clients"] == 8
    assert max(admitted.extra["admitted_by_principal"].values()) <= admitted.extra["principal_bound"]
    assert set(admitted.extra["cpu_s"]) == {"controller", "agent", "clients", "machine"}


@pytest.mark.slow
def test_an_unexpected_answer_fails_the_load(tmp_path: Path) -> None:
    """A policy that no longer grants telemetry GetMetrics: its PERMISSION_DENIED must be reported."""
    shipped = (ROOT / "controller" / "default_policy.toml").read_text()
    assert shipped.count('methods = ["GetMetrics", "PollEvents"]') == 1
    policy = tmp_path / "policy.toml"
    policy.write_text(shipped.replace('methods = ["GetMetrics", "PollEvents"]', 'methods = ["PollEvents"]'))
    report = load.run_sim(tmp_path / "sim", clients=8, seconds=1, baseline_rounds=2, policy=policy)
    assert [(u.method, u.code) for u in report.unexpected] == [("get_metrics", "PERMISSION_DENIED")]
    with pytest.raises(SystemExit, match="get_metrics: PERMISSION_DENIED"):
        load.check(report.unexpected)
