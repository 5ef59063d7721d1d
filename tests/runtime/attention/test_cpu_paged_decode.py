"""The native CPU paged decode kernel against a float64 reference: ragged lengths, scattered slots, GQA."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.attention import cpu_paged_decode

kernel = cpu_paged_decode.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C++ compiler to build the kernel")


def _case(lens, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = sum(lens) + 8
    k = torch.randn(slots, hkv, d, generator=g).to(dtype)
    v = torch.randn(slots, hkv, d, generator=g).to(dtype)
    table = torch.zeros(len(lens) + 3, max(lens) + 5, dtype=torch.int64)
    perm = torch.randperm(slots - 1, generator=g) + 1  # scattered over the pool, slot 0 never used
    rows = torch.randperm(table.shape[0], generator=g)[: len(lens)]  # requests in arbitrary table rows
    off = 0
    for r, n in zip(rows.tolist(), lens):
        table[r, :n] = perm[off : off + n]
        off += n
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    return q, k, v, table, rows, torch.tensor(lens, dtype=torch.int64)


def _reference(q, k, v, table, rows, seq_lens, scale, begin=0, lse=False):
    out, lses = [], []
    for b, (r, n) in enumerate(zip(rows.tolist(), seq_lens.tolist())):
        slots = table[r, begin:n]
        kb, vb = k[slots].double(), v[slots].double()  # [n, Hkv, D]
        grp = q.shape[1] // k.shape[1]
        kb, vb = kb.repeat_interleave(grp, 1), vb.repeat_interleave(grp, 1)  # [n, Hq, D]
        scores = torch.einsum("hd,nhd->hn", q[b].double(), kb) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), vb))
        lses.append(scores.logsumexp(-1))
    return (torch.stack(out), torch.stack(lses)) if lse else torch.stack(out)


# 64 and 128 are compiled with a fixed head size; 16, 20 and 80 take the generic loop (20: a 4-element tail
# after the 16-wide vector steps).
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (8, 2, 16), (4, 2, 20), (8, 4, 64), (12, 4, 80), (2, 1, 128)])
def test_matches_reference_float32(hq, hkv, d):
    lens = [1, 2, 31, 32, 33, 64, 100, 257, 5]  # around the 32-key block and the prefetch distance
    q, k, v, table, rows, seq = _case(lens, hq, hkv, d, torch.float32)
    out = kernel(q, k, v, table, rows, seq, d**-0.5)
    torch.testing.assert_close(out, _reference(q, k, v, table, rows, seq, d**-0.5).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [20, 64, 128])
def test_matches_reference_bfloat16(d):
    q, k, v, table, rows, seq = _case([7, 50, 129, 300], 8, 2, d, torch.bfloat16)
    out = kernel(q, k, v, table, rows, seq, d**-0.5)
    assert out.dtype == torch.bfloat16
    ref = _reference(q, k, v, table, rows, seq, d**-0.5)  # the same bf16 inputs, float64 math
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("begin", [1, 31, 32, 40])
def test_suffix_after_begin_with_lse(begin):
    """The cascade's suffix part: keys begin..seq_len-1 only, and the log-sum-exp of their scaled scores."""
    q, k, v, table, rows, seq = _case([41, 64, 90, 300], 8, 2, 32, torch.float32, seed=2)
    out, lse = kernel(q, k, v, table, rows, seq, 0.2, begin=begin, return_lse=True)
    ref, ref_lse = _reference(q, k, v, table, rows, seq, 0.2, begin=begin, lse=True)
    assert lse.shape == (4, 8) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


def test_no_keys_after_begin_gives_minus_inf_lse():
    q, k, v, table, rows, seq = _case([10, 20], 4, 2, 16, torch.float32)
    out, lse = kernel(q, k, v, table, rows, seq, 0.25, begin=10, return_lse=True)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_large_scores_do_not_overflow():
    """Scores in the hundreds: the online softmax subtracts the running max, so nothing overflows."""
    q, k, v, table, rows, seq = _case([40, 200], 4, 4, 16, torch.float32, seed=1)
    out = kernel(q * 30, k, v, table, rows, seq, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q * 30, k, v, table, rows, seq, 1.0).float(), rtol=1e-4, atol=1e-4)


def test_zero_length_context_gives_zeros():
    q, k, v, table, rows, seq = _case([3, 4], 4, 2, 16, torch.float32)
    out = kernel(q, k, v, table, rows, torch.tensor([0, 4]), 0.25)
    assert (out[0] == 0).all() and torch.isfinite(out).all()


def test_rejects_mismatched_inputs():
    q, k, v, table, rows, seq = _case([3, 4], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        kernel(q.to(torch.bfloat16), k, v, table, rows, seq, 0.25)
    with pytest.raises(ValueError, match="fit"):
        kernel(q, k, v, table, rows[:1], seq, 0.25)
    with pytest.raises(ValueError, match="begin"):
        kernel(q, k, v, table, rows, seq, 0.25, begin=-1)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(q, k, v, table[:, ::2], rows, seq, 0.25)
    assert kernel.supports(torch.float32) and kernel.supports(torch.bfloat16) and not kernel.supports(torch.float16)
