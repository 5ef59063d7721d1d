"""The torch backend: every grouping (buckets, causal path for tiny prefixes, cascade) against a per-request reference."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.attention import cpu_paged_extend as paged_extend
from radixlm.runtime.attention.torch_backend import TorchAttnBackend, TorchAttnConfig
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


D = 64  # a head size the native kernels cover


def _setup(hq: int, hkv: int, d: int = 16):
    torch.manual_seed(0)
    kv = KVPool(512, num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=torch.float32, device="cpu")
    kv.k_buffers[0].normal_()
    kv.v_buffers[0].normal_()
    table = ReqToTokenPool(16, 256, "cpu")
    return kv, table


@pytest.mark.parametrize("paged", [True, False], ids=["paged-suffix", "gathered-suffix"])
@pytest.mark.parametrize("mode", ["decode", "extend"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_cascade_matches_padded_attention(mode, hq, hkv, paged):
    kv, table = _setup(hq, hkv, D)
    shared = torch.arange(1, 61)  # 60 slots every request starts with
    prefix_lens = [70, 75, 66, 90]  # cached tokens: the shared 60 + own ones
    extend = [1, 1, 1, 1] if mode == "decode" else [3, 1, 7, 2]
    nxt = 100
    locs = []
    for b, (p, n) in enumerate(zip(prefix_lens, extend)):
        own = torch.arange(nxt, nxt + p - 60 + n)
        nxt += own.numel()
        table.req_to_token[b, : p + n] = torch.cat([shared, own])
        locs.append(table.req_to_token[b, p : p + n])
    T = sum(extend)
    fb_args = (ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND, [5] * T,
               [p + i for p, n in zip(prefix_lens, extend) for i in range(n)], torch.cat(locs),
               [0, 1, 2, 3], prefix_lens, extend, "cpu")
    q = torch.randn(T, hq, D)
    k, v = torch.randn(T, hkv, D), torch.randn(T, hkv, D)
    outs = []
    for min_shared in (32, 10**9):  # cascade, then the plain path
        backend = TorchAttnBackend(kv, table, TorchAttnConfig(cascade_min_shared=min_shared, paged_decode=paged,
                                                              paged_extend=paged, paged_cascade_min_saved_keys=0),
                                   num_heads=hq)
        fb = ForwardBatch.build(*fb_args)
        backend.init_forward_metadata(fb)
        cascades = [g for g in fb.attn_metadata.groups if g.shared is not None]
        assert len(cascades) == (min_shared == 32)
        for g in cascades:
            # decodes with the kernel: each suffix after the shared prefix is read in place, nothing gathered
            assert (g.rows is not None) == (paged and mode == "decode" and backend._paged is not None)
            # extends with the extend kernel: likewise, causal within the step
            assert (g.suffix is not None) == (mode == "extend" and backend._extend is not None)
        outs.append(backend.forward(q, k, v, 0, fb, 0.125))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], _reference(kv, table, q, prefix_lens, extend, 0.125), rtol=1e-5, atol=1e-5)


def _reference(kv: KVPool, table: ReqToTokenPool, q, prefix_lens, extend, scale):
    """One request at a time, float64: token i of request b sees its slots [0, prefix + i]."""
    out, t = [], 0
    for b, (p, n) in enumerate(zip(prefix_lens, extend)):
        slots = table.req_to_token[b, : p + n]
        k = kv.k_buffers[0][slots].double()  # [L, Hkv, D]
        v = kv.v_buffers[0][slots].double()
        qb = q[t : t + n].double()  # [n, Hq, D]
        g = qb.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [L, Hq, D]
        s = torch.einsum("nhd,lhd->hnl", qb, k) * scale
        visible = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]  # [n, L]
        s = s.masked_fill(~visible, float("-inf"))
        out.append(torch.einsum("hnl,lhd->nhd", s.softmax(-1), v))
        t += n
    return torch.cat(out).float()


CONFIGS = [
    TorchAttnConfig(),  # decodes and extends through the native paged kernels
    TorchAttnConfig(paged_extend=False),  # extends through torch's flash kernel
    TorchAttnConfig(paged_decode=False),  # decodes gathered, bucketed by length
    TorchAttnConfig(paged_decode=False, bucket_ratio=1.0),  # every distinct length its own bucket
    TorchAttnConfig(paged_decode=False, bucket_ratio=0.0),  # one bucket: the whole group padded
    TorchAttnConfig(causal_max_prefix=0),  # BOS hits through the masked path
    TorchAttnConfig(causal_max_prefix=10**9, cascade_min_shared=10**9),  # every extend causal
    TorchAttnConfig(ragged_min_tokens=2),  # every causal extend on its own, unpadded
    TorchAttnConfig(ragged_min_tokens=2, causal_max_prefix=10**9, cascade_min_shared=10**9),  # with prefixes
    TorchAttnConfig(ragged_min_tokens=10**9),  # every causal extend bucketed
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c}")
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_every_grouping_matches_the_reference(config, hq, hkv):
    """A mixed step: decodes of unequal contexts, fresh prompts, 1-token (BOS) hits, longer prefixes.
    Every slot no request owns holds NaN, as an uninitialised pool may: only the padding slot 0, which
    the pool zeroes, may be read besides the requests' own."""
    _check_mixed_step(config, hq, hkv)


