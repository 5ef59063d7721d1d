"""HostTier: the second KV tier, in host memory behind the device pool.

It stores K/V rows for its own slots (``SlotAllocator``: slot 0 is padding) in the layout
``data [L, 2, slots + 1, Hkv, D]`` with the codec's storage dtype, plus ``scale [L, 2, slots + 1, Hkv]``
float32 for a quantized codec. It knows nothing of the radix tree: ``HiRadixCache`` decides which
nodes live here and owns every slot it allocates (one owner, as for the device pool).

Copies: on CUDA the storage is pinned and ``backup`` (device → host) runs on a side stream after an
event recorded on the compute stream, so the copy overlaps the next forward; the gathered rows are
taken on the compute stream first, so device slots freed right after a backup can be reused at once.
Finished copies are applied to the storage on the next tier call (``poll``); ``load`` (host → device)
copies on the side stream and makes the compute stream wait for it. On the CPU both are plain copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.kv_tiers.codec import KVCodec
from radixlm.runtime.kv_tiers.pool_io import gather_kv, scatter_kv
from radixlm.runtime.memory_pool import KVPool, SlotAllocator


@dataclass
class _PendingBackup:
    host_slots: torch.Tensor  # [T] int64 (CPU)
    data: torch.Tensor  # pinned [L, 2, T, Hkv, D]
    scale: torch.Tensor | None  # pinned [L, 2, T, Hkv]
    done: "torch.cuda.Event"


class HostTier(SlotAllocator):
    def __init__(self, pool: KVPool, num_tokens: int, codec: KVCodec):
        super().__init__(num_tokens, "cpu")
        self.pool = pool
        self.codec = codec
        self.cuda = pool.device.type == "cuda"
        hkv, d = pool.k_buffers[0].shape[1:]
        shape = (pool.num_layers, 2, num_tokens + 1, hkv, d)
        # float8 has no CPU index_copy_/index_select: store its bytes (same size) and view them back.
        self._raw = torch.uint8 if codec.storage_dtype == torch.float8_e4m3fn else codec.storage_dtype
        self.data = torch.zeros(shape, dtype=self._raw, pin_memory=self.cuda)
        self.scale = None if codec.lossless else torch.ones(shape[:-1], dtype=torch.float32, pin_memory=self.cuda)
        self._pending: list[_PendingBackup] = []
        self._stream = torch.cuda.Stream(device=pool.device) if self.cuda else None
        self.num_backed_up = 0  # tokens copied device → host
        self.num_loaded = 0  # tokens copied host → device

    @staticmethod
    def tokens_for_bytes(pool: KVPool, codec: KVCodec, num_bytes: int) -> int:
        """How many tokens ``num_bytes`` of host memory hold with ``codec`` (all layers, K and V)."""
        hkv, d = pool.k_buffers[0].shape[1:]
        per_token = pool.num_layers * 2 * hkv * codec.bytes_per_row(d)
        return max(num_bytes // per_token, 0)

    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    # ------------------------------------------------------------------ copies
    def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Copy the K/V of ``device_slots`` into ``host_slots`` (both [T] int64)."""
        self.poll()
        rows = gather_kv(self.pool, device_slots)  # [L, 2, T, Hkv, D] on the device, compute stream
        data, scale = self.codec.encode(rows)  # compressed on the device: fewer bytes to copy
        self.num_backed_up += int(host_slots.numel())
        if not self.cuda:
            self._store(host_slots, data, scale)
            return
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            data_h = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            data_h.copy_(data, non_blocking=True)
            scale_h = None
            if scale is not None:
                scale_h = torch.empty(scale.shape, dtype=scale.dtype, pin_memory=True)
                scale_h.copy_(scale, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        data.record_stream(self._stream)  # keep the device buffers alive until the side stream used them
        if scale is not None:
            scale.record_stream(self._stream)
        self._pending.append(_PendingBackup(host_slots.cpu(), data_h, scale_h, done))

    def load(self, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """Copy the K/V stored at ``host_slots`` into the device pool at ``device_slots``."""
        self.synchronize()  # a load may read rows whose backup is still in flight
        host_slots = host_slots.cpu()
        data = self.data.index_select(2, host_slots).view(self.codec.storage_dtype)
        scale = self.scale.index_select(2, host_slots) if self.scale is not None else None
        self.num_loaded += int(host_slots.numel())
        if self.cuda:
            data = data.pin_memory()
            scale = scale.pin_memory() if scale is not None else None
            with torch.cuda.stream(self._stream):
                data = data.to(self.pool.device, non_blocking=True)
                scale = scale.to(self.pool.device, non_blocking=True) if scale is not None else None
                copied = torch.cuda.Event()
                copied.record(self._stream)
            torch.cuda.current_stream().wait_event(copied)  # the forward reads these rows
            data.record_stream(torch.cuda.current_stream())
        scatter_kv(self.pool, device_slots, self.codec.decode(data, scale))

    def poll(self) -> None:
        """Apply backups whose copies have finished (in order)."""
        while self._pending and self._pending[0].done.query():
            self._apply(self._pending.pop(0))

    def synchronize(self) -> None:
        """Wait for and apply every backup in flight."""
        while self._pending:
            op = self._pending.pop(0)
            op.done.synchronize()
            self._apply(op)

    def in_flight(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ internals
    def _apply(self, op: _PendingBackup) -> None:
        self._store(op.host_slots, op.data, op.scale)

    def _store(self, host_slots: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        host_slots = host_slots.cpu()
        self.data.index_copy_(2, host_slots, data.cpu().view(self._raw))
        if scale is not None:
            self.scale.index_copy_(2, host_slots, scale.cpu())
