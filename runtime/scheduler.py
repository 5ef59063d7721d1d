"""Scheduler: the waiting queue, admission, continuous batching, and what happens after each forward.

One step = one forward pass. Every running request with one pending token decodes in every step; new
prompts, prompt chunks and jump-forward tokens ride in the same pass when there are any (mode EXTEND),
otherwise the pass is a pure DECODE. So running requests keep streaming while long prompts prefill. Memory: every request holds a row of the
req→token table and owns the KV slots of its computed tokens beyond its locked radix prefix; the
radix tree owns the rest. ``check_memory`` verifies that when idle nothing is lost.

The scheduler is single-threaded and socket-free: the Engine drives it from a thread, the server
from its own process. Messages in and out are the Structs of ``radixlm.runtime.protocol``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.protocol import (
    AbortReq,
    ErrorOut,
    FlushCacheOut,
    FlushCacheReq,
    GetStatsReq,
    ReqOutput,
    SchedulerInput,
    SchedulerOutput,
    StatsOut,
    TokenizedGenerateReq,
    TokenLogprob,
)
from radixlm.runtime.kv_manager import KVManager
from radixlm.runtime.radix_cache import RadixCache
from radixlm.runtime.req import Req
from radixlm.runtime.sampler import Sampler, top_logprobs
from radixlm.runtime.schedule_policy import SchedulePolicy, common_prefix_len
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, args: ServerArgs):
        self.args = args
        if not os.path.isdir(args.model_path):
            raise ValueError(f"model_path: {args.model_path!r} is not a directory (radixlm never downloads models)")
        self.tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
        self.runner = ModelRunner(args)
        self.cache = RadixCache(self.runner.kv_pool, disable=args.disable_radix_cache)
        self.kv = KVManager(self.runner.kv_pool, self.runner.req_to_token_pool, self.cache)
        self.policy = SchedulePolicy(
            args.schedule_policy, self.cache, args.lpm_aging_steps, args.lpm_fallback_queue_len, args.random_seed
        )
        self.eos_ids = eos_token_ids(self.tokenizer, args.model_path)
        self.sampler = Sampler(self.runner.vocab_size, self.eos_ids, args.random_seed)
        self._grammar_backend = None  # created on first use: most deployments never constrain
        self.context_len = self.runner.context_len
        self.max_total_tokens = self.runner.max_total_tokens
        self.chunk_size = args.chunked_prefill_size if args.chunked_prefill_size > 0 else 1 << 62

        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.step_count = 0
        self._outputs: list[ReqOutput] = []  # produced outside step() (aborts, errors)
        # Stats
        self.total_prompt_tokens = 0
        self.total_cached_tokens = 0
        self.total_generated = 0
        self.total_computed_prompt_tokens = 0  # prompt positions the model computed (not served from the cache)
        self.total_computed_tokens = 0  # every position computed: prompts, decodes, jump-forward runs
        self.num_forward = 0
        self.num_retracted = 0
        self._tput_window: deque[tuple[float, int]] = deque(maxlen=64)

    # ------------------------------------------------------------------ messages
    @property
    def model_info(self) -> dict:
        return {
            "model_path": self.args.model_path,
            "served_model_name": self.args.served_model_name or self.args.model_path,
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
            return []
        if isinstance(msg, AbortReq):
            self.abort_request(msg.rid)
            return []
        if isinstance(msg, FlushCacheReq):
            ok, message = self.flush_cache()
            return [FlushCacheOut(success=ok, message=message)]
        if isinstance(msg, GetStatsReq):
            return [StatsOut(stats=self.get_stats())]
        return [ErrorOut(message=f"unknown message {type(msg).__name__}")]

    def add_request(self, tr: TokenizedGenerateReq) -> None:
        """Validate and queue. Raises ValueError (naming the field) for a request that can never run."""
        sp = tr.sampling_params
        sp.verify()
        n_in = len(tr.input_ids)
        if n_in == 0:
            raise ValueError("input_ids: the prompt is empty")
        vocab = self.runner.vocab_size
        if min(tr.input_ids) < 0 or max(tr.input_ids) >= vocab:
            raise ValueError(f"input_ids: token ids must be in [0, {vocab})")
        limit = min(self.context_len, self.max_total_tokens)
        if n_in + max(sp.min_new_tokens, 1) > limit:
            raise ValueError(
                f"input_ids: the prompt has {n_in} tokens; with min_new_tokens it exceeds the limit of {limit} "
                f"tokens (context_length={self.context_len}, max_total_tokens={self.max_total_tokens})"
            )
        if tr.logprob_start_len >= n_in:
            raise ValueError(f"logprob_start_len ({tr.logprob_start_len}) must be < the prompt length ({n_in})")
        if tr.top_logprobs_num < 0 or tr.top_logprobs_num > vocab:
            raise ValueError("top_logprobs_num must be in [0, vocab_size]")
        if any(r.rid == tr.rid for r in self.waiting) or any(r.rid == tr.rid for r in self.running):
            raise ValueError(f"rid: a request with id {tr.rid!r} is already running")
        # A request may never outgrow the pool or the context: clip its budget (finish_reason "length").
        if n_in + sp.max_new_tokens > limit:
            sp = sp.replace(max_new_tokens=limit - n_in)
        req = Req(
            rid=tr.rid,
            input_ids=list(tr.input_ids),
            sampling_params=sp,
            return_logprob=tr.return_logprob,
            logprob_start_len=tr.logprob_start_len if tr.return_logprob else -1,
            top_logprobs_num=tr.top_logprobs_num if tr.return_logprob else 0,
            arrival=self.step_count,
        )
        if sp.regex is not None or sp.json_schema is not None:
            # Front ends validated the pattern; the compile runs in the background, off this loop.
            req.grammar = self._grammar().submit(*_grammar_key(sp))
        self.waiting.append(req)

    def abort_request(self, rid: str) -> None:
        for r in self.waiting:
            if r.rid == rid:
                self.waiting.remove(r)
                r.finish_reason = {"type": "abort"}
                self._outputs.append(self._make_output(r))
                return
        for r in self.running:
            if r.rid == rid:
                r.finish_reason = {"type": "abort"}
                self.kv.release(r, finished=True)
                self.running.remove(r)
                self._outputs.append(self._make_output(r))
                return

    def flush_cache(self) -> tuple[bool, str]:
        if self.running or self.waiting:
            return False, "cannot flush the cache while requests are running or waiting"
        self.kv.flush()
        self.total_prompt_tokens = self.total_cached_tokens = self.total_computed_prompt_tokens = 0
        self.check_memory()
        return True, "cache flushed"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._outputs)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[ReqOutput]:
        """Run one scheduling step; return what each touched request produced."""
        outputs, self._outputs = self._outputs, []
        self._poll_grammars(outputs)
        # Decoding requests first get their one slot each (retracting if memory ran out), then the
        # extend work (new prompts, prompt chunks, jump-forward tokens) fills the step's token budget.
        # Both go into one forward pass: decodes never wait for a prefill step.
        decodable = self._reserve_decode([r for r in self.running if r.pending == 1])
        extend = self._build_extend_batch()
        batch = extend + [(r, 1) for r in decodable]
        if batch:
            self._run(batch, ForwardMode.EXTEND if extend else ForwardMode.DECODE)
            outputs.extend(self._collect_outputs([r for r, _ in batch]))
        self.step_count += 1
        if self.args.debug_check_memory and not self.running:
            self.check_memory()
        return outputs

    # ------------------------------------------------------------------ admission
    def _build_extend_batch(self) -> list[tuple[Req, int]]:
        """Running requests with several pending tokens (chunks, jump-forward) first, then new ones."""
        rem_prefill = self.args.max_prefill_tokens
        rem_chunk = self.chunk_size
        batch: list[tuple[Req, int]] = []
        for r in list(self.running):
            if r.pending > 1 and rem_chunk > 0 and rem_prefill > 0:
                n = min(r.pending, rem_chunk, rem_prefill)
                if not self.kv.alloc_for(r, n):
                    self._retract(r)  # re-admitted later, when memory allows
                    continue
                batch.append((r, n))
                rem_chunk -= n
                rem_prefill -= n
        if not self.waiting or rem_chunk <= 0 or rem_prefill <= 0 or self.kv.table.available() == 0:
            return batch  # (also skips matching the whole queue against the tree when nothing can join)
        if len(self.running) >= self.args.max_running_requests:
            return batch

        reserved = sum(int(r.remaining_new_tokens * self.args.new_token_ratio) for r in self.running)
        admitted: list[Req] = []
        for req in self.policy.order(self.waiting, self.step_count):
            aged = self.policy.is_aged(req, self.step_count)
            if req.grammar is not None and not _grammar_ready(req):
                continue
            if len(self.running) + len(admitted) >= self.args.max_running_requests:
                break
            if self.kv.table.available() == 0:
                break
            if not aged and admitted and self._defer_for_shared_prefix(req, admitted):
                continue  # its uncached prefix is being computed by another request in this batch
            self.kv.admit(req)
            n = min(req.pending, rem_chunk, rem_prefill)
            need = n + (int(req.remaining_new_tokens * self.args.new_token_ratio) if n == req.pending else 0)
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
                self.total_prompt_tokens += len(req.input_ids)
                self.total_cached_tokens += min(req.kv_len, len(req.input_ids))
        return batch

    def _defer_for_shared_prefix(self, req: Req, admitted: list[Req]) -> bool:
        threshold = self.args.in_batch_prefix_threshold
        if self.cache.disable or threshold <= 0:
            return False
        cached = self.kv.cached_prefix_len(req)
        return any(
            common_prefix_len(req.all_ids[: req.max_prefix_len], a.all_ids) - cached >= threshold for a in admitted
        )

    def _reserve_decode(self, reqs: list[Req]) -> list[Req]:
        """Make room for one token per decoding request, retracting the cheapest ones if needed."""
        reqs = list(reqs)
        while reqs and self.kv.available() < len(reqs):
            # Cheapest to redo: fewest generated tokens, then the longest prompt (frees the most).
            victim = min(reqs, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            reqs.remove(victim)
            self._retract(victim)
        for r in reqs:
            ok = self.kv.alloc_for(r, 1)
            assert ok, "decode allocation failed after reservation"
        return reqs

    def _retract(self, req: Req) -> None:
        self.kv.release(req, finished=True)  # its computed KV goes to the tree (evictable), row freed
        self.running.remove(req)
        self.num_retracted += 1
        self.waiting.insert(0, req)
        logger.debug("retracted %s (%d tokens)", req.rid, req.seq_len)

    # ------------------------------------------------------------------ forward + sample
    def _run(self, batch: list[tuple[Req, int]], mode: ForwardMode) -> None:
        input_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        sample_rows: list[tuple[Req, int]] = []  # (req, index into logits)
        lp_rows: list[tuple[Req, int, int, int]] = []  # (req, first logits row, first position, count)
        verify: list[tuple[Req, list[tuple[int, int, int]]]] = []  # (req, [(index, state, logits row)])
        for r, n in batch:
            start = len(input_ids)
            ids = r.tokens(r.kv_len, r.kv_len + n)
            input_ids.extend(ids)
            positions.extend(range(r.kv_len, r.kv_len + n))
            checks = []
            for idx, state in r.forced:  # forced token idx is verified by the logits at idx - 1
                if r.kv_len <= idx - 1 < r.kv_len + n:
                    checks.append((idx, state, len(logit_rows)))
                    logit_rows.append(start + idx - 1 - r.kv_len)
            if checks:
                verify.append((r, checks))
            if r.needs_input_logprobs:
                lp_rows.append((r, len(logit_rows), r.kv_len, n))
                logit_rows.extend(range(start, start + n))
                if r.kv_len + n == r.seq_len:
                    sample_rows.append((r, len(logit_rows) - 1))
            elif r.kv_len + n == r.seq_len:
                sample_rows.append((r, len(logit_rows)))
                logit_rows.append(start + n - 1)
        locs = torch.cat(
            [self.kv.slots(r, r.kv_len, r.kv_len + n) for r, n in batch]
        )
        fb = ForwardBatch.build(
            mode,
            input_ids,
            positions,
            locs,
            [r.req_pool_idx for r, _ in batch],
            [r.kv_len for r, _ in batch],
            [n for _, n in batch],
            self.runner.device,
        )
        fb.logits_indices = torch.tensor(logit_rows, dtype=torch.int64, device=self.runner.device)
        logits = self.runner.forward(fb).cpu()  # [N, V]; N may be 0 for a middle chunk
        self.num_forward += 1
        self.total_computed_tokens += len(input_ids)
        for r, n in batch:
            self.total_computed_prompt_tokens += max(0, min(r.kv_len + n, len(r.input_ids)) - r.kv_len)
            r.kv_len += n

        if lp_rows:
            all_lp = torch.log_softmax(logits, dim=-1)
            for r, row0, pos0, n in lp_rows:
                self._input_logprobs(r, all_lp, row0, pos0, n)
        for r, checks in verify:
            self._verify_forced(r, logits, checks)
        sample_rows = [(r, i) for r, i in sample_rows if not r.finished and r.pending == 0]
        if sample_rows:
            reqs = [r for r, _ in sample_rows]
            rows = torch.tensor([i for _, i in sample_rows])
            masks = self._grammar_masks(reqs)
            out = self.sampler(logits[rows], reqs, masks)
            for k, (r, tok) in enumerate(zip(reqs, out.next_ids)):
                if r.return_logprob:
                    lp_row = out.logprobs[k]
                    r.new_output_token_logprobs.append(TokenLogprob(float(lp_row[tok]), tok))
                    if r.top_logprobs_num:
                        r.new_output_top_logprobs.append(top_logprobs(lp_row, r.top_logprobs_num))
                self._append_token(r, tok)
        if mode is ForwardMode.EXTEND:
            for r, _ in batch:  # share computed prompts (and chunks) through the tree at once
                if not r.finished:
                    self.kv.release(r, finished=False)

    def _input_logprobs(self, r: Req, lp: torch.Tensor, row0: int, pos0: int, n: int) -> None:
        start, n_in = r.logprob_start_len, len(r.input_ids)
        if pos0 == 0 and start == 0:
            r.new_input_token_logprobs.append(TokenLogprob(None, r.input_ids[0]))
            if r.top_logprobs_num:
                r.new_input_top_logprobs.append(None)
        for j in range(n):
            nxt = pos0 + j + 1  # the logits at position p score the token at p + 1
            if start <= nxt < n_in:
                row = lp[row0 + j]
                tok = r.input_ids[nxt]
                r.new_input_token_logprobs.append(TokenLogprob(float(row[tok]), tok))
                if r.top_logprobs_num:
                    r.new_input_top_logprobs.append(top_logprobs(row, r.top_logprobs_num))
        if pos0 + n >= n_in:
            r.input_logprobs_done = True

    def _append_token(self, r: Req, tok: int) -> None:
        r.output_ids.append(tok)
        self.total_generated += 1
        if r.grammar is not None:
            try:
                r.grammar.accept_token(tok)
            except ValueError as e:  # a grammar that cannot continue fails this request, not the engine
                r.error = f"constrained decoding failed: {e}"
                self._finish(r, {"type": "abort", "message": r.error})
                return
        reason = self._check_finish(r, tok)
        if reason is not None:
            self._finish(r, reason)
        elif r.grammar is not None and self.args.enable_jump_forward:
            self._jump_forward(r)

    def _check_finish(self, r: Req, tok: int, upto: int | None = None) -> dict | None:
        """Finish reason if the output ``r.output_ids[:upto]`` (ending in ``tok``) is complete."""
        sp = r.sampling_params
        out = r.output_ids if upto is None else r.output_ids[:upto]
        if r.grammar is not None and upto is None and r.grammar.is_finished():
            # Nothing but EOS can follow: the grammar ends the request, whatever min_new_tokens says.
            return {"type": "stop", "matched": tok if tok in self.eos_ids else None}
        if len(out) >= sp.min_new_tokens:
            if not sp.ignore_eos and tok in self.eos_ids:
                return {"type": "stop", "matched": tok}
            if sp.stop_token_ids and tok in sp.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if sp.stop:
                # A stop string must end inside the newest token and spans at most len(stop) tokens.
                width = max(len(s) for s in sp.stop) + 1
                tail = self.tokenizer.decode(out[-width:], skip_special_tokens=sp.skip_special_tokens)
                for s in sp.stop:
                    if s in tail:
                        return {"type": "stop", "matched": s}
        if len(out) >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        return None

    # ------------------------------------------------------------------ grammar hooks
    def _grammar(self):
        if self._grammar_backend is None:
            from radixlm.runtime.constrained import GrammarBackend

            self._grammar_backend = GrammarBackend(
                self.tokenizer,
                self.runner.vocab_size,
                cache_size=self.args.grammar_cache_size,
                eos_token_ids=sorted(self.eos_ids),
                json_whitespace_pattern=self.args.constrained_json_whitespace_pattern,
            )
        return self._grammar_backend

    def _poll_grammars(self, outputs: list[ReqOutput]) -> None:
        """Turn finished compiles into matchers; fail requests whose grammar did not compile."""
        for r in list(self.waiting):
            g = r.grammar
            if g is None or not hasattr(g, "done") or not g.done():
                continue
            try:
                r.grammar = g.result().new_matcher()
            except Exception as e:  # noqa: BLE001 - surfaced to the client as this request's error
                self.waiting.remove(r)
                r.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                r.finish_reason = {"type": "abort", "message": r.error}
                outputs.append(self._make_output(r))

    def _grammar_masks(self, reqs: list[Req]) -> torch.Tensor | None:
        if all(r.grammar is None for r in reqs):
            return None
        masks = torch.ones((len(reqs), self.runner.vocab_size), dtype=torch.bool)
        for i, r in enumerate(reqs):
            if r.grammar is not None:
                masks[i].fill_(False)
                r.grammar.fill_mask(masks[i])
        return masks

    def _jump_forward(self, r: Req) -> None:
        """Append the text the grammar forces, without sampling it.

        Sampled requests take the forced tokens as they are. Greedy requests must produce exactly what
        greedy decoding would, so their forced tokens are speculative: they are computed in the next
        extend and checked against the model's masked argmax there (``_verify_forced``); the first
        disagreement is replaced by the model's choice and the rest is dropped.
        """
        sp = r.sampling_params
        greedy = sp.is_greedy
        if greedy and (sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0):
            return  # verification below does not replay penalties; such requests simply decode
        matcher = r.grammar
        state = matcher.state
        jf = matcher.jump_forward(r.output_ids[-1] if r.output_ids else None, allow_rollback=not greedy)
        if jf is None or not jf.token_ids:
            return
        # The dropped token was sampled but not computed yet, so no KV needs to be given back.
        if jf.num_rollback:  # only sampled requests roll back (see allow_rollback above)
            self._truncate(r, r.seq_len - jf.num_rollback)
        room = sp.max_new_tokens - len(r.output_ids)
        tokens = jf.token_ids[:room]
        if len(tokens) < len(jf.token_ids):  # the budget cut the run: put the matcher after what we keep
            g = matcher.grammar
            matcher.reset_to(g.walk(g.walk(g.initial_state, r.output_ids), tokens))
        for tok in tokens:
            if greedy:
                r.forced.append((r.seq_len, state))
                state = matcher.grammar.next_state(state, tok)
            r.output_ids.append(tok)
            self.total_generated += 1
            if r.return_logprob:  # filled in by verification for greedy requests
                r.new_output_token_logprobs.append(TokenLogprob(None, tok))
                if r.top_logprobs_num:
                    r.new_output_top_logprobs.append([])
        if not greedy:
            reason = self._check_finish(r, r.output_ids[-1])
            if reason is not None:
                self._finish(r, reason)

    def _verify_forced(self, r: Req, logits: torch.Tensor, checks: list[tuple[int, int, int]]) -> None:
        n_in = len(r.input_ids)
        lp = torch.log_softmax(logits[[row for _, _, row in checks]], dim=-1) if r.return_logprob else None
        for k, (idx, state, row) in enumerate(checks):
            out_pos = idx - n_in
            choice = self._greedy_choice(r, logits[row], state, out_pos)
            forced_tok = r.output_ids[out_pos]
            if choice != forced_tok:
                self._truncate(r, idx)
                r.grammar.reset_to(state)
                if r.return_logprob:
                    r.new_output_token_logprobs.append(TokenLogprob(float(lp[k][choice]), choice))
                    if r.top_logprobs_num:
                        r.new_output_top_logprobs.append(top_logprobs(lp[k], r.top_logprobs_num))
                self._append_token(r, choice)
                return
            r.forced.pop(0)
            if r.return_logprob:
                off = out_pos - r.sent_len
                r.new_output_token_logprobs[off] = TokenLogprob(float(lp[k][forced_tok]), forced_tok)
                if r.top_logprobs_num:
                    r.new_output_top_logprobs[off] = top_logprobs(lp[k], r.top_logprobs_num)
            reason = self._check_finish(r, forced_tok, upto=out_pos + 1)
            if reason is None and not r.forced and r.grammar.is_finished():
                reason = {"type": "stop", "matched": None}
            if reason is not None:
                self._truncate(r, idx + 1)
                self._finish(r, reason)
                return

    def _greedy_choice(self, r: Req, logits: torch.Tensor, state: int, out_len: int) -> int:
        """What the sampler would pick for a greedy request at grammar ``state`` (no penalties)."""
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        r.grammar.grammar.fill_mask(state, allowed)
        logits = logits.masked_fill(~allowed, float("-inf"))
        sp = r.sampling_params
        if out_len < sp.min_new_tokens:
            banned = list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else sorted(self.eos_ids))
            if banned:
                logits[banned] = float("-inf")
        return int(logits.argmax())

    def _truncate(self, r: Req, idx: int) -> None:
        """Drop tokens from absolute index ``idx`` on, freeing K/V this request computed for them."""
        self.kv.truncate(r, idx)
        out_pos = idx - len(r.input_ids)
        self.total_generated -= len(r.output_ids) - out_pos
        del r.output_ids[out_pos:]
        r.forced = [f for f in r.forced if f[0] < idx]
        if r.return_logprob:
            off = max(out_pos - r.sent_len, 0)
            del r.new_output_token_logprobs[off:]
            if r.top_logprobs_num:
                del r.new_output_top_logprobs[off:]

    def _finish(self, r: Req, reason: dict) -> None:
        r.finish_reason = reason
        r.forced = []
        self.kv.release(r, finished=True)
        self.running.remove(r)

    # ------------------------------------------------------------------ outputs
    def _collect_outputs(self, reqs: list[Req]) -> list[ReqOutput]:
        return [self._make_output(r) for r in reqs if r.finished or _visible_len(r) > r.sent_len]

    def _make_output(self, r: Req) -> ReqOutput:
        visible = _visible_len(r)
        k = visible - r.sent_len  # tokens to send now; unverified forced tokens wait
        out = ReqOutput(
            rid=r.rid,
            new_token_ids=r.output_ids[r.sent_len : visible],
            finished=r.finished,
            finish_reason=r.finish_reason,
            prompt_tokens=len(r.input_ids),
            completion_tokens=visible,
            cached_tokens=r.cached_tokens,
            error=r.error,
        )
        r.sent_len = visible
        if r.return_logprob:
            out.input_token_logprobs, r.new_input_token_logprobs = r.new_input_token_logprobs, []
            out.output_token_logprobs = r.new_output_token_logprobs[:k]
            del r.new_output_token_logprobs[:k]
            if r.top_logprobs_num:
                out.input_top_logprobs, r.new_input_top_logprobs = r.new_input_top_logprobs, []
                out.output_top_logprobs = r.new_output_top_logprobs[:k]
                del r.new_output_top_logprobs[:k]
        if r.finished:
            self._tput_window.append((time.monotonic(), self.total_generated))
        return out

    # ------------------------------------------------------------------ stats and checks
    def check_memory(self) -> None:
        """Assert free + evictable + protected (+ held by running requests) == total slots."""
        self.kv.check(self.running)

    def get_stats(self) -> dict:
        now = time.monotonic()
        self._tput_window.append((now, self.total_generated))
        t0, g0 = self._tput_window[0]
        tput = (self.total_generated - g0) / (now - t0) if now > t0 else 0.0
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            **self.kv.stats(),
            "cache_hit_rate": self.total_cached_tokens / self.total_prompt_tokens if self.total_prompt_tokens else 0.0,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_cached_tokens": self.total_cached_tokens,
            "total_computed_prompt_tokens": self.total_computed_prompt_tokens,
            "total_computed_tokens": self.total_computed_tokens,
            "total_generated_tokens": self.total_generated,
            "num_forward_passes": self.num_forward,
            "num_retracted": self.num_retracted,
            "gen_throughput": tput,
            "forward_time_s": self.runner.forward_time,
            "schedule_policy": self.args.schedule_policy,
        }


def _visible_len(r: Req) -> int:
    """Output tokens the client may see: all but unverified jump-forward tokens."""
    return len(r.output_ids) - len(r.forced)


def _grammar_key(sp) -> tuple[str, str]:
    return ("regex", sp.regex) if sp.regex is not None else ("json", sp.json_schema)


def _grammar_ready(req: Req) -> bool:
    g = req.grammar
    return not hasattr(g, "done")  # a matcher, not a pending Future
