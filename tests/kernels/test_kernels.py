"""Paged-attention kernels vs the torch reference, in Triton's interpreter on CPU (CUDA when present).

Every kernel run writes into an output pre-filled with NaN, so an element the kernel forgot to write
fails the comparison. Data are seeded random normals.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from radixlm.kernels import decode_attention, extend_attention
from radixlm.kernels.reference import decode_attention_ref, extend_attention_ref
from radixlm.runtime.attention.torch_backend import TorchAttnBackend
from radixlm.runtime.attention.triton_backend import TritonAttnBackend
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool
from tests.tiers import fast_subset

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Relative error bounds (max |err| / max |ref|) per dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
POOL = 256  # pool slots in the kernel tests


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def csr(gen: torch.Generator, lens: list[int], index_dtype=torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """indptr [B + 1] and distinct random pool slots for requests of the given lengths."""
    indptr = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=index_dtype, device=DEVICE)
    slots = torch.randperm(POOL, generator=gen)[: sum(lens)].to(dtype=index_dtype, device=DEVICE)
    return indptr, slots


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


# ---------------------------------------------------------------------------------------- decode
# (Hq, Hkv, D): MHA, GQA 4 and 8, a head dim that is not a power of two, the tiny model's dim 16.
HEADS = [(4, 4, 16), (8, 2, 64), (8, 1, 128), (6, 2, 40)]


def _decode_case(seed: int, lens: list[int], hq: int, hkv: int, d: int, dtype=torch.float32, kv_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    q = randn(gen, len(lens), hq, d, dtype=dtype)
    k_buf = randn(gen, POOL, hkv, d, dtype=kv_dtype)
    v_buf = randn(gen, POOL, hkv, d, dtype=kv_dtype)
    indptr, slots = csr(gen, lens)
    return q, k_buf, v_buf, indptr, slots, d**-0.5


@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(hq, hkv, d, num_splits):
    # Length 1, one block exactly (16 in the interpreter), lengths that are not block multiples.
    q, k_buf, v_buf, indptr, slots, scale = _decode_case(hq * d + num_splits, [1, 37, 16, 70], hq, hkv, d)
    ref = decode_attention_ref(q, k_buf, v_buf, indptr, slots, scale)
    out = decode_attention(q, k_buf, v_buf, indptr, slots, scale, out=poisoned(q), num_splits=num_splits)
    assert rel_err(out, ref) < 1e-5


def test_decode_many_splits_and_empty_request():
    # More splits than a short request has blocks: its trailing splits are empty and must weigh 0.
    # An empty request gets zeros from both the kernel and the reference.
    q, k_buf, v_buf, indptr, slots, scale = _decode_case(1, [200, 3, 0, 33], 4, 2, 32)
    ref = decode_attention_ref(q, k_buf, v_buf, indptr, slots, scale)
    assert torch.count_nonzero(ref[2]) == 0
    for num_splits in (2, 5, 13):
        out = decode_attention(q, k_buf, v_buf, indptr, slots, scale, out=poisoned(q), num_splits=num_splits)
        assert rel_err(out, ref) < 1e-5, num_splits
    # Automatic choice, with and without the host-side max length.
    for max_kv_len in (200, None):
        out = decode_attention(q, k_buf, v_buf, indptr, slots, scale, max_kv_len=max_kv_len)
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_dtypes(dtype):
    q, k_buf, v_buf, indptr, slots, scale = _decode_case(7, [1, 45, 90], 8, 2, 64, dtype=dtype)
    ref = decode_attention_ref(q, k_buf, v_buf, indptr, slots, scale)
    out = decode_attention(q, k_buf, v_buf, indptr, slots, scale, out=poisoned(q), num_splits=2)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_pool_dtype_differs_and_int64_indices():
    # A float16 pool read by a float32 query: K/V are widened on load, as in the reference.
    q, k_buf, v_buf, indptr, slots, scale = _decode_case(3, [5, 29], 4, 1, 16, kv_dtype=torch.float16)
    ref = decode_attention_ref(q, k_buf, v_buf, indptr, slots, scale)
    out = decode_attention(q, k_buf, v_buf, indptr.long(), slots.long(), scale, out=poisoned(q), num_splits=2)
    assert rel_err(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------- extend
def _extend_case(seed, ext_lens, prefix_lens, hq, hkv, d, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = sum(ext_lens)
    q = randn(gen, t, hq, d, dtype=dtype)
    k = randn(gen, t, hkv, d, dtype=dtype)
    v = randn(gen, t, hkv, d, dtype=dtype)
    k_buf = randn(gen, POOL, hkv, d, dtype=dtype)
    v_buf = randn(gen, POOL, hkv, d, dtype=dtype)
    qo_indptr = torch.tensor([0] + torch.tensor(ext_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    prefix_indptr, prefix_slots = csr(gen, prefix_lens)
    return q, k, v, k_buf, v_buf, qo_indptr, prefix_indptr, prefix_slots, d**-0.5


@pytest.mark.parametrize("hq,hkv,d", fast_subset(HEADS, [(4, 4, 16), (6, 2, 40)]))
def test_extend_matches_reference(hq, hkv, d):
    # New-token counts 1, 20 (crosses a 16-block), 33; prefixes empty, short, block-straddling.
    args = _extend_case(hq * d, [1, 20, 33, 16], [0, 17, 40, 5], hq, hkv, d)
    ref = extend_attention_ref(*args)
    out = extend_attention(*args, out=poisoned(args[0]))
    assert rel_err(out, ref) < 1e-5


def test_extend_without_prefixes_is_causal_attention():
    # No cached prefix anywhere: plain causal self-attention per request, checked against torch SDPA
    # too, so the reference itself is pinned to an independent implementation.
    args = _extend_case(11, [9, 26], [0, 0], 4, 2, 16)
    q, k, v = args[:3]
    out = extend_attention(*args, out=poisoned(q))
    assert rel_err(out, extend_attention_ref(*args)) < 1e-5
    for s, e in ((0, 9), (9, 35)):
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        assert rel_err(out[s:e], sdpa) < 1e-5


def test_extend_request_with_no_new_tokens():
    args = _extend_case(5, [4, 0, 18], [3, 8, 0], 2, 1, 16)
    ref = extend_attention_ref(*args)
    out = extend_attention(*args, out=poisoned(args[0]), max_extend_len=18)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extend_half_dtypes(dtype):
    args = _extend_case(13, [1, 21], [30, 0], 8, 2, 64, dtype=dtype)
    ref = extend_attention_ref(*args)
    out = extend_attention(*args, out=poisoned(args[0]))
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


# ---------------------------------------------------------------------------------------- bad input
def test_decode_rejects_bad_shapes():
    q, k_buf, v_buf, indptr, slots, scale = _decode_case(0, [3, 4], 4, 2, 16)
    cases = {
        "q": dict(q=q[0]),
        "k_buffer": dict(k_buffer=k_buf[:, :, :8]),
        "v_buffer": dict(v_buffer=v_buf[:, :1]),
        "heads": dict(q=randn(torch.Generator().manual_seed(0), 2, 3, 16)),
        "kv_indptr": dict(kv_indptr=indptr[:2]),
        "kv_indices": dict(kv_indices=slots.float()),
        "out": dict(out=torch.empty(2, 4, 8, device=DEVICE)),
        "num_splits": dict(num_splits=0),
    }
    base = dict(q=q, k_buffer=k_buf, v_buffer=v_buf, kv_indptr=indptr, kv_indices=slots, sm_scale=scale)
    for name, change in cases.items():
        with pytest.raises(ValueError, match=name):
            decode_attention(**{**base, **change})


def test_extend_rejects_bad_shapes():
    q, k, v, k_buf, v_buf, qo, pre, pre_idx, scale = _extend_case(0, [3, 4], [2, 0], 4, 2, 16)
    cases = {
        "q": dict(q=q.flatten(1)),
        "k must": dict(k=k[:5]),
        "v shape": dict(v=v[:, :1]),
        "heads": dict(k=k[:, :1].expand(-1, 3, -1), v=v[:, :1].expand(-1, 3, -1)),
        "k_buffer": dict(k_buffer=k_buf[:, :1]),
        "qo_indptr": dict(qo_indptr=qo.float()),
        "prefix_indptr": dict(prefix_indptr=pre[:2]),
        "prefix_indices": dict(prefix_indices=pre_idx[None]),
        "sm_scale": dict(sm_scale=float("nan")),
    }
    base = dict(
        q=q, k=k, v=v, k_buffer=k_buf, v_buffer=v_buf, qo_indptr=qo, prefix_indptr=pre, prefix_indices=pre_idx,
        sm_scale=scale,
    )
    for name, change in cases.items():
        with pytest.raises(ValueError, match=name):
            extend_attention(**{**base, **change})


# ---------------------------------------------------------------------------------------- backend
def _pools(hkv: int, d: int, layers: int, seed: int) -> tuple[KVPool, ReqToTokenPool]:
    kv = KVPool(num_slots=96, num_layers=layers, num_kv_heads=hkv, head_dim=d, dtype=torch.float32, device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(layers):  # stale random data everywhere: a wrong index would show
        kv.k_buffers[layer].copy_(randn(gen, *kv.k_buffers[layer].shape))
        kv.v_buffers[layer].copy_(randn(gen, *kv.v_buffers[layer].shape))
    return kv, ReqToTokenPool(max_requests=4, max_context_len=64, device=DEVICE)


def _clone_pools(kv: KVPool, r2t: ReqToTokenPool) -> tuple[KVPool, ReqToTokenPool]:
    kv2 = KVPool(kv.size, kv.num_layers, kv.k_buffers[0].shape[1], kv.k_buffers[0].shape[2], kv.dtype, DEVICE)
    for layer in range(kv.num_layers):
        kv2.k_buffers[layer].copy_(kv.k_buffers[layer])
        kv2.v_buffers[layer].copy_(kv.v_buffers[layer])
    r2t2 = ReqToTokenPool(r2t.size, r2t.max_context_len, DEVICE)
    r2t2.req_to_token.copy_(r2t.req_to_token)
    return kv2, r2t2


def _step(mode, rows, prefix_lens, extend_lens, kv: KVPool, r2t: ReqToTokenPool) -> ForwardBatch:
    """Allocate slots for the new tokens, record them in req_to_token, build the ForwardBatch."""
    locs = kv.alloc(sum(extend_lens))
    start = 0
    positions = []
    for row, p, e in zip(rows, prefix_lens, extend_lens):
        r2t.write(row, p, locs[start : start + e])
        positions += list(range(p, p + e))
        start += e
    return ForwardBatch.build(
        mode, [1] * len(positions), positions, locs, rows, prefix_lens, extend_lens, DEVICE
    )


def test_triton_backend_matches_torch_backend():
    hq, hkv, d, layers = 4, 2, 16, 2
    kv_a, r2t_a = _pools(hkv, d, layers, seed=0)
    kv_b, r2t_b = _clone_pools(kv_a, r2t_a)
    torch_be = TorchAttnBackend(kv_a, r2t_a)
    triton_be = TritonAttnBackend(kv_b, r2t_b)
    gen = torch.Generator().manual_seed(1)
    rows = [2, 0, 3]

    steps = [
        # First prefill chunks for rows 0 and 3, so the next extend has real cached prefixes.
        (ForwardMode.EXTEND, [0, 3], [0, 0], [19, 11]),
        # Extend: an empty prefix and the two prefixes cached by the step above.
        (ForwardMode.EXTEND, rows, [0, 19, 11], [7, 9, 20]),
        # Two decode steps over what the extend left behind.
        (ForwardMode.DECODE, rows, [7, 28, 31], [1, 1, 1]),
        (ForwardMode.DECODE, rows, [8, 29, 32], [1, 1, 1]),
    ]
    for mode, rws, prefix_lens, extend_lens in steps:
        fb_a = _step(mode, rws, prefix_lens, extend_lens, kv_a, r2t_a)
        fb_b = _step(mode, rws, prefix_lens, extend_lens, kv_b, r2t_b)
        torch_be.init_forward_metadata(fb_a)
        triton_be.init_forward_metadata(fb_b)
        t = fb_a.num_tokens
        for layer in range(layers):
            q, k, v = randn(gen, t, hq, d), randn(gen, t, hkv, d), randn(gen, t, hkv, d)
            out_a = torch_be.forward(q, k, v, layer, fb_a, d**-0.5)
            out_b = triton_be.forward(q, k, v, layer, fb_b, d**-0.5)
            assert out_b.shape == (t, hq, d)
            assert rel_err(out_b, out_a) < 1e-5, (mode, layer)
            # Both backends stored the new K/V at the same slots.
            assert torch.equal(kv_a.k_buffers[layer], kv_b.k_buffers[layer])
            assert torch.equal(kv_a.v_buffers[layer], kv_b.v_buffers[layer])


def test_create_attention_backend_selects_triton():
    from radixlm.runtime.attention import create_attention_backend

    kv, r2t = _pools(1, 16, 1, seed=0)
    assert isinstance(create_attention_backend("triton", kv, r2t), TritonAttnBackend)


# ---------------------------------------------------------------------------------------- GPU compile
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from radixlm.kernels.decode_attention import _decode_merge_kernel, _decode_split_kernel
    from radixlm.kernels.extend_attention import _extend_kernel

    def compile_for(fn, ptr_types, constexprs, **options):
        sig = {n: "constexpr" if n in constexprs else ptr_types.get(n, "i32") for n in fn.arg_names}
        cst = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
        triton.compile(ASTSource(fn, sig, cst), target=GPUTarget("cuda", 90, 32), options=options)

    bf = "*bf16"
    dec = dict(Q=bf, K=bf, V=bf, Out=bf, KvIndptr="*i32", KvIndices="*i32", MidO="*fp32", MidLse="*fp32",
               qk_scale="fp32")
    for single in (True, False):
        compile_for(_decode_split_kernel, dec, dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_H=16,
                    BLOCK_N=64, SINGLE_SPLIT=single, UPCAST=False), num_warps=4, num_stages=2)
    compile_for(_decode_merge_kernel, dict(MidO="*fp32", MidLse="*fp32", Out=bf),
                dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16), num_warps=4)
    ext = dict(Q=bf, K=bf, V=bf, KBuf=bf, VBuf=bf, Out=bf, QoIndptr="*i32", PrefixIndptr="*i32",
               PrefixIndices="*i32", qk_scale="fp32")
    compile_for(_extend_kernel, ext, dict(GROUP=4, HEAD_DIM=80, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64, UPCAST=False),
                num_warps=8, num_stages=2)
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code the GPU compiler rejects: compile each kernel to an sm_90 cubin
    (Triton ships ptxas, no GPU needed) outside interpreter mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("this Triton build has no ptxas")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout


# ---------------------------------------------------------------------------------------- engine
def test_engine_triton_backend_greedy_matches_torch_backend(tiny_llama):
    """End to end: the Engine with attention_backend="triton" (interpreter on CPU) generates the same
    greedy tokens as with the torch backend, across prefill, a shared cached prefix and decode."""
    from radixlm.runtime.engine import Engine

    prompts = ["The capital of France is", "The capital of France is a city", "1, 2, 3,", "a"]
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    results = {}
    for backend in ("torch", "triton"):
        eng = Engine(
            model_path=tiny_llama, dtype="float32", device="cpu", attention_backend=backend, max_total_tokens=1024
        )
        try:
            assert type(eng.scheduler.runner.attn_backend).__name__.lower().startswith(backend)
            first = eng.generate(prompts[0], params)  # cached, so the second prompt reuses its prefix
            rest = eng.generate(prompts[1:], params)
            assert rest[0]["meta_info"]["cached_tokens"] > 0
            results[backend] = [o["output_ids"] for o in [first, *rest]]
            eng.check_memory()
        finally:
            eng.shutdown()
    assert all(len(ids) == 6 for ids in results["triton"])
    assert results["triton"] == results["torch"]
