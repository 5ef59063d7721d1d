"""Paged-attention kernels on a CUDA GPU: correctness, bandwidth, speed against SDPA, end to end.

    python -m benchmarks.bench_kernels                 # everything (needs CUDA)
    python -m benchmarks.bench_kernels --skip-engine   # kernels only
    python -m benchmarks.bench_kernels --cpu-smoke     # tiny shapes in Triton's interpreter: checks
                                                       # that the script runs, measures nothing

Sections (printed as markdown for docs/benchmarks.md, and optionally saved with --json):
  1. correctness on CUDA: decode and extend vs radixlm.kernels.reference in bf16 (and fp16, fp32);
  2. device-to-device copy bandwidth (``dst.copy_(src)``, read + write bytes counted);
  3. decode at batch {1, 32, 128} x context {1k, 4k, 16k}: achieved GB/s over K/V + indices read,
     as a fraction of the copy bandwidth (goal: >= 70% at batch >= 32 and context >= 4k). Slots are a
     random permutation of the pool (page size 1, worst-case scatter);
  4. extend vs ``torch.nn.functional.scaled_dot_product_attention`` on the same shapes (goal: within
     1.3x). SDPA gets dense, contiguous, head-expanded K/V built outside the timed region;
  5. K/V store: torch ``index_put_`` (what KVPool.set_kv does) vs a contiguous copy of the same bytes;
  6. the Engine on CUDA with the triton backend vs transformers ``generate`` on the ``small`` preset:
     greedy outputs compared token by token in float32, and wall time.

Shapes are one Llama-3-8B layer: 32 query heads, 8 KV heads, head dim 128.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

if __package__ in (None, ""):  # run as a file: make `benchmarks` and the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOAL_DECODE_FRACTION = 0.70
GOAL_EXTEND_RATIO = 1.3


@dataclass
class Report:
    device: str = ""
    versions: dict = field(default_factory=dict)
    correctness: list = field(default_factory=list)
    copy_gbps: float = 0.0
    decode: list = field(default_factory=list)
    extend: list = field(default_factory=list)
    store: list = field(default_factory=list)
    engine: dict = field(default_factory=dict)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU in the interpreter (no numbers)")
    ap.add_argument("--skip-engine", action="store_true", help="skip the end-to-end Engine section")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim (decode, extend)")
    return ap.parse_args()


def main() -> int:
    args = _args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "bench_kernels.py needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was "
            "measured. (--cpu-smoke runs tiny shapes in Triton's interpreter to check the script itself.)",
            file=sys.stderr,
        )
        return 2
    if args.cpu_smoke:
        if torch.cuda.is_available():
            print("--cpu-smoke ignores the GPU and runs on CPU", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    import triton

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    hq, hkv, d = (4, 2, 16) if args.cpu_smoke else tuple(int(x) for x in args.heads.split(","))
    rep = Report(
        device="CPU (Triton interpreter, smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(device),
        versions={"torch": torch.__version__, "triton": triton.__version__},
    )
    torch.manual_seed(0)
    smoke = args.cpu_smoke

    rep.correctness = correctness(device, smoke)
    rep.copy_gbps = copy_bandwidth(device, smoke)
    rep.decode = bench_decode(device, hq, hkv, d, rep.copy_gbps, smoke)
    rep.extend = bench_extend(device, hq, hkv, d, smoke)
    rep.store = bench_store(device, hkv, d, smoke)
    if not args.skip_engine:
        rep.engine = bench_engine(device, smoke)
    print(render(rep, hq, hkv, d))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(rep), f, indent=2)
    return 0


# ------------------------------------------------------------------------------------------- timing
def timed_ms(fn, device) -> float:
    """Median milliseconds per call: triton's do_bench on CUDA (flushes L2 between calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # CPU (smoke runs only): one warm call, one timed call
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _csr(lens, pool_slots: int, device, scattered: bool = True):
    import torch

    total = sum(lens)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(lens), 0)
    perm = torch.randperm(pool_slots, device=device)[:total] if scattered else torch.arange(total, device=device)
    return indptr.to(device), (perm + 1).to(torch.int32)  # slot 0 is the pool's padding slot


