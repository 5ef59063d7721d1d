"""The CPU paged decode kernel against gathering the context and attending on the copy, one layer.

    python -m benchmarks.bench_cpu_paged_decode [--threads 2] [--requests 64] [--dtype float32]

llama ``small`` attention shapes (8 query heads, 4 KV heads, head size 64); request lengths drawn from
64-576 tokens; the KV slots either contiguous per request (what a fresh pool hands out) or scattered
over the pool (a long-running radix cache). The baseline is the plain gather (the backend's fallback
buckets requests by length and folds GQA heads, which is faster than this):
``index_select`` each request's slots into a padded [B, Lmax] copy, then SDPA with a padding mask.
Prints the median of 30 calls of each and the kernel's effective read bandwidth.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from radixlm.runtime.attention import cpu_paged_decode

HQ, HKV, D = 8, 4, 64


def _gather_sdpa(q, k, v, r2t, lens, scale):
    B, Lmax = len(lens), int(lens.max())
    idx = r2t[:, :Lmax]  # [B, Lmax]; slots past a request's length point at slot 0 and are masked
    kk = k.index_select(0, idx.reshape(-1)).view(B, Lmax, HKV, D).transpose(1, 2)  # [B, Hkv, Lmax, D]
    vv = v.index_select(0, idx.reshape(-1)).view(B, Lmax, HKV, D).transpose(1, 2)
    mask = (torch.arange(Lmax)[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, Lmax]
    return F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kern = cpu_paged_decode.load()
    if kern is None:
        raise SystemExit("the kernel could not be built (no C++ compiler?)")
    dtype = getattr(torch, args.dtype)
    B = args.requests
    lens = torch.randint(64, 577, (B,))
    total = int(lens.sum())
    k = torch.randn(total + 1, HKV, D, dtype=dtype)
    v = torch.randn(total + 1, HKV, D, dtype=dtype)
    q = torch.randn(B, HQ, D, dtype=dtype)
    rows, scale = torch.arange(B), D**-0.5
    kv_bytes = total * 2 * HKV * D * k.element_size()
    print(f"{B} requests, {total} keys, {kv_bytes / 1e6:.0f} MB of K/V, {args.dtype}, {args.threads} threads")
    for layout in ("contiguous", "scattered"):
        order = torch.arange(1, total + 1) if layout == "contiguous" else torch.randperm(total) + 1
        r2t = torch.zeros(B, 576, dtype=torch.int64)
        start = 0
        for b in range(B):
            r2t[b, : lens[b]] = order[start : start + lens[b]]
            start += int(lens[b])
        paged = lambda: kern(q, k, v, r2t, rows, lens, scale)  # noqa: E731
        gather = lambda: _gather_sdpa(q, k, v, r2t, lens, scale)  # noqa: E731
        diff = (paged().float() - gather()[:, :, 0].float()).abs().max().item()
        times: dict[str, list[float]] = {"paged": [], "gather": []}
        for name, fn in (("paged", paged), ("gather", gather)):  # each in its own loop: the gather's
            for _ in range(args.iters):                            # copies would evict the kernel's K/V
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        print(f"  {layout:10s} paged kernel {med['paged'] * 1e3:6.2f} ms ({kv_bytes / med['paged'] / 1e9:4.1f} GB/s), "
              f"gather + SDPA {med['gather'] * 1e3:6.2f} ms: {med['gather'] / med['paged']:.1f}x; max diff {diff:.1e}")


if __name__ == "__main__":
    main()
