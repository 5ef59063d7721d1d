"""Attention backends: ``torch`` (CPU default, reference) and ``triton`` (CUDA default)."""

from __future__ import annotations

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


def create_attention_backend(name: str, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool,
                             paged_decode: bool = True, paged_extend: bool = True,
                             num_heads: int | None = None) -> AttentionBackend:
    """``paged_decode`` / ``paged_extend``: the torch backend's CPU decodes / extends through the native
    kernels (torch only); ``num_heads``: query heads per layer (this rank's), which the extend kernel's
    choice depends on (None: it is not used)."""
    if name == "torch":
        from radixlm.runtime.attention.torch_backend import TorchAttnBackend, TorchAttnConfig

        return TorchAttnBackend(kv_pool, req_to_token_pool,
                                TorchAttnConfig(paged_decode=paged_decode, paged_extend=paged_extend), num_heads)
    if name == "triton":
        from radixlm.runtime.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend(kv_pool, req_to_token_pool)
    raise ValueError(f"attention_backend must be 'torch' or 'triton', got {name!r}")


__all__ = ["AttentionBackend", "create_attention_backend"]
