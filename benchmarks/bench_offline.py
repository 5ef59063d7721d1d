"""Offline throughput: the Engine vs transformers `generate` and `generate_batch`, one run, same prompts.

    python benchmarks/bench_offline.py --preset small --num-prompts 64 --new-tokens 64

Also reports the Engine's overhead: wall time outside the model forward, as a fraction of wall time,
for the full batch and with at most 32 running requests.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import RunResult, hf_generate, hf_generate_batch, load_hf, markdown_table, model_dir, random_prompts
from radixlm.runtime.engine import Engine


def run_engine(path: str, prompts, new_tokens: int, name: str, **kw) -> RunResult:
    with Engine(model_path=path, dtype="float32", device="cpu", disable_radix_cache=True, **kw) as eng:
        eng.generate(input_ids=prompts[0][:16], sampling_params={"max_new_tokens": 2})  # warm-up
        f0 = eng.scheduler.runner.forward_time
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True})
        wall = time.perf_counter() - t0
        fwd = eng.scheduler.runner.forward_time - f0
        eng.check_memory()
    new = sum(len(o["output_ids"]) for o in outs)
    return RunResult(name, wall, sum(map(len, prompts)), new, {"overhead": f"{100 * (1 - fwd / wall):.1f}%"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir(args.arch, args.preset)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompts = random_prompts(tok, args.num_prompts, args.min_len, args.max_len)
    rows = [
        run_engine(path, prompts, args.new_tokens, "radixlm Engine"),
        run_engine(path, prompts, args.new_tokens, "radixlm Engine (max 32 running)", max_running_requests=32),
    ]
    model = load_hf(path)
    rows.append(hf_generate(model, prompts, args.new_tokens, tok.pad_token_id or 0))
    try:
        rows.append(hf_generate_batch(model, prompts, args.new_tokens))
    except Exception as e:  # noqa: BLE001 - report, do not hide the other numbers
        print(f"generate_batch failed: {type(e).__name__}: {e}")
    print(f"\n{args.num_prompts} prompts ({args.min_len}-{args.max_len} tokens) x {args.new_tokens} new tokens, "
          f"{args.arch}-{args.preset}, float32, CPU, torch threads={torch.get_num_threads()}\n")
    print(markdown_table(rows, "transformers generate", ("overhead",)))


if __name__ == "__main__":
    main()
