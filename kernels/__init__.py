"""radixlm.kernels: Triton paged-attention kernels.

* ``decode_attention``: one query token per request over its KV in the paged pool (split-KV with a
  log-sum-exp merge).
* ``extend_attention``: new tokens over their request's cached prefix and, causally, each other.

Both take CUDA tensors, or CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1``
set before triton is imported). ``radixlm.kernels.reference`` holds the torch reference.

Writing new K/V into the pool needs no kernel: ``KVPool.set_kv`` is one torch ``index_copy_`` per
buffer, a single scatter launch that moves only the step's new tokens (T x Hkv x D per layer), which is
small next to what attention reads. ``benchmarks/bench_kernels.py`` measures its bandwidth.
"""

from radixlm.kernels.decode_attention import decode_attention
from radixlm.kernels.extend_attention import extend_attention

__all__ = ["decode_attention", "extend_attention"]
