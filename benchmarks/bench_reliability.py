"""Hostile requests vs. a bystander's stream: how long does the bystander wait between two chunks?

    python -m benchmarks.bench_reliability --model-path /tmp/tiny [--grammar-compile-timeout 10]

One server (the tiny model by default, made locally). A bystander streams a long greedy generation over
native /generate and records the gap before every chunk; while it runs, each hostile request of the
issue is sent once, alone, and the row reports: its HTTP status, how long it took, and the bystander's
longest gap during it (against its median gap in a quiet period). The issue's bar: no hostile request
stalls another stream by more than a second. Prints a markdown table for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import requests

HOSTILE = [
    ("native n=20000", "/generate", lambda m: {"text": "Hello", "sampling_params": {"n": 20000, "max_new_tokens": 4}}),
    ("OpenAI 100 prompts x n=128", "/v1/completions",
     lambda m: {"model": m, "prompt": ["Hello world"] * 100, "n": 128, "max_tokens": 4}),
    ("10 MB prompt", "/generate", lambda m: {"text": "word " * (2 * 1024 * 1024), "sampling_params": {"max_new_tokens": 1}}),
    ("regex a{100000}{100000}", "/generate",
     lambda m: {"text": "Hello", "sampling_params": {"regex": "a{100000}{100000}", "max_new_tokens": 4}}),
    ("regex (a|b)*a(a|b){18}", "/generate",
     lambda m: {"text": "Hello", "sampling_params": {"regex": "(a|b)*a(a|b){18}", "max_new_tokens": 4}}),
    ("regex (?:a{300}){100}", "/generate",
     lambda m: {"text": "Hello", "sampling_params": {"regex": "(?:a{300}){100}", "max_new_tokens": 4}}),
    ("top_k 2^64-1", "/generate",
     lambda m: {"text": "Hello world", "sampling_params": {"max_new_tokens": 4, "top_k": 18446744073709551615}}),
    ("stop_token_ids [1000000]", "/generate",
     lambda m: {"text": "Hello world", "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 2,
                                                            "stop_token_ids": [1000000]}}),
]


class Bystander(threading.Thread):
    """Streams until stopped, recording (time, gap) before every chunk."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.gaps: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            body = {"text": "Once upon a time", "stream": True,
                    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}
            with requests.post(self.url + "/generate", json=body, stream=True, timeout=300) as r:
                last = time.monotonic()
                for line in r.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    now = time.monotonic()
                    self.gaps.append((now, now - last))
                    last = now
                    if self.stop.is_set():
                        break

    def max_gap(self, t0: float, t1: float) -> float:
        """Longest wait for a chunk that arrived in [t0, t1] or the first one after."""
        inside = [g for t, g in self.gaps if t0 <= t <= t1]
        after = [g for t, g in self.gaps if t > t1][:1]
        return max(inside + after, default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="default: a tiny llama made in a temporary folder")
    ap.add_argument("--grammar-compile-timeout", type=float, default=10.0)
    args = ap.parse_args()
    from radixlm.runtime.server import Runtime

    model = args.model_path
    if model is None:
        from radixlm.runtime.tiny_model import make_tiny_model

        model = os.path.join(tempfile.mkdtemp(), "tiny")
        make_tiny_model(model, arch="llama", preset="tiny", seed=0)
    rt = Runtime(model_path=model, device="cpu", max_total_tokens=8192, log_level="error", log_interval_s=0.0,
                 grammar_compile_timeout=args.grammar_compile_timeout)
    try:
        name = requests.get(rt.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        by = Bystander(rt.url)
        by.start()
        time.sleep(5.0)
        quiet = [g for _, g in by.gaps[5:]]
        rows = []
        for label, path, make in HOSTILE:
            body = json.dumps(make(name))
            t0 = time.monotonic()
            r = requests.post(rt.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=300)
            t1 = time.monotonic()
            time.sleep(0.5)
            rows.append((label, r.status_code, t1 - t0, by.max_gap(t0, t1)))
        by.stop.set()
        by.join(60)
        active = requests.get(rt.url + "/get_server_info", timeout=30).json()["num_active_requests"]
    finally:
        rt.shutdown()
    print(f"bystander: median gap {statistics.median(quiet) * 1000:.1f} ms, max {max(quiet) * 1000:.1f} ms "
          f"in a quiet period; num_active_requests after: {active}\n")
    print("| hostile request | status | its latency (s) | bystander's longest gap during it (ms) |")
    print("|---|---|---|---|")
    for label, status, took, gap in rows:
        print(f"| {label} | {status} | {took:.2f} | {gap * 1000:.0f} |")


if __name__ == "__main__":
    main()
