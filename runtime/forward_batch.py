"""ForwardBatch: everything one forward pass needs, built by the scheduler, read by the model.

Model code never sees the scheduler: it receives this per-step object and hands it to the attention
backend, which reads and writes the paged KV pool through ``req_to_token``.

Layout (T = total new tokens this step, B = requests in the batch):
  input_ids     [T]  int64   new tokens, request-major (request 0's tokens first)
  positions     [T]  int64   absolute position of each new token
  out_cache_loc [T]  int64   KV-pool slot each new token's K/V is written to
  req_pool_indices [B] int64 row of req_to_token for each request
  prefix_lens   [B]  int64   tokens already in the pool before this step (cached prefix)
  extend_lens   [B]  int64   new tokens this step (1 for every request in DECODE)
  seq_lens      [B]  int64   prefix_lens + extend_lens: tokens visible after this step
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill / chunked prefill: several new tokens per request
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    req_pool_indices: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    seq_lens: torch.Tensor
    # The same lengths as Python lists: loops and shape decisions must not sync with the device.
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Filled by AttentionBackend.init_forward_metadata; opaque to the model.
    attn_metadata: Any = None
    # Which rows of the [T, hidden] output need logits (last token of each request by default).
    logits_indices: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        mode: ForwardMode,
        input_ids: list[int],
        positions: list[int],
        out_cache_loc: torch.Tensor,
        req_pool_indices: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        device: torch.device | str,
    ) -> "ForwardBatch":
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return cls(
            mode=mode,
            input_ids=t(input_ids),
            positions=t(positions),
            out_cache_loc=out_cache_loc.to(device=device, dtype=torch.int64),
            req_pool_indices=t(req_pool_indices),
            prefix_lens=t(prefix_lens),
            extend_lens=t(extend_lens),
            seq_lens=t(seq_lens),
            prefix_lens_cpu=list(prefix_lens),
            extend_lens_cpu=list(extend_lens),
            seq_lens_cpu=seq_lens,
        )
