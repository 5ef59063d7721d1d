"""Reading and writing a device pool's K/V rows for a set of slots, in the tiers' layout.

The tiers move K/V as one tensor per transfer, ``[L, 2, T, Hkv, D]`` (layer, K/V, token, head, dim),
so one codec call and one copy cover every layer of a node.
"""

from __future__ import annotations

import torch

from radixlm.runtime.memory_pool import KVPool


def gather_kv(pool: KVPool, slots: torch.Tensor) -> torch.Tensor:
    """The K/V of ``slots`` ([T] int64 on the pool's device) as [L, 2, T, Hkv, D] in the pool dtype."""
    ks = [k.index_select(0, slots) for k in pool.k_buffers]
    vs = [v.index_select(0, slots) for v in pool.v_buffers]
    return torch.stack([torch.stack(ks), torch.stack(vs)], dim=1)


def scatter_kv(pool: KVPool, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write kv [L, 2, T, Hkv, D] into the pool at ``slots`` ([T] int64)."""
    kv = kv.to(device=pool.device, dtype=pool.dtype)
    for layer in range(pool.num_layers):
        pool.k_buffers[layer].index_copy_(0, slots, kv[layer, 0])
        pool.v_buffers[layer].index_copy_(0, slots, kv[layer, 1])
