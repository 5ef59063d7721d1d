"""KV tiers end to end: greedy outputs are identical whether a prefix came from the device pool, the
host tier, disk or was recomputed (float32, lossless tiers); the compressed tier's error is bounded;
a restart with the same directory serves cached prefixes from disk; torn blocks are misses."""

from __future__ import annotations

import random

import pytest

from radixlm.runtime.engine import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def _prompts(vocab: int, n_prefixes: int = 3, per: int = 3, prefix_len: int = 48, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_prefixes):
        prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
        out += [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))] for _ in range(per)]
    return out


def _engine(path, **kw) -> Engine:
    return Engine(model_path=path, dtype="float32", device="cpu", **kw)


def _run(eng: Engine, prompts, sp=GREEDY, **kw) -> list[dict]:
    """One request at a time, so later ones find earlier prefixes in whatever tier they went to."""
    return [eng.generate(input_ids=p, sampling_params=sp, **kw) for p in prompts]


@pytest.fixture(scope="module")
def vocab(tiny_llama) -> int:
    import json
    import os

    with open(os.path.join(tiny_llama, "config.json")) as f:
        return json.load(f)["vocab_size"]


@pytest.fixture(scope="module")
def reference(tiny_llama, vocab):
    """Each group of prompts sharing a prefix, then a revisit that alternates between the groups (so in
    a small pool each revisit finds its prefix evicted); outputs computed from scratch (no cache)."""
    prompts = _prompts(vocab)
    revisit = [prompts[g * 3 + i] for i in range(3) for g in range(3)]
    with _engine(tiny_llama, disable_radix_cache=True) as eng:
        outs = _run(eng, prompts + revisit, return_logprob=True)
        eng.check_memory()
    return prompts + revisit, outs


def _same(outs, ref) -> None:
    for o, r in zip(outs, ref):
        assert o["output_ids"] == r["output_ids"]
        for (a, _, _), (b, _, _) in zip(o["meta_info"]["output_token_logprobs"], r["meta_info"]["output_token_logprobs"]):
            assert abs(a - b) < 1e-4


@pytest.fixture
def small_pool_hicache(tiny_llama):
    # The pool holds ~1.5 prompts: every revisit finds its prefix in the host tier, not on the device.
    with _engine(
        tiny_llama, max_total_tokens=96, enable_hierarchical_cache=True, hicache_compression="none", hicache_ratio=8
    ) as eng:
        yield eng


def test_host_tier_hits_are_token_identical_to_recomputing(small_pool_hicache, reference):
    prompts, ref = reference
    outs = _run(small_pool_hicache, prompts, return_logprob=True)
    _same(outs, ref)
    stats = small_pool_hicache.get_server_info()["scheduler_stats"]
    assert stats["hicache_host_hit_tokens"] >= 9 * 48
    assert all(o["meta_info"]["cached_tokens"] >= 48 for o in outs[9:])  # every revisit hit


@pytest.mark.parametrize("policy", ["write_back", "write_through_selective"])
def test_write_policies_give_identical_outputs(tiny_llama, reference, policy):
    prompts, ref = reference
    with _engine(
        tiny_llama, max_total_tokens=96, enable_hierarchical_cache=True, hicache_compression="none",
        hicache_write_policy=policy,
    ) as eng:
        outs = _run(eng, prompts, return_logprob=True)
        _same(outs, ref)
        assert eng.get_server_info()["scheduler_stats"]["hicache_host_hit_tokens"] > 0
        eng.check_memory()


def test_no_host_tier_recomputes_what_the_small_pool_evicted(tiny_llama, reference):
    """The same pool without the hierarchy: the revisits miss (so the test above measures the tier)."""
    prompts, ref = reference
    with _engine(tiny_llama, max_total_tokens=96) as eng:
        outs = _run(eng, prompts, return_logprob=True)
        _same(outs, ref)
        eng.check_memory()
    assert all(o["meta_info"]["cached_tokens"] < 48 for o in outs[9:])


