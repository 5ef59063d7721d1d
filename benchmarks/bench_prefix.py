"""RadixAttention on prefix-sharing workloads: hit rates, prefill work and throughput, side by side.

    python -m benchmarks.bench_prefix --preset small

Workloads (deterministic token ids):
  few-shot   200 questions behind one ~1k-token 5-shot prefix
  fork-tree  3 levels, fan-out 4: 64 leaves sharing a root, 4 branches and 16 sub-branches
  chat       50 sessions x 5 turns, sent turn by turn (each turn's prompt = the history so far)
For each: the optimal hit rate (1 - trie size / prompt tokens), the achieved hit rate, prefill tokens
computed, throughput with the cache on vs off, and vs transformers generate / generate_batch; then the
pool at 100%, 50% and 25% of the working set under lpm, dfs-weight and fcfs.

    python -m benchmarks.bench_prefix --preset small --tiers

KV tiers (``--tiers``, runs only these): each workload with the device pool at 50% and 25% of the
working set, without a second tier, with the host tier compressed (int8, the CPU default) and lossless,
beside the 100% pool; then a warm restart: time to first token of a request behind a 2,000-token
shared prefix in a fresh Engine (nothing in memory carries over; the block files may sit in the OS
page cache, as after a real restart on the same machine), recomputed (no tier / an empty directory)
vs served from the disk tier a previous Engine wrote (int8 and lossless), median of ``--restarts``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import torch

from benchmarks.common import hf_generate, hf_generate_batch, load_hf, model_dir
from radixlm.runtime.engine import Engine


# ---------------------------------------------------------------------------- workloads
def _seg(rng: random.Random, vocab: list[int], n: int) -> list[int]:
    return [rng.choice(vocab) for _ in range(n)]


def few_shot(vocab, bos, scale: float) -> list[list[list[int]]]:
    rng = random.Random(1)
    prefix = bos + _seg(rng, vocab, 1000)
    return [[prefix + _seg(rng, vocab, rng.randint(10, 40)) for _ in range(int(200 * scale))]]


def fork_tree(vocab, bos, scale: float) -> list[list[list[int]]]:
    rng = random.Random(2)
    root = bos + _seg(rng, vocab, 400)
    prompts = []
    for _ in range(4):
        a = _seg(rng, vocab, 150)
        for _ in range(4):
            b = _seg(rng, vocab, 80)
            for _ in range(4):
                prompts.append(root + a + b + _seg(rng, vocab, 30))
    return [prompts[: max(int(len(prompts) * scale), 4)]]


def chat(vocab, bos, scale: float) -> list[list[list[int]]]:
    """Rounds of requests: round t holds every session's turn t (the history so far + a new message)."""
    rng = random.Random(3)
    sessions = [bos + _seg(rng, vocab, 60) for _ in range(int(50 * scale))]  # system prompt + first message
    rounds = []
    for _turn in range(5):
        rounds.append([list(s) for s in sessions])
        # The assistant reply (fixed, so prompts are deterministic) and the next user message.
        sessions = [s + _seg(rng, vocab, 24) + _seg(rng, vocab, rng.randint(15, 40)) for s in sessions]
    return rounds


WORKLOADS = {"few-shot": few_shot, "fork-tree": fork_tree, "chat": chat}


def trie_size(prompts: list[list[int]]) -> int:
    root: dict = {}
    n = 0
    for p in prompts:
        node = root
        for t in p:
            if t not in node:
                node[t] = {}
                n += 1
            node = node[t]
    return n


# ---------------------------------------------------------------------------- runs
def run_engine(path, rounds, new_tokens, **kw) -> dict:
    with Engine(model_path=path, dtype="float32", device="cpu", **kw) as eng:
        sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        t0 = time.perf_counter()
        gen = 0
        for prompts in rounds:
            outs = eng.generate(input_ids=prompts, sampling_params=sp)
            gen += sum(len(o["output_ids"]) for o in outs)
        wall = time.perf_counter() - t0
        info = eng.get_server_info()["scheduler_stats"]
        eng.check_memory()
    return {
        "wall": wall,
        "tok_s": gen / wall,
        "hit": info["cache_hit_rate"],
        "prefill": info["total_computed_prompt_tokens"],
        "retracted": info["num_retracted"],
        "host_hits": info.get("hicache_host_hit_tokens", 0),
    }


# ---------------------------------------------------------------------------- KV tiers
TIER_CONFIGS = {
    "no second tier": {},
    "host int8": {"enable_hierarchical_cache": True, "hicache_compression": "int8", "hicache_ratio": 2.0},
    "host lossless": {"enable_hierarchical_cache": True, "hicache_compression": "none", "hicache_ratio": 4.0},
}


def working_set(rounds, new_tokens: int) -> int:
    flat = [p for r in rounds for p in r]
    return trie_size(flat) + len(flat) * new_tokens


def _best(path, rounds, new_tokens: int, repeats: int, **kw) -> dict:
    """The fastest of ``repeats`` runs (hit rates and work are identical run to run; time is not)."""
    return min((run_engine(path, rounds, new_tokens, **kw) for _ in range(repeats)), key=lambda r: r["wall"])


