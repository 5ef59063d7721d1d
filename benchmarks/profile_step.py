"""Where one decode step and one prefill step spend their time: torch.profiler on the Scheduler.

    python -m benchmarks.profile_step --preset small --num-prompts 64

Drives the Scheduler directly (no thread, no sockets) on the no-sharing workload of bench_vllm: 64
prompts of 64-512 tokens. It profiles the first step (a prefill of as many prompts as the token budget
admits) and then, once every prompt is running, one pure decode step; for each it prints the wall time
and the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import model_dir, random_prompts
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.protocol import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs


def _profiled_step(sched: Scheduler, label: str, rows: int, enabled: bool = True) -> float:
    if not enabled:
        t0 = time.perf_counter()
        sched.step()
        wall = time.perf_counter() - t0
        print(f"\n## {label}: {wall * 1e3:.1f} ms wall")
        return wall
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        sched.step()
        wall = time.perf_counter() - t0
    print(f"\n## {label}: {wall * 1e3:.1f} ms wall\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--enable-torch-compile", action="store_true", help="fused elementwise ops through torch.compile")
    ap.add_argument("--disable-cpu-paged-decode", action="store_true", help="decodes through the bucketed gather path")
    ap.add_argument("--no-profiler", action="store_true", help="wall times only (the profiler adds overhead)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir("llama", args.preset)
    from transformers import AutoTokenizer

    prompts = random_prompts(AutoTokenizer.from_pretrained(path), args.num_prompts, 64, 512)
    sched = Scheduler(ServerArgs.from_kwargs(model_path=path, dtype=args.dtype, device="cpu",
                                             enable_torch_compile=args.enable_torch_compile,
                                             disable_cpu_paged_decode=args.disable_cpu_paged_decode))
    sp = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)
    # Warm up allocator and kernels on a throw-away request.
    sched.add_request(TokenizedGenerateReq(rid="warm", input_ids=prompts[0][:32], sampling_params=sp.replace(max_new_tokens=2)))
    while sched.has_work():
        sched.step()
    for i, p in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(rid=str(i), input_ids=p, sampling_params=sp))
    _profiled_step(sched, "first prefill step", args.rows, not args.no_profiler)
    while sched.waiting or any(r.pending > 1 for r in sched.running):
        sched.step()
    assert all(r.pending == 1 for r in sched.running), "not a pure decode step"
    print(f"\n{len(sched.running)} requests decoding, mode {ForwardMode.DECODE.value}")
    for i in range(3):  # the first may still pay for lazy work
        _profiled_step(sched, f"decode step {i + 1}", args.rows, not args.no_profiler and i == 2)
    while sched.has_work():
        sched.step()
    sched.check_memory()


if __name__ == "__main__":
    main()
