"""Paged extend (prefill) attention: new tokens over their request's cached prefix and each other.

One program per (request, query head, block of BLOCK_M new tokens). It first streams the request's
cached prefix from the pool through ``prefix_indices`` (every new token sees all of it), then the
request's new K/V straight from the ``k``/``v`` inputs (unmasked below the diagonal block, causally
masked on it), carrying one online softmax (running max, running sum, rescaled accumulator) across
both phases. Blocks past a request's last new token exit at once, so the grid can be sized by the
longest request.

Softmax runs in base 2 (``exp2``; scores pre-scaled by log2(e)).
"""

from __future__ import annotations


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
    dot_upcast,
    head_block,
    last_dim_contiguous,
)

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, m_i, l_i, acc, v):
    """Fold one block of base-2 scores s [M, N] (masked entries -inf) and values v [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no visible key yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    Q,  # [T, Hq, D]
    K,  # [T, Hkv, D] new keys
    V,  # [T, Hkv, D] new values
    KBuf,  # [S, Hkv, D] pool
    VBuf,  # [S, Hkv, D] pool
    QoIndptr,  # [B + 1]
    PrefixIndptr,  # [B + 1]
    PrefixIndices,  # [P]
    Out,  # [T, Hq, D]
    qk_scale,  # sm_scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kbn,
    stride_kbh,
    stride_vbn,
    stride_vbh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)

    q_start = tl.load(QoIndptr + b)
    n_new = tl.load(QoIndptr + b + 1) - q_start
    if m_block * BLOCK_M >= n_new:
        return
    kvh = h // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among this request's new tokens
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_new
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1: the cached prefix, visible to every new token.
    p_start = tl.load(PrefixIndptr + b)
    n_prefix = tl.load(PrefixIndptr + b + 1) - p_start
    for n in range(0, n_prefix, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_prefix
        slots = tl.load(PrefixIndices + p_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        kt_mask = d_mask[:, None] & n_mask[None, :]
        # K loaded transposed, [BLOCK_D, BLOCK_N], so the scores are a plain q @ kT.
        kt = tl.load(KBuf + slots[None, :] * stride_kbn + kvh * stride_kbh + offs_d[:, None], mask=kt_mask, other=0.0)
        s = tl.dot(q, kt.to(q.dtype), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v_ptrs = VBuf + slots[:, None] * stride_vbn + kvh * stride_vbh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v.to(q.dtype))

    # Phase 2a: new tokens before this block's first row: visible to every row, no mask needed
    # (m_block * BLOCK_M < n_new, and BLOCK_N divides BLOCK_M so no block straddles the diagonal).
    diag_lo = m_block * BLOCK_M
    for n in range(0, diag_lo, BLOCK_N):
        cols = (q_start + n + tl.arange(0, BLOCK_N)).to(tl.int64)
        kt = tl.load(K + cols[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None], mask=d_mask[:, None], other=0.0)
        s = tl.dot(q, kt.to(q.dtype), input_precision="ieee") * qk_scale
        v = tl.load(V + cols[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v.to(q.dtype))

    # Phase 2b: the diagonal block(s), causally; keys past this block's last row are never visible.
    diag_hi = tl.minimum(n_new, diag_lo + BLOCK_M)
    for n in range(diag_lo, diag_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_new
        cols = (q_start + offs_n).to(tl.int64)
        kt_mask = d_mask[:, None] & n_mask[None, :]
        kt = tl.load(K + cols[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None], mask=kt_mask, other=0.0)
        s = tl.dot(q, kt.to(q.dtype), input_precision="ieee") * qk_scale
        visible = n_mask[None, :] & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        v_ptrs = V + cols[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v.to(q.dtype))

    # Every real row saw at least its own key, so l_i > 0 there; padded rows are not stored.
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_ptrs = Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _blocks(block_d: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps)."""
    if device.type != "cuda":
        # Interpreter: small blocks so short test sequences still cross block boundaries.
        return 16, 16, 4
    if block_d <= 64:
        return 64, 64, 4
    if block_d <= 128:
        return 64, 64, 8
    return 32, 32, 8


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    prefix_indptr: torch.Tensor,
    prefix_indices: torch.Tensor,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    max_extend_len: int | None = None,
) -> torch.Tensor:
    """Attention of each request's new tokens over its cached prefix (in the pool) and, causally,
    over its new tokens.

    Args:
      q: ``[T, Hq, D]`` float32/float16/bfloat16, requests packed by ``qo_indptr``.
      k, v: ``[T, Hkv, D]`` the new tokens' keys and values (``Hq % Hkv == 0``).
      k_buffer, v_buffer: ``[S, Hkv, D]`` pool buffers holding the prefixes.
      qo_indptr: int32/int64 ``[B + 1]``; request b's new tokens are rows
        ``qo_indptr[b] : qo_indptr[b + 1]``.
      prefix_indptr: int32/int64 ``[B + 1]``; request b's prefix slots are
        ``prefix_indices[prefix_indptr[b] : prefix_indptr[b + 1]]`` (may be empty).
      prefix_indices: int32/int64 ``[P]`` pool slots.
      sm_scale: softmax scale.
      out: optional ``[T, Hq, D]`` tensor of q's dtype to write into.
      max_extend_len: the most new tokens of any request (must not be less), to size the grid without
        a device sync; computed from ``qo_indptr`` (a sync) when None.

    Returns ``o [T, Hq, D]`` in q's dtype. K/V are cast to q's dtype on load.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    device = q.device
    check_tensor("k", k, 3, FLOAT_DTYPES, device)
    check_tensor("v", v, 3, FLOAT_DTYPES, device)
    check_tensor("k_buffer", k_buffer, 3, FLOAT_DTYPES, device)
    check_tensor("v_buffer", v_buffer, 3, FLOAT_DTYPES, device)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must have shape [{num_tokens}, Hkv, {head_dim}] to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of k heads ({num_kv_heads})")
    if k_buffer.shape[1:] != k.shape[1:]:
        raise ValueError(f"k_buffer must have shape [S, {num_kv_heads}, {head_dim}], got {tuple(k_buffer.shape)}")
    if v_buffer.shape != k_buffer.shape:
        raise ValueError(f"v_buffer shape {tuple(v_buffer.shape)} != k_buffer shape {tuple(k_buffer.shape)}")
    batch = check_indptr("qo_indptr", qo_indptr, None, device)
    check_indptr("prefix_indptr", prefix_indptr, batch, device)
    check_tensor("prefix_indices", prefix_indices, 1, INDEX_DTYPES, device)
    check_sm_scale(sm_scale)
    out = output_like(q, out, device)
    block_d = head_block(head_dim)
    check_runnable(_extend_kernel, device)
    if batch == 0 or num_tokens == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int((qo_indptr[1:] - qo_indptr[:-1]).max())  # syncs; callers should pass it
    if not isinstance(max_extend_len, int) or max_extend_len < 0:
        raise ValueError(f"max_extend_len must be a non-negative int, got {max_extend_len!r}")
    if max_extend_len == 0:
        return out

    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    k_buffer, v_buffer = last_dim_contiguous(k_buffer), last_dim_contiguous(v_buffer)
    block_m, block_n, num_warps = _blocks(block_d, device)
    assert block_m % block_n == 0, "phase 2a of the kernel assumes BLOCK_N divides BLOCK_M"
    grid = (batch, num_q_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q,
        k,
        v,
        k_buffer,
        v_buffer,
        qo_indptr.contiguous(),
        prefix_indptr.contiguous(),
        prefix_indices.contiguous(),
        out,
        float(sm_scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=dot_upcast(q.dtype, device),
        num_warps=num_warps,
        num_stages=2 if device.type == "cuda" else 1,
    )
    return out
