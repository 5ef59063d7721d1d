"""The CPU's paged causal extend attention: prefill and other extends read the KV pool in place.

torch's fused CPU flash kernel ran the prefill's causal attention at about 45 GFLOP/s on this project's
2-core machine (17% of a prefill-only run for 5-6% of its arithmetic), after the backend had gathered
and padded each group's context. ``cpu_paged_extend.cpp`` takes every extending request of a step in one
call, reads each request's K/V rows once through its ``req_to_token`` row into a packed, transposed
copy, and computes blocks of 16 query rows (positions x the query heads of one KV head) against blocks
of 16 keys with AVX-512 FMAs and an online softmax. ``python -m benchmarks.bench_cpu_paged_extend``
(the llama ``small`` shapes: 8 query heads, 4 KV heads, head size 64; 2 threads, float32): a 2k-token
prefill step of 7 prompts of 64-512 tokens 7.5-11 ms per layer against 13-14 ms for per-request SDPA;
single prompts of 64 / 288 / 512 / 1,024 / 2,048 tokens 2.1 / 1.75 / 1.47 / 1.09 / 1.05x faster. Through
the Scheduler, prefill-only of the no-sharing workload took 5.40-5.49 s against 5.87-5.95 s.

Behind a prefix that several requests share, the backend's cascade attends the prefix once (torch's
flash kernel) and calls this kernel with ``begin`` = the prefix length and an ``lse`` buffer: it then
reads only each request's own suffix and returns each row's log-sum-exp for the merge (before, the
suffixes were gathered, padded and masked; chat's extend attention went from 0.69-0.73 to 0.45-0.49 s).

It needs AVX-512 (checked here, from the CPU flags), a head size of 64 or 128 and a query-head group
(Hq / Hkv) that divides 16; otherwise ``supports`` is False and the backend keeps its torch paths.
Arithmetic is float32 whatever the storage (float32 or bfloat16), in another summation order than
SDPA's, so results agree with the other paths to rounding (tests compare them with a float64
reference, and tokens and logprobs with transformers).
"""

from __future__ import annotations

import ctypes

import torch

from radixlm.runtime.attention import cpu_kernels

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_ARGTYPES = [_P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _F]
_ROWS = 16  # query rows per task in the kernel (R): the query-head group must divide it


class PagedExtendKernel:
    """The loaded library: ``__call__`` runs causal extend attention for one layer of one step."""

    def __init__(self, lib: ctypes.CDLL):
        self._fns = {torch.float32: lib.radixlm_causal_extend_f32, torch.bfloat16: lib.radixlm_causal_extend_bf16}
        for fn in self._fns.values():
            fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int

    def supports(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether the kernel covers this storage type and these shapes (else the caller keeps torch's path)."""
        return (dtype in self._fns and head_dim in (64, 128) and num_heads % num_kv_heads == 0
                and _ROWS % (num_heads // num_kv_heads) == 0)

    def __call__(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
                 rows: torch.Tensor, q_start: torch.Tensor, prefix: torch.Tensor, n_new: torch.Tensor,
                 scale: float, out: torch.Tensor, begin: int = 0, lse: torch.Tensor | None = None) -> None:
        """q [T, Hq, D] (the step's queries); k_buf/v_buf [slots, Hkv, D] (the layer's pool, same dtype, the
        new tokens' K/V already written); req_to_token [R, stride] int64; per extending request, int64 [B]:
        ``rows`` (its row), ``q_start`` (its first token in q), ``prefix`` (cached slots before its new
        tokens), ``n_new``. New token i sees its row's slots begin .. prefix + i (``begin`` <= every
        prefix: > 0 leaves out a shared prefix that a cascade attends on its own). Writes those requests'
        rows of ``out`` [T, Hq, D] (q's dtype, contiguous) and, if given, of ``lse`` [T, Hq] float32 (the
        log-sum-exp of each row's scaled scores, to merge with the other part), and leaves the rest alone."""
        T, Hq, D = q.shape
        Hkv = k_buf.shape[1]
        B = rows.shape[0]
        if not self.supports(q.dtype, Hq, Hkv, D) or k_buf.shape[2] != D or out.shape != q.shape:
            raise ValueError(f"paged extend kernel: q {tuple(q.shape)}, k_buf {tuple(k_buf.shape)}, out "
                             f"{tuple(out.shape)} ({q.dtype}) are not shapes it covers")
        if any(t.shape != (B,) or t.dtype != torch.int64 for t in (q_start, prefix, n_new)) or rows.dtype != torch.int64:
            raise ValueError("paged extend kernel: rows, q_start, prefix and n_new are int64 [B] each")
        q = q.contiguous()
        for t in (k_buf, v_buf, req_to_token, rows, q_start, prefix, n_new, out):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("paged extend kernel: every tensor must be a contiguous CPU tensor")
        if k_buf.dtype != q.dtype or v_buf.dtype != q.dtype or out.dtype != q.dtype:
            raise ValueError("paged extend kernel: q, k_buf, v_buf and out share one dtype")
        if lse is not None and (lse.shape != (T, Hq) or lse.dtype != torch.float32 or not lse.is_contiguous()):
            raise ValueError(f"paged extend kernel: lse must be contiguous float32 [{T}, {Hq}]")
        rc = self._fns[q.dtype](q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), req_to_token.data_ptr(),
                                req_to_token.stride(0), rows.data_ptr(), q_start.data_ptr(), prefix.data_ptr(),
                                n_new.data_ptr(), begin, out.data_ptr(), None if lse is None else lse.data_ptr(),
                                B, Hq, Hkv, D, scale)
        if rc != 0:
            raise ValueError(f"paged extend kernel refused Hq={Hq}, Hkv={Hkv}, D={D}, begin={begin} "
                             "(begin must be within every request's prefix)")


def load() -> PagedExtendKernel | None:
    """The kernel, built on first use (cached on disk) and loaded once per process; None if this CPU lacks
    AVX-512 or it cannot be built."""
    if "kernel" not in _loaded:
        lib = None
        if "avx512f" in cpu_kernels.cpu_flags():
            lib = cpu_kernels.load_library("cpu_paged_extend", "extends keep torch's attention")
        _loaded["kernel"] = None if lib is None else PagedExtendKernel(lib)
    return _loaded["kernel"]


_loaded: dict[str, PagedExtendKernel | None] = {}
