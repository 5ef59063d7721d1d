"""The native decoder ops (cpu_decoder_ops.cpp) against the eager functions they replace on the CPU."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.models import cpu_decoder_ops, decoder_ops
from radixlm.runtime.models.rope import apply_rope

NATIVE = cpu_decoder_ops.load()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="no C++ compiler to build the native ops")

# 1 and 7 rows: decode batches on the calling thread; 300 x 512 and more: the OpenMP path.
ROWS = [1, 7, 64, 300]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-6) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("T", ROWS)
def test_rms_norm_matches_eager(T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 512, generator=g) * 3
    w = torch.randn(512, generator=g)
    _close(NATIVE.rms_norm(x, w, 1e-6), decoder_ops.rms_norm(x, w, 1e-6))
    wide = torch.randn(T, 1024, generator=g)[:, 256:768]  # a row stride other than the width
    _close(NATIVE.rms_norm(wide, w, 1e-5), decoder_ops.rms_norm(wide, w, 1e-5))


@pytest.mark.parametrize("T", ROWS)
def test_rope_is_bit_identical_to_eager_on_views_of_qkv(T):
    g = torch.Generator().manual_seed(T)
    Hq, Hkv, D = 8, 4, 64
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g)
    q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g)[None, :]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]  # [T, 1, D/2]
    for x in (q.view(T, Hq, D), k.view(T, Hkv, D)):
        out = NATIVE.rope(x, cos, sin)
        assert out.is_contiguous() and torch.equal(out, apply_rope(x, cos, sin))


@pytest.mark.parametrize("T", ROWS)
def test_silu_mul_matches_eager_over_the_whole_range(T):
    g = torch.Generator().manual_seed(T)
    gate_up = torch.randn(T, 2 * 1408, generator=g) * 4
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 20.0, -20.0])  # saturation, zero
    _close(NATIVE.silu_mul(gate_up), decoder_ops.silu_mul(gate_up))


def test_what_the_loops_do_not_cover_falls_back_to_eager():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(NATIVE.rms_norm(x, w, 1e-6), decoder_ops.rms_norm(x, w, 1e-6))
    gu = torch.randn(5, 128, dtype=torch.bfloat16)
    assert torch.equal(NATIVE.silu_mul(gu), decoder_ops.silu_mul(gu))
    xt, w32 = torch.randn(64, 5).t(), w.float()  # xt's rows are not contiguous
    assert torch.equal(NATIVE.rms_norm(xt, w32, 1e-6), decoder_ops.rms_norm(xt, w32, 1e-6))
