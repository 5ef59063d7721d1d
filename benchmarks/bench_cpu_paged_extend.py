"""The CPU paged extend kernel against torch's flash kernel per request, one layer of causal prefill.

    python -m benchmarks.bench_cpu_paged_extend [--threads 2] [--dtype float32]

llama ``small`` attention shapes (8 query heads, 4 KV heads, head size 64). Cases: a 2k-token prefill
step of prompts drawn from 64-512 tokens (each after a 1-token cached BOS, as the radix cache leaves
them), and single prompts of 64 to 2,048 tokens. The K/V of every request sit scattered over the pool.
The baseline is the backend's per-request path without the kernel: the request's slots gathered from
the pool, SDPA with ``is_causal`` and the cached token as a padded leading query row. Prints the
median of the calls of each, and the kernel's attention GFLOP/s (the causal half of the products).

    python -m benchmarks.bench_cpu_paged_extend --baseline /tmp/old_cpu_paged_extend.cpp

compares a change to the kernel with an older source instead (say, ``git show
HEAD~1:runtime/attention/cpu_paged_extend.cpp``): both are built, the same cases alternate between them
call by call in one process (the machine's state drifts too much between separate runs), and the table
gives both medians, their ratio and the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from radixlm.runtime.attention import cpu_paged_extend
from radixlm.runtime.attention.cpu_kernels import build_library

HQ, HKV, D = 8, 4, 64


def _case(lens: list[int], dtype: torch.dtype, prefix: int = 1):
    g = torch.Generator().manual_seed(0)
    slots = sum(lens) + prefix * len(lens) + 1
    k = torch.randn(slots, HKV, D, generator=g).to(dtype)
    v = torch.randn(slots, HKV, D, generator=g).to(dtype)
    q = torch.randn(sum(lens), HQ, D, generator=g).to(dtype)
    r2t = torch.zeros(len(lens), max(lens) + prefix, dtype=torch.int64)
    perm, off = torch.randperm(slots - 1, generator=g) + 1, 0
    for b, n in enumerate(lens):
        r2t[b, : n + prefix] = perm[off : off + n + prefix]
        off += n + prefix
    i64 = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    starts = i64([sum(lens[:b]) for b in range(len(lens))])
    return q, k, v, r2t, starts, i64([prefix] * len(lens)), i64(lens)


def _per_request_sdpa(q, k, v, r2t, starts, prefix, lens, scale, out):
    for b, (s, p, n) in enumerate(zip(starts.tolist(), prefix.tolist(), lens.tolist())):
        slots = r2t[b, : p + n]
        qq = torch.cat([q.new_zeros((p, HQ, D)), q[s : s + n]])
        o = F.scaled_dot_product_attention(qq.transpose(0, 1)[None], k.index_select(0, slots).transpose(0, 1)[None],
                                           v.index_select(0, slots).transpose(0, 1)[None], is_causal=True,
                                           scale=scale, enable_gqa=True)
        out[s : s + n] = o[0, :, p:].transpose(0, 1)


def _median_ms(fn, iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--baseline", help="an older cpu_paged_extend.cpp to compare the current kernel with")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kern = cpu_paged_extend.load()
    if kern is None:
        raise SystemExit("the paged extend kernel is not available here (no AVX-512 or no C++ compiler)")
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    step: list[int] = []
    while sum(step) < 2048:
        step.append(rng.randint(64, 512))
    cases = [(f"2k-token step ({len(step)} prompts)", step)] + [(f"one prompt of {n}", [n]) for n in (64, 288, 512, 1024, 2048)]
    if args.baseline:
        _against_baseline(kern, cpu_paged_extend.PagedExtendKernel(build_library(args.baseline)), cases, dtype,
                          4 * args.iters + 1)
        return
    print(f"| case | kernel (ms) | per-request SDPA (ms) | speed-up | kernel GFLOP/s |\n|---|---:|---:|---:|---:|")
    scale = D ** -0.5
    for name, lens in cases:
        q, k, v, r2t, starts, prefix, n_new = _case(lens, dtype)
        out = torch.empty_like(q)
        t_k = _median_ms(lambda: kern(q, k, v, r2t, r2t.new_tensor(range(len(lens))), starts, prefix, n_new, scale, out),
                         args.iters)
        t_s = _median_ms(lambda: _per_request_sdpa(q, k, v, r2t, starts, prefix, n_new, scale, out), args.iters)
        flops = sum(2 * 2 * HQ * D * n * (n + 1) / 2 for n in lens)
        print(f"| {name} | {t_k:.2f} | {t_s:.2f} | {t_s / t_k:.2f}x | {flops / t_k / 1e6:.0f} |")


def _against_baseline(kern, base, cases, dtype: torch.dtype, iters: int) -> None:
    print("| case | baseline (ms) | current (ms) | baseline / current | max difference |\n|---|---:|---:|---:|---:|")
    for name, lens in cases:
        q, k, v, r2t, starts, prefix, n_new = _case(lens, dtype)
        rows = r2t.new_tensor(range(len(lens)))
        outs = [torch.empty_like(q), torch.empty_like(q)]
        times: list[list[float]] = [[], []]
        for _ in range(iters):  # alternate call by call
            for i, kn in enumerate((base, kern)):
                t0 = time.perf_counter()
                kn(q, k, v, r2t, rows, starts, prefix, n_new, D ** -0.5, outs[i])
                times[i].append(time.perf_counter() - t0)
        t_b, t_c = (1e3 * statistics.median(t[1:]) for t in times)
        diff = (outs[0].float() - outs[1].float()).abs().max().item()
        print(f"| {name} | {t_b:.2f} | {t_c:.2f} | {t_b / t_c:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
