"""Prometheus metrics of the router, per worker, on a registry of its own (refreshed at scrape time).

Counters: requests routed and failed per worker, routing decisions per reason (``cache_hit``,
``cache_miss``, ``imbalanced``, ``spread``, or the policy's name), failovers. Gauges per worker:
health, requests in flight, the worker's queue (waiting and running requests) and cache hit rate from
its last summary, and the size of the router's tree for it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from radixlm.router.workers import WorkerSet


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        w = ["worker"]
        self.requests = Counter("radixlm_router:requests", "Requests routed to the worker.", w, registry=r)
        self.errors = Counter("radixlm_router:request_errors", "Requests that failed on the worker.", w, registry=r)
        self.decisions = Counter("radixlm_router:decisions", "Routing decisions by reason.", ["reason"], registry=r)
        self.failovers = Counter("radixlm_router:failovers", "Requests retried on another worker.", registry=r)
        self.healthy = Gauge("radixlm_router:worker_healthy", "1 if the worker is in service.", w, registry=r)
        self.in_flight = Gauge("radixlm_router:in_flight_requests", "Requests in flight on the worker.", w, registry=r)
        self.waiting = Gauge("radixlm_router:worker_waiting_requests", "The worker's waiting queue.", w, registry=r)
        self.running = Gauge("radixlm_router:worker_running_requests", "The worker's running requests.", w, registry=r)
        self.hit_rate = Gauge("radixlm_router:worker_cache_hit_rate", "The worker's radix cache hit rate.", w, registry=r)
        self.tree = Gauge("radixlm_router:tree_chars", "Characters in the router's tree of the worker.", w, registry=r)

    def render(self, workers: WorkerSet) -> bytes:
        for w in workers.workers.values():
            self.healthy.labels(w.url).set(1 if w.available else 0)
            self.in_flight.labels(w.url).set(w.load)
            self.waiting.labels(w.url).set(w.stats.get("num_waiting_reqs", 0))
            self.running.labels(w.url).set(w.stats.get("num_running_reqs", 0))
            self.hit_rate.labels(w.url).set(w.stats.get("cache_hit_rate", 0.0))
            self.tree.labels(w.url).set(w.tree.size)
        return generate_latest(self.registry)
