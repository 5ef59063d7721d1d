"""The decoder's elementwise pieces (RMSNorm, rotary embedding, SiLU-and-multiply), eager or fused.

Eager, each is several passes over a [tokens, hidden] tensor (a cast, the statistics, the scale, the
gain; the rotate-half cat; the SiLU, the product). On the CPU the model runs them as one native loop
each instead (``cpu_decoder_ops.py``; float32 and bfloat16, falling back to these functions otherwise). With
``--enable-torch-compile`` the model uses the same functions compiled by inductor (dynamic shapes),
which fuses each into one loop, for calls of ``COMPILED_FROM_ROWS`` rows or more (below, the compiled
call's fixed cost is larger than the passes, and the native or eager ops run). The arithmetic is
the same float32 math, so outputs stay within rounding of the eager path (tests compare tokens and
logprobs with transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from radixlm.runtime.models.rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 statistics, cast back before the gain: the same rounding as transformers' LlamaRMSNorm."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate ++ up) → silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class DecoderOps:
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


EAGER = DecoderOps(rms_norm, silu_mul, apply_rope)


# Below this many rows (tokens) a compiled call's fixed cost, dynamo's guard check and the compiled
# region's wrapper, exceeds what fusion saves, so decode batches run the eager functions. Measured on
# the llama ``small`` shapes, one layer's five calls, 2 threads, median of 200 (2026-12-04):
#     rows       16     64    128    256   1024
#     eager      86    173    319    373-622   2.6-7.5k   us
#     compiled  171    274-363 455   430-493   1.9-2.9k   us
COMPILED_FROM_ROWS = 256


def _by_rows(eager: Callable, compiled: Callable, from_rows: int) -> Callable:
    def op(x: torch.Tensor, *args):
        return (compiled if x.shape[0] >= from_rows else eager)(x, *args)

    return op


def compiled_ops(from_rows: int = COMPILED_FROM_ROWS, small: DecoderOps = EAGER) -> DecoderOps:
    """The same three functions through torch.compile for calls of at least ``from_rows`` rows (prefill
    chunks), ``small`` below (decode batches: the eager functions, or the native CPU loops of
    ``cpu_decoder_ops.py``)."""
    c = lambda f, f_small: _by_rows(f_small, torch.compile(f, dynamic=True, fullgraph=True), from_rows)  # noqa: E731
    return DecoderOps(c(rms_norm, small.rms_norm), c(silu_mul, small.silu_mul), c(apply_rope, small.rope))


def install(model: torch.nn.Module, ops: DecoderOps) -> None:
    """Make every module of ``model`` that has elementwise ops use ``ops``."""
    for m in model.modules():
        if isinstance(getattr(m, "ops", None), DecoderOps):
            m.ops = ops


def warm_up(ops: DecoderOps, model: torch.nn.Module, config, num_heads: int, num_kv_heads: int,
            dtype: torch.dtype, device) -> None:
    """Call each op as the model does (the model's own norm gain, q/k as views of the fused qkv output,
    distinct cos/sin, one row and several), so every graph the model needs is compiled now rather than
    during the first requests (dynamo guards on all of these)."""
    H, I = config.hidden_size, config.intermediate_size
    D = getattr(config, "head_dim", None) or H // config.num_attention_heads
    norm = next(m for m in model.modules() if isinstance(getattr(m, "ops", None), DecoderOps) and hasattr(m, "eps"))
    # Sizes 0 and 1 are the only ones dynamo specialises; both run eager unless every call is compiled.
    for T in (COMPILED_FROM_ROWS + 1, 1):
        ops.rms_norm(torch.ones((T, H), dtype=dtype, device=device), norm.weight, norm.eps)
        ops.silu_mul(torch.ones((T, 2 * I), dtype=dtype, device=device))
        cos = torch.ones((T, 1, D // 2), dtype=dtype, device=device)
        sin = torch.zeros((T, 1, D // 2), dtype=dtype, device=device)
        qkv = torch.ones((T, (num_heads + 2 * num_kv_heads) * D), dtype=dtype, device=device)
        q, k, _ = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
        ops.rope(q.view(T, num_heads, D), cos, sin)
        ops.rope(k.view(T, num_kv_heads, D), cos, sin)