def test_compressed_host_tier_error_is_small(tiny_llama, vocab):
    """int8 and fp8 tiers change K/V slightly: teacher-forced logprobs of a continuation scored behind a
    prefix loaded from the compressed tier stay close to the lossless ones (the benchmark reports them)."""
    rng = random.Random(5)
    prefix = [rng.randrange(3, vocab) for _ in range(64)]
    cont = [rng.randrange(3, vocab) for _ in range(16)]
    filler = [[rng.randrange(3, vocab) for _ in range(80)] for _ in range(2)]
    sp = {"temperature": 0, "max_new_tokens": 1}

    def score(**kw) -> tuple[list[float], dict]:
        with _engine(tiny_llama, max_total_tokens=100, enable_hierarchical_cache=True, hicache_ratio=4, **kw) as eng:
            eng.generate(input_ids=prefix, sampling_params=sp)
            for f in filler:  # push the prefix out of the device pool into the host tier
                eng.generate(input_ids=f, sampling_params=sp)
            out = eng.generate(input_ids=prefix + cont, sampling_params=sp, return_logprob=True, logprob_start_len=65)
            eng.check_memory()
            return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]], out["meta_info"]

    exact, meta = score(hicache_compression="none")
    assert meta["cached_tokens"] == 64
    for codec, bound in (("int8", 0.05), ("fp8", 0.3)):
        lossy, meta = score(hicache_compression=codec)
        assert meta["cached_tokens"] == 64
        delta = max(abs(a - b) for a, b in zip(exact, lossy))
        assert 0 < delta < bound, (codec, delta)  # > 0: the tier really is lossy and really was used


def test_restart_serves_the_prefix_from_disk(tiny_llama, vocab, tmp_path):
    rng = random.Random(7)
    prompt = [rng.randrange(3, vocab) for _ in range(70)]
    kw = dict(enable_hierarchical_cache=True, hicache_compression="none", hicache_storage_dir=str(tmp_path),
              hicache_storage_block_size=16)
    with _engine(tiny_llama, disable_radix_cache=True) as cold_eng:
        cold = cold_eng.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
    with _engine(tiny_llama, **kw) as eng:
        first = eng.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
        assert first["meta_info"]["cached_tokens"] == 0
        eng.check_memory()
    # A new process would do the same: nothing survives in memory, the directory is all it has.
    with _engine(tiny_llama, **kw) as eng:
        again = eng.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
        eng.check_memory()
        assert eng.get_server_info()["scheduler_stats"]["hicache_disk_hit_tokens"] == 64
    assert again["meta_info"]["cached_tokens"] == 64  # 4 whole blocks of 16 (the 70th token is computed)
    _same([first, again], [cold, cold])


