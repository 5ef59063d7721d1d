"""Sampler: logits of the sampled rows → next tokens, in one batched pass.

Order of operations per row (as in vLLM/SGLang): penalties on the raw logits → logit_bias → min_new_tokens
ban on EOS/stop ids → grammar mask → greedy argmax, or temperature → top-k → top-p → min-p → draw.

Reported logprobs are the model's own ``log_softmax`` of the raw logits (before penalties, masks and
temperature), so they are comparable with transformers and independent of sampling settings.

Reproducibility: a request with ``seed`` draws its noise from a generator seeded by (seed, position),
so its samples do not depend on which other requests share the batch, nor on retraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.protocol import TokenLogprob
from radixlm.runtime.req import Req


@dataclass
class SampleOutput:
    next_ids: list[int]
    logprobs: torch.Tensor | None  # [B, V] raw log-softmax, only if some row asked for logprobs


class Sampler:
    def __init__(self, vocab_size: int, eos_ids: set[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Req], masks: torch.Tensor | None = None) -> SampleOutput:
        """logits [B, V] float32 (one row per req); masks [B, V] bool (True = allowed) or None."""
        B, V = logits.shape
        need_lp = any(r.logprob.return_logprob for r in reqs)
        logprobs = torch.log_softmax(logits, dim=-1) if need_lp else None
        logits = self._apply_penalties(logits, reqs)
        logits = apply_logit_bias(logits, [r.sampling_params for r in reqs])
        if masks is not None:
            logits = logits.masked_fill(~masks, float("-inf"))
        banned = self._ban_early_stop(logits, reqs)
        # A grammar that admits only EOS outranks min_new_tokens: never leave a row with nothing to pick.
        dead = torch.isinf(banned).all(dim=-1) & ~torch.isinf(logits).all(dim=-1)
        logits = torch.where(dead[:, None], logits, banned)

        sps = [r.sampling_params for r in reqs]
        greedy = torch.tensor([sp.is_greedy for sp in sps])
        next_ids = logits.argmax(dim=-1)  # [B]
        if not bool(greedy.all()):
            rows = (~greedy).nonzero().flatten()
            sampled = self._sample_rows(logits[rows], [reqs[i] for i in rows.tolist()])
            next_ids[rows] = sampled
        return SampleOutput(next_ids.tolist(), logprobs)

    # ------------------------------------------------------------------ pieces
    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        idx = [
            i
            for i, r in enumerate(reqs)
            if r.sampling_params.frequency_penalty
            or r.sampling_params.presence_penalty
            or r.sampling_params.repetition_penalty != 1.0
        ]
        if not idx:
            return logits
        logits = logits.clone()
        for i in idx:  # rows with penalties are rare; per-row vector ops, no per-token loop
            sp, r = reqs[i].sampling_params, reqs[i]
            row = logits[i]
            if sp.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.input_ids) | set(r.output_ids)), dtype=torch.int64)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
            if r.output_ids and (sp.frequency_penalty or sp.presence_penalty):
                counts = torch.bincount(torch.tensor(r.output_ids, dtype=torch.int64), minlength=self.vocab_size)
                counts = counts[: row.shape[0]].to(row.dtype)
                row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _ban_early_stop(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        rows = [i for i, r in enumerate(reqs) if len(r.output_ids) < r.sampling_params.min_new_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            banned = list(reqs[i].sampling_params.stop_token_ids or [])
            if not reqs[i].sampling_params.ignore_eos:
                banned += self.eos_ids
            if banned:
                logits[i, banned] = float("-inf")
        return logits

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """logits [N, V] of non-greedy rows → sampled ids [N]."""
        N, V = logits.shape
        sps = [r.sampling_params for r in reqs]
        temp = torch.tensor([sp.temperature for sp in sps], dtype=logits.dtype)[:, None]
        probs = torch.softmax(logits / temp, dim=-1)  # [N, V]
        top_k = torch.tensor([sp.top_k if sp.top_k > 0 else V for sp in sps])
        top_p = torch.tensor([sp.top_p for sp in sps], dtype=probs.dtype)
        min_p = torch.tensor([sp.min_p for sp in sps], dtype=probs.dtype)
        if bool((top_k < V).any() | (top_p < 1).any() | (min_p > 0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)  # [N, V]
            rank = torch.arange(V)[None, :]
            drop = rank >= top_k[:, None]
            drop |= (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]  # keep the token that crosses top_p
            drop |= sorted_p < (min_p[:, None] * sorted_p[:, :1])
            drop[:, 0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        # Exponential race: argmax(p / E), E ~ Exp(1), draws from p without renormalising.
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            seed = r.sampling_params.seed
            if seed is None:
                noise[i].exponential_(generator=self.generator)
            else:
                g = torch.Generator().manual_seed((seed * 1_000_003 + r.seq_len) & 0x7FFFFFFFFFFFFFFF)
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


def apply_logit_bias(logits: torch.Tensor, sps: list) -> torch.Tensor:
    """logits [B, V] + each row's ``logit_bias`` (token id → bias); a copy only when some row has one.

    Also used on one row ([V], one SamplingParams) by the greedy jump-forward check, so both agree."""
    if logits.dim() == 1:
        return apply_logit_bias(logits[None], sps)[0]
    rows = [(i, sp.logit_bias) for i, sp in enumerate(sps) if sp.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    for i, bias in rows:
        ids = torch.tensor(list(bias.keys()), dtype=torch.int64)
        logits[i].index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype))
    return logits


def token_ids_logprobs(row: torch.Tensor, ids: tuple[int, ...]) -> list[TokenLogprob]:
    """The logprobs of exactly ``ids`` (in their order) in one log-softmax row [V] (token_ids_logprob)."""
    vals = row[list(ids)].tolist()
    return [TokenLogprob(float(v), int(i)) for v, i in zip(vals, ids)]


def top_logprobs(row: torch.Tensor, k: int) -> list[TokenLogprob]:
    """The k most likely tokens of one log-softmax row [V], best first."""
    vals, ids = row.topk(k)
    return [TokenLogprob(float(v), int(i)) for v, i in zip(vals.tolist(), ids.tolist())]
