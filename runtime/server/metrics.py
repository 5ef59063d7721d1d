"""Prometheus metrics for /metrics, on a registry owned by the server (no process-global registry).

Latencies (TTFT, inter-token, end-to-end) are observed in the tokenizer manager as outputs arrive;
scheduler gauges (running/waiting requests, token usage, cache hit rate, throughput) are refreshed
from the scheduler's stats at scrape time. Names follow SGLang's (``sglang:`` → ``radixlm:``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the HTTP layer

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

# scheduler stats key → gauge name and help
_GAUGES = {
    "num_running_reqs": "The number of running requests.",
    "num_waiting_reqs": "The number of requests in the waiting queue.",
    "token_usage": "Fraction of the KV pool in use by running requests and locked cache entries.",
    "cache_hit_rate": "Prompt tokens served from the radix cache / prompt tokens.",
    "gen_throughput": "Generation throughput (tokens/s), recent window.",
    "free_tokens": "Free KV slots.",
    "evictable_tokens": "KV slots held by the radix cache, evictable.",
    "protected_tokens": "KV slots held by the radix cache, locked by running requests.",
    "max_total_tokens": "KV pool size in tokens.",
}


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self._labels = {"model_name": model_name}
        r = self.registry
        self.ttft = Histogram(
            "radixlm:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "radixlm:inter_token_latency_seconds", "Inter-token latency.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "radixlm:e2e_request_latency_seconds", "End-to-end request latency.", labels, buckets=_E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("radixlm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("radixlm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.cached_tokens = Counter("radixlm:cached_tokens", "Prompt tokens served from the cache.", labels, registry=r)
        self.requests = Counter(
            "radixlm:num_requests", "Finished requests by finish reason.", labels + ["finish_reason"], registry=r
        )
        self.gauges = {k: Gauge(f"radixlm:{k}", h, labels, registry=r) for k, h in _GAUGES.items()}

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.labels(**self._labels).observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.labels(**self._labels).observe(seconds)

    def observe_finished(self, e2e_s: float, meta_info: dict | None) -> None:
        self.e2e.labels(**self._labels).observe(e2e_s)
        meta = meta_info or {}
        self.prompt_tokens.labels(**self._labels).inc(meta.get("prompt_tokens", 0) or 0)
        self.generation_tokens.labels(**self._labels).inc(meta.get("completion_tokens", 0) or 0)
        self.cached_tokens.labels(**self._labels).inc(meta.get("cached_tokens", 0) or 0)
        fr = meta.get("finish_reason") or {}
        self.requests.labels(finish_reason=str(fr.get("type", "unknown")), **self._labels).inc()

    def set_scheduler_stats(self, stats: dict) -> None:
        for key, gauge in self.gauges.items():
            v = stats.get(key)
            if isinstance(v, (int, float)):
                gauge.labels(**self._labels).set(float(v))

    def render(self) -> bytes:
        return generate_latest(self.registry)
