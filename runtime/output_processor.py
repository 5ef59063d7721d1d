"""OutputProcessor: what a forward pass's logits turn into.

Before the pass it says which logits rows are needed (``LogitsPlan``: sampling rows, prompt-logprob
rows, rows that verify jump-forward tokens) and builds the ``SamplingBatch`` the model runner samples
on the device. After it: prompt logprobs and verification of forced tokens (through
``GrammarManager``) from the few logits rows copied to the host, the sampled ids, token append, finish
checks (EOS, stop ids and strings, length, a finished grammar), and the ``ReqOutput`` each request
reports (unverified forced tokens are held back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from radixlm.runtime.device_sampler import SamplingBatch
from radixlm.runtime.grammar_manager import GrammarManager
from radixlm.runtime.kv_manager import KVManager
from radixlm.runtime.model_runner import ForwardOutput
from radixlm.runtime.protocol import ReqOutput, TokenLogprob
from radixlm.runtime.req import Req
from radixlm.runtime.sampler import top_logprobs
from radixlm.runtime.scheduler_stats import SchedulerCounters


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

    def __init__(self, tokenizer: Any, eos_ids: set[int], vocab_size: int, device: str, kv: KVManager,
                 grammars: GrammarManager, running: list[Req], counters: SchedulerCounters,
                 enable_jump_forward: bool) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.device = device
        self.kv = kv
        self.grammars = grammars
        self.running = running
        self.counters = counters
        self.enable_jump_forward = enable_jump_forward

    def sampling_batch(self, plan: LogitsPlan) -> SamplingBatch | None:
        """The device-side sampling inputs of the plan's sampling rows (built before the pass).

        Grammar masks, penalties and seeds are read now; they are what sampling after the pass would
        read, since the pass changes none of them. A row whose request verification later truncates is
        discarded (its request has a pending token again).
        """
        if not plan.sample:
            return None
        return SamplingBatch.build([r for r, _ in plan.sample], [i for _, i in plan.sample], self.vocab_size,
                                   sorted(self.eos_ids), self.device)

    def process(self, plan: LogitsPlan, out: ForwardOutput) -> None:
        """Apply a pass's output (after the batch's ``kv_len`` were advanced)."""
        host_rows = plan.host_rows
        remap = {row: k for k, row in enumerate(host_rows)}  # logits row -> row of out.host_logits
        if plan.input_logprobs:
            all_lp = torch.log_softmax(out.host_logits, dim=-1)
            for r, row0, pos0, n in plan.input_logprobs:
                self._input_logprobs(r, all_lp, remap[row0], pos0, n)  # a request's rows are contiguous
        for r, checks in plan.verify:
            self.grammars.verify_forced(r, out.host_logits, [(i, s, remap[row]) for i, s, row in checks], self)
        if not plan.sample:
            return
        res = out.sample
        lp_pos = {k: j for j, k in enumerate(self._lp_rows(plan))}  # plan.sample index -> logprobs row
        for k, (r, _) in enumerate(plan.sample):
            if r.finished or r.pending != 0:
                continue
            tok = res.next_ids[k]
            if r.return_logprob:
                lp_row = res.logprobs[lp_pos[k]]
                r.new_output_token_logprobs.append(TokenLogprob(float(lp_row[tok]), tok))
                if r.top_logprobs_num:
                    r.new_output_top_logprobs.append(top_logprobs(lp_row, r.top_logprobs_num))
            self.append_token(r, tok)

    @staticmethod
    def _lp_rows(plan: LogitsPlan) -> list[int]:
        """Indices into plan.sample of the rows whose logprobs the sampler returned (SamplingBatch order)."""
        return [k for k, (r, _) in enumerate(plan.sample) if r.return_logprob]

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

    # ------------------------------------------------------------------ token bookkeeping
    def append_token(self, r: Req, tok: int) -> None:
        """Append a sampled (or model-chosen) token, advance the grammar, finish or jump forward."""
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
            self.grammars.jump_forward(r, self)

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
        if r.return_logprob:
            off = max(out_pos - r.sent_len, 0)
            del r.new_output_token_logprobs[off:]
            if r.top_logprobs_num:
                del r.new_output_top_logprobs[off:]

    def finish(self, r: Req, reason: dict) -> None:
        r.finish_reason = reason
        r.forced = []
        self.kv.release(r, finished=True)
        self.running.remove(r)

    # ------------------------------------------------------------------ outputs
    def collect(self, reqs: list[Req]) -> list[ReqOutput]:
        """Outputs of the requests that finished or have new visible tokens."""
        return [self.make_output(r) for r in reqs if r.finished or _visible_len(r) > r.sent_len]

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
        if r.return_logprob:
            out.input_token_logprobs, r.new_input_token_logprobs = r.new_input_token_logprobs, []
            out.output_token_logprobs = r.new_output_token_logprobs[:k]
            del r.new_output_token_logprobs[:k]
            if r.top_logprobs_num:
                out.input_top_logprobs, r.new_input_top_logprobs = r.new_input_top_logprobs, []
                out.output_top_logprobs = r.new_output_top_logprobs[:k]
                del r.new_output_top_logprobs[:k]
        if r.finished:
            self.counters.mark()
        return out
