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
DTYPES = [torch.float32, torch.bfloat16]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within rounding of the storage type: float32 a few ulps; bfloat16 two rounding steps (2^-7: a sum
    of squares in another order can move a normalised value by one step, and the gain's product then
    rounds again), on under 1% of the elements, the rest bit-identical."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a.float()).all()
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-5)
        assert (a != b).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", ROWS)
def test_rms_norm_matches_eager(T, dtype):
    g = torch.Generator().manual_seed(T)
    x = (torch.randn(T, 512, generator=g) * 3).to(dtype)
    w = torch.randn(512, generator=g).to(dtype)
    _close(NATIVE.rms_norm(x, w, 1e-6), decoder_ops.rms_norm(x, w, 1e-6))
    wide = torch.randn(T, 1024, generator=g).to(dtype)[:, 256:768]  # a row stride other than the width
    _close(NATIVE.rms_norm(wide, w, 1e-5), decoder_ops.rms_norm(wide, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", ROWS)
def test_rope_is_bit_identical_to_eager_on_views_of_qkv(T, dtype):
    g = torch.Generator().manual_seed(T)
    Hq, Hkv, D = 8, 4, 64
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=g)[None, :]
    cos, sin = freqs.cos()[:, None, :].to(dtype), freqs.sin()[:, None, :].to(dtype)  # [T, 1, D/2]
    for x in (q.view(T, Hq, D), k.view(T, Hkv, D)):
        out = NATIVE.rope(x, cos, sin)
        assert out.is_contiguous() and torch.equal(out, apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", ROWS)
def test_silu_mul_matches_eager_over_the_whole_range(T, dtype):
    g = torch.Generator().manual_seed(T)
    gate_up = torch.randn(T, 2 * 1408, generator=g) * 4
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 20.0, -20.0])  # saturation, zero
    gate_up = gate_up.to(dtype)
    _close(NATIVE.silu_mul(gate_up), decoder_ops.silu_mul(gate_up))


def test_what_the_loops_do_not_cover_falls_back_to_eager():
    x = torch.randn(5, 64, dtype=torch.float16)
    w = torch.randn(64, dtype=torch.float16)
    assert torch.equal(NATIVE.rms_norm(x, w, 1e-6), decoder_ops.rms_norm(x, w, 1e-6))
    gu = torch.randn(5, 128, dtype=torch.float16)
    assert torch.equal(NATIVE.silu_mul(gu), decoder_ops.silu_mul(gu))
    xb, w32 = torch.randn(5, 64, dtype=torch.bfloat16), w.float()  # mixed storage types
    assert torch.equal(NATIVE.rms_norm(xb, w32, 1e-6), decoder_ops.rms_norm(xb, w32, 1e-6))
    xt = torch.randn(64, 5).t()  # xt's rows are not contiguous
    assert torch.equal(NATIVE.rms_norm(xt, w32, 1e-6), decoder_ops.rms_norm(xt, w32, 1e-6))


def test_engine_installs_them_in_bfloat16_and_decodes_as_the_eager_ops_do(tiny_llama):
    from radixlm.runtime.engine import Engine

    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    sp = {"temperature": 0.0, "max_new_tokens": 8}
    outs = {}
    for name, flags in (("native", {}), ("eager", {"disable_cpu_decoder_ops": True})):
        with Engine(model_path=tiny_llama, dtype="bfloat16", device="cpu", max_total_tokens=2048, **flags) as eng:
            ops = eng.scheduler.runner.model.model.norm.ops
            assert (ops is NATIVE) == (name == "native")
            outs[name] = [o["output_ids"] for o in eng.generate(prompts, sp)]
            eng.check_memory()
    assert [o[0] for o in outs["native"]] == [o[0] for o in outs["eager"]]
    same = sum(a == b for x, y in zip(outs["native"], outs["eager"]) for a, b in zip(x, y))
    assert same >= 0.75 * sum(map(len, outs["eager"]))
