"""BatchBuilder: which requests compute how many tokens in the next forward pass.

Admission and batch assembly, nothing else: decode reservation (one KV slot per decoding request,
retracting the cheapest requests when memory ran out), then the extend work (running requests with
several pending tokens, i.e. prompt chunks and jump-forward runs, then new requests from the waiting
queue in policy order) under the step's token budgets, with in-batch prefix sharing and the aging
bound. With KV tiers, a new request's prefix loaded from the host tier or disk counts in the memory
budget (a load that cannot fit together with the request's first chunk is not started). What happens to the batch after the forward is ``OutputProcessor``'s job.
"""

from __future__ import annotations

import logging

from radixlm.runtime.kv_manager import KVManager
from radixlm.runtime.radix_cache import RadixCache
from radixlm.runtime.req import Req
from radixlm.runtime.schedule_policy import SchedulePolicy
from radixlm.runtime.scheduler_stats import SchedulerCounters
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

Batch = list[tuple[Req, int]]  # (request, number of its pending tokens computed in this pass)


class BatchBuilder:
    """Moves requests between the scheduler's ``waiting`` and ``running`` lists (shared, mutated in
    place) and allocates their KV through ``kv``."""

    def __init__(self, args: ServerArgs, kv: KVManager, cache: RadixCache, policy: SchedulePolicy,
                 waiting: list[Req], running: list[Req], counters: SchedulerCounters) -> None:
        self.args = args
        self.kv = kv
        self.cache = cache
        self.policy = policy
        self.waiting = waiting
        self.running = running
        self.counters = counters
        self.chunk_size = args.chunked_prefill_size if args.chunked_prefill_size > 0 else 1 << 62

    def reserve_decode(self, reqs: list[Req]) -> list[Req]:
        """Make room for one token per decoding request, retracting the cheapest ones if needed."""
        reqs = list(reqs)
        while reqs and self.kv.available() < len(reqs):
            # Cheapest to redo: fewest generated tokens, then the longest prompt (frees the most).
            victim = min(reqs, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            reqs.remove(victim)
            self.retract(victim)
        for r in reqs:
            ok = self.kv.alloc_for(r, 1)
            assert ok, "decode allocation failed after reservation"
        return reqs

    def build_extend(self, step_count: int) -> Batch:
        """Running requests with several pending tokens (chunks, jump-forward) first, then new ones."""
        rem_prefill = self.args.max_prefill_tokens
        rem_chunk = self.chunk_size
        batch: Batch = []
        for r in list(self.running):
            if r.pending > 1 and rem_chunk > 0 and rem_prefill > 0:
                n = min(r.pending, rem_chunk, rem_prefill)
                if not self.kv.alloc_for(r, n):
                    self.retract(r)  # re-admitted later, when memory allows
                    continue
                batch.append((r, n))
                rem_chunk -= n
                rem_prefill -= n
        if not self.waiting or rem_chunk <= 0 or rem_prefill <= 0 or self.kv.table.available() == 0:
            return batch  # (also skips matching the whole queue against the tree when nothing can join)
        if len(self.running) >= self.args.max_running_requests:
            return batch

        reserved = sum(self._decode_reserve(r) for r in self.running)
        rem_load = self.args.max_prefill_tokens
        admitted: list[Req] = []
        for req in self.policy.order(self.waiting, step_count):
            aged = self.policy.is_aged(req, step_count)
            if req.grammar is not None and not req.grammar.ready:
                continue
            if len(self.running) + len(admitted) >= self.args.max_running_requests:
                break
            if self.kv.table.available() == 0:
                break
            if not aged and admitted and self._defer_for_shared_prefix(req, admitted):
                continue  # its uncached prefix is being computed by another request in this batch
            load = self.kv.admit(req)
            if load:
                # Tokens loaded from the host tier or disk need device slots like computed ones: the
                # whole load, the first chunk after it and the decode reservation must fit, or the
                # request waits (no load starts that could not be used). A step loads at most
                # max_prefill_tokens, unless the load is the step's first admission.
                left = req.pending - load
                n = min(left, rem_chunk, rem_prefill)
                need = load + n + (self._decode_reserve(req) if n == left else 0)
                if (admitted and load > rem_load) or need + reserved > self.kv.available():
                    self.kv.unadmit(req)
                    self.counters.num_load_deferred += 1
                    if aged:
                        break
                    continue
                loaded = self.kv.load_tiers(req, load)
                rem_load -= loaded
                self.counters.total_loaded_tokens += loaded
            n = min(req.pending, rem_chunk, rem_prefill)
            need = n + (self._decode_reserve(req) if n == req.pending else 0)
            if need + reserved > self.kv.available() or not self.kv.alloc_for(req, n):
                self.kv.unadmit(req)
                if aged:
                    break  # keep memory for the aged request: nothing overtakes it
                continue
            reserved += need - n
            admitted.append(req)
            batch.append((req, n))
            rem_chunk -= n
            rem_prefill -= n
            if rem_chunk <= 0 or rem_prefill <= 0:
                break
        for req in admitted:
            self.waiting.remove(req)
            self.running.append(req)
            if not req.first_admitted:
                req.first_admitted = True
                req.cached_tokens = req.kv_len
                self.counters.total_prompt_tokens += len(req.input_ids)
                self.counters.total_cached_tokens += min(req.kv_len, len(req.input_ids))
        return batch

    def _decode_reserve(self, req: Req) -> int:
        """Slots kept free for the tokens ``req`` is still expected to generate."""
        return int(req.remaining_new_tokens * self.args.new_token_ratio)

    def _defer_for_shared_prefix(self, req: Req, admitted: list[Req]) -> bool:
        threshold = self.args.in_batch_prefix_threshold
        if self.cache.disable or threshold <= 0:
            return False
        # Deferred when some admitted request shares at least ``threshold`` tokens beyond what req has cached.
        n = self.kv.cached_prefix_len(req) + threshold
        if n > req.max_prefix_len:
            return False
        head = req.tokens(0, n)
        return any(
            a.tokens(0, n) == head  # one C-level list compare per pair (shorter lists never compare equal)
            for a in admitted
            if a.cache_namespace == req.cache_namespace  # other namespaces never share its prefix
        )

    def retract(self, req: Req) -> None:
        """Back to the front of the queue; its computed KV goes to the tree (evictable), its row is freed."""
        self.kv.release(req, finished=True)
        self.running.remove(req)
        self.counters.num_retracted += 1
        self.waiting.insert(0, req)
        logger.debug("retracted %s (%d tokens)", req.rid, req.seq_len)
