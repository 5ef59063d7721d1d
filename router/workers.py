"""The router's workers: their state, health checks, and the correction of their approximate trees.

Every ``health_check_interval_s`` the router asks each worker's ``/health`` and reads its
``/get_server_info`` (its scheduler's stats are the cache summary: how many tokens its radix tree
holds, evictable + locked). A worker that fails ``health_failure_threshold`` liveness checks in a row,
or refuses a connection (to a request or to a check), is taken out: no new
requests, and the requests in flight on it fail at once with an error (``Worker.dead`` wakes them), so
no client waits on a dead worker. A check that succeeds again puts it back.

Tree correction, so the picture does not drift from what the worker really holds:

* the worker's cache was flushed (its prompt counters went back) or it restarted (new scheduler pid):
  the tree is cleared;
* the tree holds more characters than the worker's cached tokens can cover (tokens × the characters per
  token measured on this worker, plus the prompts still in flight): the least recently used leaves go
  until it fits, which is what the worker's own LRU eviction did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from radixlm.router.prefix_tree import ApproxPrefixTree

logger = logging.getLogger("radixlm.router")

_MIN_CPT, _MAX_CPT = 0.5, 16.0  # plausible characters per token


@dataclass
class Worker:
    url: str
    healthy: bool = False
    removed: bool = False  # /remove_worker: draining, gets no new requests
    load: int = 0  # requests in flight through the router
    pending_chars: int = 0  # routing-key characters of those requests
    requests_total: int = 0
    errors_total: int = 0
    failures_in_row: int = 0
    tree: ApproxPrefixTree = field(default_factory=ApproxPrefixTree)
    stats: dict = field(default_factory=dict)  # the worker's last scheduler stats
    dead: asyncio.Event = field(default_factory=asyncio.Event)  # set while the worker is out
    last_error: Optional[str] = None
    last_check: float = 0.0
    # characters-per-token estimate: characters routed here vs prompt tokens the worker counted since
    _chars_since: int = 0
    _tokens_base: Optional[int] = None
    _scheduler_pid: Optional[int] = None

    @property
    def available(self) -> bool:
        return self.healthy and not self.removed

    def chars_per_token(self) -> Optional[float]:
        tokens = self.stats.get("total_prompt_tokens", 0) - (self._tokens_base or 0)
        if self._tokens_base is None or tokens <= 0 or self._chars_since <= 0:
            return None
        return min(max(self._chars_since / tokens, _MIN_CPT), _MAX_CPT)

    def routed(self, key: str) -> None:
        self.load += 1
        self.pending_chars += len(key)
        self.requests_total += 1
        self._chars_since += len(key)

    def finished(self, key: str, failed: bool) -> None:
        self.load -= 1
        self.pending_chars -= len(key)
        if failed:
            self.errors_total += 1

    def describe(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "removed": self.removed, "load": self.load,
                "requests_total": self.requests_total, "errors_total": self.errors_total,
                "tree_chars": self.tree.size, "chars_per_token": self.chars_per_token(),
                "cache_hit_rate": self.stats.get("cache_hit_rate"),
                "num_waiting_reqs": self.stats.get("num_waiting_reqs"),
                "num_running_reqs": self.stats.get("num_running_reqs"), "last_error": self.last_error}

    # ------------------------------------------------------------------ health and summaries
    def mark_down(self, reason: str) -> None:
        if self.healthy:
            logger.warning("worker %s is out: %s", self.url, reason)
        self.healthy = False
        self.last_error = reason
        self.dead.set()

    def apply_info(self, info: dict) -> None:
        """A successful check: back in service, and the tree corrected from the cache summary."""
        if not self.healthy:
            logger.info("worker %s is healthy", self.url)
        self.healthy = True
        self.failures_in_row = 0
        self.last_error = None
        if self.dead.is_set():
            self.dead = asyncio.Event()
        stats = info.get("scheduler_stats") or {}
        pid = (info.get("pids") or {}).get("scheduler")
        prompt_total = int(stats.get("total_prompt_tokens", 0))
        restarted = self._scheduler_pid is not None and pid is not None and pid != self._scheduler_pid
        flushed = prompt_total < int(self.stats.get("total_prompt_tokens", 0))
        self._scheduler_pid = pid
        if restarted or flushed:
            self.tree.clear()
            self._tokens_base, self._chars_since = None, 0
        self.stats = stats
        if self._tokens_base is None:
            self._tokens_base, self._chars_since = prompt_total - 0, 0
            return
        self.correct_tree()

    def correct_tree(self) -> int:
        """Trim the tree to what the worker can hold; returns the characters dropped."""
        cpt = self.chars_per_token()
        if cpt is None or "evictable_tokens" not in self.stats:
            return 0
        cached_tokens = int(self.stats.get("evictable_tokens", 0)) + int(self.stats.get("protected_tokens", 0))
        budget = int(cached_tokens * cpt) + self.pending_chars
        if self.tree.size > budget * 1.1 + 64:
            return self.tree.evict(self.tree.size - budget)
        return 0


class WorkerSet:
    """The workers, in the order they were added, and the loop that checks them."""

    def __init__(self, urls: tuple[str, ...], client: httpx.AsyncClient, headers: dict[str, str],
                 interval_s: float, failure_threshold: int, max_tree_chars: int = 1 << 24):
        self.workers: dict[str, Worker] = {}
        self._client = client
        self._headers = headers
        self.interval_s = interval_s
        self.failure_threshold = failure_threshold
        self.max_tree_chars = max_tree_chars
        self._task: Optional[asyncio.Task] = None
        for u in urls:
            self.add(u)

    def add(self, url: str) -> Worker:
        w = self.workers.get(url)
        if w is None:
            w = self.workers[url] = Worker(url)
            w.dead.set()  # out until its first check succeeds
        w.removed = False
        return w

    def remove(self, url: str) -> Optional[Worker]:
        """Stop routing to ``url``; requests in flight there finish. Forgotten once idle."""
        w = self.workers.get(url)
        if w is not None:
            w.removed = True
            w.tree.clear()
            if w.load == 0:
                del self.workers[url]
        return w

    def forget_if_drained(self, w: Worker) -> None:
        if w.removed and w.load == 0 and self.workers.get(w.url) is w:
            del self.workers[w.url]

    def available(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.available]

    async def check(self, w: Worker) -> bool:
        """Liveness from ``/health`` (answered by the worker's front process, which itself watches its
        scheduler), then the cache summary from ``/get_server_info``. Only liveness failures count
        against the worker: a summary that is slow because the scheduler is busy is merely skipped."""
        try:
            r = await self._client.get(w.url + "/health", timeout=max(self.interval_s, 2.0))
            if r.status_code != 200:
                raise RuntimeError(f"/health answered {r.status_code}")
        except (httpx.HTTPError, RuntimeError) as e:
            w.failures_in_row += 1
            reason = f"health check failed: {type(e).__name__}: {e}"
            w.last_error = reason
            # A refused connection is unambiguous (nothing listens: the process is gone); a timeout or
            # an error answer may be a busy worker, so those count toward the threshold.
            if (isinstance(e, httpx.ConnectError) or w.failures_in_row >= self.failure_threshold
                    or not w.healthy):
                w.mark_down(reason)
            return False
        finally:
            w.last_check = time.monotonic()
        try:
            r = await self._client.get(w.url + "/get_server_info", headers=self._headers, timeout=10.0)
            info = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            info = None
        if info is None:
            if not w.healthy:  # a worker is taken in only once it answers fully (a wrong key shows here)
                w.last_error = "/get_server_info failed"
                return False
            w.failures_in_row = 0
            return True
        w.apply_info(info)
        return True

    def bound_trees(self) -> None:
        """Keep every tree under ``max_tree_chars`` (to 90% of it), summaries or not."""
        for w in self.workers.values():
            if w.tree.size > self.max_tree_chars:
                w.tree.evict(w.tree.size - int(self.max_tree_chars * 0.9))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self.workers.values())))

    async def wait_any_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            await self.check_all()
            if self.available() or time.monotonic() >= deadline:
                return bool(self.available())
            await asyncio.sleep(min(0.5, self.interval_s))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_all()
                self.bound_trees()
            except Exception:  # noqa: BLE001 - the loop must survive anything one check does
                logger.exception("health check loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def aggregate_stats(self) -> dict[str, Any]:
        """Integer stats summed over the healthy workers (free/evictable/protected tokens, queues...)."""
        out: dict[str, Any] = {}
        for w in self.workers.values():
            if not w.healthy:
                continue
            for k, v in w.stats.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        if out.get("total_prompt_tokens"):
            out["cache_hit_rate"] = out.get("total_cached_tokens", 0) / out["total_prompt_tokens"]
        return out
