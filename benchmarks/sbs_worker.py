"""The side-by-side worker protocol (bench_vllm.py), shared by vllm_worker.py and radixlm_worker.py.

It imports nothing from radixlm, because vLLM's worker runs in its own virtual environment.

A worker loads one system once, then answers requests on stdin, one JSON object per line:
``{"workload": NAME}`` runs that workload of the spec file once and answers on stdout with one line
``@@RESULT {json}`` (wall seconds, output token ids, prompt and cached token counts); ``{"quit": true}``
ends it. Everything else a system prints goes to stderr or is ignored by the runner.

A workload is a list of *rounds*. Each round's items are ``[parent, suffix]``: the prompt is the parent
item's whole history (its prompt and its output, from the previous round; -1 for none) followed by
``suffix``. One round is one batch; a round starts when the previous one ended. So multi-turn chat and
fork trees are built from each system's own outputs, exactly as a client would do it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

# generate(prompts, new_tokens) -> (outputs, cached_tokens): per prompt its new token ids and its cached prompt tokens
GenerateFn = Callable[[list[list[int]], int], tuple[list[list[int]], list[int]]]

RESULT_MARK = "@@RESULT "


def run_rounds(rounds: list[dict], generate: GenerateFn) -> dict:
    """Run one workload; the wall time covers the generate calls only (building prompts is free)."""
    history: list[list[int]] = []
    outputs: list[list[int]] = []
    wall = 0.0
    prompt_tokens = cached_tokens = 0
    for rnd in rounds:
        prompts = [(history[p] if p >= 0 else []) + list(suffix) for p, suffix in rnd["items"]]
        t0 = time.perf_counter()
        outs, cached = generate(prompts, rnd["new_tokens"])
        wall += time.perf_counter() - t0
        prompt_tokens += sum(map(len, prompts))
        cached_tokens += sum(cached)
        outputs.extend(outs)
        history = [p + o for p, o in zip(prompts, outs)]
    return {
        "wall_s": wall,
        "outputs": outputs,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "new_tokens": sum(map(len, outputs)),
        "logit_rows": sum(len(r["items"]) * r["new_tokens"] for r in rounds),
    }


def serve(spec_path: str, generate: GenerateFn, reset: Callable[[], None]) -> None:
    """Answer workload requests from stdin until told to quit (or stdin closes)."""
    with open(spec_path) as f:
        workloads = json.load(f)["workloads"]
    out = sys.stdout
    print(RESULT_MARK + json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            break
        reset()  # every iteration starts from an empty prefix cache
        res = run_rounds(workloads[msg["workload"]]["rounds"], generate)
        print(RESULT_MARK + json.dumps(res), file=out, flush=True)