def tier_rows(path, names, scale: float, vocab, bos, new_tokens: int, repeats: int) -> None:
    run_engine(path, WORKLOADS[names[0]](vocab, bos, scale)[:1], new_tokens)  # warm up (not reported)
    print("| workload | pool | second tier | hit rate | vs 100% pool hit | prefill computed | tok/s | vs no tier "
          "| loaded from host | retractions |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        rounds = WORKLOADS[name](vocab, bos, scale)
        ws = working_set(rounds, new_tokens)
        floor = max(len(p) for r in rounds for p in r) + new_tokens + 8
        full = _best(path, rounds, new_tokens, repeats, max_total_tokens=max(ws, floor))
        print(f"| {name} | 100% ({max(ws, floor)}) | none | {full['hit']:.3f} | 1.00 | {full['prefill']} "
              f"| {full['tok_s']:.1f} | | | {full['retracted']} |", flush=True)
        for frac in (0.5, 0.25):
            pool = max(int(ws * frac), floor)
            base = None
            for label, kw in TIER_CONFIGS.items():
                r = _best(path, rounds, new_tokens, repeats, max_total_tokens=pool, **kw)
                base = base or r
                print(f"| {name} | {frac:.0%} ({pool}) | {label} | {r['hit']:.3f} | {r['hit'] / full['hit']:.2f} "
                      f"| {r['prefill']} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x "
                      f"| {r['host_hits']} | {r['retracted']} |", flush=True)


def _first_token_s(path, prompt: list[int], **kw) -> tuple[float, int]:
    """Start a fresh Engine (not timed), then time one request's first token: (seconds, cached tokens)."""
    with Engine(model_path=path, dtype="float32", device="cpu", max_total_tokens=8192, **kw) as eng:
        eng.generate(input_ids=[3, 4, 5], sampling_params={"max_new_tokens": 1})  # warm up the forward
        eng.flush_cache()  # ... but not the cache
        t0 = time.perf_counter()
        out = eng.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 1})
        dt = time.perf_counter() - t0
    return dt, out["meta_info"]["cached_tokens"]


def warm_restart(path, vocab, bos, restarts: int, prefix_len: int = 2000) -> None:
    rng = random.Random(7)
    prefix = bos + _seg(rng, vocab, prefix_len - len(bos))
    print(f"\nWarm restart: first token of a request behind a {prefix_len}-token shared prefix, in a fresh "
          f"Engine (median of {restarts}):\n")
    print("| prefix from | TTFT (s) | cached tokens | vs recompute |")
    print("|---|---:|---:|---:|")
    rows = []
    cold = [_first_token_s(path, prefix + _seg(rng, vocab, 16)) for _ in range(restarts)]
    rows.append(("recomputed (no tiers)", cold))
    for codec in ("int8", "none"):
        with tempfile.TemporaryDirectory(prefix="radixlm-bench-kv-") as d:
            kw = dict(enable_hierarchical_cache=True, hicache_compression=codec, hicache_storage_dir=d)
            empty = _first_token_s(path, prefix + _seg(rng, vocab, 16), **kw)  # writes the prefix's blocks
            if codec == "int8":
                rows.append(("recomputed (disk tier on, empty directory)", [empty]))
            warm = [_first_token_s(path, prefix + _seg(rng, vocab, 16), **kw) for _ in range(restarts)]
            rows.append((f"disk tier ({'lossless' if codec == 'none' else codec}), after a restart", warm))
    base = statistics.median(t for t, _ in cold)
    for label, runs in rows:
        t = statistics.median(t for t, _ in runs)
        cached = min(c for _, c in runs)
        print(f"| {label} | {t:.3f} | {cached} | {base / t:.1f}x |", flush=True)