# ------------------------------------------------------------------------------------------- 1. correctness
def correctness(device, smoke: bool) -> list[dict]:
    import torch

    from radixlm.kernels import decode_attention, extend_attention
    from radixlm.kernels.reference import decode_attention_ref, extend_attention_ref

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    rows = []
    configs = [(4, 2, 16)] if smoke else [(32, 8, 128), (32, 32, 64), (28, 4, 128), (16, 2, 96), (8, 1, 256)]
    dtypes = [torch.bfloat16] if smoke else [torch.bfloat16, torch.float16, torch.float32]
    gen = torch.Generator().manual_seed(0)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    for dtype in dtypes:
        for hq, hkv, d in configs:
            lens = [1, 17, 300, 64] if smoke else [1, 37, 1000, 4096, 63, 2500]
            pool = sum(lens) + 1
            kb = torch.randn(pool, hkv, d, generator=gen).to(dtype=dtype, device=device)
            vb = torch.randn(pool, hkv, d, generator=gen).to(dtype=dtype, device=device)
            indptr, idx = _csr(lens, pool - 1, device)
            q = torch.randn(len(lens), hq, d, generator=gen).to(dtype=dtype, device=device)
            ref = decode_attention_ref(q, kb, vb, indptr, idx, d**-0.5)
            for splits in (None, 1, 7):
                out = decode_attention(q, kb, vb, indptr, idx, d**-0.5, out=torch.full_like(q, float("nan")),
                                       num_splits=splits)
                err = rel(out, ref)
                rows.append(dict(kernel="decode", dtype=str(dtype).split(".")[-1], heads=f"{hq}/{hkv}x{d}",
                                 case=f"splits={splits or 'auto'}", rel_err=err, ok=err < tol[dtype]))
            ext, pre = ([1, 20], [0, 30]) if smoke else ([1, 200, 700, 64], [0, 1000, 0, 33])
            t = sum(ext)
            qx = torch.randn(t, hq, d, generator=gen).to(dtype=dtype, device=device)
            kx = torch.randn(t, hkv, d, generator=gen).to(dtype=dtype, device=device)
            vx = torch.randn(t, hkv, d, generator=gen).to(dtype=dtype, device=device)
            qo = torch.tensor([0] + torch.tensor(ext).cumsum(0).tolist(), dtype=torch.int32, device=device)
            pp, pidx = _csr(pre, pool - 1, device)
            ref = extend_attention_ref(qx, kx, vx, kb, vb, qo, pp, pidx, d**-0.5)
            out = extend_attention(qx, kx, vx, kb, vb, qo, pp, pidx, d**-0.5, out=torch.full_like(qx, float("nan")))
            err = rel(out, ref)
            rows.append(dict(kernel="extend", dtype=str(dtype).split(".")[-1], heads=f"{hq}/{hkv}x{d}",
                             case=f"ext={ext} prefix={pre}", rel_err=err, ok=err < tol[dtype]))
    return rows


# ------------------------------------------------------------------------------------------- 2. copy
def copy_bandwidth(device, smoke: bool) -> float:
    """GB/s of dst.copy_(src), counting bytes read plus bytes written."""
    import torch

    n = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device)
    return 2 * n / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------- 3. decode
def bench_decode(device, hq, hkv, d, copy_gbps, smoke: bool) -> list[dict]:
    import torch

    from radixlm.kernels import decode_attention
    from radixlm.kernels.decode_attention import choose_num_splits

    batches, contexts = ((1, 2), (16, 40)) if smoke else ((1, 32, 128), (1024, 4096, 16384))
    dtype = torch.bfloat16
    pool = max(batches) * max(contexts)
    # One pool for every shape: [pool + 1, Hkv, D] each for K and V (8 GiB at the largest shape).
    kb = torch.randn(pool + 1, hkv, d, device=device, dtype=dtype)
    vb = torch.randn(pool + 1, hkv, d, device=device, dtype=dtype)
    rows = []
    for b in batches:
        for ctx in contexts:
            q = torch.randn(b, hq, d, device=device, dtype=dtype)
            out = torch.empty_like(q)
            row = dict(batch=b, context=ctx, splits=choose_num_splits(ctx, b, hkv, device))
            for layout, scattered in (("scattered", True), ("contiguous", False)):
                indptr, idx = _csr([ctx] * b, pool, device, scattered)
                ms = timed_ms(lambda: decode_attention(q, kb, vb, indptr, idx, d**-0.5, out=out, max_kv_len=ctx),
                              device)
                moved = b * ctx * (2 * hkv * d * kb.element_size() + 4)  # K + V + the int32 slot
                gbps = moved / (ms * 1e-3) / 1e9
                row[f"{layout}_us"] = ms * 1e3
                row[f"{layout}_gbps"] = gbps
                row[f"{layout}_frac"] = gbps / copy_gbps
            row["goal_applies"] = b >= 32 and ctx >= 4096
            row["goal_met"] = row["scattered_frac"] >= GOAL_DECODE_FRACTION if row["goal_applies"] else None
            rows.append(row)
    del kb, vb
    return rows