def test_torn_block_on_disk_is_a_miss_and_outputs_stay_exact(tiny_llama, vocab, tmp_path):
    rng = random.Random(8)
    prompt = [rng.randrange(3, vocab) for _ in range(70)]
    kw = dict(enable_hierarchical_cache=True, hicache_compression="none", hicache_storage_dir=str(tmp_path),
              hicache_storage_block_size=16)
    with _engine(tiny_llama, **kw) as eng:
        cold = eng.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
    blocks = sorted(tmp_path.rglob("*.kv"), key=lambda p: p.stat().st_mtime_ns)
    assert len(blocks) == 4
    from radixlm.runtime.kv_tiers.disk_tier import MAGIC

    # Tear the third block: keep its header, lose half of the payload.
    with _engine(tiny_llama, **kw) as eng:
        names = eng.scheduler.cache.disk.chain(prompt, 4)
        torn = eng.scheduler.cache.disk.path(names[2])
        raw = torn.read_bytes()
        assert raw.startswith(MAGIC)
        torn.write_bytes(raw[: len(raw) // 2])
        out = eng.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
        eng.check_memory()
        stats = eng.get_server_info()["scheduler_stats"]
    assert out["meta_info"]["cached_tokens"] == 32 and stats["hicache_storage_corrupt"] == 1
    _same([out], [cold])


def test_hicache_settings_are_validated_by_name(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="hicache_write_policy"):
        _engine(tiny_llama, enable_hierarchical_cache=True, hicache_write_policy="write_sometimes")
    with pytest.raises(ValueError, match="hicache_storage_backend"):
        _engine(tiny_llama, enable_hierarchical_cache=True, hicache_storage_backend="mooncake")
    with pytest.raises(ValueError, match="hicache_storage_dir"):
        _engine(tiny_llama, enable_hierarchical_cache=True, hicache_storage_backend="file")
    with pytest.raises(ValueError, match="enable_hierarchical_cache"):
        _engine(tiny_llama, hicache_storage_dir=str(tmp_path))
    with pytest.raises(ValueError, match="hicache_ratio"):
        _engine(tiny_llama, enable_hierarchical_cache=True, hicache_ratio=0)
    with pytest.raises(ValueError, match="enable_hierarchical_cache.*tp_size"):
        _engine(tiny_llama, enable_hierarchical_cache=True, tp_size=2)


@pytest.mark.slow
def test_admission_counts_the_tier_load_and_defers_a_load_that_cannot_fit(tiny_llama, vocab):
    """A host-tier hit needs device slots for the whole load: while a long request holds the pool, a
    request whose 64-token load does not fit waits untouched (nothing is loaded or evicted for it), then
    is admitted with the hit once the pool frees, and its output is exact."""
    from radixlm.runtime.protocol import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.scheduler import Scheduler
    from radixlm.runtime.server_args import ServerArgs

    rng = random.Random(11)
    prefix = [rng.randrange(3, vocab) for _ in range(64)]
    tail = [rng.randrange(3, vocab) for _ in range(8)]
    long_prompt = [rng.randrange(3, vocab) for _ in range(70)]
    fillers = [[rng.randrange(3, vocab) for _ in range(80)] for _ in range(2)]
    with _engine(tiny_llama, disable_radix_cache=True) as eng:
        ref = eng.generate(input_ids=prefix + tail, sampling_params=GREEDY)
    args = ServerArgs(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=160,
                      enable_hierarchical_cache=True, hicache_compression="none", hicache_ratio=4)
    sched = Scheduler(args)

    def run(rid: str, ids: list[int], max_new: int = 1) -> None:
        sp = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True)
        sched.add_request(TokenizedGenerateReq(rid=rid, input_ids=ids, sampling_params=sp))

    def drain() -> dict:
        outs: dict = {}
        while sched.has_work():
            for o in sched.step():
                outs.setdefault(o.rid, []).extend(o.new_token_ids)
        return outs

    run("p", prefix)
    drain()
    for i, f in enumerate(fillers):  # push the prefix out of the device pool (it stays in the host tier)
        run(f"f{i}", f)
        drain()
    assert sched.cache.match_prefix(prefix).host_len == 64
    run("long", long_prompt, max_new=60)
    for _ in range(3):
        sched.step()
    run("hit", prefix + tail, max_new=8)
    outs: dict = {}
    while any(r.rid == "long" for r in sched.running):
        for o in sched.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
        stats = sched.get_stats()
        assert any(r.rid == "hit" for r in sched.waiting), "admitted although its load could not fit"
        assert stats["hicache_host_hit_tokens"] == 0  # nothing was loaded for a request that waits
    assert sched.get_stats()["hicache_load_deferred"] > 0
    hit_req = next(r for r in sched.waiting if r.rid == "hit")
    for rid, toks in drain().items():
        outs.setdefault(rid, []).extend(toks)
    stats = sched.get_stats()
    assert hit_req.cached_tokens == 64 and stats["hicache_host_hit_tokens"] == 64
    assert stats["hicache_loaded_tokens"] == 64
    assert outs["hit"] == ref["output_ids"]
    sched.check_memory()
    sched.close()


def test_a_leaked_host_slot_fails_the_invariant_checked_at_shutdown(tiny_llama):
    """conftest checks every Engine at shutdown; the check covers the host tier, not just the pool."""
    eng = _engine(tiny_llama, enable_hierarchical_cache=True, max_total_tokens=96)
    eng.generate(input_ids=list(range(3, 40)), sampling_params=GREEDY)
    eng._call(lambda: eng.scheduler.cache.host.alloc(2))  # two host slots nobody owns
    with pytest.raises(AssertionError, match="host tier leak"):
        eng.shutdown()
    assert not eng._thread.is_alive()  # shut down all the same


def _disk_kw(tmp_path, **kw) -> dict:
    return dict(enable_hierarchical_cache=True, hicache_compression="none", hicache_storage_dir=str(tmp_path),
                hicache_storage_block_size=16, **kw)


@pytest.mark.slow
def test_two_engines_share_one_disk_directory(tiny_llama, vocab, tmp_path):
    """Two replicas write the same directory at once (same prefixes, racing on the same blocks); a third
    that starts afterwards serves every prefix from it, no block torn, outputs exact."""
    import threading

    prompts = _prompts(vocab, n_prefixes=2, per=4, prefix_len=64, seed=3)
    with _engine(tiny_llama, disable_radix_cache=True) as eng:
        ref = _run(eng, prompts, return_logprob=True)
    a, b = _engine(tiny_llama, **_disk_kw(tmp_path)), _engine(tiny_llama, **_disk_kw(tmp_path))
    try:
        outs: dict = {}
        threads = [threading.Thread(target=lambda e=e, i=i: outs.__setitem__(i, _run(e, prompts, return_logprob=True)))
                   for i, e in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        _same(outs[0], ref)
        _same(outs[1], ref)
    finally:
        a.shutdown()
        b.shutdown()
    with _engine(tiny_llama, **_disk_kw(tmp_path)) as c:
        again = _run(c, prompts, return_logprob=True)
        stats = c.get_server_info()["scheduler_stats"]
    assert stats["hicache_storage_corrupt"] == 0 and stats["hicache_disk_hit_tokens"] >= 2 * 64
    assert all(o["meta_info"]["cached_tokens"] >= 64 for o in again)
    _same(again, ref)


@pytest.mark.slow
def test_disk_directory_is_bounded_and_keeps_the_recent_prefixes(tiny_llama, vocab, tmp_path):
    rng = random.Random(9)
    prompts = [[rng.randrange(3, vocab) for _ in range(36)] for _ in range(6)]  # 2 whole blocks each
    with _engine(tiny_llama, **_disk_kw(tmp_path / "probe")) as eng:
        eng.generate(input_ids=prompts[0], sampling_params=GREEDY)
        eng.scheduler.cache.disk.flush()
        block_bytes = eng.get_server_info()["scheduler_stats"]["hicache_storage_bytes"] / 2
    bound = block_bytes * 5.5  # room for under three prompts
    kw = _disk_kw(tmp_path / "d", hicache_storage_size_gb=bound / (1 << 30))
    with _engine(tiny_llama, **kw) as eng:
        _run(eng, prompts)
        eng.scheduler.cache.disk.flush()
        stats = eng.get_server_info()["scheduler_stats"]
    assert stats["hicache_storage_evicted"] >= 6
    assert sum(p.stat().st_size for p in (tmp_path / "d").rglob("*.kv")) <= bound
    with _engine(tiny_llama, **kw) as eng:  # after a restart: the newest prefix is there, the oldest not
        newest = eng.generate(input_ids=prompts[-1], sampling_params=GREEDY)
        oldest = eng.generate(input_ids=prompts[0], sampling_params=GREEDY)
    assert newest["meta_info"]["cached_tokens"] == 32 and oldest["meta_info"]["cached_tokens"] == 0


@pytest.mark.slow
def test_a_step_loads_at_most_max_prefill_tokens_from_the_tiers(tiny_llama, vocab):
    """Two requests with 64-token host hits and max_prefill_tokens 80: the first load is the step's
    first admission and goes; the second would exceed the step's load budget and waits one step."""
    from radixlm.runtime.protocol import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.scheduler import Scheduler
    from radixlm.runtime.server_args import ServerArgs

    rng = random.Random(12)
    prefixes = [[rng.randrange(3, vocab) for _ in range(64)] for _ in range(2)]
    filler = [rng.randrange(3, vocab) for _ in range(150)]
    args = ServerArgs(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=200,
                      max_prefill_tokens=80, enable_hierarchical_cache=True, hicache_compression="none",
                      hicache_ratio=4)
    sched = Scheduler(args)
    sp = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)

    def drain() -> None:
        while sched.has_work():
            sched.step()

    for i, ids in enumerate(prefixes + [filler]):  # the filler pushes both prefixes to the host tier
        sched.add_request(TokenizedGenerateReq(rid=f"w{i}", input_ids=ids, sampling_params=sp))
        drain()
    assert [sched.cache.match_prefix(p).host_len for p in prefixes] == [64, 64]
    sp8 = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    for i, p in enumerate(prefixes):
        sched.add_request(TokenizedGenerateReq(rid=f"h{i}", input_ids=p + [5, 6], sampling_params=sp8))
    sched.step()
    assert [r.rid for r in sched.running] == ["h0"] and sched.get_stats()["hicache_loaded_tokens"] == 64
    sched.step()
    assert {r.rid for r in sched.running} == {"h0", "h1"} and sched.get_stats()["hicache_loaded_tokens"] == 128
    drain()
    sched.check_memory()
    sched.close()
