"""radixlm's server against vLLM's CPU build's OpenAI server: the same Poisson workload, the same client.

    python -m benchmarks.bench_vllm --setup             # once: vLLM's virtual environment
    python -m benchmarks.bench_serving_vllm --request-rate 2
    python -m benchmarks.bench_serving_vllm --request-rate 2 --radixlm-threads 2

Both systems serve a fresh ``small`` llama over HTTP, one after the other (never at once): radixlm as
``radixlm serve`` (its three processes), vLLM as ``python -m vllm.entrypoints.openai.api_server`` in
benchmarks/.vllm/venv (its API server and engine-core processes, ``VLLM_CPU_OMP_THREADS_BIND=0-1``).
One client drives both through ``/v1/completions`` with token-id prompts, ``stream=true`` and
``stream_options={"include_usage": true, "continuous_usage_stats": true}``, so every chunk carries
the number of tokens generated so far: time to first token (TTFT) and the gap per token between
chunks (ITL) are measured where a client sees them, from exact token counts. Greedy, ``ignore_eos``,
exactly ``--output-len`` tokens per request; Poisson arrivals with a fixed seed; prompts of random
token ids, lengths uniform in [input_len/8, input_len] (64-512 by default, the no-sharing workload of
bench_vllm). Each server gets a short untimed warm-up first (vLLM compiles for new shapes). Both
systems' greedy outputs are compared token for token. Prints a markdown table for
docs/benchmarks.md.

radixlm's scheduler takes its thread count from its own rule (every core of its affinity mask on the
CPU) unless ``--radixlm-threads`` sets OMP_NUM_THREADS for it; vLLM's model runs on 2 threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from benchmarks.bench_serving import RequestResult, Workload, summarize
from benchmarks.bench_vllm import VLLM_PY, _vllm_env, setup_vllm_venv


def make_workload(vocab: int, n: int, lo: int, hi: int, output_len: int, rate: float, seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi) - 1)] for _ in range(n)]
    gaps = [0.0 if rate <= 0 else rng.expovariate(rate) for _ in range(n)]
    return Workload(prompts, gaps, output_len)


# ---------------------------------------------------------------------- the client
async def _one(client, url: str, model: str, ids: list[int], new: int, res: RequestResult) -> None:
    import httpx

    body = {"model": model, "prompt": ids, "max_tokens": new, "min_tokens": new, "ignore_eos": True,
            "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    last_t, last_n = None, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or {}
                n = int(usage.get("completion_tokens") or 0)
                now = time.perf_counter()
                if n > last_n:
                    if res.first is None:
                        res.first = now
                    elif last_t is not None:
                        res.itls.extend([(now - last_t) / (n - last_n)] * (n - last_n))
                    last_t, last_n = now, n
        res.output_tokens = last_n
        res.done = time.perf_counter()
    except httpx.HTTPError as e:
        res.error = repr(e)


async def _drive(url: str, model: str, wl: Workload) -> list[RequestResult]:
    import httpx

    limits = httpx.Limits(max_connections=len(wl.prompts) + 4, max_keepalive_connections=len(wl.prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        results, tasks = [], []
        for ids, gap in zip(wl.prompts, wl.gaps):
            await asyncio.sleep(gap)
            res = RequestResult(sent=time.perf_counter())
            results.append(res)
            tasks.append(asyncio.create_task(_one(client, url, model, ids, wl.output_len, res)))
        await asyncio.gather(*tasks)
        return results


def _greedy_ids(url: str, model: str, prompts: list[list[int]], new: int, native: bool) -> list[list[int]]:
    """Greedy output ids, non-streamed, one request at a time (for the agreement check): radixlm's
    native /generate returns ``output_ids``; vLLM's completions return ids with
    ``return_tokens_as_token_ids`` (a vLLM extension) and logprobs."""
    import requests

    out = []
    for ids in prompts:
        if native:
            r = requests.post(url + "/generate", timeout=600, json={"input_ids": ids, "sampling_params": {
                "max_new_tokens": new, "min_new_tokens": new, "ignore_eos": True, "temperature": 0.0}})
            r.raise_for_status()
            out.append(list(r.json()["output_ids"]))
            continue
        r = requests.post(url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": ids, "max_tokens": new, "min_tokens": new, "ignore_eos": True,
            "temperature": 0.0, "logprobs": 0, "return_tokens_as_token_ids": True})
        r.raise_for_status()
        toks = r.json()["choices"][0]["logprobs"]["tokens"]
        out.append([int(t.split(":", 1)[1]) for t in toks])
    return out


def _model_id(url: str) -> str:
    import requests

    return requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before it answered /health")
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{url} did not come up in {timeout_s:.0f} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(name: str, cmd: list[str], env: dict, log_path: str, wl: Workload, warmup: Workload,
           check: list[list[int]], port: int, native: bool) -> tuple[dict, list[list[int]]]:
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # cwd: the log's folder, not the repository root, whose top-level folders (kernels/, ...) would
        # shadow packages of the same bare names for ``python -m``
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(log_path))
    try:
        try:
            _wait_up(url, proc, 900)
        except SystemExit as e:
            with open(log_path) as log:
                raise SystemExit(f"{e}\n--- the last lines of {name}'s log:\n" + "".join(log.readlines()[-25:]))
        started = time.perf_counter() - t0
        model = _model_id(url)
        asyncio.run(_drive(url, model, warmup))
        ids = _greedy_ids(url, model, check, 16, native)
        results = asyncio.run(_drive(url, model, wl))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    row = summarize(name, results, 0.0)
    row["startup_s"] = started
    errors = [r.error for r in results if r.error]
    if errors:
        print(f"{name}: {len(errors)} failed, first: {errors[0]} (log: {log_path})", file=sys.stderr)
    return row, ids


def table(rows: list[dict]) -> str:
    lines = ["| server | done | out tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
             "| E2E p50 (s) | start-up (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['completed']}/{r['completed'] + r['failed']} | {r['out_tok_per_s']:.1f} "
                     f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} "
                     f"| {r['itl_p99_ms']:.1f} | {r['e2e_p50_s']:.2f} | {r['startup_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=2.0, help="Poisson rate (req/s)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--radixlm-threads", type=int, default=0,
                    help="OMP_NUM_THREADS for radixlm's server (0: its own rule)")
    ap.add_argument("--radixlm-args", default="--enable-torch-compile",
                    help="extra flags for radixlm serve (default: its fused elementwise ops, as bench_vllm)")
    ap.add_argument("--only", choices=["radixlm", "vllm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.only != "radixlm":
        setup_vllm_venv()

    from radixlm.runtime.child_process import child_env
    from radixlm.runtime.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"llama-{args.preset}")
        make_tiny_model(path, arch="llama", preset=args.preset, seed=0)
        with open(os.path.join(path, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        wl = make_workload(vocab, args.num_prompts, max(args.input_len // 8, 2), args.input_len,
                           args.output_len, args.request_rate, args.seed)
        warm = make_workload(vocab, 8, 16, args.input_len, 8, 0, args.seed + 1)
        check = make_workload(vocab, 4, 32, 128, 16, 0, args.seed + 2).prompts
        rows, outs = [], {}
        if args.only in (None, "radixlm"):
            port = _free_port()
            env = child_env(TOKENIZERS_PARALLELISM="false")
            if args.radixlm_threads:
                env["OMP_NUM_THREADS"] = str(args.radixlm_threads)
            threads = args.radixlm_threads or "auto"
            extra = f", {args.radixlm_args}" if args.radixlm_args else ""
            cmd = [sys.executable, "-m", "radixlm.runtime.cli", "serve", "--model-path", path, "--device", "cpu",
                   "--dtype", args.dtype, "--port", str(port), "--log-level", "warning", *args.radixlm_args.split()]
            row, outs["radixlm"] = _serve(f"radixlm ({threads} threads{extra})", cmd, env,
                                          os.path.join(tmp, "radixlm.log"), wl, warm, check, port, True)
            rows.append(row)
            print(table(rows[-1:]), file=sys.stderr, flush=True)
        if args.only in (None, "vllm"):
            port = _free_port()
            cmd = [VLLM_PY, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--dtype", args.dtype,
                   "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "4096", "--seed", "0",
                   "--enable-prefix-caching"]
            row, outs["vllm"] = _serve("vLLM (2 threads)", cmd, _vllm_env(2), os.path.join(tmp, "vllm.log"),
                                       wl, warm, check, port, False)
            rows.append(row)
            print(table(rows[-1:]), file=sys.stderr, flush=True)
    print(f"\nworkload: {args.num_prompts} streamed requests, Poisson {args.request_rate} req/s, prompts "
          f"{max(args.input_len // 8, 2)}-{args.input_len} tokens, {args.output_len} new, llama-{args.preset}, "
          f"{args.dtype}\n")
    print(table(rows))
    if len(outs) == 2:
        a, b = outs["radixlm"], outs["vllm"]
        same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
        print(f"\ngreedy agreement on {len(a)} check prompts: {same}/{sum(len(p) for p in a)} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "outputs": outs}, f, indent=2)


if __name__ == "__main__":
    main()