# ------------------------------------------------------------------------------------------- 4. extend
def bench_extend(device, hq, hkv, d, smoke: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from radixlm.kernels import extend_attention

    dtype = torch.bfloat16
    if smoke:
        shapes = [(1, 0, 40), (2, 24, 16)]
    else:
        # (batch, cached prefix per request, new tokens per request)
        shapes = [(1, 0, 4096), (4, 0, 2048), (8, 0, 512), (1, 0, 16384), (4, 2048, 512), (2, 8192, 1024)]
    rows = []
    group = hq // hkv
    for b, p, e in shapes:
        t = b * e
        q = torch.randn(t, hq, d, device=device, dtype=dtype)
        k = torch.randn(t, hkv, d, device=device, dtype=dtype)
        v = torch.randn(t, hkv, d, device=device, dtype=dtype)
        kb = torch.randn(b * p + 1, hkv, d, device=device, dtype=dtype)
        vb = torch.randn(b * p + 1, hkv, d, device=device, dtype=dtype)
        qo = torch.arange(0, t + 1, e, dtype=torch.int32, device=device)
        pp, pidx = _csr([p] * b, b * p, device, scattered=True)
        out = torch.empty_like(q)
        ours = timed_ms(lambda: extend_attention(q, k, v, kb, vb, qo, pp, pidx, d**-0.5, out=out, max_extend_len=e),
                        device)
        # SDPA on the same problem, dense: [B, Hq, E, D] queries, [B, Hq, P + E, D] keys (heads expanded).
        qs = q.view(b, e, hq, d).transpose(1, 2).contiguous()
        pk = kb[pidx.long()].view(b, p, hkv, d)
        pv = vb[pidx.long()].view(b, p, hkv, d)
        ks = torch.cat((pk, k.view(b, e, hkv, d)), 1).transpose(1, 2).repeat_interleave(group, 1).contiguous()
        vs = torch.cat((pv, v.view(b, e, hkv, d)), 1).transpose(1, 2).repeat_interleave(group, 1).contiguous()
        if p == 0:
            sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
        else:
            mask = causal_lower_right(e, p + e)
            sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)  # noqa: E731
        ref_ms = timed_ms(sdpa, device)
        flops = 4 * b * hq * d * (e * (e + 1) / 2 + e * p)  # QK^T and PV over visible pairs
        rows.append(dict(batch=b, prefix=p, extend=e, ours_us=ours * 1e3, sdpa_us=ref_ms * 1e3,
                         ratio=ours / ref_ms, ours_tflops=flops / (ours * 1e-3) / 1e12,
                         goal_met=ours / ref_ms <= GOAL_EXTEND_RATIO))
    return rows


# ------------------------------------------------------------------------------------------- 5. store
def bench_store(device, hkv, d, smoke: bool) -> list[dict]:
    """KVPool.set_kv's torch indexing vs a contiguous copy of the same bytes (a floor for any kernel)."""
    import torch

    dtype = torch.bfloat16
    pool = 4096 if smoke else 1 << 20
    kb = torch.zeros(pool + 1, hkv, d, device=device, dtype=dtype)
    vb = torch.zeros_like(kb)
    rows = []
    for t in (8, 64) if smoke else (1, 128, 8192):
        k = torch.randn(t, hkv, d, device=device, dtype=dtype)
        v = torch.randn_like(k)
        loc = torch.randperm(pool, device=device)[:t] + 1  # int64, as ForwardBatch.out_cache_loc

        def index_put():
            kb[loc] = k
            vb[loc] = v

        def contiguous():
            kb[1 : t + 1].copy_(k)
            vb[1 : t + 1].copy_(v)

        a, c = timed_ms(index_put, device), timed_ms(contiguous, device)
        rows.append(dict(tokens=t, index_put_us=a * 1e3, contiguous_copy_us=c * 1e3, ratio=a / c))
    return rows


