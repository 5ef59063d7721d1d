"""The torch attention backend: the CPU default and the reference for every other backend.

Batched over requests with padding: per step it builds one gather index ``[B, Lmax]`` into the KV
pool and one boolean mask ``[B, Qmax, Lmax]``; every layer then does one gather and one SDPA call.
No Python loop over requests runs per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


@dataclass
class TorchAttnMetadata:
    kv_idx: torch.Tensor  # [B, Lmax] int64 KV slots (0 = padding)
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True = may attend
    q_b: torch.Tensor  # [T] request index of each new token
    q_i: torch.Tensor  # [T] index of each new token within its request's new tokens
    qmax: int


class TorchAttnBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token_pool.req_to_token

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = fb.input_ids.device
        lmax = max(fb.seq_lens_cpu)
        qmax = max(fb.extend_lens_cpu)
        B = fb.batch_size
        j = torch.arange(lmax, device=device)  # [Lmax]
        kv_idx = self.req_to_token[fb.req_pool_indices, :lmax]  # [B, Lmax]
        kv_idx = torch.where(j[None, :] < fb.seq_lens[:, None], kv_idx, torch.zeros_like(kv_idx))
        i = torch.arange(qmax, device=device)  # [Qmax]
        # Query i of request b sits at absolute position prefix_len[b] + i and sees keys j <= that.
        limit = fb.prefix_lens[:, None] + i[None, :]  # [B, Qmax]
        mask = j[None, None, :] <= limit[:, :, None]  # [B, Qmax, Lmax]
        valid_q = i[None, :] < fb.extend_lens[:, None]  # [B, Qmax]
        # Padded query rows attend to key 0 only, so softmax never sees an all-masked row.
        mask = torch.where(valid_q[:, :, None], mask, j[None, None, :] == 0)
        q_b = torch.repeat_interleave(torch.arange(B, device=device), fb.extend_lens)  # [T]
        starts = torch.cumsum(fb.extend_lens, 0) - fb.extend_lens  # [B]
        q_i = torch.arange(fb.num_tokens, device=device) - starts[q_b]  # [T]
        fb.attn_metadata = TorchAttnMetadata(kv_idx, mask[:, None], q_b, q_i, qmax)

    def forward(self, q, k, v, layer_id, fb, sm_scale):
        self.kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        md: TorchAttnMetadata = fb.attn_metadata
        B = fb.batch_size
        T, Hq, D = q.shape
        k_all = self.kv_pool.k_buffers[layer_id][md.kv_idx]  # [B, Lmax, Hkv, D]
        v_all = self.kv_pool.v_buffers[layer_id][md.kv_idx]
        q_pad = q.new_zeros((B, md.qmax, Hq, D))
        q_pad[md.q_b, md.q_i] = q
        o = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),  # [B, Hq, Qmax, D]
            k_all.transpose(1, 2).to(q.dtype),  # [B, Hkv, Lmax, D]
            v_all.transpose(1, 2).to(q.dtype),
            attn_mask=md.mask,
            scale=sm_scale,
            enable_gqa=k_all.shape[2] != Hq,
        )  # [B, Hq, Qmax, D]
        return o.transpose(1, 2)[md.q_b, md.q_i]  # [T, Hq, D]
