"""OutputProcessor: what a forward pass's logits turn into.

Before the pass it says which logits rows are needed (``LogitsPlan``: sampling rows, prompt-logprob
rows, rows that verify jump-forward tokens). After it: prompt logprobs and verification of forced
tokens (through ``GrammarManager``) from the few logits rows copied to the host, sampling on the
model's device (``DeviceSampler``: only ids and requested logprob rows come back), token append, finish
checks (EOS, stop ids and strings, length, a finished grammar), and the ``ReqOutput`` each request
reports (unverified forced tokens are held back).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from radixlm.runtime.device_sampler import DeviceSampler, SamplingBatch
from radixlm.runtime.grammar_manager import GrammarManager
from radixlm.runtime.kv_manager import KVManager
from radixlm.runtime.model_runner import ForwardOutput
from radixlm.runtime.protocol import ReqOutput, TokenLogprob
from radixlm.runtime.req import Req
from radixlm.runtime.sampler import token_ids_logprobs, top_logprobs
from radixlm.runtime.scheduler_stats import SchedulerCounters

logger = logging.getLogger("radixlm.scheduler")


@dataclass
class LogitsPlan:
    """Which rows of the pass's hidden states get logits, and what each is for."""

    rows: list[int] = field(default_factory=list)  # token positions in the flattened batch
    sample: list[tuple[Req, int]] = field(default_factory=list)  # (req, index into logits)
    # (req, first logits row, first position, count): rows scoring prompt tokens
    input_logprobs: list[tuple[Req, int, int, int]] = field(default_factory=list)
    # (req, [(index in all_ids, grammar state before it, logits row)]): forced tokens to verify
    verify: list[tuple[Req, list[tuple[int, int, int]]]] = field(default_factory=list)

    @classmethod
    def build(cls, batch: list[tuple[Req, int]]) -> "LogitsPlan":
        plan = cls()
        rows = plan.rows
        start = 0
        for r, n in batch:
            checks = []
            for idx, state in r.forced:  # forced token idx is verified by the logits at idx - 1
                if r.kv_len <= idx - 1 < r.kv_len + n:
                    checks.append((idx, state, len(rows)))
                    rows.append(start + idx - 1 - r.kv_len)
            if checks:
                plan.verify.append((r, checks))
            if r.needs_input_logprobs:
                plan.input_logprobs.append((r, len(rows), r.kv_len, n))
                rows.extend(range(start, start + n))
                if r.kv_len + n == r.seq_len:
                    plan.sample.append((r, len(rows) - 1))
            elif r.kv_len + n == r.seq_len:
                plan.sample.append((r, len(rows)))
                rows.append(start + n - 1)
            start += n
        return plan

    @property
    def host_rows(self) -> list[int]:
        """Logits rows the host needs whole: prompt-logprob rows and jump-forward verification rows."""
        rows = {row0 + j for _, row0, _, n in self.input_logprobs for j in range(n)}
        rows.update(row for _, checks in self.verify for _, _, row in checks)
        return sorted(rows)


def _visible_len(r: Req) -> int:
    """Output tokens the client may see: all but unverified jump-forward tokens."""
    return len(r.output_ids) - len(r.forced)


