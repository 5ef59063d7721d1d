"""The torch backend's cascade path (shared prefix read once) against its plain padded path."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.attention.torch_backend import TorchAttnBackend
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


def _setup(hq: int, hkv: int, d: int = 16):
    torch.manual_seed(0)
    kv = KVPool(512, num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=torch.float32, device="cpu")
    kv.k_buffers[0].normal_()
    kv.v_buffers[0].normal_()
    table = ReqToTokenPool(8, 256, "cpu")
    return kv, table


@pytest.mark.parametrize("mode", ["decode", "extend"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_cascade_matches_padded_attention(mode, hq, hkv):
    kv, table = _setup(hq, hkv)
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
    q = torch.randn(T, hq, 16)
    k, v = torch.randn(T, hkv, 16), torch.randn(T, hkv, 16)
    outs = []
    for min_shared in (32, 10**9):  # cascade, then the plain path
        backend = TorchAttnBackend(kv, table, cascade_min_shared=min_shared)
        fb = ForwardBatch.build(*fb_args)
        backend.init_forward_metadata(fb)
        assert (fb.attn_metadata.groups[-1].shared is not None) == (min_shared == 32)
        outs.append(backend.forward(q, k, v, 0, fb, 0.25))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
