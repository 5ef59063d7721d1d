"""RadixAttention and scheduling: outputs independent of cache, chunking, pool size and policy."""

from __future__ import annotations

import pytest

from radixlm.runtime.engine import Engine
from radixlm.runtime.protocol import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs

SHARED = "You are a careful assistant. Answer briefly and precisely. Here are some examples first. "
PROMPTS = [SHARED + q for q in ["What is 2+2?", "Name a color.", "Spell cat.", "Count to three."]] + [
    "Unrelated prompt about the sea and the sky",
    "Another one: the quick brown fox",
    SHARED + "What is 2+2? And why?",
    "short",
]
SP = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_path(make_model):
    return make_model("llama")


@pytest.fixture(scope="module")
def reference(model_path):
    with Engine(model_path=model_path, dtype="float32", device="cpu", disable_radix_cache=True,
                chunked_prefill_size=-1, max_total_tokens=4096) as eng:
        outs = [o["output_ids"] for o in eng.generate(PROMPTS, SP)]
        eng.check_memory()
    return outs


def _run(model_path, **kw):
    eng = Engine(model_path=model_path, dtype="float32", device="cpu", debug_check_memory=True, **kw)
    try:
        # Twice: the second round hits whatever the first left in the cache.
        first = [o["output_ids"] for o in eng.generate(PROMPTS, SP)]
        second = [o["output_ids"] for o in eng.generate(PROMPTS[::-1], SP)][::-1]
        info = eng.get_server_info()["scheduler_stats"]
        eng.check_memory()
        flushed = eng.flush_cache()
        assert flushed["success"]
        info_after = eng.get_server_info()["scheduler_stats"]
        assert info_after["free_tokens"] == info_after["max_total_tokens"]
        return first, second, info
    finally:
        eng.shutdown()


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs", "lof", "random"])
@pytest.mark.parametrize("chunk", [8, 64, -1])
def test_outputs_identical_with_cache_chunking_and_policy(model_path, reference, policy, chunk):
    first, second, info = _run(
        model_path, schedule_policy=policy, chunked_prefill_size=chunk, max_total_tokens=4096
    )
    assert first == reference and second == reference
    assert info["cache_hit_rate"] > 0.3  # the second round is served from the tree


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs"])
def test_tiny_pool_forces_eviction_and_retraction(model_path, reference, policy):
    # About three requests' worth of KV: decode runs out, requests are retracted and finish later.
    first, second, info = _run(
        model_path, schedule_policy=policy, chunked_prefill_size=16, max_total_tokens=96, new_token_ratio=0.0
    )
    assert first == reference and second == reference
    assert info["num_retracted"] > 0


def test_cache_disabled_reports_no_hits(model_path, reference):
    first, second, info = _run(model_path, disable_radix_cache=True, max_total_tokens=4096)
    assert first == reference and second == reference
    assert info["cache_hit_rate"] == 0.0 and info["evictable_tokens"] == 0


def test_cached_tokens_and_in_batch_sharing(model_path):
    with Engine(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=4096,
                in_batch_prefix_threshold=8) as eng:
        outs = eng.generate(PROMPTS[:4], {"temperature": 0, "max_new_tokens": 2})
        # The shared prefix is computed once: one request pays for it, the others hit the cache.
        cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
        assert cached[0] == 0 and all(c >= 8 for c in cached[1:])
        info = eng.get_server_info()["scheduler_stats"]
        total = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        assert info["total_computed_prompt_tokens"] < total
        again = eng.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 2})
        assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
        eng.check_memory()


def test_flush_refused_while_running(model_path):
    args = ServerArgs(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=1024)
    sched = Scheduler(args)
    sched.add_request(TokenizedGenerateReq(rid="a", input_ids=[1, 5, 6, 7], sampling_params=SamplingParams(max_new_tokens=4)))
    ok, msg = sched.flush_cache()
    assert not ok and "running" in msg
    while sched.has_work():
        sched.step()
    ok, _ = sched.flush_cache()
    assert ok and sched.kv.kv_pool.available() == sched.max_total_tokens
    sched.check_memory()


def _starvation_steps(model_path, aging_steps: int, max_steps: int = 150) -> int | None:
    """Steps until a cache-cold request finishes behind a continuous stream of cache-hot ones."""
    args = ServerArgs(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=2048,
                      max_running_requests=2, lpm_aging_steps=aging_steps, schedule_policy="lpm")
    sched = Scheduler(args)
    tok = sched.tokenizer
    hot = tok(SHARED * 3).input_ids
    sp = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    sched.add_request(TokenizedGenerateReq(rid="warm", input_ids=hot + [7], sampling_params=sp))
    while sched.has_work():
        sched.step()
    sched.add_request(TokenizedGenerateReq(rid="cold", input_ids=tok("cold cold cold").input_ids, sampling_params=sp))
    done_at = None
    for step in range(max_steps):
        # Keep the queue full of hot requests: under pure LPM they always win.
        while len(sched.waiting) < 4:
            sched.add_request(TokenizedGenerateReq(rid=f"hot{step}-{len(sched.waiting)}", input_ids=hot + [step % 50 + 3],
                                                   sampling_params=sp))
        for out in sched.step():
            if out.rid == "cold" and out.finished:
                done_at = step
        if done_at is not None:
            break
    for r in list(sched.waiting) + list(sched.running):
        sched.abort_request(r.rid)
    sched.step()
    sched.check_memory()
    return done_at


def test_lpm_aging_bounds_the_wait_of_a_cold_request(model_path):
    bound = 8
    done = _starvation_steps(model_path, aging_steps=bound)
    # Admitted within `bound` steps of waiting, then at most 3 tokens (and a few decode steps) to finish.
    assert done is not None and done <= bound + 2 * 3 + 4
    # The control: without aging, pure LPM starves it for the whole run.
    assert _starvation_steps(model_path, aging_steps=10**9, max_steps=60) is None


def test_request_that_can_never_fit_is_rejected(model_path):
    with Engine(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=64) as eng:
        with pytest.raises(ValueError, match="max_total_tokens"):
            eng.generate("word " * 80, {"max_new_tokens": 4})
        out = eng.generate("fits", {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0})
        # Clipped to the pool: finishes with "length" instead of hanging.
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        eng.check_memory()
