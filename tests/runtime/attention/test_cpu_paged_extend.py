"""The native CPU paged extend kernel against a float64 reference: ragged extends after cached prefixes,
scattered slots, requests in arbitrary table rows, GQA groups, both head sizes, float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.attention import cpu_paged_extend

kernel = cpu_paged_extend.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no AVX-512 or no C++ compiler to build the kernel")


def _case(prefix, n_new, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in zip(prefix, n_new)]
    slots = sum(lens) + 8
    k = torch.randn(slots, hkv, d, generator=g).to(dtype)
    v = torch.randn(slots, hkv, d, generator=g).to(dtype)
    table = torch.zeros(len(lens) + 3, max(lens) + 5, dtype=torch.int64)
    perm = torch.randperm(slots - 1, generator=g) + 1  # scattered over the pool, slot 0 never used
    rows = torch.randperm(table.shape[0], generator=g)[: len(lens)]
    off = 0
    for r, n in zip(rows.tolist(), lens):
        table[r, :n] = perm[off : off + n]
        off += n
    T = sum(n_new)
    q = torch.randn(T + 2, hq, d, generator=g).to(dtype)  # two trailing rows belong to no extend
    q_start = torch.tensor([sum(n_new[:b]) for b in range(len(n_new))], dtype=torch.int64)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return q, k, v, table, rows, q_start, as_t(prefix), as_t(n_new)


def _reference(q, k, v, table, rows, q_start, prefix, n_new, scale, begin=0, with_lse=False):
    """Attention of new token i over its row's slots begin .. prefix + i, in float64 (and the lse)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(q.shape[:2], dtype=torch.float64)
    for r, s, p, n in zip(rows.tolist(), q_start.tolist(), prefix.tolist(), n_new.tolist()):
        slots = table[r, begin : p + n]
        grp = q.shape[1] // k.shape[1]
        kb = k[slots].double().repeat_interleave(grp, 1)  # [L, Hq, D]
        vb = v[slots].double().repeat_interleave(grp, 1)
        sc = torch.einsum("nhd,lhd->hnl", q[s : s + n].double(), kb) * scale
        visible = torch.arange(begin, p + n)[None, :] <= (p + torch.arange(n))[:, None]  # [n, L]
        sc = sc.masked_fill(~visible, float("-inf"))
        out[s : s + n] = torch.einsum("hnl,lhd->nhd", sc.softmax(-1), vb)
        lse[s : s + n] = sc.logsumexp(-1).T
    return (out, lse) if with_lse else out


CASES = [
    ([0], [1]),  # one token, one key
    ([0, 1, 0], [17, 30, 2]),  # fresh prompts and a BOS hit; blocks of 16 keys with tails
    ([40, 3, 0, 130], [5, 64, 33, 9]),  # longer cached prefixes (chunks, cache hits)
]


@pytest.mark.parametrize("prefix,n_new", CASES)
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 2), (16, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_float64_reference(prefix, n_new, hq, hkv, d):
    q, k, v, table, rows, q_start, pre, nn = _case(prefix, n_new, hq, hkv, d, torch.float32)
    out = torch.full_like(q, 7.0)
    kernel(q, k, v, table, rows, q_start, pre, nn, d ** -0.5, out)
    ref = _reference(q, k, v, table, rows, q_start, pre, nn, d ** -0.5)
    T = sum(n_new)
    torch.testing.assert_close(out[:T].double(), ref[:T], rtol=0, atol=2e-6)
    assert (out[T:] == 7.0).all()  # rows of no extend are left alone


@pytest.mark.parametrize("begin", [1, 17, 40])
@pytest.mark.parametrize("hq,hkv", [(8, 4), (16, 1)])
def test_a_suffix_after_a_shared_prefix_and_its_lse(begin, hq, hkv):
    """A cascade's own-suffix part: keys from ``begin`` on (the shared prefix is attended elsewhere),
    with each row's log-sum-exp so the two parts merge into the whole attention."""
    prefix, n_new = [40, 45, 130, 40], [5, 64, 9, 1]
    q, k, v, table, rows, q_start, pre, nn = _case(prefix, n_new, hq, hkv, 64, torch.float32, seed=begin)
    out, lse = torch.full_like(q, 7.0), torch.full(q.shape[:2], 7.0)
    kernel(q, k, v, table, rows, q_start, pre, nn, 0.125, out, begin=begin, lse=lse)
    ref, ref_lse = _reference(q, k, v, table, rows, q_start, pre, nn, 0.125, begin=begin, with_lse=True)
    T = sum(n_new)
    torch.testing.assert_close(out[:T].double(), ref[:T], rtol=0, atol=2e-6)
    torch.testing.assert_close(lse[:T].double(), ref_lse[:T], rtol=0, atol=1e-5)
    assert (out[T:] == 7.0).all() and (lse[T:] == 7.0).all()


def test_begin_past_a_prefix_is_refused():
    q, k, v, table, rows, q_start, pre, nn = _case([3, 10], [4, 2], 8, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="begin"):
        kernel(q, k, v, table, rows, q_start, pre, nn, 0.125, torch.empty_like(q), begin=4)


@pytest.mark.parametrize("d", [64, 128])
def test_bfloat16_storage(d):
    q, k, v, table, rows, q_start, pre, nn = _case([0, 1, 20], [40, 9, 3], 8, 2, d, torch.bfloat16)
    out = torch.empty_like(q)
    kernel(q, k, v, table, rows, q_start, pre, nn, d ** -0.5, out)
    ref = _reference(q, k, v, table, rows, q_start, pre, nn, d ** -0.5)
    T = int(nn.sum())
    # float32 arithmetic on bfloat16 inputs, rounded once at the end: within bfloat16's half-ulp
    torch.testing.assert_close(out[:T].double(), ref[:T], rtol=8e-3, atol=8e-3)


def test_unsupported_shapes_are_refused():
    assert not kernel.supports(torch.float32, 8, 4, 16)  # head size
    assert not kernel.supports(torch.float32, 24, 1, 64)  # a group of 24 does not divide 16
    assert not kernel.supports(torch.float16, 8, 4, 64)
    q, k, v, table, rows, q_start, pre, nn = _case([0], [4], 8, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="shapes"):
        kernel(q, k, v, table, rows, q_start, pre, nn, 0.25, torch.empty_like(q))
    q, k, v, table, rows, q_start, pre, nn = _case([0], [4], 8, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, k, v, table, rows, q_start, pre.int(), nn, 0.125, torch.empty_like(q))
