"""Pull-only telemetry of the controller (claims C5, C16).

Nothing here is ever pushed: GetMetrics renders this registry (Prometheus
text exposition) when the control plane asks.  Counters by method and status
code, call latency, denials, rate-limit refusals, agent link state and
anomalies, and the agent's own gauges fetched over the channel at pull time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hostagent.wire import messages as m

from .app import AgentConnection, LinkState


class Telemetry:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter("passivisor_calls", "API calls by method and status code", ["method", "code"],
                             registry=self.registry)
        self.latency = Histogram("passivisor_call_seconds", "API call latency", ["method"], registry=self.registry)
        self.denials = Counter("passivisor_denials", "calls refused by authorization", ["method"],
                               registry=self.registry)
        self.limited = Counter("passivisor_rate_limited", "calls refused by a rate limit", ["method"],
                               registry=self.registry)
        self.link_up = Gauge("passivisor_agent_link_up", "1 when the agent link is up", registry=self.registry)
        self.anomalies = Gauge("passivisor_agent_anomalies", "anomalies seen on the agent link",
                               registry=self.registry)
        self.agent = Gauge("passivisor_agent", "the agent's gauges and counters", ["metric"], registry=self.registry)
        self._calls: dict[tuple[str, str], Counter] = {}
        self._latency: dict[str, Histogram] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        # The labelled children, looked up once: ``labels`` validates and locks on every call, and this
        # runs on every answered call.  The sets of methods and codes are closed, so the caches stay small.
        counter = self._calls.get((method, code))
        if counter is None:
            counter = self._calls.setdefault((method, code), self.calls.labels(method, code))
        histogram = self._latency.get(method)
        if histogram is None:
            histogram = self._latency.setdefault(method, self.latency.labels(method))
        counter.inc()
        histogram.observe(seconds)

    def denied(self, method: str) -> None:
        self.denials.labels(method).inc()

    def rate_limited(self, method: str) -> None:
        self.limited.labels(method).inc()

    def render(self, link: AgentConnection, agent_metrics: m.Metrics | None) -> str:
        self.link_up.set(1 if link.state is LinkState.UP else 0)
        self.anomalies.set(link.stats.anomalies)
        if agent_metrics is not None:
            for sample in agent_metrics.samples:
                self.agent.labels(sample.metric.name.lower()).set(sample.value)
        return generate_latest(self.registry).decode()
