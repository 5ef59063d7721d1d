"""The torch attention backend: the CPU default and the reference for every other backend.

Batched over requests with padding. Requests are split into up to three groups per step: one new token
(decodes), several new tokens with nothing cached before them (fresh prefills), and several new tokens
after a cached prefix (chunks, cache hits, jump-forward runs). So a mixed batch never pads a decode to a
prompt's query length, and fresh prefills use SDPA's causal path (no mask: right padding never leaks
into a valid row, because query i only sees keys j <= i < its length). Per group and step it builds one
gather index ``[B, Lmax]`` into the KV pool and, where needed, one boolean mask ``[B, 1, Qmax, Lmax]``;
every layer then does one gather and one SDPA call per group. No Python loop over requests runs per
layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


@dataclass
class _Group:
    tokens: torch.Tensor  # [Tg] indices of this group's tokens in the step's [T] token order
    kv_idx: torch.Tensor  # [Bg, Lmax] int64 KV slots (0 = padding)
    mask: torch.Tensor | None  # [Bg, 1, Qmax, Lmax] bool, True = may attend (None: see `causal`)
    causal: bool  # no mask: plain causal attention (fresh prefills), or all keys valid (equal decodes)
    q_flat: torch.Tensor  # [Tg] row of each token in the padded [Bg * Qmax] query layout
    batch: int
    qmax: int


@dataclass
class TorchAttnMetadata:
    groups: list[_Group]


class TorchAttnBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token_pool.req_to_token

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = fb.input_ids.device
        ext = fb.extend_lens_cpu
        starts = [0]
        for n in ext[:-1]:
            starts.append(starts[-1] + n)
        pre = fb.prefix_lens_cpu
        groups = []
        for members in (
            [b for b, n in enumerate(ext) if n == 1],
            [b for b, n in enumerate(ext) if n > 1 and pre[b] == 0],
            [b for b, n in enumerate(ext) if n > 1 and pre[b] > 0],
        ):
            if members:
                groups.append(self._group(fb, members, starts, device))
        fb.attn_metadata = TorchAttnMetadata(groups)

    def _group(self, fb: ForwardBatch, members: list[int], starts: list[int], device) -> _Group:
        ext = [fb.extend_lens_cpu[b] for b in members]
        seq = [fb.seq_lens_cpu[b] for b in members]
        lmax, qmax, B = max(seq), max(ext), len(members)
        idx = torch.tensor(members, dtype=torch.int64, device=device)
        seq_lens, prefix_lens, extend_lens = fb.seq_lens[idx], fb.prefix_lens[idx], fb.extend_lens[idx]
        j = torch.arange(lmax, device=device)  # [Lmax]
        kv_idx = self.req_to_token[fb.req_pool_indices[idx], :lmax]  # [B, Lmax]
        kv_idx = torch.where(j[None, :] < seq_lens[:, None], kv_idx, torch.zeros_like(kv_idx))
        q_b = torch.repeat_interleave(torch.arange(B, device=device), extend_lens)  # [Tg]
        group_starts = torch.cumsum(extend_lens, 0) - extend_lens  # [B]
        q_i = torch.arange(int(sum(ext)), device=device) - group_starts[q_b]  # [Tg]
        tokens = torch.tensor(
            [starts[b] + k for b, n in zip(members, ext) for k in range(n)], dtype=torch.int64, device=device
        )
        fresh = qmax > 1 and all(fb.prefix_lens_cpu[b] == 0 for b in members)
        equal_decodes = qmax == 1 and all(x == lmax for x in seq)
        q_flat = q_b * qmax + q_i
        if fresh or equal_decodes:
            return _Group(tokens, kv_idx, None, fresh, q_flat, B, qmax)
        i = torch.arange(qmax, device=device)  # [Qmax]
        # Query i of request b sits at absolute position prefix_len[b] + i and sees keys j <= that.
        limit = prefix_lens[:, None] + i[None, :]  # [B, Qmax]
        mask = j[None, None, :] <= limit[:, :, None]  # [B, Qmax, Lmax]
        valid_q = i[None, :] < extend_lens[:, None]  # [B, Qmax]
        # Padded query rows attend to key 0 only, so softmax never sees an all-masked row.
        mask = torch.where(valid_q[:, :, None], mask, j[None, None, :] == 0)
        return _Group(tokens, kv_idx, mask[:, None], False, q_flat, B, qmax)

    def forward(self, q, k, v, layer_id, fb, sm_scale):
        self.kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        md: TorchAttnMetadata = fb.attn_metadata
        T, Hq, D = q.shape
        if len(md.groups) == 1 and md.groups[0].tokens.numel() == T:
            return self._attend(q, md.groups[0], layer_id, sm_scale)
        o = q.new_empty((T, Hq, D))
        for g in md.groups:
            o.index_copy_(0, g.tokens, self._attend(q.index_select(0, g.tokens), g, layer_id, sm_scale))
        return o

    def _attend(self, q: torch.Tensor, g: _Group, layer_id: int, sm_scale: float) -> torch.Tensor:
        """q [Tg, Hq, D] of one group → o [Tg, Hq, D]."""
        Hq, D = q.shape[1], q.shape[2]
        # index_select on the flattened index is several times faster than advanced indexing on CPU.
        flat = g.kv_idx.reshape(-1)
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        k_all = k_buf.index_select(0, flat).view(g.batch, -1, *k_buf.shape[1:])  # [B, Lmax, Hkv, D]
        v_all = v_buf.index_select(0, flat).view(g.batch, -1, *v_buf.shape[1:])
        if g.qmax == 1:
            q_pad = q[:, None]  # decodes: one token per request, already in request order
        else:
            q_pad = q.new_zeros((g.batch * g.qmax, Hq, D)).index_copy_(0, g.q_flat, q)
            q_pad = q_pad.view(g.batch, g.qmax, Hq, D)
        o = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),  # [B, Hq, Qmax, D]
            k_all.transpose(1, 2).to(q.dtype),  # [B, Hkv, Lmax, D]
            v_all.transpose(1, 2).to(q.dtype),
            attn_mask=g.mask,
            is_causal=g.causal,
            scale=sm_scale,
            enable_gqa=k_all.shape[2] != Hq,
        )  # [B, Hq, Qmax, D]
        o = o.transpose(1, 2)  # [B, Qmax, Hq, D]
        return o[:, 0] if g.qmax == 1 else o.reshape(-1, Hq, D).index_select(0, g.q_flat)
