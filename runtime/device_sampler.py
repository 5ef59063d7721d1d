"""Sampling on the model's device: logits rows → next token ids, without copying the vocabulary to the host.

``SamplingBatch.build`` gathers, on the host, what a step's sampling rows need (their parameters,
penalty statistics, logit biases, grammar masks packed as 32-bit bitmasks, min_new_tokens bans) into
small tensors on the model's device; calling ``DeviceSampler`` runs the same order of operations as the
host reference ``Sampler`` (runtime/sampler.py) on the device and returns the ids (one ``[B]`` copy to
the host) and log-softmax rows only for the requests that asked for logprobs. Greedy rows take an
argmax and never sort the vocabulary; only rows that sample with top-k/top-p/min-p are sorted.

On the CPU this is the same code and gives the same tokens as the reference, seeded sampling included
(its noise comes from generators seeded by (seed, position) on the logits' device); on CUDA seeded
sampling is reproducible but draws from CUDA's generator stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.req import Req

_BITS = 32


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [G, V] (True = allowed) → int32 [G, ceil(V / 32)]; bit j of word w is token 32 w + j."""
    G, V = allowed.shape
    W = (V + _BITS - 1) // _BITS
    padded = torch.zeros((G, W * _BITS), dtype=torch.int64)
    padded[:, :V] = allowed
    words = (padded.view(G, W, _BITS) << torch.arange(_BITS, dtype=torch.int64)).sum(-1)  # [G, W] < 2**32
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [G, W] → bool [G, vocab_size], on the words' device."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=words.device)
    bits = (words[:, :, None] >> shifts) & 1  # arithmetic shift; the & 1 keeps only the wanted bit
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()


@dataclass
class SamplingBatch:
    """One step's sampling rows and everything their sampling reads, as tensors on the model's device."""

    reqs: list[Req]
    rows: torch.Tensor  # [B] int64: which logits row of the forward pass each request samples from
    logprob_rows: list[int]  # indices into reqs of the requests that return logprobs
    sample_rows: list[int]  # indices into reqs of non-greedy requests (the others take the argmax)
    temperature: torch.Tensor | None  # [S, 1] for sample_rows
    top_k: torch.Tensor | None  # [S]
    top_p: torch.Tensor | None  # [S]
    min_p: torch.Tensor | None  # [S]
    needs_filter: bool  # some sample row has top-k, top-p or min-p (sorting is needed)
    penalty_rows: torch.Tensor | None  # [P] rows with repetition/frequency/presence penalties
    repetition: torch.Tensor | None  # [P, 1]
    frequency: torch.Tensor | None  # [P, 1]
    presence: torch.Tensor | None  # [P, 1]
    seen: torch.Tensor | None  # [P, V] bool: token occurs in prompt or output (repetition penalty)
    counts: torch.Tensor | None  # [P, V] float32: occurrences in the output (frequency/presence)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row, token, value) of every logit_bias entry
    grammar_rows: torch.Tensor | None  # [G] rows with a grammar
    grammar_bitmask: torch.Tensor | None  # [G, ceil(V/32)] int32 allowed tokens
    ban: tuple[torch.Tensor, torch.Tensor] | None  # (row, token): EOS/stop ids banned by min_new_tokens

    @classmethod
    def build(cls, reqs: list[Req], rows: list[int], vocab_size: int, eos_ids: list[int],
              device: torch.device | str, masks: torch.Tensor | None = None) -> "SamplingBatch":
        """Everything the device needs for these requests. ``masks``: [B, V] bool allowed tokens on the host
        (``GrammarManager.masks``; all-true rows for free requests) or None; only constrained rows are
        packed and sent."""

        def dev(x, dtype):
            return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

        sps = [r.sampling_params for r in reqs]
        V = vocab_size
        sample = [i for i, sp in enumerate(sps) if not sp.is_greedy]
        temp = top_k = top_p = min_p = None
        needs_filter = False
        if sample:
            s = [sps[i] for i in sample]
            temp = dev([[sp.temperature] for sp in s], torch.float32)
            k = [sp.top_k if sp.top_k > 0 else V for sp in s]
            needs_filter = any(x < V for x in k) or any(sp.top_p < 1 for sp in s) or any(sp.min_p > 0 for sp in s)
            top_k, top_p = dev(k, torch.int64), dev([sp.top_p for sp in s], torch.float32)
            min_p = dev([sp.min_p for sp in s], torch.float32)

        pen = [i for i, sp in enumerate(sps) if sp.frequency_penalty or sp.presence_penalty
               or sp.repetition_penalty != 1.0]
        pen_rows = rep = freq = pres = seen = counts = None
        if pen:
            seen = torch.zeros((len(pen), V), dtype=torch.bool)
            counts = torch.zeros((len(pen), V), dtype=torch.float32)
            for k, i in enumerate(pen):
                r = reqs[i]
                if sps[i].repetition_penalty != 1.0:
                    seen[k, torch.tensor(sorted(set(r.input_ids) | set(r.output_ids)), dtype=torch.int64)] = True
                if r.output_ids:
                    counts[k] = torch.bincount(torch.tensor(r.output_ids, dtype=torch.int64), minlength=V)[:V].float()
            pen_rows = dev(pen, torch.int64)
            rep = dev([[sps[i].repetition_penalty] for i in pen], torch.float32)
            freq = dev([[sps[i].frequency_penalty] for i in pen], torch.float32)
            pres = dev([[sps[i].presence_penalty] for i in pen], torch.float32)
            seen, counts = seen.to(device), counts.to(device)

        bias = None
        entries = [(i, t, b) for i, sp in enumerate(sps) if sp.logit_bias for t, b in sp.logit_bias.items()]
        if entries:
            bias = (dev([e[0] for e in entries], torch.int64), dev([int(e[1]) for e in entries], torch.int64),
                    dev([e[2] for e in entries], torch.float32))

        g_rows = g_mask = None
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None] if masks is not None else []
        if constrained:
            g_rows = dev(constrained, torch.int64)
            g_mask = pack_bitmask(masks[torch.tensor(constrained, dtype=torch.int64)]).to(device)

        ban_r, ban_t = [], []
        for i, r in enumerate(reqs):
            if len(r.output_ids) < sps[i].min_new_tokens:
                ids = list(sps[i].stop_token_ids or []) + ([] if sps[i].ignore_eos else list(eos_ids))
                ban_r += [i] * len(ids)
                ban_t += ids
        ban = (dev(ban_r, torch.int64), dev(ban_t, torch.int64)) if ban_r else None

        return cls(reqs, dev(rows, torch.int64), [i for i, r in enumerate(reqs) if r.logprob.return_logprob], sample,
                   temp, top_k, top_p, min_p, needs_filter, pen_rows, rep, freq, pres, seen, counts, bias,
                   g_rows, g_mask, ban)