def compression_error(path, vocab, bos, prefix_len: int = 512, cont_len: int = 64, gen_len: int = 32) -> None:
    """Teacher-forced logprobs of a continuation, and greedy tokens, behind a prefix loaded back from
    the host tier, per codec vs the lossless tier."""
    rng = random.Random(11)
    prefix = bos + _seg(rng, vocab, prefix_len - len(bos))
    cont = _seg(rng, vocab, cont_len)
    fillers = [bos + _seg(rng, vocab, prefix_len + 100) for _ in range(2)]

    def score(codec: str) -> tuple[list[float], list[int], int]:
        """(continuation logprobs, greedy ids, prefix tokens the host tier served)"""
        with Engine(model_path=path, dtype="float32", device="cpu", max_total_tokens=2 * prefix_len + 300,
                    enable_hierarchical_cache=True, hicache_compression=codec, hicache_ratio=4) as eng:
            eng.generate(input_ids=prefix, sampling_params={"max_new_tokens": 1})
            for f in fillers:  # push the prefix out of the device pool into the host tier
                eng.generate(input_ids=f, sampling_params={"max_new_tokens": 1})
            out = eng.generate(input_ids=prefix + cont, return_logprob=True, logprob_start_len=len(prefix),
                               sampling_params={"temperature": 0, "max_new_tokens": gen_len, "ignore_eos": True})
            host = eng.get_server_info()["scheduler_stats"]["hicache_host_hit_tokens"]
        return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]], out["output_ids"], host

    print(f"\nCompressed tier error: a {prefix_len}-token prefix loaded back from the host tier, then "
          f"{cont_len} teacher-forced tokens and {gen_len} greedy ones, vs the lossless tier:\n")
    print("| codec | bytes/token vs lossless | tokens loaded from host | max abs dlogprob | mean abs dlogprob "
          "| greedy tokens before the first difference |")
    print("|---|---:|---:|---:|---:|---:|")
    from radixlm.runtime.kv_tiers.codec import KVCodec

    results = {codec: score(codec) for codec in ("none", "int8", "fp8")}
    exact, exact_ids, _ = results["none"]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    full = KVCodec("none", torch.float32).bytes_per_row(head_dim)
    for codec, (lps, ids, host) in results.items():
        d = [abs(a - b) for a, b in zip(lps, exact)]
        same = next((i for i, (a, b) in enumerate(zip(ids, exact_ids)) if a != b), len(ids))
        ratio = KVCodec(codec, torch.float32).bytes_per_row(head_dim) / full
        print(f"| {codec} | {ratio:.3f} | {host} | {max(d):.2e} | {sum(d) / len(d):.2e} | {same} of {len(ids)} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's requests")
    ap.add_argument("--hf-batch-subset", type=int, default=16, help="prompts given to generate_batch (slow on CPU)")
    ap.add_argument("--workloads", default="few-shot,fork-tree,chat")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--tiers", action="store_true", help="only the KV-tier rows and the warm restart")
    ap.add_argument("--restarts", type=int, default=3, help="fresh processes per warm-restart row")
    ap.add_argument("--repeats", type=int, default=2, help="--tiers: runs per row, the fastest reported")
    ap.add_argument("--rows-only", action="store_true", help="--tiers: skip the warm restart and codec error")
    args = ap.parse_args()
    path = model_dir("llama", args.preset)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if args.tiers:
        print(f"llama-{args.preset}, float32, CPU, torch threads={torch.get_num_threads()}, lpm, "
              f"{args.new_tokens} new tokens/request, scale {args.scale}\n")
        if args.workloads:
            tier_rows(path, args.workloads.split(","), args.scale, vocab, bos, args.new_tokens, args.repeats)
        if not args.rows_only:
            warm_restart(path, vocab, bos, args.restarts)
            compression_error(path, vocab, bos)
        return
    model = load_hf(path)
    print(f"llama-{args.preset}, float32, CPU, torch threads={torch.get_num_threads()}, {args.new_tokens} new tokens/request\n")
    print("| workload | requests | prompt tokens | optimal hit | achieved hit | prefill computed (on / off) "
          "| tok/s cache on | tok/s cache off | on/off | vs HF generate | vs HF generate_batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    working = {}
    for name in args.workloads.split(","):
        rounds = WORKLOADS[name](vocab, bos, args.scale)
        flat = [p for r in rounds for p in r]
        total = sum(map(len, flat))
        optimal = 1 - trie_size(flat) / total
        working[name] = (rounds, trie_size(flat) + len(flat) * args.new_tokens)
        big = 4 * working[name][1]
        on = run_engine(path, rounds, args.new_tokens, max_total_tokens=big)
        off = run_engine(path, rounds, args.new_tokens, max_total_tokens=big, disable_radix_cache=True)
        hf = hf_generate(model, flat, args.new_tokens, tok.pad_token_id or 0, batch_size=16)
        sub = flat[: args.hf_batch_subset]
        try:
            hfb = hf_generate_batch(model, sub, args.new_tokens).tok_per_s
            vs_b = f"{on['tok_s'] / hfb:.1f}x (HF on {len(sub)})"
        except Exception as e:  # noqa: BLE001
            vs_b = f"failed: {type(e).__name__}"
        print(f"| {name} | {len(flat)} | {total} | {optimal:.3f} | {on['hit']:.3f} ({on['hit'] / optimal:.1%} of optimal) "
              f"| {on['prefill']} / {off['prefill']} | {on['tok_s']:.1f} | {off['tok_s']:.1f} | "
              f"{on['tok_s'] / off['tok_s']:.1f}x | {on['tok_s'] / hf.tok_per_s:.1f}x | {vs_b} |", flush=True)
    if args.skip_sweep:
        return
    print("\nPool size sweep (fraction of the working set = trie of prompts + generated tokens):\n")
    print("| workload | pool | policy | hit rate | prefill computed | tok/s | retractions |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, (rounds, ws) in working.items():
        for frac in (1.0, 0.5, 0.25):
            for policy in ("lpm", "dfs-weight", "fcfs"):
                pool = max(int(ws * frac), max(len(p) for r in rounds for p in r) + args.new_tokens + 8)
                r = run_engine(path, rounds, args.new_tokens, max_total_tokens=pool, schedule_policy=policy)
                print(f"| {name} | {frac:.0%} ({pool}) | {policy} | {r['hit']:.3f} | {r['prefill']} | {r['tok_s']:.1f} | {r['retracted']} |",
                      flush=True)


if __name__ == "__main__":
    main()