def _check_mixed_step(config: TorchAttnConfig, hq: int, hkv: int) -> None:
    kv, table = _setup(hq, hkv, D)
    prefix_lens = [0, 1, 1, 40, 17, 9, 0, 120, 33]
    extend = [12, 30, 5, 1, 1, 6, 1, 1, 9]
    nxt, locs = 1, []
    for b, (p, n) in enumerate(zip(prefix_lens, extend)):
        table.req_to_token[b, : p + n] = torch.arange(nxt, nxt + p + n)
        nxt += p + n
        locs.append(table.req_to_token[b, p : p + n])
    for buf in kv.k_buffers + kv.v_buffers:  # slots nobody owns: garbage; the padding slot: zeros
        buf[nxt:] = float("nan")
        buf[0] = 0.0
    T = sum(extend)
    q = torch.randn(T, hq, D)
    k, v = torch.randn(T, hkv, D), torch.randn(T, hkv, D)
    fb = ForwardBatch.build(ForwardMode.EXTEND, [5] * T, [p + i for p, n in zip(prefix_lens, extend) for i in range(n)],
                            torch.cat(locs), list(range(9)), prefix_lens, extend, "cpu")
    backend = TorchAttnBackend(kv, table, config, num_heads=hq)
    backend.init_forward_metadata(fb)
    md = fb.attn_metadata
    if backend._extend is not None:  # every extend in the kernel's one call (no prefix is shared here)
        assert md.paged_extends.n_new.tolist() == [n for n in extend if n > 1] and md.ragged is None
    else:  # the longest fresh prompt has 30 new tokens: alone (unpadded) exactly when the config allows it
        assert md.paged_extends is None and (md.ragged is not None) == (config.ragged_min_tokens <= 30)
    assert (backend._extend is not None) == (config.paged_extend and paged_extend.load() is not None)
    out = backend.forward(q, k, v, 0, fb, 0.25)
    torch.testing.assert_close(out, _reference(kv, table, q, prefix_lens, extend, 0.25), rtol=1e-5, atol=1e-5)
    assert not torch.isnan(out).any()


def test_decode_buckets_bound_padding():
    """Contexts of 10..100 tokens with ratio 0.75: no bucket pads a request to more than 1/0.75 of its length."""
    kv, table = _setup(4, 4)
    lens = list(range(10, 101, 10))
    for b, n in enumerate(lens[:8]):
        table.req_to_token[b, :n] = torch.arange(1, n + 1) + 100 * b
    lens = lens[:8]
    fb = ForwardBatch.build(ForwardMode.DECODE, [5] * 8, [n - 1 for n in lens], torch.tensor([table.req_to_token[b, n - 1] for b, n in enumerate(lens)]),
                            list(range(8)), [n - 1 for n in lens], [1] * 8, "cpu")
    TorchAttnBackend(kv, table, TorchAttnConfig(paged_decode=False)).init_forward_metadata(fb)
    groups = fb.attn_metadata.groups
    assert len(groups) > 1
    for g in groups:
        lmax = g.kv_idx.shape[1]
        members = [int(t) for t in g.tokens]
        assert all(lens[m] >= 0.75 * lmax for m in members)


def test_paged_decode_is_one_group_without_padding():
    """With the native kernel, decodes of any lengths form one group that carries no gather index."""
    kv, table = _setup(8, 2)
    lens = [3, 40, 17, 1, 90]
    for b, n in enumerate(lens):
        table.req_to_token[b, :n] = torch.arange(1, n + 1) + 100 * b
    fb = ForwardBatch.build(ForwardMode.DECODE, [5] * 5, [n - 1 for n in lens],
                            torch.tensor([table.req_to_token[b, n - 1] for b, n in enumerate(lens)]),
                            list(range(5)), [n - 1 for n in lens], [1] * 5, "cpu")
    TorchAttnBackend(kv, table).init_forward_metadata(fb)
    (g,) = fb.attn_metadata.groups
    assert g.kv_idx is None and g.seq_lens.tolist() == lens and g.rows.tolist() == list(range(5))


def test_paged_decodes_cascade_only_when_it_spares_enough_reads():
    """4 decodes behind 60 shared slots spare the kernel 3 x 60 = 180 key reads: cascade at a limit of 180, not 181."""
    kv, table = _setup(8, 2)
    lens = [70, 75, 66, 90]
    for b, n in enumerate(lens):
        table.req_to_token[b, :n] = torch.cat([torch.arange(1, 61), torch.arange(n - 60) + 100 * (b + 1)])
    for limit, cascades in ((180, True), (181, False)):
        fb = ForwardBatch.build(ForwardMode.DECODE, [5] * 4, [n - 1 for n in lens],
                                torch.tensor([table.req_to_token[b, n - 1] for b, n in enumerate(lens)]),
                                list(range(4)), [n - 1 for n in lens], [1] * 4, "cpu")
        backend = TorchAttnBackend(kv, table, TorchAttnConfig(paged_cascade_min_saved_keys=limit))
        if backend._paged is None:
            pytest.skip("no C++ compiler: the paged kernel is unavailable")
        backend.init_forward_metadata(fb)
        (g,) = fb.attn_metadata.groups
        assert (g.shared is not None) == cascades and g.rows is not None
