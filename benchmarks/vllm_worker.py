"""vLLM's side of bench_vllm.py: loads ``vllm.LLM`` once, then runs workloads on request (sbs_worker).

Runs in vLLM's own virtual environment (benchmarks/.vllm/venv), started by bench_vllm.py, which also
sets VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND and the cache folders. Not importable as part of
radixlm on purpose: vLLM's engine spawns processes, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=0, help="KV block size (0: vLLM's default)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()

    from sbs_worker import serve  # this script's folder is sys.path[0]
    from vllm import LLM, SamplingParams

    kw = {"block_size": args.block_size} if args.block_size else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              enable_prefix_caching=True, **kw)

    def generate(prompts: list[list[int]], new_tokens: int):
        sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return ([list(o.outputs[0].token_ids) for o in outs], [int(o.num_cached_tokens or 0) for o in outs])

    serve(args.spec, generate, llm.reset_prefix_cache)


if __name__ == "__main__":
    main()
