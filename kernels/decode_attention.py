"""Paged decode attention: one new query token per request against that request's KV in the pool.

Split-KV ("flash-decoding"): stage 1 cuts each request's keys into ``num_splits`` contiguous chunks
and runs one program per (request, KV head, split); each program reads its chunk of K/V once for all
query heads of its GQA group (padded to 16 rows so the scores are one ``tl.dot``) and writes a
partial output plus its log-sum-exp. Stage 2 merges the splits with the log-sum-exp weights. With a
single split, stage 1 writes the final output and stage 2 is skipped.

Decode is bound by reading K/V, so the split count is chosen to give the GPU enough programs: small
batches with long contexts get many splits, large batches get one.

Softmax runs in base 2 (``exp2``, scores pre-scaled by log2(e)); partial LSEs are base 2 as well.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from radixlm.kernels._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_indptr,
    check_sm_scale,
    output_like,
    check_runnable,
    check_tensor,
    device_parallelism,
    dot_upcast,
    head_block,
    last_dim_contiguous,
    next_pow2,
)

LOG2E = 1.4426950408889634
# A split shorter than this costs more in its merge traffic than it gains in parallelism.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q,  # [B, Hq, D]
    K,  # [S, Hkv, D]
    V,  # [S, Hkv, D]
    KvIndptr,  # [B + 1]
    KvIndices,  # [N]
    Out,  # [B, Hq, D]: written directly when SINGLE_SPLIT
    MidO,  # [B, Hq, num_splits, BLOCK_D] float32: per-split normalised outputs
    MidLse,  # [B, Hq, num_splits] float32: per-split base-2 log-sum-exp
    qk_scale,  # sm_scale * log2(e)
    num_splits,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,  # GROUP padded to >= 16 rows for tl.dot
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (interpreter bf16 workaround)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    kv_start = tl.load(KvIndptr + b)
    kv_len = tl.load(KvIndptr + b + 1) - kv_start
    # Every split of this request covers the same whole number of blocks; trailing splits may be empty.
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h  # [BLOCK_H] query heads served by this program
    hd_mask = h_mask[:, None] & d_mask[None, :]

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=hd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max (base-2 scaled)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n in range(lo, hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        # Pool slots: widened before scaling by the stride so huge pools cannot overflow int32.
        slots = tl.load(KvIndices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slots[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0)
        k = k.to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Each block holds at least one valid key, so m_new is finite and no exp2(-inf - -inf) arises.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + slots[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)
        v = v.to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # An empty split (or an empty request) has l_i == 0: output 0 with weight exp2(-inf) = 0.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        out_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=hd_mask)
    else:
        mid_ptrs = MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
        tl.store(mid_ptrs, o, mask=h_mask[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    MidO,  # [B, Hq, num_splits, BLOCK_D] float32
    MidLse,  # [B, Hq, num_splits] float32
    Out,  # [B, Hq, D]
    num_splits,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    # All splits empty (a request with no keys): every weight is 0 and the output is 0.
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_S]
    parts = tl.load(
        MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    denom = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * parts, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=d_mask)


def choose_num_splits(max_kv_len: int, batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per request: enough programs for about two waves over the device, none shorter than
    MIN_TOKENS_PER_SPLIT tokens, at most MAX_SPLITS."""
    if max_kv_len <= MIN_TOKENS_PER_SPLIT:
        return 1
    wanted = math.ceil(2 * device_parallelism(device) / max(1, batch * num_kv_heads))
    by_length = math.ceil(max_kv_len / MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def _block_n(block_d: int, device: torch.device) -> int:
    if device.type != "cuda":
        # Interpreter: small blocks so short test sequences still cross block boundaries.
        return 16
    return 64 if block_d <= 128 else 32


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_kv_len: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged KV.

    Args:
      q: ``[B, Hq, D]`` float32/float16/bfloat16.
      k_buffer, v_buffer: ``[S, Hkv, D]`` pool buffers (``Hq % Hkv == 0``); cast to q's dtype on load.
      kv_indptr: int32/int64 ``[B + 1]``; request b's keys are
        ``k_buffer[kv_indices[kv_indptr[b] : kv_indptr[b + 1]]]``.
      kv_indices: int32/int64 ``[N]`` pool slots.
      sm_scale: softmax scale (usually ``D ** -0.5``).
      out: optional ``[B, Hq, D]`` tensor of q's dtype to write into.
      num_splits: KV splits per request; chosen from the lengths when None.
      max_kv_len: the longest request's key count, to choose ``num_splits`` without a device sync.

    Returns ``o [B, Hq, D]`` in q's dtype. A request with no keys gets zeros.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    device = q.device
    check_tensor("k_buffer", k_buffer, 3, FLOAT_DTYPES, device)
    check_tensor("v_buffer", v_buffer, 3, FLOAT_DTYPES, device)
    batch, num_q_heads, head_dim = q.shape
    if k_buffer.shape[2] != head_dim:
        raise ValueError(f"k_buffer head dim {k_buffer.shape[2]} != q head dim {head_dim}")
    if v_buffer.shape != k_buffer.shape:
        raise ValueError(f"v_buffer shape {tuple(v_buffer.shape)} != k_buffer shape {tuple(k_buffer.shape)}")
    num_kv_heads = k_buffer.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of k_buffer heads ({num_kv_heads})")
    check_indptr("kv_indptr", kv_indptr, batch, device)
    check_tensor("kv_indices", kv_indices, 1, INDEX_DTYPES, device)
    check_sm_scale(sm_scale)
    out = output_like(q, out, device)
    block_d = head_block(head_dim)
    check_runnable(_decode_split_kernel, device)
    if batch == 0:
        return out

    if num_splits is None:
        if max_kv_len is None:
            max_kv_len = int((kv_indptr[1:] - kv_indptr[:-1]).max())  # syncs; callers should pass it
        num_splits = choose_num_splits(max_kv_len, batch, num_kv_heads, device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")

    q = last_dim_contiguous(q)
    k_buffer = last_dim_contiguous(k_buffer)
    v_buffer = last_dim_contiguous(v_buffer)
    kv_indices = kv_indices.contiguous()
    kv_indptr = kv_indptr.contiguous()
    group = num_q_heads // num_kv_heads
    single = num_splits == 1
    if single:
        mid_o = mid_lse = out  # unused placeholders
        mo_strides, ml_strides = (0, 0, 0), (0, 0)
    else:
        mid_o = torch.empty((batch, num_q_heads, num_splits, block_d), dtype=torch.float32, device=device)
        mid_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
        mo_strides, ml_strides = mid_o.stride()[:3], mid_lse.stride()[:2]

    on_cuda = device.type == "cuda"
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_buffer,
        v_buffer,
        kv_indptr,
        kv_indices,
        out,
        mid_o,
        mid_lse,
        float(sm_scale) * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out.stride(0),
        out.stride(1),
        *mo_strides,
        *ml_strides,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, next_pow2(group)),
        BLOCK_N=_block_n(block_d, device),
        SINGLE_SPLIT=single,
        UPCAST=dot_upcast(q.dtype, device),
        num_warps=4,
        num_stages=2 if on_cuda else 1,
    )
    if not single:
        _decode_merge_kernel[(batch, num_q_heads)](
            mid_o,
            mid_lse,
            out,
            num_splits,
            *mo_strides,
            *ml_strides,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=next_pow2(num_splits),
            num_warps=4 if block_d >= 128 else 2,
        )
    return out