# ------------------------------------------------------------------------------------------- 6. engine
def bench_engine(device, smoke: bool) -> dict:
    """Greedy tokens and wall time: Engine (triton backend) vs transformers generate, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.common import model_dir, random_prompts
    from radixlm.runtime.engine import Engine

    preset = "tiny" if smoke else "small"
    path = model_dir("llama", preset)
    tok = AutoTokenizer.from_pretrained(path)
    n, new = (2, 4) if smoke else (16, 32)
    prompts = random_prompts(tok, n, 8, 24 if smoke else 300, seed=1)
    dev = "cpu" if smoke else "cuda"
    with Engine(model_path=path, dtype="float32", device=dev, attention_backend="triton") as eng:
        eng.generate(input_ids=prompts[0][:8], sampling_params={"max_new_tokens": 2})  # warm-up/compile
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": new,
                                                                "ignore_eos": True})
        engine_s = time.perf_counter() - t0
        eng.check_memory()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    same, first_diff = 0, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        refs = []
        for p in prompts:  # one at a time: no padding, so the reference is exact
            ids = torch.tensor([p], device=dev)
            r = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=tok.pad_token_id or 0)
            refs.append(r[0, len(p):].tolist())
    hf_s = time.perf_counter() - t0
    for o, r in zip(outs, refs):
        if o["output_ids"] == r:
            same += 1
        else:
            first_diff.append(next((i for i, (x, y) in enumerate(zip(o["output_ids"], r)) if x != y), len(r)))
    return dict(preset=preset, prompts=n, new_tokens=new, identical=same, first_divergence=first_diff,
                engine_s=engine_s, transformers_sequential_s=hf_s)


# ------------------------------------------------------------------------------------------- output
def render(rep: Report, hq: int, hkv: int, d: int) -> str:
    lines = [f"Device: {rep.device}; torch {rep.versions['torch']}, triton {rep.versions['triton']}", ""]
    bad = [r for r in rep.correctness if not r["ok"]]
    worst_bf16 = max((r["rel_err"] for r in rep.correctness if r["dtype"] == "bfloat16"), default=math.nan)
    lines.append(f"Correctness: {len(rep.correctness) - len(bad)}/{len(rep.correctness)} cases within tolerance; "
                 f"worst bf16 rel err {worst_bf16:.2e}")
    for r in bad:
        lines.append(f"  FAILED {r}")
    lines += ["", f"Device-to-device copy: {rep.copy_gbps:.0f} GB/s (read + write)", "",
              f"Decode, bf16, {hq} q heads / {hkv} KV heads x {d}:", "",
              "| batch | context | splits | scattered us | GB/s | % of copy | contiguous us | GB/s | % of copy |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep.decode:
        mark = "" if r["goal_met"] is None else (" (goal met)" if r["goal_met"] else " (below 70% goal)")
        lines.append(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['scattered_us']:.1f} | "
                     f"{r['scattered_gbps']:.0f} | {100 * r['scattered_frac']:.0f}%{mark} | {r['contiguous_us']:.1f} | "
                     f"{r['contiguous_gbps']:.0f} | {100 * r['contiguous_frac']:.0f}% |")
    lines += ["", "Extend vs SDPA, bf16:", "",
              "| batch | prefix | new tokens | ours us | SDPA us | ours / SDPA | ours TFLOP/s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep.extend:
        lines.append(f"| {r['batch']} | {r['prefix']} | {r['extend']} | {r['ours_us']:.1f} | {r['sdpa_us']:.1f} | "
                     f"{r['ratio']:.2f}x{'' if r['goal_met'] else ' (over 1.3x goal)'} | {r['ours_tflops']:.1f} |")
    lines += ["", "K/V store (KVPool.set_kv indexing vs contiguous copy of the same bytes):", "",
              "| tokens | index_put us | contiguous copy us | ratio |", "|---:|---:|---:|---:|"]
    for r in rep.store:
        lines.append(f"| {r['tokens']} | {r['index_put_us']:.1f} | {r['contiguous_copy_us']:.1f} | {r['ratio']:.2f}x |")
    if rep.engine:
        e = rep.engine
        lines += ["", f"Engine (triton backend, float32) vs transformers generate, {e['preset']} preset, "
                      f"{e['prompts']} prompts x {e['new_tokens']} tokens: {e['identical']}/{e['prompts']} identical "
                      f"greedy outputs (first divergences {e['first_divergence']}); Engine {e['engine_s']:.2f} s, "
                      f"transformers one prompt at a time {e['transformers_sequential_s']:.2f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
