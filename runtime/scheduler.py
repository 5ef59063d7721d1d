"""Scheduler: the loop. Messages in (``handle``), one forward pass per ``step``, stats out.

One step = one forward pass. Every running request with one pending token decodes in every step; new
prompts, prompt chunks and jump-forward tokens ride in the same pass when there are any (mode EXTEND),
otherwise the pass is a pure DECODE. So running requests keep streaming while long prompts prefill.
Memory: every request holds a row of the req→token table and owns the KV slots of its computed tokens
beyond its locked radix prefix; the radix tree owns the rest. ``check_memory`` verifies that when idle
nothing is lost.

The parts, one job each: ``BatchBuilder`` (runtime/batch_builder.py) decides who computes what this
step; ``ModelRunner`` runs the pass; ``OutputProcessor`` (runtime/output_processor.py) turns logits into
tokens, finishes and outputs; ``GrammarManager`` (runtime/grammar_manager.py) handles grammars and
jump-forward. The scheduler is single-threaded and socket-free: the Engine drives it from a thread, the
server from its own process. Messages in and out are the Structs of ``radixlm.runtime.protocol``.
"""

from __future__ import annotations

import logging
import os

import torch

from radixlm.runtime.batch_builder import Batch, BatchBuilder
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.grammar_manager import GrammarManager
from radixlm.runtime.kv_manager import KVManager
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.output_processor import LogitsPlan, OutputProcessor
from radixlm.runtime.profiler import SchedulerProfiler
from radixlm.runtime.protocol import (
    AbortReq,
    ErrorOut,
    FlushCacheOut,
    FlushCacheReq,
    GetStatsReq,
    ProfileOut,
    ProfileReq,
    ReqOutput,
    SchedulerInput,
    SchedulerOutput,
    StatsOut,
    TokenizedGenerateReq,
)
from radixlm.runtime.kv_tiers import create_cache
from radixlm.runtime.req import Req
from radixlm.runtime.schedule_policy import Priority, SchedulePolicy
from radixlm.runtime.scheduler_stats import SchedulerCounters
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.hf_tokenizer import eos_token_ids, load_tokenizer
from radixlm.runtime.validation import RequestLimits, check_request

logger = logging.getLogger("radixlm.scheduler")


