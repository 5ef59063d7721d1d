"""KV tiers behind the radix tree: a host tier (compressed on the CPU, pinned on CUDA) and a disk tier.

``create_cache(args, pool)`` builds the radix cache the scheduler uses: the plain ``RadixCache`` unless
``--enable-hierarchical-cache``, else a ``HiRadixCache`` with a ``HostTier`` and, with
``--hicache-storage-dir``, a ``DiskTier``. Modules: ``codec`` (lossless / int8 / fp8 with per-block
scales), ``pool_io`` (moving a pool's K/V rows), ``host_tier``, ``disk_tier``, ``hiradix_cache``.
"""

from __future__ import annotations

import logging
import os

import torch

from radixlm.runtime.kv_tiers.codec import KVCodec
from radixlm.runtime.kv_tiers.disk_tier import DiskTier, model_identity
from radixlm.runtime.kv_tiers.hiradix_cache import HiRadixCache
from radixlm.runtime.kv_tiers.host_tier import HostTier
from radixlm.runtime.memory_pool import KVPool
from radixlm.runtime.radix_cache import RadixCache
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)
_HOST_MEMORY_FRACTION = 0.5  # at most this share of the memory free when the tier is made

__all__ = ["DiskTier", "HiRadixCache", "HostTier", "KVCodec", "create_cache", "resolve_codec"]


def resolve_codec(args: ServerArgs, pool: KVPool) -> KVCodec:
    """``auto``: int8 on the CPU (where host memory is the device's memory), lossless on CUDA."""
    name = args.hicache_compression
    if name == "auto":
        name = "none" if pool.device.type == "cuda" else "int8"
    return KVCodec(name, pool.dtype)


def create_cache(args: ServerArgs, pool: KVPool) -> RadixCache:
    if not args.enable_hierarchical_cache:
        return RadixCache(pool, disable=args.disable_radix_cache)
    codec = resolve_codec(args, pool)
    hkv, dim = pool.k_buffers[0].shape[1:]
    if args.hicache_size > 0:
        host_bytes = int(args.hicache_size * (1 << 30))
    else:  # the ratio is of bytes: a compressed tier holds more tokens than the device in the same bytes
        device_bytes = pool.size * pool.num_layers * 2 * hkv * dim * torch.empty(0, dtype=pool.dtype).element_size()
        host_bytes = int(device_bytes * args.hicache_ratio)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if host_bytes > _HOST_MEMORY_FRACTION * avail:
        # The host tier must not take the machine's memory (on the CPU the auto-sized pool already did
        # its share): clipped, loudly; hicache_host_capacity_tokens in the stats shows what it got.
        clipped = int(_HOST_MEMORY_FRACTION * avail)
        logger.warning("KV host tier: %.2f GB asked, %.2f GB of memory free: using %.2f GB",
                       host_bytes / 2**30, avail / 2**30, clipped / 2**30)
        host_bytes = clipped
    host = HostTier(pool, HostTier.tokens_for_bytes(pool, codec, host_bytes), codec)
    disk = None
    if args.hicache_storage_dir:
        kv_shape = (pool.num_layers, int(hkv), int(dim))
        disk = DiskTier(
            args.hicache_storage_dir,
            model_identity(args.model_path, pool.dtype, kv_shape, codec),
            codec,
            kv_shape,
            args.hicache_storage_block_size,
            int(args.hicache_storage_size_gb * (1 << 30)),
        )
    return HiRadixCache(pool, host, args.hicache_write_policy, disk)
