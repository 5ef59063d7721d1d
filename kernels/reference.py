"""The torch reference for the paged-attention kernels: the one definition tests compare against.

Plain per-request loops in float64, written for obviousness rather than speed. Semantics:

* decode: query b attends to every key of request b,
  ``k_buffer[kv_indices[kv_indptr[b] : kv_indptr[b + 1]]]``. A request with no keys yields zeros.
* extend: the new tokens of request b (rows ``qo_indptr[b] : qo_indptr[b + 1]`` of q, k, v) attend
  to the request's whole cached prefix ``k_buffer[prefix_indices[prefix_indptr[b] :
  prefix_indptr[b + 1]]]`` and causally to the request's new tokens (token i sees new tokens 0..i).

GQA: query head h reads KV head ``h // (Hq // Hkv)``. Outputs are returned in q's dtype.
"""

from __future__ import annotations

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [M, Hq, D], k/v [N, Hkv, D], mask [M, N] bool (True = may attend) -> [M, Hq, D] float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [N, Hq, D]
    v = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), k) * sm_scale  # [Hq, M, N]
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    # Rows that see no key at all (an empty decode request) give zeros, not NaN.
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("hmn,nhd->mhd", p, v)


def decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_buffer: torch.Tensor,  # [S, Hkv, D]
    v_buffer: torch.Tensor,  # [S, Hkv, D]
    kv_indptr: torch.Tensor,  # [B + 1]
    kv_indices: torch.Tensor,  # [sum of lengths]
    sm_scale: float,
) -> torch.Tensor:
    """Reference decode attention over the paged pool -> [B, Hq, D] in q's dtype."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    indptr = kv_indptr.tolist()
    for b in range(q.shape[0]):
        idx = kv_indices[indptr[b] : indptr[b + 1]].long()
        if idx.numel() == 0:
            continue
        mask = torch.ones((1, idx.numel()), dtype=torch.bool, device=q.device)
        k_b = k_buffer[idx].to(q.dtype)  # [L, Hkv, D], rounded to q's dtype as the kernel does
        v_b = v_buffer[idx].to(q.dtype)
        out[b] = _attend(q[b : b + 1], k_b, v_b, mask, sm_scale)[0]
    return out.to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_buffer: torch.Tensor,  # [S, Hkv, D]
    v_buffer: torch.Tensor,  # [S, Hkv, D]
    qo_indptr: torch.Tensor,  # [B + 1]
    prefix_indptr: torch.Tensor,  # [B + 1]
    prefix_indices: torch.Tensor,  # [sum of prefix lengths]
    sm_scale: float,
) -> torch.Tensor:
    """Reference extend (prefill over a cached prefix) attention -> [T, Hq, D] in q's dtype."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    qo = qo_indptr.tolist()
    pre = prefix_indptr.tolist()
    for b in range(len(qo) - 1):
        qs, qe = qo[b], qo[b + 1]
        if qe == qs:
            continue
        idx = prefix_indices[pre[b] : pre[b + 1]].long()
        n_prefix, n_new = idx.numel(), qe - qs
        # K/V are rounded to q's dtype first, as the kernels (and the torch backend) do.
        keys = torch.cat((k_buffer[idx].to(q.dtype), k[qs:qe].to(q.dtype)))  # [P + E, Hkv, D]
        vals = torch.cat((v_buffer[idx].to(q.dtype), v[qs:qe].to(q.dtype)))
        i = torch.arange(n_new, device=q.device)[:, None]
        j = torch.arange(n_prefix + n_new, device=q.device)[None, :]
        mask = j <= n_prefix + i  # [E, P + E]: the whole prefix, then causal
        out[qs:qe] = _attend(q[qs:qe], keys, vals, mask, sm_scale)
    return out.to(q.dtype)
