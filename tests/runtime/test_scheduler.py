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


# ----------------------------------------------------------------------------- priority scheduling
def _prio_reqs(priorities):
    from radixlm.runtime.req import Req

    return [Req(rid=f"r{i}", input_ids=[1, 2, 3], sampling_params=SamplingParams(), priority=p, arrival=i)
            for i, p in enumerate(priorities)]


def test_priority_orders_admission_and_aging_stays_above_it():
    from radixlm.runtime.schedule_policy import Priority, SchedulePolicy

    reqs = _prio_reqs([None, 1, 5, 1, None])

    def order(priority, step=0, policy="fcfs"):
        pol = SchedulePolicy(policy, None, aging_steps=100, fallback_queue_len=128, priority=priority)
        return [r.rid for r in pol.order(list(reqs), step)]

    assert order(Priority()) == ["r0", "r1", "r2", "r3", "r4"]  # flag off: the field is ignored
    # SGLang's default: higher values first; ties keep the policy's order; no priority: after all others
    assert order(Priority(enabled=True)) == ["r2", "r1", "r3", "r0", "r4"]
    assert order(Priority(enabled=True, low_first=True)) == ["r1", "r3", "r2", "r0", "r4"]
    assert order(Priority(enabled=True, default=3)) == ["r2", "r0", "r4", "r1", "r3"]
    # within one priority, lof's order (longest max_new_tokens first) holds
    reqs[1].sampling_params = SamplingParams(max_new_tokens=500)
    reqs[3].sampling_params = SamplingParams(max_new_tokens=900)
    assert order(Priority(enabled=True), policy="lof") == ["r2", "r3", "r1", "r0", "r4"]
    # aging stays above priority: at step 100 r0 and r1 (arrived at 0 and 1) have waited 100 and 99 steps
    assert order(Priority(enabled=True), step=100) == ["r0", "r2", "r1", "r3", "r4"]


@pytest.mark.parametrize("enabled", [True, False])
def test_priority_admission_order_in_the_scheduler(model_path, enabled, caplog):
    """One request runs at a time (max_running_requests=1): with the flag requests finish in priority order
    (under the default lpm policy), without it in arrival order."""
    args = ServerArgs(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=2048,
                      max_running_requests=1, enable_priority_scheduling=enabled)
    sched = Scheduler(args)
    sp = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    for rid, prio, text in (("low", 0, "one two three"), ("high", 10, "four five six"), ("mid", 5, "seven eight"),
                            ("none", None, "nine ten")):
        sched.add_request(TokenizedGenerateReq(rid=rid, input_ids=sched.tokenizer(text).input_ids,
                                               sampling_params=sp, priority=prio))
    finished = []
    while sched.has_work():
        finished += [o.rid for o in sched.step() if o.finished]
    assert finished == (["high", "mid", "low", "none"] if enabled else ["low", "high", "mid", "none"])
    # Ignored without the flag, but not silently: one warning, at the first request that sent a priority.
    warnings = [r for r in caplog.records if "priority scheduling is off" in r.getMessage()]
    assert len(warnings) == (0 if enabled else 1)
    sched.check_memory()


def test_priority_refused_when_disabled_with_the_abort_flag(model_path):
    with Engine(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=2048,
                abort_on_priority_when_disabled=True) as eng:
        with pytest.raises(ValueError, match="^priority: "):
            eng.generate("hello", {"max_new_tokens": 2}, priority=3)
        assert eng.generate("hello", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] == 2
        eng.check_memory()
    with Engine(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=2048) as eng:
        # SGLang's default: without --enable-priority-scheduling a priority is accepted and has no effect
        assert eng.generate("hello", {"max_new_tokens": 2}, priority=3)["meta_info"]["completion_tokens"] == 2
        with pytest.raises(ValueError, match="priority"):
            eng.generate("hello", {"max_new_tokens": 2}, priority="high")
