"""The language on prefix-sharing programs: the DSL vs independent OpenAI-style calls vs a transformers loop.

    python -m benchmarks.bench_programs --preset small

Workloads (text programs):
  few-shot select  N reviews behind one few-shot block; per review: select among 4 labels, then a
                   16-token reason.
  fork tree        T topics; per topic a root prompt forked 4 ways (a 16-token plan each), each plan
                   forked 4 ways again (a 16-token step each): 20 generations per topic.
Systems (same model, same prompts, one process):
  DSL                        ``run_batch`` / ``fork`` on the in-process Engine, radix cache on.
  independent calls (cache)  the same work as concurrent independent OpenAI-style requests: every
                             request carries its full prompt; a choice is scored by echoing the prompt's
                             logprobs (one request per choice, as ``/v1/completions`` with ``echo``
                             does); no warm-up, no fork commit. Radix cache on.
  independent calls (no cache)  the same, ``disable_radix_cache=True``.
  transformers loop          one request at a time: a forward pass per choice, ``generate`` per gen.
Reported: wall time, requests sent, prompt tokens prefilled (computed, not served from a cache).
The few-shot decisions of each system are compared with the DSL's (they should agree).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import radixlm as sgl
from benchmarks.common import load_hf, model_dir
from radixlm.backend.engine_backend import EngineBackend
from radixlm.runtime.engine import Engine

FEW_SHOT = """Classify the sentiment of each product review as positive, negative, neutral or mixed, then give a short reason.

Review: The battery lasts all day and the screen is gorgeous, best phone I have owned.
Sentiment: positive
Reason: praises the battery and the screen.

Review: It broke after two days and support never answered my emails.
Sentiment: negative
Reason: the product failed and support was absent.

Review: It is a phone. It makes calls and it has a camera.
Sentiment: neutral
Reason: states facts without any opinion.

Review: Great sound, but the microphone is terrible and the case scratches easily.
Sentiment: mixed
Reason: good sound, bad microphone and case.

Review: Shipping was fast and the colour is exactly as shown in the pictures.
Sentiment: positive
Reason: fast shipping, accurate colour.

Review: The keyboard feels cheap and two keys stopped working within a week.
Sentiment: negative
Reason: poor build quality.

"""
LABELS = ["positive", "negative", "neutral", "mixed"]
ROOT = ("You are planning a small project. First list a few different plans, then break each plan into "
        "concrete steps. Be specific and practical, and keep every line short.\nProject: ")


def reviews(n: int) -> list[str]:
    subjects = ["headphones", "laptop", "kettle", "backpack", "monitor", "bike lamp", "desk chair", "blender"]
    verdicts = ["works well", "stopped working", "is fine", "looks great but is loud", "arrived late",
                "exceeded my expectations", "feels flimsy", "does what it says"]
    return [f"The {subjects[i % 8]} {verdicts[(i * 3) % 8]} after {i + 2} days of use." for i in range(n)]


def topics(n: int) -> list[str]:
    base = ["a community garden", "a home weather station", "a reading club", "a bicycle repair day",
            "a photo exhibition", "a coding workshop", "a neighbourhood cleanup", "a recipe book"]
    return [base[i % len(base)] + (f" #{i // len(base) + 1}" if i >= len(base) else "") for i in range(n)]


# --------------------------------------------------------------------------- programs
@sgl.function
def classify(s, review):
    s += FEW_SHOT
    s += "Review: " + review + "\n"
    s += "Sentiment: " + sgl.select("label", choices=LABELS) + "\n"
    s += "Reason:" + sgl.gen("reason", max_tokens=16, stop="\n")


@sgl.function
def plan_tree(s, topic, fanout=4):
    s += ROOT + topic + "\n"
    plans = s.fork(fanout)
    plans += lambda i: f"Plan {i + 1}:" + sgl.gen("plan", max_tokens=16, ignore_eos=True)
    steps = []
    for p in plans:  # fork each plan; join all at the end so the 16 steps run concurrently
        sub = p.fork(fanout)
        sub += lambda j: f"\nStep {j + 1}:" + sgl.gen("step", max_tokens=16, ignore_eos=True)
        steps.append(sub)
    for sub in steps:
        sub.join()
    plans.join()


# --------------------------------------------------------------------------- measurement
@dataclass
class Result:
    system: str
    wall_s: float
    requests: int
    prefill_tokens: int
    outputs: list[Any] = field(default_factory=list)


class CountingBackend(EngineBackend):
    """An EngineBackend that counts the sequences it sends (a batch of k counts k)."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.requests = 0

    def _request(self, data: dict) -> Any:
        self.requests += len(data["text"]) if isinstance(data.get("text"), list) else \
            len(data["input_ids"]) if isinstance(data.get("input_ids"), list) and data["input_ids"] and \
            isinstance(data["input_ids"][0], list) else 1
        return super()._request(data)


