"""Attention backends: ``torch`` (CPU default, reference) and ``triton`` (CUDA default)."""

from __future__ import annotations

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


def create_attention_backend(name: str, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool,
                             paged_decode: bool = True) -> AttentionBackend:
    """``paged_decode``: the torch backend's CPU decodes through the native paged kernel (torch only)."""
    if name == "torch":
        from radixlm.runtime.attention.torch_backend import TorchAttnBackend, TorchAttnConfig

        return TorchAttnBackend(kv_pool, req_to_token_pool, TorchAttnConfig(paged_decode=paged_decode))
    if name == "triton":
        from radixlm.runtime.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend(kv_pool, req_to_token_pool)
    raise ValueError(f"attention_backend must be 'torch' or 'triton', got {name!r}")


__all__ = ["AttentionBackend", "create_attention_backend"]
