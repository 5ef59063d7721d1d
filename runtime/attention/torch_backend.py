"""The torch attention backend: the CPU default and the reference for every other backend.

Batched over requests with padding. Requests are split into up to three groups per step: one new token
(decodes), several new tokens with nothing cached before them (fresh prefills), and several new tokens
after a cached prefix (chunks, cache hits, jump-forward runs). So a mixed batch never pads a decode to a
prompt's query length, and fresh prefills use SDPA's causal path (no mask: right padding never leaks
into a valid row, because query i only sees keys j <= i < its length). Per group and step it builds one
gather index ``[B, Lmax]`` into the KV pool and, where needed, one boolean mask ``[B, 1, Qmax, Lmax]``;
every layer then does one gather and one SDPA call per group. No Python loop over requests runs per
layer.

Cascade attention for shared prefixes: when the requests of a group share their first P KV slots (the
radix cache hands every request with a common prompt prefix the same slots), the shared keys are read
once and attended by all the group's queries in one GEMM; only each request's own suffix is gathered per
request; the two partial softmaxes are merged with their log-sum-exps. A 1k-token few-shot prefix decoded
by 200 requests is then read once per layer instead of 200 times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


CASCADE_MIN_SHARED = 32  # shared KV slots below which the plain padded path is as cheap


@dataclass
class _Group:
    tokens: torch.Tensor  # [Tg] indices of this group's tokens in the step's [T] token order
    kv_idx: torch.Tensor  # [Bg, Lmax] int64 KV slots (0 = padding)
    mask: torch.Tensor | None  # [Bg, 1, Qmax, Lmax] bool, True = may attend (None: see `causal`)
    causal: bool  # no mask: plain causal attention (fresh prefills), or all keys valid (equal decodes)
    shared: torch.Tensor | None  # [P] KV slots every request of the group starts with (cascade), or None
    q_flat: torch.Tensor  # [Tg] row of each token in the padded [Bg * Qmax] query layout
    batch: int
    qmax: int


@dataclass
class TorchAttnMetadata:
    groups: list[_Group]


class TorchAttnBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool, cascade_min_shared: int = CASCADE_MIN_SHARED):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token_pool.req_to_token
        self.cascade_min_shared = cascade_min_shared

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
        shared = None
        if not fresh and B >= 2:
            # Longest run of KV slots every request starts with; all of it is visible to every query.
            cap = min(fb.prefix_lens_cpu[b] if qmax > 1 else fb.seq_lens_cpu[b] for b in members)
            same = (kv_idx[:, :cap] == kv_idx[:1, :cap]).all(dim=0)
            p = int(same.long().cumprod(0).sum())
            if p >= self.cascade_min_shared:
                shared = kv_idx[0, :p]
        if shared is None and (fresh or equal_decodes):
            return _Group(tokens, kv_idx, None, fresh, None, q_flat, B, qmax)
        i = torch.arange(qmax, device=device)  # [Qmax]
        # Query i of request b sits at absolute position prefix_len[b] + i and sees keys j <= that.
        limit = prefix_lens[:, None] + i[None, :]  # [B, Qmax]
        mask = j[None, None, :] <= limit[:, :, None]  # [B, Qmax, Lmax]
        valid_q = i[None, :] < extend_lens[:, None]  # [B, Qmax]
        # Padded query rows attend to key 0 only, so softmax never sees an all-masked row.
        if shared is not None:  # keep only the per-request suffix; padded query rows see nothing there
            p = shared.numel()
            return _Group(tokens, kv_idx[:, p:], (mask & valid_q[:, :, None])[:, None, :, p:], False, shared,
                          q_flat, B, qmax)
        mask = torch.where(valid_q[:, :, None], mask, j[None, None, :] == 0)
        return _Group(tokens, kv_idx, mask[:, None], False, None, q_flat, B, qmax)

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
        if g.shared is not None:
            o = self._cascade(self._pad(q, g), g, layer_id, sm_scale)  # [B, Qmax, Hq, D]
            return o[:, 0] if g.qmax == 1 else o.reshape(-1, Hq, D).index_select(0, g.q_flat)
        # index_select on the flattened index is several times faster than advanced indexing on CPU.
        flat = g.kv_idx.reshape(-1)
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        k_all = k_buf.index_select(0, flat).view(g.batch, -1, *k_buf.shape[1:])  # [B, Lmax, Hkv, D]
        v_all = v_buf.index_select(0, flat).view(g.batch, -1, *v_buf.shape[1:])
        q_pad = self._pad(q, g)
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

    @staticmethod
    def _pad(q: torch.Tensor, g: _Group) -> torch.Tensor:
        """q [Tg, Hq, D] → [B, Qmax, Hq, D] (zeros in padded rows)."""
        if g.qmax == 1:
            return q[:, None]  # decodes: one token per request, already in request order
        Hq, D = q.shape[1], q.shape[2]
        return q.new_zeros((g.batch * g.qmax, Hq, D)).index_copy_(0, g.q_flat, q).view(g.batch, g.qmax, Hq, D)

    def _cascade(self, q: torch.Tensor, g: _Group, layer_id: int, scale: float) -> torch.Tensor:
        """Attention over (shared prefix ++ own suffix) for q [B, Q, Hq, D] → [B, Q, Hq, D]."""
        B, Q, Hq, D = q.shape
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        Hkv = k_buf.shape[1]
        G = Hq // Hkv  # query heads per KV head: query head h reads KV head h // G
        # Shared prefix: every query of the group against the same keys, one batched GEMM per KV head.
        ks = k_buf.index_select(0, g.shared).to(q.dtype)  # [P, Hkv, D]
        vs = v_buf.index_select(0, g.shared).to(q.dtype)
        qh = q.reshape(B * Q, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, B * Q * G, D)  # [Hkv, N, D]
        s_s = torch.bmm(qh, ks.permute(1, 2, 0)) * scale  # [Hkv, N, P]
        m_s = s_s.amax(-1, keepdim=True)  # [Hkv, N, 1]
        p_s = torch.exp(s_s - m_s)
        l_s = p_s.sum(-1, keepdim=True)
        o_s = torch.bmm(p_s, vs.transpose(0, 1))  # [Hkv, N, D]

        def per_request(x: torch.Tensor) -> torch.Tensor:  # [Hkv, B*Q*G, X] → [B, Hkv, Q*G, X]
            return x.view(Hkv, B, Q * G, -1).transpose(0, 1)

        m_s, l_s, o_s = per_request(m_s), per_request(l_s), per_request(o_s)
        # Own suffix: gathered per request, masked (causal within the step, padding).
        lu = g.kv_idx.shape[1]
        ku = k_buf.index_select(0, g.kv_idx.reshape(-1)).view(B, lu, Hkv, D).to(q.dtype)
        vu = v_buf.index_select(0, g.kv_idx.reshape(-1)).view(B, lu, Hkv, D).to(q.dtype)
        qb = q.reshape(B, Q, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Q * G, D)
        s_u = torch.matmul(qb, ku.permute(0, 2, 3, 1)) * scale  # [B, Hkv, Q*G, Lu]
        mask = g.mask[:, :, :, None, :].expand(B, 1, Q, G, lu).reshape(B, 1, Q * G, lu)
        s_u = s_u.masked_fill(~mask, float("-inf"))
        m_u = s_u.amax(-1, keepdim=True)  # -inf where a row has no suffix key
        p_u = torch.exp(s_u - torch.where(torch.isinf(m_u), torch.zeros_like(m_u), m_u))
        l_u = p_u.sum(-1, keepdim=True)
        o_u = torch.matmul(p_u, vu.permute(0, 2, 1, 3))  # [B, Hkv, Q*G, D]
        # Merge the two partial softmaxes.
        m = torch.maximum(m_s, m_u)
        a_s, a_u = torch.exp(m_s - m), torch.exp(m_u - m)
        o = (o_s * a_s + o_u * a_u) / (l_s * a_s + l_u * a_u)  # [B, Hkv, Q*G, D]
        return o.view(B, Hkv, Q, G, D).permute(0, 2, 1, 3, 4).reshape(B, Q, Hq, D)
