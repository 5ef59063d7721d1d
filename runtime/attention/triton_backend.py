"""The Triton attention backend: the CUDA default, calling radixlm.kernels.

Per step, ``init_forward_metadata`` flattens each request's row of ``req_to_token`` into the CSR
form the kernels read (an int32 ``indptr [B + 1]`` plus int32 pool slots), once for all layers:

* DECODE: ``kv_indptr``/``kv_indices`` over every visible token, the new one included (the backend
  stores the new K/V into the pool before attending).
* EXTEND: ``qo_indptr`` over the packed new tokens, and ``prefix_indptr``/``prefix_indices`` over the
  cached prefix only; the new tokens' K/V go to the kernel directly.

Sizes that shape launches (totals, maxima) come from the ForwardBatch's host-side length lists, so
building the metadata never waits on the device.

K/V are written into the pool with ``KVPool.set_kv`` (torch indexing): see radixlm.kernels for why no
store kernel is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.kernels import decode_attention, extend_attention
from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


@dataclass
class TritonDecodeMetadata:
    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [sum(seq_lens)] int32 pool slots
    max_kv_len: int


@dataclass
class TritonExtendMetadata:
    qo_indptr: torch.Tensor  # [B + 1] int32
    prefix_indptr: torch.Tensor  # [B + 1] int32
    prefix_indices: torch.Tensor  # [sum(prefix_lens)] int32 pool slots
    max_extend_len: int


def _indptr(lens: torch.Tensor) -> torch.Tensor:
    """[B] lengths -> [B + 1] int32 exclusive prefix sums."""
    out = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=lens.device)
    out[1:] = torch.cumsum(lens, 0)
    return out


def _flatten_rows(
    req_to_token: torch.Tensor,  # [R, C]
    rows: torch.Tensor,  # [B] rows of req_to_token
    lens: torch.Tensor,  # [B] tokens to take from the start of each row
    indptr: torch.Tensor,  # [B + 1] exclusive prefix sums of lens
    total: int,  # sum(lens), known on the host
) -> torch.Tensor:
    """Concatenate ``req_to_token[rows[b], :lens[b]]`` over b -> [total] int32, without a host sync."""
    device = req_to_token.device
    b = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), lens, output_size=total)  # [total]
    col = torch.arange(total, device=device) - indptr[:-1].to(torch.int64)[b]  # [total]
    return req_to_token[rows[b], col].to(torch.int32)


class TritonAttnBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token_pool.req_to_token

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.mode == ForwardMode.DECODE:
            kv_indptr = _indptr(fb.seq_lens)
            kv_indices = _flatten_rows(
                self.req_to_token, fb.req_pool_indices, fb.seq_lens, kv_indptr, sum(fb.seq_lens_cpu)
            )
            fb.attn_metadata = TritonDecodeMetadata(kv_indptr, kv_indices, max(fb.seq_lens_cpu, default=0))
        else:
            qo_indptr = _indptr(fb.extend_lens)
            prefix_indptr = _indptr(fb.prefix_lens)
            prefix_indices = _flatten_rows(
                self.req_to_token, fb.req_pool_indices, fb.prefix_lens, prefix_indptr, sum(fb.prefix_lens_cpu)
            )
            fb.attn_metadata = TritonExtendMetadata(
                qo_indptr, prefix_indptr, prefix_indices, max(fb.extend_lens_cpu, default=0)
            )

    def forward(self, q, k, v, layer_id, fb, sm_scale):
        self.kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        k_buffer = self.kv_pool.k_buffers[layer_id]
        v_buffer = self.kv_pool.v_buffers[layer_id]
        md = fb.attn_metadata
        if fb.mode == ForwardMode.DECODE:
            assert isinstance(md, TritonDecodeMetadata), "init_forward_metadata was not called for this batch"
            return decode_attention(
                q, k_buffer, v_buffer, md.kv_indptr, md.kv_indices, sm_scale, max_kv_len=md.max_kv_len
            )
        assert isinstance(md, TritonExtendMetadata), "init_forward_metadata was not called for this batch"
        # Attend to the new K/V as the pool stores them, so a pool dtype narrower than the model's
        # rounds prefix and new tokens alike (the torch backend reads both back from the pool).
        if k.dtype != k_buffer.dtype:
            k, v = k.to(k_buffer.dtype), v.to(v_buffer.dtype)
        return extend_attention(
            q,
            k,
            v,
            k_buffer,
            v_buffer,
            md.qo_indptr,
            md.prefix_indptr,
            md.prefix_indices,
            sm_scale,
            max_extend_len=md.max_extend_len,
        )
