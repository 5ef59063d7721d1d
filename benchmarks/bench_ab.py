"""radixlm against an older commit of itself, on bench_vllm's workloads, interleaved in one run.

    python -m benchmarks.bench_ab --baseline <commit> [--iters 4] [--dtype float32] [--workloads a,b]

On a shared 2-core machine two runs of the same code differ by more than most changes (the ratios
against vLLM moved by up to 0.24 between runs 11 and 12 in docs/benchmarks.md), so a change is judged
against its baseline in one sitting: the baseline commit is checked out into a temporary worktree and
installed (no dependencies) into a folder of its own, then two workers (``radixlm_worker.py``, one per
code, each in its own process, the baseline's through ``PYTHONPATH``) run every workload after one
untimed warm-up each, alternating A B B A ... so that drift falls on both. The table gives each side's
median wall and range, the speed-up, and the fraction of output tokens on which the two agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchmarks.bench_vllm import HERE, Worker, _radixlm_env, agreement, build_workloads

ROOT = os.path.dirname(HERE)


def install_commit(commit: str, tmp: str) -> str:
    """``commit`` installed (without dependencies) into a folder under ``tmp``; returns that folder."""
    src, site = os.path.join(tmp, "src"), os.path.join(tmp, "site")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", src, commit], check=True,
                   capture_output=True, text=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", site, src], check=True, capture_output=True, text=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", src], capture_output=True)
    return site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="the commit (or any git revision) to compare with")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workloads", default=None, help="comma list of workload names (default: all)")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="both without --enable-torch-compile")
    args = ap.parse_args()

    import json

    from transformers import AutoTokenizer

    from benchmarks.common import model_dir

    path = model_dir("llama", args.preset)
    workloads = build_workloads(AutoTokenizer.from_pretrained(path), False)
    if args.workloads:
        workloads = {k: workloads[k] for k in args.workloads.split(",")}
    tmp = tempfile.mkdtemp(prefix="bench_ab_")
    spec = os.path.join(tmp, "spec.json")
    with open(spec, "w") as f:
        json.dump({"workloads": workloads}, f)
    site = install_commit(args.baseline, tmp)
    env_base = dict(_radixlm_env(args.threads))
    env_base["PYTHONPATH"] = os.pathsep.join([site] + [p for p in [env_base.get("PYTHONPATH")] if p])
    probe = subprocess.run([sys.executable, "-c", "import radixlm; print(radixlm.__file__)"], env=env_base,
                           capture_output=True, text=True, cwd=HERE)
    if not probe.stdout.startswith(site):
        raise SystemExit(f"the baseline's radixlm does not load from {site}: {probe.stdout or probe.stderr}")
    cmd = [sys.executable, os.path.join(HERE, "radixlm_worker.py"), "--spec", spec, "--model", path,
           "--dtype", args.dtype, "--threads", str(args.threads)] + ([] if args.no_compile else ["--enable-torch-compile"])
    print(f"llama-{args.preset}, {args.dtype}, baseline {args.baseline} against the working tree, "
          f"{args.iters} iterations, logs in {tmp}", flush=True)
    base = Worker(f"baseline {args.baseline}", cmd, env_base, os.path.join(tmp, "baseline.log"), HERE)
    cur = Worker("current", cmd, _radixlm_env(args.threads), os.path.join(tmp, "current.log"), HERE)
    rows = []
    try:
        for w in workloads:
            base.run(w)
            cur.run(w)
            res: dict[str, list[dict]] = {"base": [], "cur": []}
            for i in range(args.iters):
                order = [("base", base), ("cur", cur)] if i % 2 == 0 else [("cur", cur), ("base", base)]
                for name, worker in order:
                    res[name].append(worker.run(w))
            b, c = ([r["wall_s"] for r in res[k]] for k in ("base", "cur"))
            same = agreement(res["base"][0]["outputs"], res["cur"][0]["outputs"])
            rows.append((w, b, c, same))
            print(f"  {w}: baseline {statistics.median(b):.2f} s, current {statistics.median(c):.2f} s", flush=True)
    finally:
        base.close()
        cur.close()
    print(f"\n| workload | {args.baseline} (s) | current (s) | speed-up | same tokens |\n|---|---:|---:|---:|---:|")
    for w, b, c, same in rows:
        mb, mc = statistics.median(b), statistics.median(c)
        print(f"| {w} | {mb:.2f} ({min(b):.2f}–{max(b):.2f}) | {mc:.2f} ({min(c):.2f}–{max(c):.2f}) | "
              f"{mb / mc:.2f}× | {100 * same:.1f}% |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
