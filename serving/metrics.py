"""Prometheus metrics of the gateway, served at `GET /metrics` on the API port in the text exposition format.

    gpt2_serve_requests_total{variant, status}            completion requests answered, by HTTP status
    gpt2_serve_completion_tokens_total{variant}           tokens generated
    gpt2_serve_time_to_first_token_seconds{variant}       histogram, streamed requests
    gpt2_serve_request_latency_seconds{variant}           histogram, request received to last event
    gpt2_serve_active_rows{variant}, gpt2_serve_queue_depth{variant}
                                                          decoding rows in use and requests waiting for one,
                                                          read from a model replica when scraped

The metrics live in a registry of their own, so Ray's metrics (exported by Ray on its own port) are left alone.
Counters and histograms are per gateway replica: with several, Prometheus scrapes each (or sums what it gets).
The `variant` label takes only configured names ("unknown" for a request rejected before naming a known one), so
clients cannot grow the number of series.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN = "unknown"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, variants) -> None:
        self.variants = set(variants)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpt2_serve_requests", "Completion requests answered, by variant and HTTP status "
                                "(a streamed response counts as its status when streaming began)",
                                ["variant", "status"], registry=r)
        self.tokens = Counter("gpt2_serve_completion_tokens", "Completion tokens generated", ["variant"], registry=r)
        self.ttft = Histogram("gpt2_serve_time_to_first_token_seconds",
                              "Time from receiving a streamed completion request to its first text",
                              ["variant"], buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("gpt2_serve_request_latency_seconds",
                                 "Time from receiving a completion request to its last event (finished or failed)",
                                 ["variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.active = Gauge("gpt2_serve_active_rows", "Requests decoding now (one model replica, read when scraped)",
                            ["variant"], registry=r)
        self.pending = Gauge("gpt2_serve_queue_depth",
                             "Requests waiting for a decoding row (one model replica, read when scraped)",
                             ["variant"], registry=r)
        for name in self.variants:  # series exist from the start, at zero, rather than appearing on first use
            self.tokens.labels(name)
            self.ttft.labels(name)
            self.latency.labels(name)

    def label(self, variant: str | None) -> str:
        return variant if variant in self.variants else UNKNOWN

    def answered(self, variant: str | None, status: int) -> None:
        self.requests.labels(self.label(variant), str(status)).inc()

    def timed(self, events, variant: str, started: float, streamed: bool) -> "TimedEvents":
        return TimedEvents(events, self, self.label(variant), started, streamed)

    def render(self, stats: dict | None) -> bytes:
        """The exposition text, with the replica gauges set from `stats` (ModelServer.stats; None: unavailable,
        and the gauges are left out rather than reported stale)."""
        self.active.clear()
        self.pending.clear()
        if stats is not None:
            for name in self.variants:
                engine = stats.get(name, {})
                self.active.labels(name).set(engine.get("active", 0))
                self.pending.labels(name).set(engine.get("pending", 0))
        return generate_latest(self.registry)


class TimedEvents:
    """The model event stream (batches of events) of one completion, passed through unchanged while its timings and
    tokens are recorded.

    A class rather than an async generator because the consumers also call `cancel()` on the stream (when the client
    goes away), which must reach the model replica's generator."""

    def __init__(self, events, metrics: GatewayMetrics, variant: str, started: float, streamed: bool) -> None:
        self._events, self._metrics, self._variant = events, metrics, variant
        self._started, self._streamed = started, streamed
        self._first_text_seen = self._done = False

    def __aiter__(self) -> "TimedEvents":
        return self

    async def __anext__(self) -> list[dict]:
        batch = await self._events.__anext__()
        elapsed = time.perf_counter() - self._started
        for event in batch:
            kind = event.get("event")
            if kind == "text" and not self._first_text_seen:
                self._first_text_seen = True
                if self._streamed:  # a request that is not streamed gets its text in one piece at the end
                    self._metrics.ttft.labels(self._variant).observe(elapsed)
            elif kind in ("end", "error") and not self._done:
                self._done = True
                self._metrics.latency.labels(self._variant).observe(elapsed)
                if kind == "end":
                    self._metrics.tokens.labels(self._variant).inc(event["usage"]["completion_tokens"])
        return batch

    def cancel(self) -> None:
        self._events.cancel()
