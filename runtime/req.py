"""Req: one sequence inside the scheduler, and the lengths it knows about itself.

A request's tokens are ``input_ids + output_ids``. The first ``kv_len`` of them have K/V in the
pool at ``req_to_token[req_pool_idx, :kv_len]``; the rest (``pending``) are the input of its next
forward pass. Prefill, chunked prefill, decode, jump-forward and re-admission after retraction are
all the same thing: compute the pending tokens (a decode step is the case of exactly one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixlm.runtime.protocol import LogprobOptions, TokenLogprob
from radixlm.runtime.radix_cache import TreeNode
from radixlm.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixlm.runtime.grammar_manager import GrammarSlot


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    logprob: LogprobOptions = LogprobOptions()  # with return_logprob False, the others are defaults
    cache_namespace: str = ""  # radix-tree and disk-tier namespace (cache_salt / extra_key); "" is shared
    priority: int | None = None  # SGLang's priority field (used with --enable-priority-scheduling)
    arrival: int = 0  # scheduler step at which it arrived (FCFS order and aging)
    output_ids: list[int] = field(default_factory=list)

    # KV state
    req_pool_idx: int | None = None
    kv_len: int = 0  # tokens of input+output whose K/V are in the pool
    locked_len: int = 0  # the first locked_len slots belong to the radix tree (locked via last_node)
    last_node: TreeNode | None = None
    cached_tokens: int = 0  # prompt tokens reused from the cache (for meta_info), at first admission

    # Policy scratch (refreshed each scheduling step while waiting)
    prefix_len: int = 0

    # Progress
    finish_reason: dict | None = None
    error: str | None = None  # reported to the client with the final output
    input_logprobs_done: bool = False
    first_admitted: bool = False
    grammar: GrammarSlot | None = None  # None for a free request; admitted once the slot is ready
    # Jump-forward tokens of a greedy request not yet checked against the model: (index in all_ids,
    # grammar state before it). They are held back from the client until verified.
    forced: list[tuple[int, int]] = field(default_factory=list)
    # Logprobs produced since the last output was sent
    new_input_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_input_top_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    new_output_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_output_top_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    new_input_token_ids_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    new_output_token_ids_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    sent_len: int = 0  # output tokens already reported

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building the whole concatenation (the per-step hot path)."""
        n_in = len(self.input_ids)
        if start >= n_in:
            return self.output_ids[start - n_in : end - n_in]
        if end <= n_in:
            return self.input_ids[start:end]
        return self.input_ids[start:] + self.output_ids[: end - n_in]

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        return self.seq_len - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_input_logprobs(self) -> bool:
        return self.logprob.return_logprob and self.logprob.logprob_start_len >= 0 and not self.input_logprobs_done

    @property
    def max_prefix_len(self) -> int:
        """Cached prefix usable at admission: input logprobs need the logits before the first scored token."""
        limit = self.seq_len - 1  # at least one token must be computed to get next-token logits
        if self.needs_input_logprobs:
            limit = min(limit, max(self.logprob.logprob_start_len - 1, 0))
        if self.forced:  # the logits that verify forced tokens must be computed, not cached
            limit = min(limit, self.forced[0][0] - 1)
        return max(limit, 0)

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.sampling_params.max_new_tokens - len(self.output_ids), 0)
