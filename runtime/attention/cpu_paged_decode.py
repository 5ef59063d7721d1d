"""The CPU's paged decode attention: a small native kernel that reads the KV pool in place.

The torch backend's other paths gather each request's padded context out of the pool (``index_select``,
a copy per layer and step) and attend on the copy; on a 2-core machine that copy and the second read
were 60% of a 64-request decode step. ``cpu_paged_decode.cpp`` instead walks each request's row of
``req_to_token`` and reads every key and value once, where it lies, with an online softmax over blocks
of keys; one call covers every decoding request of a step whatever their context lengths (no buckets,
no padding). ``python -m benchmarks.bench_cpu_paged_decode`` (the llama ``small`` shapes, 64 requests of
64-576 tokens, 43 MB of K/V per layer, 2 threads, float32): 1.6 ms per layer with each request's slots
contiguous (27 GB/s, near the 32 GB/s this machine reads with 2 threads), 2.6-2.9 ms scattered over the
pool, against 35-39 ms for a plain gather + SDPA (docs/benchmarks.md, the levers table).

No maintained library ships such a kernel for the CPU build of torch pinned here (IPEX supports older
torch releases only; sgl-kernel's CPU kernels are not on the index), so radixlm builds its own on first
use (``cpu_kernels.py``: the system C++ compiler, a cache keyed by source, flags and CPU). Without a
compiler ``load()`` returns None and the backend keeps the gather path (logged once).

The arithmetic is float32 whatever the storage (float32 or bfloat16), in a different summation order
than SDPA's, so results agree with the other paths to rounding (tests compare them, and tokens and
logprobs with transformers).
"""

from __future__ import annotations

import ctypes

import torch

from radixlm.runtime.attention import cpu_kernels

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_ARGTYPES = [_P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _I, _I, _I, _F]


class PagedDecodeKernel:
    """The loaded library: ``__call__`` runs decode attention for one layer of one step."""

    def __init__(self, lib: ctypes.CDLL):
        self._fns = {torch.float32: lib.radixlm_paged_decode_f32, torch.bfloat16: lib.radixlm_paged_decode_bf16}
        for fn in self._fns.values():
            fn.argtypes, fn.restype = _ARGTYPES, None

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether the kernel covers this storage type (float32, bfloat16; else the caller keeps the gather path)."""
        return dtype in self._fns

    def __call__(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
                 rows: torch.Tensor, seq_lens: torch.Tensor, scale: float, begin: int = 0,
                 return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, D] (one query per request); k_buf/v_buf [slots, Hkv, D] (the layer's pool, same dtype);
        req_to_token [R, stride] int64; rows [B] int64 (each request's row); seq_lens [B] int64: keys
        begin..seq_len-1 of the row, the new token's included (``begin`` > 0: only the suffix after a
        prefix the caller attends to itself, as the cascade does) → o [B, Hq, D] in q's dtype, and with
        ``return_lse`` also lse [B, Hq] float32 (log-sum-exp of the scaled scores; -inf where no keys)."""
        B, Hq, D = q.shape
        Hkv = k_buf.shape[1]
        if Hq % Hkv or k_buf.shape[2] != D or rows.shape != (B,) or seq_lens.shape != (B,):
            raise ValueError(f"paged decode kernel: q {tuple(q.shape)}, k_buf {tuple(k_buf.shape)}, rows "
                             f"{tuple(rows.shape)}, seq_lens {tuple(seq_lens.shape)} do not fit together")
        q = q.contiguous()
        for t in (k_buf, v_buf, req_to_token, rows, seq_lens):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("paged decode kernel: every tensor must be a contiguous CPU tensor")
        if k_buf.dtype != q.dtype or v_buf.dtype != q.dtype or rows.dtype != torch.int64 or seq_lens.dtype != torch.int64:
            raise ValueError("paged decode kernel: q, k_buf and v_buf share one dtype; rows and seq_lens are int64")
        if begin < 0:
            raise ValueError(f"paged decode kernel: begin must be >= 0, got {begin}")
        out = torch.empty_like(q)
        lse = torch.empty((B, Hq), dtype=torch.float32) if return_lse else None
        self._fns[q.dtype](q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), req_to_token.data_ptr(),
                           req_to_token.stride(0), rows.data_ptr(), seq_lens.data_ptr(), begin, out.data_ptr(),
                           None if lse is None else lse.data_ptr(), B, Hq, Hkv, D, scale)
        return (out, lse) if return_lse else out


def load() -> PagedDecodeKernel | None:
    """The kernel, built on first use (cached on disk) and loaded once per process; None if it cannot be."""
    if "kernel" not in _loaded:
        lib = cpu_kernels.load_library("cpu_paged_decode", "decode attention gathers the context")
        _loaded["kernel"] = None if lib is None else PagedDecodeKernel(lib)
    return _loaded["kernel"]


_loaded: dict[str, PagedDecodeKernel | None] = {}