@dataclass
class SampleResult:
    next_ids: list[int]  # one per request of the SamplingBatch
    logprobs: torch.Tensor | None  # [len(logprob_rows), V] host float32 raw log-softmax, or None


class DeviceSampler:
    """Samples on the logits' device; same order of operations and results as the host ``Sampler``."""

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, sb: SamplingBatch) -> SampleResult:
        """logits [N, V] float32 on the device (the forward pass's rows); returns ids on the host."""
        x = logits.index_select(0, sb.rows)  # [B, V], a fresh tensor we may modify in place
        lp = None
        if sb.logprob_rows:  # the model's raw distribution, only for the rows that report it
            lp_idx = torch.tensor(sb.logprob_rows, dtype=torch.int64, device=x.device)
            lp = torch.log_softmax(x.index_select(0, lp_idx), dim=-1).cpu()
        if sb.penalty_rows is not None:
            sub = x.index_select(0, sb.penalty_rows)  # [P, V]
            sub = torch.where(sb.seen, torch.where(sub > 0, sub / sb.repetition, sub * sb.repetition), sub)
            sub = sub - (sb.frequency * sb.counts + sb.presence * (sb.counts > 0).to(sub.dtype))
            x.index_copy_(0, sb.penalty_rows, sub)
        if sb.bias is not None:
            r, t, v = sb.bias
            x.index_put_((r, t), v, accumulate=True)
        if sb.grammar_rows is not None:
            allowed = unpack_bitmask(sb.grammar_bitmask, x.shape[1])
            x.index_copy_(0, sb.grammar_rows, x.index_select(0, sb.grammar_rows).masked_fill(~allowed, float("-inf")))
        if sb.ban is not None:
            banned = x.clone()
            banned.index_put_(sb.ban, torch.tensor(float("-inf"), device=x.device))
            # A grammar that admits only EOS outranks min_new_tokens: never leave a row with nothing to pick.
            dead = torch.isinf(banned).all(dim=-1) & ~torch.isinf(x).all(dim=-1)
            x = torch.where(dead[:, None], x, banned)
        next_ids = x.argmax(dim=-1)  # [B]
        if sb.sample_rows:
            rows = torch.tensor(sb.sample_rows, dtype=torch.int64, device=x.device)
            next_ids[rows] = self._sample_rows(x.index_select(0, rows), sb)
        return SampleResult(next_ids.tolist(), lp)

    def _sample_rows(self, x: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
        """x [S, V] logits of the non-greedy rows → sampled ids [S]."""
        S, V = x.shape
        probs = torch.softmax(x / sb.temperature, dim=-1)  # [S, V]
        if sb.needs_filter:
            sorted_p, order = probs.sort(dim=-1, descending=True)  # [S, V]
            rank = torch.arange(V, device=x.device)[None, :]
            drop = rank >= sb.top_k[:, None]
            drop |= (sorted_p.cumsum(-1) - sorted_p) > sb.top_p[:, None]  # keep the token that crosses top_p
            drop |= sorted_p < (sb.min_p[:, None] * sorted_p[:, :1])
            drop[:, 0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        # Exponential race: argmax(p / E), E ~ Exp(1), draws from p without renormalising.
        noise = torch.empty_like(probs)
        for k, i in enumerate(sb.sample_rows):
            r = sb.reqs[i]
            seed = r.sampling_params.seed
            if seed is None:
                noise[k].exponential_(generator=self.generator)
            else:
                g = torch.Generator(device=x.device).manual_seed((seed * 1_000_003 + r.seq_len) & 0x7FFFFFFFFFFFFFFF)
                noise[k].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)
