"""KV memory: request slots → token positions → KV slots, and the per-layer K/V buffers.

Two pools, as in SGLang:
  * ReqToTokenPool: ``req_to_token[r, p]`` is the KV slot holding position p of the request in row r.
  * KVPool: per-layer K and V buffers ``[num_slots + 1, Hkv, D]`` and a token-granular free-slot
    allocator. Slot 0 is a padding slot that is never handed out, so padded gathers can point at it.

Ownership: a KV slot is owned either by the free list, by exactly one running request (not yet in the
radix tree), or by the radix tree (evictable or protected). ``free`` is called by that single owner.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str):
        self.size = max_requests
        self.max_context_len = max_context_len
        # [max_requests, max_context_len] int64; 0 = the padding KV slot.
        self.req_to_token = torch.zeros((max_requests, max_context_len), dtype=torch.int64, device=device)
        self._free_rows: list[int] = list(range(max_requests))

    def available(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.req_to_token[row, start : start + slots.numel()] = slots

    def clear(self) -> None:
        self._free_rows = list(range(self.size))


class SlotAllocator:
    """A token-granular free list over slots ``1..size`` (slot 0 is padding, never handed out).

    The one allocator of KV slots: the device pool and every KV tier (``radixlm.runtime.kv_tiers``)
    hand out their slots with it. ``free`` is called by the slot's single owner.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        self.size = size
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def available(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots (int64 [n]) or None if fewer are free. The caller owns them."""
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Give slots back. They go to the front, so the next ``alloc`` reuses them before any slot
        never handed out: the working set stays as compact as the load allows (its pages resident and
        warm in cache), and untouched slots cost no memory until the load needs them."""
        if slots.numel():
            self._free = torch.cat((slots.to(device=self.device, dtype=torch.int64), self._free))

    def defragment(self) -> None:
        """Put the free list in slot order, so the next allocations are contiguous runs from the lowest
        slots. Slots freed one request at a time come back interleaved (decode steps allocate one slot
        per request, side by side), and handing them out again as they came scatters each new prompt's
        K/V over the pool: decode attention then reads rows instead of runs. A few milliseconds for a
        quarter-million slots, so it is for moments like a cache flush, not every step."""
        self._free = torch.sort(self._free).values


class KVPool(SlotAllocator):
    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(num_slots, device)
        self.num_layers = num_layers
        self.dtype = dtype
        shape = (num_slots + 1, num_kv_heads, head_dim)  # +1: slot 0 is padding
        self.k_buffers = [self._alloc(shape, dtype, device) for _ in range(num_layers)]
        self.v_buffers = [self._alloc(shape, dtype, device) for _ in range(num_layers)]

    @staticmethod
    def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """One layer's buffer. A slot is always written before any attention reads it, except slot 0,
        the padding that gathers read (it must hold finite values, or 0 x NaN poisons a masked row), so
        on the CPU the rest is left uninitialised: the OS then commits pages as slots are first used,
        and the auto-sized pool (4 GB for llama ``small``) costs neither 1.7 s of zero-filling at start
        nor its whole size in resident memory."""
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        buf = torch.empty(shape, dtype=dtype, device=device)
        buf[0].zero_()
        return buf

    # ----------------------------------------------------------------- data
    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """loc [T] int64, k/v [T, Hkv, D]."""
        self.k_buffers[layer_id].index_copy_(0, loc, k.to(self.dtype))
        self.v_buffers[layer_id].index_copy_(0, loc, v.to(self.dtype))
