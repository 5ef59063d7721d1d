"""Constrained decoding: grammar compile time and per-token mask cost, at both tiny-model vocabularies.

    python -m benchmarks.bench_constrained [--presets tiny small] [--samples 50]

Grammar side (no model): for every JSON schema and regex in tests/constrained_cases.py,
  * compile time (cache miss: schema → regex → outlines-core Index → first mask), and the automaton's size;
  * per-token cost of ``fill_mask``, ``accept_token`` and ``jump_forward`` over seeded random walks through
    the grammar (tests/constrained_cases.Walker), jump-forward on: mean, p50, p99. A first pass visits states
    for the first time (their allowed-token rows are built then: "cold"); a second pass over the same walks
    is "warm";
  * sampled/tokens: tokens that had to be sampled per output token (the rest came from jump-forward), a
    model-free proxy for the decode steps jump-forward saves.
Goal (issue 6): mask cost at most 20 µs per token on average.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch
from transformers import AutoTokenizer

from benchmarks.common import model_dir
from radixlm.runtime.constrained import GrammarBackend

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from constrained_cases import JSON_SCHEMA_CASES, REGEX_CASES, Walker, schema_json  # noqa: E402

EOS_IDS = (2, 4)  # tiny models: </s> and <|im_end|> (generation_config.json)


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def _summary(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{statistics.fmean(values) / 1000:.1f} / {_pct(values, 0.5):.1f} / {_pct(values, 0.99):.1f}"


def _cases() -> list[tuple[str, str, str]]:
    return [("json", name, schema_json(name)) for name in JSON_SCHEMA_CASES] + [
        ("regex", name, pattern) for name, pattern in REGEX_CASES.items()]


def bench_grammar(preset: str, samples: int, whitespace: str | None) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir("llama", preset))
    t0 = time.perf_counter()
    backend = GrammarBackend(tok, vocab_size=len(tok), eos_token_ids=list(EOS_IDS), json_whitespace_pattern=whitespace)
    vocab_ms = (time.perf_counter() - t0) * 1e3
    print(f"\n### preset `{preset}` (vocabulary {len(tok)}), JSON whitespace {whitespace!r}\n")
    print(f"Vocabulary build: {vocab_ms:.1f} ms\n")
    print("| grammar | compile ms | states | fill_mask µs cold (mean / p50 / p99) | fill_mask µs warm | "
          "accept µs warm | jump_forward µs warm | tokens/sample | sampled/tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    all_cold: list[int] = []
    all_warm: list[int] = []
    try:
        for kind, name, pattern in _cases():
            t0 = time.perf_counter()
            grammar = backend.compile(kind, pattern)
            compile_ms = (time.perf_counter() - t0) * 1e3
            walker = Walker(grammar)
            states = len(walker.trans)
            passes = []
            for _ in range(2):  # same seed: the second pass revisits the same states, all rows cached
                rng = random.Random(0)
                timings: dict[str, list[int]] = {}
                emitted = 0
                for _ in range(samples):
                    ids, _, _ = walker.walk(rng, jump_forward=True, timings=timings)
                    emitted += len(ids)
                passes.append((timings, emitted))
            cold, (warm, emitted) = passes[0][0], passes[1]
            sampled = len(warm.get("accept_token", []))
            all_cold += cold["fill_mask"]
            all_warm += warm["fill_mask"]
            print(f"| {kind} `{name}` | {compile_ms:.1f} | {states} | {_summary(cold['fill_mask'])} | "
                  f"{_summary(warm['fill_mask'])} | {_summary(warm.get('accept_token', []))} | "
                  f"{_summary(warm.get('jump_forward', []))} | {emitted / samples:.1f} | "
                  f"{sampled / max(emitted, 1):.0%} |")
        print(f"| **all** | | | {_summary(all_cold)} | {_summary(all_warm)} | | | | |")
    finally:
        backend.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--samples", type=int, default=50, help="random walks per grammar")
    ap.add_argument("--whitespace", choices=["default", "compact"], nargs="+", default=["default", "compact"],
                    help="JSON whitespace: outlines-core's optional space, or none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    for preset in args.presets:
        for ws in args.whitespace:
            bench_grammar(preset, args.samples, None if ws == "default" else "")


if __name__ == "__main__":
    main()
