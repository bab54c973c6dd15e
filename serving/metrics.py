"""Prometheus metrics of the server, served at `GET /metrics` on the API port in the text exposition format.

    gpt2_serve_requests_total{variant, status}            completion requests answered, by HTTP status
    gpt2_serve_completion_tokens_total{variant}           tokens generated
    gpt2_serve_time_to_first_token_seconds{variant}       histogram, streamed requests
    gpt2_serve_request_latency_seconds{variant}           histogram, request received to last event
    gpt2_serve_active_rows{variant}, gpt2_serve_queue_depth{variant}
                                                          decoding rows in use and requests waiting for one,
                                                          on the replica that answers the scrape
    gpt2_serve_prompt_tokens_computed_total{variant}      prompt tokens computed, and those lent by the prefix
    gpt2_serve_prompt_tokens_lent_total{variant}          cache (kept from an earlier prompt), since the variant
                                                          loaded on that replica; their ratio is the hit rate
    gpt2_serve_prefix_cache_bytes{variant}                memory the kept prompts take there

The metrics live in a registry of their own, so Ray's metrics (exported by Ray on its own port) are left alone.
Everything is per replica: with several, Prometheus scrapes each (or sums what it gets).
The `variant` label takes only configured names ("unknown" for a request rejected before naming a known one), so
clients cannot grow the number of series.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

UNKNOWN = "unknown"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
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
        self.active = Gauge("gpt2_serve_active_rows", "Requests decoding now (the replica that answers the scrape)",
                            ["variant"], registry=r)
        self.pending = Gauge("gpt2_serve_queue_depth",
                             "Requests waiting for a decoding row (the replica that answers the scrape)",
                             ["variant"], registry=r)
        self.cached = Gauge("gpt2_serve_prefix_cache_bytes", "Memory taken by computed prompts kept for later "
                            "requests (the replica that answers the scrape)", ["variant"], registry=r)
        self.engine_totals = _EngineTotals(self.variants)
        r.register(self.engine_totals)
        for name in self.variants:  # series exist from the start, at zero, rather than appearing on first use
            self.tokens.labels(name)
            self.ttft.labels(name)
            self.latency.labels(name)

    def label(self, variant: str | None) -> str:
        return variant if variant in self.variants else UNKNOWN

    def answered(self, variant: str | None, status: int) -> None:
        self.requests.labels(self.label(variant), str(status)).inc()

    async def timed(self, events, variant: str, started: float, streamed: bool):
        """The event batches of one completion, passed through unchanged while its timings and tokens are
        recorded. Closing it closes `events` (the client went away: the request's decoding rows are freed)."""
        variant = self.label(variant)
        first_text_seen = done = False
        try:
            async for batch in events:
                elapsed = time.perf_counter() - started
                for event in batch:
                    kind = event.get("event")
                    if kind == "text" and not first_text_seen:
                        first_text_seen = True
                        if streamed:  # a request that is not streamed gets its text in one piece at the end
                            self.ttft.labels(variant).observe(elapsed)
                    elif kind in ("end", "error") and not done:
                        done = True
                        self.latency.labels(variant).observe(elapsed)
                        if kind == "end":
                            self.tokens.labels(variant).inc(event["usage"]["completion_tokens"])
                yield batch
        finally:
            await events.aclose()

    def render(self, stats: dict) -> bytes:
        """The exposition text, with the replica gauges set from `stats` (ModelPool.stats: the loaded variants)."""
        self.active.clear()
        self.pending.clear()
        self.cached.clear()
        for name in self.variants:
            engine = stats.get(name, {})
            self.active.labels(name).set(engine.get("active", 0))
            self.pending.labels(name).set(engine.get("pending", 0))
            self.cached.labels(name).set(engine.get("prefix_cache", {}).get("bytes", 0))
        self.engine_totals.stats = stats
        return generate_latest(self.registry)


class _EngineTotals:
    """Totals that each engine keeps itself (serving.engine.DecodeEngine.stats), exposed as counters of the
    replica that answers the scrape. An engine counts from when its variant loaded: an unloaded and reloaded variant
    starts again at zero, which Prometheus reads as a counter reset."""

    def __init__(self, variants) -> None:
        self.variants = sorted(variants)
        self.stats: dict = {}

    def collect(self):
        computed = CounterMetricFamily("gpt2_serve_prompt_tokens_computed", "Prompt tokens computed by the model",
                                       labels=["variant"])
        lent = CounterMetricFamily("gpt2_serve_prompt_tokens_lent", "Prompt tokens not computed: lent by the prefix "
                                   "cache from an earlier prompt that began the same way", labels=["variant"])
        for name in self.variants:
            engine = self.stats.get(name, {})
            computed.add_metric([name], engine.get("prompt_tokens", 0))
            lent.add_metric([name], engine.get("prefix_cache", {}).get("tokens_lent", 0))
        yield computed
        yield lent