def _prefilled(engine: Engine, fn: Callable[[], Any]) -> tuple[Any, float, int]:
    before = engine.get_server_info()["scheduler_stats"]["total_computed_prompt_tokens"]
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, wall, engine.get_server_info()["scheduler_stats"]["total_computed_prompt_tokens"] - before


def dsl_few_shot(engine: Engine, items: list[str]) -> Result:
    engine.flush_cache()
    backend = CountingBackend(engine)
    states, wall, pre = _prefilled(engine, lambda: classify.run_batch(
        [{"review": r} for r in items], backend=backend, temperature=0))
    assert all(st.error() is None for st in states)
    return Result("DSL (run_batch, select)", wall, backend.requests, pre, [st["label"] for st in states])


def dsl_tree(engine: Engine, items: list[str], fanout: int) -> Result:
    engine.flush_cache()
    backend = CountingBackend(engine)
    states, wall, pre = _prefilled(engine, lambda: plan_tree.run_batch(
        [{"topic": t, "fanout": fanout} for t in items], backend=backend, temperature=0))
    assert all(st.error() is None for st in states)
    return Result("DSL (fork)", wall, backend.requests, pre)


def _boundary(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Where a choice's tokens start: the first token that differs from the prompt's own tokens (a
    trailing space in the prompt merges into the choice's first token)."""
    k = 0
    while k < min(len(prompt_ids), len(full_ids)) and prompt_ids[k] == full_ids[k]:
        k += 1
    return k


def _score_choices_openai_style(engine: Engine, prompt: str, prompt_ids: list[int]) -> str:
    """One echo request per choice, logprobs over the whole prompt (what /v1/completions echo does)."""
    scores = []
    for label in LABELS:
        out = engine.generate(prompt + label, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
        entries = out["meta_info"]["input_token_logprobs"]
        k = _boundary(prompt_ids, [e[1] for e in entries])
        lps = [e[0] for e in entries[k:] if e[0] is not None]
        scores.append(sum(lps) / max(len(lps), 1))
    return LABELS[max(range(len(LABELS)), key=scores.__getitem__)]


def independent_few_shot(engine: Engine, items: list[str], name: str, threads: int) -> Result:
    engine.flush_cache()

    def one(review: str) -> str:
        prompt = FEW_SHOT + "Review: " + review + "\nSentiment: "
        label = _score_choices_openai_style(engine, prompt, engine.tokenizer(prompt).input_ids)
        engine.generate(prompt + label + "\nReason:", {"max_new_tokens": 16, "temperature": 0.0, "stop": ["\n"]})
        return label

    def run() -> list[str]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, items))

    labels, wall, pre = _prefilled(engine, run)
    return Result(name, wall, len(items) * (len(LABELS) + 1), pre, labels)


def independent_tree(engine: Engine, items: list[str], fanout: int, name: str, threads: int) -> Result:
    engine.flush_cache()
    sp = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}

    def one(topic: str) -> None:
        root = ROOT + topic + "\n"
        with ThreadPoolExecutor(fanout) as pool:
            plans = list(pool.map(lambda i: root + f"Plan {i + 1}:" + engine.generate(
                root + f"Plan {i + 1}:", sp)["text"], range(fanout)))
            prompts = [p + f"\nStep {j + 1}:" for p in plans for j in range(fanout)]
            list(pool.map(lambda p: engine.generate(p, sp), prompts))

    def run() -> None:
        with ThreadPoolExecutor(max(1, threads // fanout)) as pool:
            list(pool.map(one, items))

    _, wall, pre = _prefilled(engine, run)
    return Result(name, wall, len(items) * (fanout + fanout * fanout), pre)


@torch.inference_mode()
def hf_few_shot(model: Any, tok: Any, items: list[str]) -> Result:
    t0, requests, prefill, labels = time.perf_counter(), 0, 0, []
    for review in items:
        prompt = FEW_SHOT + "Review: " + review + "\nSentiment: "
        prompt_ids = tok(prompt).input_ids
        scores = []
        for label in LABELS:
            ids = tok(prompt + label, return_tensors="pt").input_ids
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            lp = logp[torch.arange(len(tgt)), tgt][_boundary(prompt_ids, ids[0].tolist()) - 1:]
            scores.append(lp.mean().item())
            requests, prefill = requests + 1, prefill + ids.shape[1]
        label = LABELS[max(range(len(LABELS)), key=scores.__getitem__)]
        ids = tok(prompt + label + "\nReason:", return_tensors="pt").input_ids
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                       pad_token_id=tok.pad_token_id)
        requests, prefill = requests + 1, prefill + ids.shape[1]
        labels.append(label)
    return Result("transformers loop", time.perf_counter() - t0, requests, prefill, labels)


@torch.inference_mode()
def hf_tree(model: Any, tok: Any, items: list[str], fanout: int) -> Result:
    t0, requests, prefill = time.perf_counter(), 0, 0

    def gen(text: str) -> str:
        nonlocal requests, prefill
        ids = tok(text, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                             min_new_tokens=16, pad_token_id=tok.pad_token_id)
        requests, prefill = requests + 1, prefill + ids.shape[1]
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    for topic in items:
        root = ROOT + topic + "\n"
        for i in range(fanout):
            plan = root + f"Plan {i + 1}:" + gen(root + f"Plan {i + 1}:")
            for j in range(fanout):
                gen(plan + f"\nStep {j + 1}:")
    return Result("transformers loop", time.perf_counter() - t0, requests, prefill)


def table(title: str, rows: list[Result]) -> str:
    base = rows[0]
    lines = [f"### {title}", "", "| system | wall s | vs DSL | requests | prefill tokens | vs DSL |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.system} | {r.wall_s:.2f} | {r.wall_s / base.wall_s:.2f}x | {r.requests} | "
                     f"{r.prefill_tokens} | {r.prefill_tokens / max(base.prefill_tokens, 1):.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--topics", type=int, default=4)
    ap.add_argument("--fanout", type=int, default=4)
    ap.add_argument("--threads", type=int, default=32, help="client threads for the independent calls")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the transformers loop")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    path = model_dir(args.arch, args.preset)
    items, tree_items = reviews(args.questions), topics(args.topics)
    few, tree = [], []

    with Engine(model_path=path, random_seed=0) as eng:
        # Warm up the engine (first forward passes allocate and compile nothing, but touch memory).
        eng.generate("warm up", {"max_new_tokens": 4})
        few.append(dsl_few_shot(eng, items))
        few.append(independent_few_shot(eng, items, "independent calls (cache on)", args.threads))
        tree.append(dsl_tree(eng, tree_items, args.fanout))
        tree.append(independent_tree(eng, tree_items, args.fanout, "independent calls (cache on)", args.threads))
    with Engine(model_path=path, random_seed=0, disable_radix_cache=True) as eng:
        eng.generate("warm up", {"max_new_tokens": 4})
        few.append(independent_few_shot(eng, items, "independent calls (no cache)", args.threads))
        tree.append(independent_tree(eng, tree_items, args.fanout, "independent calls (no cache)", args.threads))
    if not args.skip_hf:
        model = load_hf(path)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        few.append(hf_few_shot(model, tok, items))
        tree.append(hf_tree(model, tok, tree_items, args.fanout))

    print(f"model: {args.arch}-{args.preset} ({path}), torch threads {torch.get_num_threads()}")
    print(table(f"few-shot select ({args.questions} reviews, {len(LABELS)} labels, 16-token reason)", few))
    agree = {r.system: sum(a == b for a, b in zip(r.outputs, few[0].outputs)) for r in few[1:]}
    print(f"\nlabels agreeing with the DSL's: {agree} of {args.questions}\n")
    print(table(f"fork tree ({args.topics} topics, fan-out {args.fanout}, 2 levels, 16 tokens per node)", tree))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"few_shot": [r.__dict__ for r in few], "fork_tree": [r.__dict__ for r in tree]}, f, indent=2)


if __name__ == "__main__":
    main()
