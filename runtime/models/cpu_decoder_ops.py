"""The decoder's elementwise ops through native CPU loops (``cpu_decoder_ops.cpp``), as a ``DecoderOps``.

A decode step of 8-64 requests calls RMSNorm, the rotary embedding and SiLU-and-multiply 41 times on
tensors of a few kilobytes; torch's eager versions are several dispatched passes each (RMSNorm: about
15 us at 8-16 rows where one loop takes 5, most of it the ctypes call). ``load()`` builds the library
like the attention kernels (``runtime/attention/cpu_kernels.py``) and returns the three functions; each
falls back to the eager function for what the loops do not cover (neither float32 nor bfloat16, not on
the CPU, a layout other than the model's). Results: the rotary embedding bit-identical to the eager
one, RMSNorm and SiLU within rounding of it, in the storage type
(``tests/runtime/models/test_cpu_decoder_ops.py``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from radixlm.runtime.attention import cpu_kernels
from radixlm.runtime.models import decoder_ops
from radixlm.runtime.models.decoder_ops import DecoderOps
from radixlm.runtime.models.rope import apply_rope

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _NativeOps:
    def __init__(self, lib: ctypes.CDLL):
        self._fns: dict[torch.dtype, tuple] = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            rms, rope, silu = (getattr(lib, f"radixlm_{op}_{suffix}") for op in ("rms_norm", "rope", "silu_mul"))
            rms.argtypes, rms.restype = [_P, _I, _P, _P, _I, _I, _F], None
            rope.argtypes, rope.restype = [_P, _I, _I, _P, _P, _I, _P, _I, _I, _I], None
            silu.argtypes, silu.restype = [_P, _I, _P, _I, _I], None
            self._fns[dtype] = (rms, rope, silu)

    def _covers(self, *ts: torch.Tensor) -> bool:
        """One storage type the loops have (float32 or bfloat16) for every tensor, all on the CPU."""
        return ts[0].dtype in self._fns and all(t.dtype == ts[0].dtype and t.device.type == "cpu" for t in ts)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] → [T, H]."""
        if not (self._covers(x, weight) and x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous()
                and weight.shape == x.shape[1:]):
            return decoder_ops.rms_norm(x, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self._fns[x.dtype][0](x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] (a view of the fused qkv output), cos/sin [T, 1, D/2] → [T, H, D]."""
        T, H, D = x.shape
        if not (self._covers(x, cos, sin) and x.stride(2) == 1 and D % 2 == 0
                and cos.shape == sin.shape == (T, 1, D // 2) and cos.stride(2) == sin.stride(2) == 1
                and cos.stride(0) == sin.stride(0)):
            return apply_rope(x, cos, sin)
        out = torch.empty((T, H, D), dtype=x.dtype)
        self._fns[x.dtype][1](x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                              out.data_ptr(), T, H, D)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate ++ up) → silu(gate) * up [T, I]."""
        if not (self._covers(gate_up) and gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0):
            return decoder_ops.silu_mul(gate_up)
        T, I = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((T, I), dtype=gate_up.dtype)
        self._fns[gate_up.dtype][2](gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), T, I)
        return out


def load() -> DecoderOps | None:
    """The native ops, built on first use (cached on disk) and loaded once per process; None if they cannot be."""
    if "ops" not in _loaded:
        lib = cpu_kernels.load_library("cpu_decoder_ops", "the decoder's elementwise ops stay eager",
                                       folder=Path(__file__).parent)
        native = None if lib is None else _NativeOps(lib)
        _loaded["ops"] = None if native is None else DecoderOps(native.rms_norm, native.silu_mul, native.rope)
    return _loaded["ops"]


_loaded: dict[str, DecoderOps | None] = {}
