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

Engine side (``--workload``): a JSON-extraction workload, 100 requests with a 6-field schema through the
Engine on the ``small`` preset, jump-forward off vs on, greedy and sampled: forward passes, generated
tokens/s and wall time, side by side in one run. Goal: at least 1.5x with jump-forward.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from transformers import AutoTokenizer

from benchmarks.common import model_dir
from radixlm.runtime.constrained import GrammarBackend

from tests.constrained_cases import JSON_SCHEMA_CASES, REGEX_CASES, Walker, schema_json

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


EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 24},
        "city": {"type": "string", "maxLength": 12},
        "member": {"type": "boolean"},
        "plan": {"enum": ["free", "pro", "enterprise"]},
    },
    "required": ["name", "age", "email", "city", "member", "plan"],
}


def bench_extraction(preset: str, num_requests: int, whitespace: str | None) -> None:
    import json

    from radixlm.runtime.engine import Engine

    path = model_dir("llama", preset)
    schema = json.dumps(EXTRACTION_SCHEMA)
    prompts = [f"Extract the customer record from message {i}: " for i in range(num_requests)]
    print(f"\nJSON extraction, {num_requests} requests, 6-field schema, llama-{preset}, "
          f"whitespace={'compact' if whitespace == '' else 'default'}\n")
    print("| sampling | jump-forward | forward passes | output tokens | wall s | tokens/s | speed-up | valid |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, sp in (("greedy", {"temperature": 0}), ("temperature 1.0", {"temperature": 1.0, "seed": 0})):
        base = None
        for jf in (False, True):
            with Engine(model_path=path, dtype="float32", device="cpu", enable_jump_forward=jf,
                        constrained_json_whitespace_pattern=whitespace, max_total_tokens=65536) as eng:
                eng.generate("warm up", {"json_schema": schema, "max_new_tokens": 4})
                p0 = eng.get_server_info()["scheduler_stats"]["num_forward_passes"]
                t0 = time.perf_counter()
                outs = eng.generate(prompts, {**sp, "json_schema": schema, "max_new_tokens": 160})
                wall = time.perf_counter() - t0
                passes = eng.get_server_info()["scheduler_stats"]["num_forward_passes"] - p0
            toks = sum(len(o["output_ids"]) for o in outs)
            valid = 0
            for o in outs:
                try:
                    json.loads(o["text"])
                    valid += 1
                except json.JSONDecodeError:
                    pass
            rate = toks / wall
            base = base or wall
            print(f"| {label} | {'on' if jf else 'off'} | {passes} | {toks} | {wall:.2f} | {rate:.1f} | "
                  f"{base / wall:.2f}x | {valid}/{len(outs)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--samples", type=int, default=50, help="random walks per grammar")
    ap.add_argument("--whitespace", choices=["default", "compact"], nargs="+", default=["default", "compact"],
                    help="JSON whitespace: outlines-core's optional space, or none")
    ap.add_argument("--workload", action="store_true", help="also run the Engine JSON-extraction workload")
    ap.add_argument("--workload-only", action="store_true")
    ap.add_argument("--workload-preset", default="small")
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    if args.workload or args.workload_only:
        for ws in args.whitespace:
            bench_extraction(args.workload_preset, args.requests, None if ws == "default" else "")
        if args.workload_only:
            return
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    for preset in args.presets:
        for ws in args.whitespace:
            bench_grammar(preset, args.samples, None if ws == "default" else "")


if __name__ == "__main__":
    main()
