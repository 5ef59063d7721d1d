"""Router benchmark: a multi-tenant shared-prefix workload over two workers, per routing policy.

    python -m benchmarks.bench_router --preset small --groups 8 --requests-per-group 8 \
        --system-len 600 --question-len 24 --output-len 16 --request-rate 4

Workload (like SGLang's generated-shared-prefix dataset): G groups (tenants), each with a long system
prompt of random words (``--system-len`` tokens) and R short questions (``--question-len`` tokens);
the G×R requests are shuffled and sent with Poisson arrivals (``--request-rate`` per second, fixed
seed), streamed over SGLang's native /generate, each generating ``--output-len`` tokens (ignore_eos).

Rows, one after the other on the same workload:

* ``cache_aware``, ``round_robin``, ``power_of_two``: ``radixlm router`` over two workers (the caches
  flushed before each row);
* ``one worker holding everything``: a single worker whose KV pool is the two workers' together,
  without a router: the hit-rate ceiling;

then the scaling of throughput on a workload without sharing (distinct prompts): one worker vs the
router (round_robin) over two. ``--workers W`` puts W workers behind the router instead of two.

Every worker has ``--pool-tokens`` KV slots (default: room for G/W groups' prompts plus one, so the
fleet's working set exceeds one worker's cache, the case a router exists for). The workers are
processes on the same machine: on a machine with few cores they share them (each runs torch with
``--threads`` threads), so absolute numbers and the 1 → 2 worker scaling are bounded by the cores,
and the hit rates and ratios are what carries over. Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Result:
    sent: float
    first: float | None = None
    done: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def shared_prefix_workload(groups: int, per_group: int, system_words: int, question_words: int,
                           seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "si", "tu") for b in ("x", "y", "z", "w")]
    prompts = []
    for g in range(groups):
        system = f"Tenant {g} system prompt: " + _words(rng, system_words, vocab) + "\n"
        prompts += [system + f"Q{q}: " + _words(rng, question_words, vocab) + "?" for q in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def distinct_workload(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    vocab = [f"{a}{b}" for a in ("ba", "de", "fi", "go", "hu") for b in ("p", "q", "r", "s", "t", "v")]
    return [f"Request {i}: " + _words(rng, words, vocab) for i in range(n)]


def words_for_tokens(model_path: str, tokens: int) -> int:
    """How many workload words make ``tokens`` tokens with this tokenizer (measured on a sample)."""
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    sample = shared_prefix_workload(1, 1, 200, 1, 0)[0]
    per_word = len(tok(sample).input_ids) / 200
    return max(1, round(tokens / per_word))


# --------------------------------------------------------------------------- client
async def _one(client, url: str, text: str, sp: dict, res: Result) -> None:
    import httpx

    try:
        async with client.stream("POST", url + "/generate", json={"text": text, "sampling_params": sp,
                                                                  "stream": True}) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {await r.aread()!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return
                n = len(chunk.get("output_ids") or [])
                if n and res.first is None:
                    res.first = time.perf_counter()
                meta = chunk.get("meta_info", {})
                res.output_tokens = meta.get("completion_tokens", n)
                res.prompt_tokens = meta.get("prompt_tokens", 0)
                res.cached_tokens = meta.get("cached_tokens", 0)
        res.done = time.perf_counter()
    except httpx.HTTPError as e:
        res.error = repr(e)


async def _run(url: str, prompts: list[str], rate: float, output_len: int, seed: int) -> list[Result]:
    import httpx

    rng = random.Random(seed)
    sp = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0.0}
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        results, tasks = [], []
        for text in prompts:
            await asyncio.sleep(rng.expovariate(rate) if rate > 0 else 0.0)
            res = Result(sent=time.perf_counter())
            results.append(res)
            tasks.append(asyncio.create_task(_one(client, url, text, sp, res)))
        await asyncio.gather(*tasks)
    return results


def summarize(name: str, results: list[Result]) -> dict:
    ok = [r for r in results if r.error is None and r.done is not None]
    start = min(r.sent for r in results)
    end = max((r.done for r in ok), default=start)
    prompt = sum(r.prompt_tokens for r in ok)
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    return {
        "name": name, "completed": len(ok), "failed": len(results) - len(ok),
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else float("nan"),
        "out_tok_per_s": sum(r.output_tokens for r in ok) / (end - start) if end > start else float("nan"),
        "req_per_s": len(ok) / (end - start) if end > start else float("nan"),
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


# --------------------------------------------------------------------------- processes
def start_workers(model: str, n: int, pool: int, threads: int) -> list:
    from concurrent.futures import ThreadPoolExecutor

    from radixlm.runtime.server import Runtime

    os.environ["OMP_NUM_THREADS"] = str(threads)
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: Runtime(model_path=model, device="cpu", max_total_tokens=pool,
                                             log_level="warning", log_interval_s=0.0), range(n)))


@contextmanager
def router(urls: list[str], policy: str) -> Iterator[str]:
    import requests

    from radixlm.runtime.child_process import child_env, python_command
    from radixlm.runtime.server.ipc import free_port

    port = free_port()
    proc = subprocess.Popen(python_command("radixlm.runtime.cli", "router", "--worker-urls", *urls, "--policy", policy,
                                           "--port", str(port), "--log-level", "warning"), env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def flush(urls: list[str]) -> None:
    import requests

    for u in urls:
        requests.post(u + "/flush_cache", timeout=120)


def warm(url: str) -> None:
    asyncio.run(_run(url, ["warm up " * 8] * 2, 0.0, 4, 0))


# --------------------------------------------------------------------------- main
def table(rows: list[dict]) -> str:
    out = ["| setup | done | hit rate | out tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['completed']}/{r['completed'] + r['failed']} | {r['hit_rate']:.3f} | "
                   f"{r['out_tok_per_s']:.1f} | {r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--requests-per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=600, help="system prompt tokens")
    ap.add_argument("--question-len", type=int, default=24, help="question tokens")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=4.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--pool-tokens", type=int, default=None,
                    help="KV slots per worker (default: about half the groups' system prompts, plus working room)")
    ap.add_argument("--distinct-requests", type=int, default=32, help="requests of the no-sharing scaling run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--workers", type=int, default=2, help="workers behind the router")
    ap.add_argument("--policies", default="cache_aware,round_robin,power_of_two")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from benchmarks.common import model_dir

    model = model_dir("llama", args.preset)
    sys_words = words_for_tokens(model, args.system_len)
    q_words = words_for_tokens(model, args.question_len)
    prompts = shared_prefix_workload(args.groups, args.requests_per_group, sys_words, q_words, args.seed)
    per_worker = args.groups / args.workers  # the groups cache_aware gives each worker
    pool = args.pool_tokens or int((per_worker + 1) * (args.system_len + args.question_len + args.output_len))
    print(f"model {model}; {len(prompts)} requests ({args.groups} groups x {args.requests_per_group}); "
          f"pool {pool} tokens per worker; {os.cpu_count()} CPU cores shared by every process", flush=True)

    rows = []
    workers = start_workers(model, args.workers, pool, args.threads)
    urls = [w.url for w in workers]
    try:
        for w in urls:
            warm(w)
        for policy in args.policies.split(","):
            flush(urls)
            with router(urls, policy) as url:
                rows.append(summarize(f"router {policy}, {args.workers} workers", _go(url, prompts, args)))
            print(table(rows[-1:]), flush=True)
        # no sharing: 1 worker vs all of them behind the router
        distinct = distinct_workload(args.distinct_requests, sys_words // 2, args.seed)
        flush(urls)
        scale1 = summarize("no sharing, 1 worker", _go(urls[0], distinct, args))
        print(table([scale1]), flush=True)
        flush(urls)
        with router(urls, "round_robin") as url:
            scale2 = summarize(f"no sharing, router round_robin, {args.workers} workers", _go(url, distinct, args))
        print(table([scale2]), flush=True)
    finally:
        for w in workers:
            w.shutdown()
    big = start_workers(model, 1, args.workers * pool, args.threads)[0]
    try:
        warm(big.url)
        rows.append(summarize(f"one worker holding everything ({args.workers}x pool, no router)",
                              _go(big.url, prompts, args)))
    finally:
        big.shutdown()

    print("\n### shared-prefix workload\n")
    print(table(rows))
    by = {r["name"].split(",")[0].removeprefix("router "): r for r in rows}
    if "cache_aware" in by and "round_robin" in by:
        ca, rr = by["cache_aware"], by["round_robin"]
        single = rows[-1]
        print(f"\ncache_aware / round_robin: hit rate {ca['hit_rate'] / max(rr['hit_rate'], 1e-9):.2f}x, "
              f"throughput {ca['out_tok_per_s'] / rr['out_tok_per_s']:.2f}x, TTFT p50 "
              f"{ca['ttft_p50_ms'] / rr['ttft_p50_ms']:.2f}x; cache_aware hit rate / one worker holding everything: "
              f"{ca['hit_rate'] / single['hit_rate']:.3f}")
    print(f"\n### no sharing: 1 vs {args.workers} workers\n")
    print(table([scale1, scale2]))
    print(f"\nthroughput {args.workers} workers / 1 worker: {scale2['out_tok_per_s'] / scale1['out_tok_per_s']:.2f}x")
    for r in rows + [scale1, scale2]:
        if r["errors"]:
            print(f"errors in {r['name']}: {r['errors']}")


def _go(url: str, prompts: list[str], args: argparse.Namespace) -> list[Result]:
    return asyncio.run(_run(url, prompts, args.request_rate, args.output_len, args.seed))


if __name__ == "__main__":
    main()
