"""radixlm eager against radixlm with --enable-torch-compile, side by side (one lever, measured in the Engine).

    python -m benchmarks.bench_compile --quick --workloads no-sharing,few-shot,chat

Two radixlm worker processes (benchmarks/radixlm_worker.py), the same workloads and protocol as
bench_vllm.py, ``--warmup`` untimed runs each, then interleaved iterations; prints the median walls and
the speed-up. Greedy outputs of the two must agree (the compiled path is token-identical in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from benchmarks.bench_vllm import HERE, Worker, _radixlm_env, agreement, build_workloads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workloads", default="no-sharing,few-shot,chat")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from benchmarks.common import model_dir

    path = model_dir("llama", args.preset)
    workloads = build_workloads(AutoTokenizer.from_pretrained(path), args.quick)
    names = args.workloads.split(",")
    tmp = tempfile.mkdtemp(prefix="bench_compile_")
    spec = os.path.join(tmp, "spec.json")
    with open(spec, "w") as f:
        json.dump({"workloads": {w: workloads[w] for w in names}}, f)

    def worker(name: str, extra: list[str]) -> Worker:
        cmd = [sys.executable, os.path.join(HERE, "radixlm_worker.py"), "--spec", spec, "--model", path,
               "--dtype", args.dtype, "--threads", str(args.threads)] + extra
        return Worker(name, cmd, _radixlm_env(args.threads), os.path.join(tmp, f"{name}.log"), HERE)

    eager, comp = worker("eager", []), worker("compiled", ["--enable-torch-compile"])
    print(f"\n| workload | eager s | compiled s | speed-up | same tokens |\n|---|---:|---:|---:|---:|")
    try:
        for w in names:
            for _ in range(args.warmup):
                eager.run(w)
                comp.run(w)
            a, b = [], []
            for _ in range(args.iters):
                a.append(eager.run(w))
                b.append(comp.run(w))
            ta, tb = statistics.median(r["wall_s"] for r in a), statistics.median(r["wall_s"] for r in b)
            same = agreement(a[0]["outputs"], b[0]["outputs"])
            print(f"| {w} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}x | {100 * same:.1f}% |", flush=True)
    finally:
        eager.close()
        comp.close()


if __name__ == "__main__":
    main()
