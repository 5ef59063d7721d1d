"""RadixAttention on prefix-sharing workloads: hit rates, prefill work and throughput, side by side.

    python -m benchmarks.bench_prefix --preset small

Workloads (deterministic token ids):
  few-shot   200 questions behind one ~1k-token 5-shot prefix
  fork-tree  3 levels, fan-out 4: 64 leaves sharing a root, 4 branches and 16 sub-branches
  chat       50 sessions x 5 turns, sent turn by turn (each turn's prompt = the history so far)
For each: the optimal hit rate (1 - trie size / prompt tokens), the achieved hit rate, prefill tokens
computed, throughput with the cache on vs off, and vs transformers generate / generate_batch; then the
pool at 100%, 50% and 25% of the working set under lpm, dfs-weight and fcfs.
"""

from __future__ import annotations

import argparse
import random
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
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's requests")
    ap.add_argument("--hf-batch-subset", type=int, default=16, help="prompts given to generate_batch (slow on CPU)")
    ap.add_argument("--workloads", default="few-shot,fork-tree,chat")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    path = model_dir("llama", args.preset)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
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