class OutputProcessor:
    """Applies one pass's logits to its requests; removes finished ones from ``running`` (shared)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], sampler: DeviceSampler, kv: KVManager,
                 grammars: GrammarManager, running: list[Req], counters: SchedulerCounters,
                 enable_jump_forward: bool) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.eos_list = sorted(eos_ids)
        self.sampler = sampler
        self.vocab_size = sampler.vocab_size
        self.kv = kv
        self.grammars = grammars
        self.running = running
        self.counters = counters
        self.enable_jump_forward = enable_jump_forward

    def process(self, plan: LogitsPlan, out: ForwardOutput) -> None:
        """Apply a pass's output (after the batch's ``kv_len`` were advanced): ``out.logits`` stay on the
        model's device and are sampled there; ``out.host_logits`` holds the ``plan.host_rows``.

        Per-request isolation: an exception while handling one request (its prompt logprobs, grammar,
        sampling, token bookkeeping) fails that request alone (``fail``: finish reason abort with the
        message, KV released); every other request of the batch goes on unchanged.
        """
        remap = {row: k for k, row in enumerate(plan.host_rows)}  # logits row -> row of out.host_logits
        if plan.input_logprobs:
            all_lp = torch.log_softmax(out.host_logits, dim=-1)
            for r, row0, pos0, n in plan.input_logprobs:
                # a request's rows are contiguous in host_rows too
                self.guarded(r, "prompt logprobs", self._input_logprobs, r, all_lp, remap[row0], pos0, n)
        for r, checks in plan.verify:
            if not r.finished:
                checks = [(i, state, remap[row]) for i, state, row in checks]
                self.guarded(r, "constrained decoding", self.grammars.verify_forced, r, out.host_logits, checks,
                             self)
        sample_rows = []
        for r, i in plan.sample:
            if r.finished or r.pending != 0:
                continue
            if r.sampling_params.max_new_tokens == 0 and not r.output_ids:
                # Prefill only (SGLang's max_new_tokens=0): the prompt is computed, cached and scored;
                # nothing is sampled.
                self.finish(r, {"type": "length", "length": 0})
                continue
            sample_rows.append((r, i))
        if not sample_rows:
            return
        try:
            drawn = self._draw(sample_rows, out.logits)
        except Exception:  # noqa: BLE001 - find the request(s) at fault by drawing each row alone
            drawn = []
            for r, i in sample_rows:
                one = self.guarded(r, "sampling", self._draw, [(r, i)], out.logits)
                if one is not None:
                    drawn.extend(one)
        for r, tok, lp_row in drawn:
            self.guarded(r, "output", self._accept, r, tok, lp_row)

    def _draw(self, rows: list[tuple[Req, int]], logits: torch.Tensor) -> list[tuple[Req, int, torch.Tensor | None]]:
        """Sample the rows on the logits' device (grammar bitmasks, penalties, ...): (req, token, its raw
        log-softmax row on the host, or None). Only ids and the rows of requests that asked come back."""
        reqs = [r for r, _ in rows]
        sb = SamplingBatch.build(reqs, [i for _, i in rows], self.vocab_size, self.eos_list, logits.device,
                                 self.grammars.masks(reqs))
        res = self.sampler(logits, sb)
        lp = iter(res.logprobs) if res.logprobs is not None else iter(())
        return [(r, tok, next(lp) if r.logprob.return_logprob else None) for r, tok in zip(reqs, res.next_ids)]

    def _accept(self, r: Req, tok: int, lp_row: torch.Tensor | None) -> None:
        if lp_row is not None:
            self.push_logprobs(r, tok, lp_row)
        self.append_token(r, tok, lp_row)

    @staticmethod
    def push_logprobs(r: Req, tok: int, row: torch.Tensor | None, at: int | None = None) -> None:
        """Record output token ``tok``'s logprob entries from its log-softmax ``row``: its own logprob, its
        top logprobs and its ``token_ids_logprob`` entries, appended (``at`` None) or replacing the entries
        at offset ``at``. ``row`` None records placeholders (jump-forward tokens scored later)."""
        opts = r.logprob
        entries: list[tuple[list, Any]] = [(r.new_output_token_logprobs,
                                            TokenLogprob(None if row is None else float(row[tok]), tok))]
        if opts.top_logprobs_num:
            entries.append((r.new_output_top_logprobs,
                            [] if row is None else top_logprobs(row, opts.top_logprobs_num)))
        if opts.token_ids_logprob:
            entries.append((r.new_output_token_ids_logprobs,
                            [] if row is None else token_ids_logprobs(row, opts.token_ids_logprob)))
        for lst, value in entries:
            if at is None:
                lst.append(value)
            else:
                lst[at] = value

    def guarded(self, r: Req, stage: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``; if it raises, fail ``r`` alone and return None."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one request's fault must not stop the engine
            self.fail(r, stage, e)
            return None

    def fail(self, r: Req, stage: str, e: BaseException) -> None:
        """End ``r`` with an error (finish reason abort, the message in meta_info) and release its KV."""
        logger.exception("request %s failed during %s", r.rid, stage)
        self.counters.num_failed += 1
        r.error = f"{stage} failed: {type(e).__name__}: {e}"
        if r.finished and r.req_pool_idx is None:
            return  # already finished and released (it failed while its output was being built)
        r.forced = []
        r.finish_reason = {"type": "abort", "message": r.error}
        self.kv.release(r, finished=True)  # a failure here is memory corruption: it stops the engine
        if r in self.running:
            self.running.remove(r)

    def _input_logprobs(self, r: Req, lp: torch.Tensor, row0: int, pos0: int, n: int) -> None:
        start, n_in = r.logprob.logprob_start_len, len(r.input_ids)
        ids = r.logprob.token_ids_logprob
        if pos0 == 0 and start == 0:
            r.new_input_token_logprobs.append(TokenLogprob(None, r.input_ids[0]))
            if r.logprob.top_logprobs_num:
                r.new_input_top_logprobs.append(None)
            if ids:
                r.new_input_token_ids_logprobs.append(None)
        for j in range(n):
            nxt = pos0 + j + 1  # the logits at position p score the token at p + 1
            if start <= nxt < n_in:
                row = lp[row0 + j]
                tok = r.input_ids[nxt]
                r.new_input_token_logprobs.append(TokenLogprob(float(row[tok]), tok))
                if r.logprob.top_logprobs_num:
                    r.new_input_top_logprobs.append(top_logprobs(row, r.logprob.top_logprobs_num))
                if ids:
                    r.new_input_token_ids_logprobs.append(token_ids_logprobs(row, ids))
        if pos0 + n >= n_in:
            r.input_logprobs_done = True

    # ------------------------------------------------------------------ token bookkeeping
    def append_token(self, r: Req, tok: int, lp_row: torch.Tensor | None = None) -> None:
        """Append a sampled (or model-chosen) token, advance the grammar, finish or jump forward.

        ``lp_row`` is the log-softmax row ``tok`` was drawn from (when logprobs are returned): jump-forward
        may re-encode ``tok`` with the forced text, and the new token at its place is scored by it."""
        r.output_ids.append(tok)
        self.counters.total_generated += 1
        if r.grammar is not None:
            try:
                r.grammar.matcher.accept_token(tok)
            except ValueError as e:  # a grammar that cannot continue fails this request, not the engine
                r.error = f"constrained decoding failed: {e}"
                self.finish(r, {"type": "abort", "message": r.error})
                return
        reason = self.check_finish(r, tok)
        if reason is not None:
            self.finish(r, reason)
        elif r.grammar is not None and self.enable_jump_forward:
            self.grammars.jump_forward(r, self, lp_row)

    def check_finish(self, r: Req, tok: int, upto: int | None = None) -> dict | None:
        """Finish reason if the output ``r.output_ids[:upto]`` (ending in ``tok``) is complete."""
        sp = r.sampling_params
        out = r.output_ids if upto is None else r.output_ids[:upto]
        if r.grammar is not None and upto is None and r.grammar.matcher.is_finished():
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
            if sp.stop_regex:
                # A match ends inside the newest token and spans at most its width in tokens.
                width = sp.stop_regex_window + 1
                tail = self.tokenizer.decode(out[-width:], skip_special_tokens=sp.skip_special_tokens)
                for pat in sp.stop_regex:
                    if re.search(pat, tail):
                        return {"type": "stop", "matched": pat}
        if len(out) >= sp.max_new_tokens:
            return {"type": "length", "length": sp.max_new_tokens}
        return None

    def truncate(self, r: Req, idx: int) -> None:
        """Drop tokens from absolute index ``idx`` on, freeing K/V this request computed for them."""
        self.kv.truncate(r, idx)
        out_pos = idx - len(r.input_ids)
        self.counters.total_generated -= len(r.output_ids) - out_pos
        del r.output_ids[out_pos:]
        r.forced = [f for f in r.forced if f[0] < idx]
        if r.logprob.return_logprob:
            off = max(out_pos - r.sent_len, 0)
            del r.new_output_token_logprobs[off:]
            if r.logprob.top_logprobs_num:
                del r.new_output_top_logprobs[off:]
            if r.logprob.token_ids_logprob:
                del r.new_output_token_ids_logprobs[off:]

    def finish(self, r: Req, reason: dict) -> None:
        r.finish_reason = reason
        r.forced = []
        self.kv.release(r, finished=True)
        self.running.remove(r)

    # ------------------------------------------------------------------ outputs
    def collect(self, reqs: list[Req]) -> list[ReqOutput]:
        """Outputs of the requests that finished or have new visible tokens."""
        return [self.safe_output(r) for r in reqs if r.finished or _visible_len(r) > r.sent_len]

    def safe_output(self, r: Req) -> ReqOutput:
        """``make_output``, or, if building it fails, fail the request and send a bare final error."""
        try:
            return self.make_output(r)
        except Exception as e:  # noqa: BLE001 - isolate the request, as in ``process``
            self.fail(r, "output", e)
            return ReqOutput(rid=r.rid, new_token_ids=[], finished=True, finish_reason=r.finish_reason,
                             prompt_tokens=len(r.input_ids), completion_tokens=r.sent_len,
                             cached_tokens=r.cached_tokens, error=r.error)

    def make_output(self, r: Req) -> ReqOutput:
        """What ``r`` produced since its last output (and mark it sent)."""
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
        if r.logprob.return_logprob:
            out.input_token_logprobs, r.new_input_token_logprobs = r.new_input_token_logprobs, []
            out.output_token_logprobs = r.new_output_token_logprobs[:k]
            del r.new_output_token_logprobs[:k]
            if r.logprob.top_logprobs_num:
                out.input_top_logprobs, r.new_input_top_logprobs = r.new_input_top_logprobs, []
                out.output_top_logprobs = r.new_output_top_logprobs[:k]
                del r.new_output_top_logprobs[:k]
            if r.logprob.token_ids_logprob:
                out.input_token_ids_logprobs, r.new_input_token_ids_logprobs = r.new_input_token_ids_logprobs, []
                out.output_token_ids_logprobs = r.new_output_token_ids_logprobs[:k]
                del r.new_output_token_ids_logprobs[:k]
        if r.finished:
            self.counters.mark()
        return out