class Scheduler:
    def __init__(self, args: ServerArgs):
        self.args = args
        self.profiler = SchedulerProfiler()  # /start_profile, /stop_profile
        if not os.path.isdir(args.model_path):
            raise ValueError(f"model_path: {args.model_path!r} is not a directory (radixlm never downloads models)")
        self.tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
        self.runner = ModelRunner(args)
        self.cache = create_cache(args, self.runner.kv_pool)  # RadixCache, or HiRadixCache with KV tiers
        self.kv = KVManager(self.runner.kv_pool, self.runner.req_to_token_pool, self.cache)
        self._warned_priority = False  # the one warning about priorities sent while the flag is off
        self.policy = SchedulePolicy(
            args.schedule_policy, self.cache, args.lpm_aging_steps, args.lpm_fallback_queue_len, args.random_seed,
            Priority.from_args(args),
        )
        self.eos_ids = eos_token_ids(self.tokenizer, args.model_path)
        self.context_len = self.runner.context_len
        self.max_total_tokens = self.runner.max_total_tokens
        self.limits = RequestLimits.from_args(args, self.runner.vocab_size, self.context_len, self.tokenizer)

        # The two queues are shared with the parts below, which mutate them in place (never rebind).
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.step_count = 0
        self._outputs: list[ReqOutput] = []  # produced outside step() (aborts, errors)
        self.counters = SchedulerCounters()
        self.grammars = GrammarManager(args, self.tokenizer, self.runner.vocab_size, self.eos_ids)
        self.batches = BatchBuilder(args, self.kv, self.cache, self.policy, self.waiting, self.running, self.counters)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_ids, self.runner.sampler, self.kv, self.grammars,
                                       self.running, self.counters, args.enable_jump_forward)

    # ------------------------------------------------------------------ messages
    @property
    def model_info(self) -> dict:
        return {
            "model_path": self.args.model_path,
            "served_model_name": self.args.model_id,
            "is_generation": True,
            "context_length": self.context_len,
            "vocab_size": self.runner.vocab_size,
            "max_total_tokens": self.max_total_tokens,
            "dtype": str(self.runner.dtype).replace("torch.", ""),
            "device": self.runner.device,
            "attention_backend": self.args.resolved_attention_backend,
            "eos_token_ids": sorted(self.eos_ids),
        }

    def handle(self, msg: SchedulerInput) -> list[SchedulerOutput]:
        if isinstance(msg, TokenizedGenerateReq):
            try:
                self.add_request(msg)
            except ValueError as e:
                return [ErrorOut(rid=msg.rid, message=str(e))]
            except Exception as e:  # noqa: BLE001 - a request the checks did not foresee fails alone
                logger.exception("add_request %s failed", msg.rid)
                return [ErrorOut(rid=msg.rid, message=f"the request could not be queued: {type(e).__name__}: {e}")]
            return []
        if isinstance(msg, AbortReq):
            self.abort_request(msg.rid)
            return []
        if isinstance(msg, FlushCacheReq):
            ok, message = self.flush_cache()
            return [FlushCacheOut(success=ok, message=message)]
        if isinstance(msg, GetStatsReq):
            return [StatsOut(stats=self.get_stats())]
        if isinstance(msg, ProfileReq):
            ok, message = self.profiler.handle(msg.action, msg.output_dir)
            return [ProfileOut(success=ok, message=message)]
        return [ErrorOut(message=f"unknown message {type(msg).__name__}")]

    def add_request(self, tr: TokenizedGenerateReq) -> None:
        """Validate and queue. Raises ValueError (naming the field) for a request that can never run."""
        check_request(tr, self.limits)  # again: the front doors did, but this is the last line of defence
        sp = tr.sampling_params
        n_in = len(tr.input_ids)
        limit = min(self.context_len, self.max_total_tokens)
        if n_in + max(sp.min_new_tokens, 1) > limit:
            raise ValueError(
                f"input_ids: the prompt has {n_in} tokens; with min_new_tokens it exceeds the limit of {limit} "
                f"tokens (context_length={self.context_len}, max_total_tokens={self.max_total_tokens})"
            )
        if any(r.rid == tr.rid for r in self.waiting) or any(r.rid == tr.rid for r in self.running):
            raise ValueError(f"rid: a request with id {tr.rid!r} is already running")
        # A request may never outgrow the pool or the context: clip its budget (finish_reason "length").
        if n_in + sp.max_new_tokens > limit:
            sp = sp.replace(max_new_tokens=limit - n_in)
        if tr.priority is not None and not self.policy.priority.enabled and not self._warned_priority:
            # SGLang accepts and ignores it without the flag; say so once rather than silently.
            logger.warning("request %s sent priority=%d but priority scheduling is off "
                           "(--enable-priority-scheduling); priorities are ignored", tr.rid, tr.priority)
            self._warned_priority = True
        req = Req(
            rid=tr.rid,
            input_ids=list(tr.input_ids),
            sampling_params=sp,
            logprob=tr.logprob.for_scheduler(),
            cache_namespace=tr.cache_namespace,
            priority=tr.priority,
            arrival=self.step_count,
        )
        # Front ends validated the pattern; the compile runs in the background, off this loop.
        req.grammar = self.grammars.submit(sp)
        self.waiting.append(req)

    def abort_request(self, rid: str) -> None:
        for r in self.waiting:
            if r.rid == rid:
                self.waiting.remove(r)
                r.finish_reason = {"type": "abort"}
                self._outputs.append(self.outputs.safe_output(r))
                return
        for r in self.running:
            if r.rid == rid:
                r.finish_reason = {"type": "abort"}
                self.kv.release(r, finished=True)
                self.running.remove(r)
                self._outputs.append(self.outputs.safe_output(r))
                return

    def flush_cache(self) -> tuple[bool, str]:
        if self.running or self.waiting:
            return False, "cannot flush the cache while requests are running or waiting"
        self.kv.flush()
        c = self.counters
        c.total_prompt_tokens = c.total_cached_tokens = c.total_computed_prompt_tokens = 0
        self.check_memory()
        return True, "cache flushed"

    def close(self) -> None:
        """Finish background work that must not be lost (queued disk-tier writes); stop grammar workers."""
        self.grammars.close()
        self.kv.close()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._outputs)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[ReqOutput]:
        """Run one scheduling step; return what each touched request produced."""
        outputs, self._outputs = self._outputs, []
        outputs.extend(self.outputs.safe_output(r) for r in self.grammars.poll(self.waiting))
        # Decoding requests first get their one slot each (retracting if memory ran out), then the
        # extend work (new prompts, prompt chunks, jump-forward tokens) fills the step's token budget.
        # Both go into one forward pass: decodes never wait for a prefill step.
        decodable = self.batches.reserve_decode([r for r in self.running if r.pending == 1])
        extend = self.batches.build_extend(self.step_count)
        batch = extend + [(r, 1) for r in decodable]
        if batch:
            self._run(batch, ForwardMode.EXTEND if extend else ForwardMode.DECODE)
            outputs.extend(self.outputs.collect([r for r, _ in batch]))
        self.step_count += 1
        if self.args.debug_check_memory and not self.running:
            self.check_memory()
        return outputs

    def _run(self, batch: Batch, mode: ForwardMode) -> None:
        """One forward pass over ``batch``, then its outputs; computed prompts go to the tree at once."""
        plan = LogitsPlan.build(batch)
        input_ids: list[int] = []
        positions: list[int] = []
        for r, n in batch:
            input_ids.extend(r.tokens(r.kv_len, r.kv_len + n))
            positions.extend(range(r.kv_len, r.kv_len + n))
        locs = torch.cat([self.kv.slots(r, r.kv_len, r.kv_len + n) for r, n in batch])
        fb = ForwardBatch.build(
            mode, input_ids, positions, locs,
            [r.req_pool_idx for r, _ in batch], [r.kv_len for r, _ in batch], [n for _, n in batch],
            self.runner.device,
        )
        fb.logits_indices = torch.tensor(plan.rows, dtype=torch.int64, device=self.runner.device)
        # The logits stay on the model's device (sampled there); only host_rows are copied. N may be 0.
        out = self.runner.forward(fb, plan.host_rows)
        self.counters.num_forward += 1
        self.counters.total_computed_tokens += len(input_ids)
        for r, n in batch:
            self.counters.total_computed_prompt_tokens += max(0, min(r.kv_len + n, len(r.input_ids)) - r.kv_len)
            r.kv_len += n
        self.outputs.process(plan, out)
        if mode is ForwardMode.EXTEND:
            for r, _ in batch:  # share computed prompts (and chunks) through the tree at once
                if not r.finished:
                    self.kv.release(r, finished=False)

    # ------------------------------------------------------------------ stats and checks
    def check_memory(self) -> None:
        """Assert free + evictable + protected (+ held by running requests) == total slots."""
        self.kv.check(self.running)

    def get_stats(self) -> dict:
        c = self.counters
        tput = c.throughput()
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            **self.kv.stats(),
            "cache_hit_rate": c.total_cached_tokens / c.total_prompt_tokens if c.total_prompt_tokens else 0.0,
            "total_prompt_tokens": c.total_prompt_tokens,
            "total_cached_tokens": c.total_cached_tokens,
            "total_computed_prompt_tokens": c.total_computed_prompt_tokens,
            "total_computed_tokens": c.total_computed_tokens,
            "total_generated_tokens": c.total_generated,
            "num_forward_passes": c.num_forward,
            "num_retracted": c.num_retracted,
            "num_failed_requests": c.num_failed,
            **(
                {"hicache_loaded_tokens": c.total_loaded_tokens, "hicache_load_deferred": c.num_load_deferred}
                if self.kv.tiers is not None
                else {}
            ),
            "gen_throughput": tput,
            "forward_time_s": self.runner.forward_time,
            "schedule_policy": self.args.schedule_policy,
        }
