"""radixlm's side of bench_vllm.py: one in-process Engine, workloads on request (sbs_worker).

Started by bench_vllm.py with the project's Python, as a script (its folder is sys.path[0]; radixlm
comes from the installed package).
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--enable-torch-compile", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sbs_worker import serve

    from radixlm.runtime.engine import Engine

    eng = Engine(model_path=args.model, dtype=args.dtype, device="cpu", max_running_requests=256,
                 enable_torch_compile=args.enable_torch_compile)
    eng.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 2})  # warm-up

    def generate(prompts: list[list[int]], new_tokens: int):
        sp = {"temperature": 0.0, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "ignore_eos": True}
        outs = eng.generate(input_ids=prompts, sampling_params=sp)
        return [o["output_ids"] for o in outs], [int(o["meta_info"]["cached_tokens"]) for o in outs]

    def reset() -> None:
        eng.flush_cache()
        eng.check_memory()

    try:
        serve(args.spec, generate, reset)
    finally:
        eng.shutdown()


if __name__ == "__main__":
    main()
