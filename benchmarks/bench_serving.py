"""Serving benchmark: the same Poisson workload through the HTTP server and through the in-process Engine.

    python benchmarks/bench_serving.py --preset tiny --num-prompts 64 --request-rate 8 \
        --input-len 128 --output-len 64

Each request is streamed (SGLang's native /generate with stream=true over HTTP; Engine.generate(stream=True)
in-process), so time to first token (TTFT) and inter-token latency (ITL) are measured where a client
sees them. Arrivals are Poisson (exponential gaps, fixed seed); prompts are random token ids with
lengths uniform in [input_len/2, input_len]; every request generates exactly output_len tokens
(ignore_eos). Both runs use the same ServerArgs; they run one after the other, never at once.
Prints a markdown table (paste into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    sent: float
    first: float | None = None
    done: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    prompts: list[list[int]]
    gaps: list[float]  # seconds before each request is sent, after the previous one
    output_len: int

    def sampling_params(self) -> dict:
        return {"max_new_tokens": self.output_len, "ignore_eos": True, "temperature": 0.0}


def make_workload(vocab: int, n: int, input_len: int, output_len: int, rate: float, seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(max(input_len // 2, 1), input_len))]
               for _ in range(n)]
    gaps = [0.0 if rate <= 0 else rng.expovariate(rate) for _ in range(n)]
    return Workload(prompts, gaps, output_len)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(name: str, results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None and r.done is not None]
    start = min(r.sent for r in results)
    end = max(r.done for r in ok) if ok else start
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    itl = [x for r in ok for x in r.itls]
    e2e = [r.done - r.sent for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "name": name,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": end - start,
        "req_per_s": len(ok) / (end - start) if end > start else float("nan"),
        "out_tok_per_s": tokens / (end - start) if end > start else float("nan"),
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
        "e2e_p50_s": statistics.median(e2e) if e2e else float("nan"),
    }


# --------------------------------------------------------------------------- HTTP server
async def _http_one(client, url: str, ids: list[int], sp: dict, res: RequestResult) -> None:
    import httpx

    last_t, last_n = None, 0
    try:
        async with client.stream("POST", url + "/generate", json={"input_ids": ids, "sampling_params": sp,
                                                                  "stream": True}) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {await r.aread()}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                last_t, last_n = _record_chunk(res, len(chunk["output_ids"]), last_t, last_n)
        res.output_tokens = last_n
        res.done = time.perf_counter()
    except httpx.HTTPError as e:
        res.error = repr(e)


async def _http_run(url: str, wl: Workload) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(wl.prompts) + 4, max_keepalive_connections=len(wl.prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        results, tasks = [], []
        t0 = time.perf_counter()
        for ids, gap in zip(wl.prompts, wl.gaps):
            await asyncio.sleep(gap)
            res = RequestResult(sent=time.perf_counter())
            results.append(res)
            tasks.append(asyncio.create_task(_http_one(client, url, ids, wl.sampling_params(), res)))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def bench_http(server_kwargs: dict, wl: Workload, warmup: list[list[int]]) -> dict:
    from radixlm.runtime.server import Runtime

    with Runtime(**server_kwargs, log_level="warning") as rt:
        asyncio.run(_http_run(rt.url, Workload(warmup, [0.0] * len(warmup), 4)))
        rt_flush(rt.url)
        results, wall = asyncio.run(_http_run(rt.url, wl))
    return summarize("HTTP server (3 processes)", results, wall)


def rt_flush(url: str) -> None:
    import requests

    requests.post(url + "/flush_cache", timeout=60)


def _record_chunk(res: "RequestResult", n: int, last_t: float | None, last_n: int) -> tuple[float | None, int]:
    """A streamed chunk holding n output tokens so far: first-token time, or per-token gaps since the last."""
    now = time.perf_counter()
    if n <= last_n:
        return last_t, last_n
    if res.first is None:
        res.first = now
    elif last_t is not None:
        res.itls.extend([(now - last_t) / (n - last_n)] * (n - last_n))
    return now, n


# --------------------------------------------------------------------------- in-process Engine
def _engine_one(engine, ids: list[int], sp: dict, res: RequestResult) -> None:
    last_t, last_n = None, 0
    try:
        for chunk in engine.generate(input_ids=ids, sampling_params=sp, stream=True):
            last_t, last_n = _record_chunk(res, len(chunk["output_ids"]), last_t, last_n)
        res.output_tokens = last_n
        res.done = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - reported in the table as a failure
        res.error = repr(e)


def _engine_run(engine, wl: Workload) -> tuple[list[RequestResult], float]:
    results, threads = [], []
    t0 = time.perf_counter()
    for ids, gap in zip(wl.prompts, wl.gaps):
        time.sleep(gap)
        res = RequestResult(sent=time.perf_counter())
        results.append(res)
        t = threading.Thread(target=_engine_one, args=(engine, ids, wl.sampling_params(), res))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def bench_engine(server_kwargs: dict, wl: Workload, warmup: list[list[int]]) -> dict:
    from radixlm.runtime.engine import Engine

    kwargs = {k: v for k, v in server_kwargs.items() if k not in ("port",)}
    engine = Engine(**kwargs)
    try:
        _engine_run(engine, Workload(warmup, [0.0] * len(warmup), 4))
        engine.flush_cache()
        results, wall = _engine_run(engine, wl)
    finally:
        engine.shutdown()
    return summarize("in-process Engine", results, wall)


# --------------------------------------------------------------------------- main
def table(rows: list[dict]) -> str:
    head = ("| front door | done | req/s | out tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
            "| E2E p50 (s) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['completed']}/{r['completed'] + r['failed']} | {r['req_per_s']:.2f} | "
            f"{r['out_tok_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} | "
            f"{r['itl_p99_ms']:.2f} | {r['e2e_p50_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="a model directory; default: a fresh tiny model of --arch/--preset")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=8.0, help="Poisson rate (req/s); <= 0 sends all at once")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["http", "engine"], help="run one side only")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            from radixlm.runtime.tiny_model import make_tiny_model

            model_path = os.path.join(tmp, f"{args.arch}-{args.preset}")
            make_tiny_model(model_path, arch=args.arch, preset=args.preset, seed=0)
        with open(os.path.join(model_path, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        wl = make_workload(vocab, args.num_prompts, args.input_len, args.output_len, args.request_rate, args.seed)
        warmup = make_workload(vocab, 4, 16, 4, 0, args.seed + 1).prompts
        server_kwargs = dict(model_path=model_path, device=args.device, max_total_tokens=args.max_total_tokens)
        rows = []
        if args.only in (None, "http"):
            rows.append(bench_http(server_kwargs, wl, warmup))
            print(table(rows[-1:]), file=sys.stderr)
        if args.only in (None, "engine"):
            rows.append(bench_engine(server_kwargs, wl, warmup))
    print(f"\nworkload: {args.num_prompts} requests, Poisson {args.request_rate} req/s, input "
          f"{args.input_len // 2}-{args.input_len} tokens, output {args.output_len} tokens, "
          f"model {args.arch}/{args.preset if args.model_path is None else model_path}, device {args.device}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
