"""The compiled elementwise ops: the same math as the eager ones, and only for calls with enough rows."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.models import decoder_ops
from radixlm.runtime.models.decoder_ops import EAGER


def test_calls_below_the_row_gate_run_eager():
    calls = []
    op = decoder_ops._by_rows(lambda x: calls.append("eager"), lambda x: calls.append("compiled"), from_rows=4)
    for rows in (1, 3, 4, 9):
        op(torch.zeros(rows, 2))
    assert calls == ["eager", "eager", "compiled", "compiled"]


@pytest.mark.slow  # compiles three small graphs (seconds on a warm inductor cache)
def test_compiled_ops_match_eager():
    torch.manual_seed(0)
    ops = decoder_ops.compiled_ops(from_rows=2)  # every shape below is compiled
    with torch.inference_mode():
        for T in (2, 7, 300):
            x, w = torch.randn(T, 64), torch.randn(64)
            torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), EAGER.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
            gu = torch.randn(T, 256)
            torch.testing.assert_close(ops.silu_mul(gu), EAGER.silu_mul(gu), rtol=1e-5, atol=1e-6)
            q, cos, sin = torch.randn(T, 4, 16), torch.randn(T, 1, 8), torch.randn(T, 1, 8)
            torch.testing.assert_close(ops.rope(q, cos, sin), EAGER.rope(q, cos, sin), rtol=1e-5, atol=1e-6)
