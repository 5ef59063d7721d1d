"""KV cache namespaces (``cache_salt``, SGLang's ``extra_key``): requests of different namespaces never
share radix-tree nodes, host-tier copies or disk blocks; requests of one namespace share as before.
Tree level, the Engine, and (slow) every server door: /generate, the OpenAI routes and ZeroMQ."""

from __future__ import annotations

import random

import pytest
import torch

from radixlm.runtime.engine import Engine
from radixlm.runtime.generate_request import cache_namespace
from radixlm.runtime.kv_tiers import HiRadixCache, HostTier, KVCodec
from radixlm.runtime.memory_pool import KVPool
from radixlm.runtime.radix_cache import RadixCache

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


def _pool(total: int = 32) -> KVPool:
    return KVPool(total, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")


def _fill(cache: RadixCache, pool: KVPool, key: list[int], ns: str) -> int:
    m = cache.match_prefix(key, ns)
    have = len(m.indices)
    slots = pool.alloc(len(key) - have)
    value = torch.cat([m.indices, slots])
    dup = cache.insert(key, value, ns)
    pool.free(value[have:dup])
    return have


@pytest.mark.parametrize("hier", [False, True])
def test_namespaces_never_share_nodes_and_vanish_when_evicted(hier):
    pool = _pool()
    if hier:
        cache = HiRadixCache(pool, HostTier(pool, 64, KVCodec("none", pool.dtype)), "write_back")
    else:
        cache = RadixCache(pool)
    key = [5, 6, 7, 8, 9]
    assert _fill(cache, pool, key, "") == 0
    assert _fill(cache, pool, key, "tenant-a") == 0  # the shared tree's copy is not visible here
    assert _fill(cache, pool, key, "tenant-b") == 0
    assert _fill(cache, pool, key + [1], "tenant-a") == 5  # but its own is
    assert cache.namespaces() == ["", "tenant-a", "tenant-b"]
    a, b, shared = (cache.match_prefix(key, ns).indices for ns in ("tenant-a", "tenant-b", ""))
    assert len(set(a.tolist()) | set(b.tolist()) | set(shared.tolist())) == 15  # no slot in common
    assert len(cache.match_prefix(key, "tenant-c").indices) == 0
    assert pool.available() + cache.evictable_size() + cache.protected_size() == pool.size
    cache.evict(pool.size)
    assert pool.available() == pool.size
    if hier:  # still cached in the host tier, in its own namespace only
        assert cache.match_prefix(key, "tenant-a").host_len == 5
        assert cache.match_prefix(key, "tenant-c").host_len == 0
        cache.check()
        cache.reset()
    assert cache.namespaces() == []  # an emptied namespace leaves no node behind
    assert cache.evictable_size() == cache.protected_size() == 0


def test_cache_namespace_keeps_the_two_fields_apart_and_validates_them():
    assert cache_namespace(None, None) == cache_namespace("", "") == ""
    assert cache_namespace("a", None) != cache_namespace(None, "a")
    assert cache_namespace("a", "b") not in (cache_namespace("a", None), cache_namespace(None, "b"))
    with pytest.raises(ValueError, match="cache_salt"):
        cache_namespace(3, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extra_key"):
        cache_namespace(None, "x" * 5000)


@pytest.fixture(scope="module")
def eng(tiny_llama):
    with Engine(model_path=tiny_llama, dtype="float32", device="cpu") as e:
        yield e


def _prompt(seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def test_engine_same_salt_hits_other_salt_misses(eng):
    p = _prompt(1)
    first = eng.generate(input_ids=p, sampling_params=GREEDY, cache_salt="alice")
    other = eng.generate(input_ids=p, sampling_params=GREEDY, cache_salt="bob")
    plain = eng.generate(input_ids=p, sampling_params=GREEDY)
    again = eng.generate(input_ids=p, sampling_params=GREEDY, cache_salt="alice")
    extra = eng.generate(input_ids=p, sampling_params=GREEDY, extra_key="alice")  # a different field
    assert [o["meta_info"]["cached_tokens"] for o in (first, other, plain, extra)] == [0, 0, 0, 0]
    assert again["meta_info"]["cached_tokens"] == len(p) - 1
    assert len({tuple(o["output_ids"]) for o in (first, other, plain, again, extra)}) == 1


def test_engine_batch_takes_one_salt_per_prompt(eng):
    p = _prompt(2)
    eng.generate(input_ids=p, sampling_params=GREEDY, extra_key="k1")
    outs = eng.generate(input_ids=[p, p], sampling_params=GREEDY, extra_key=["k1", "k2"])
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [len(p) - 1, 0]
    with pytest.raises(ValueError, match="extra_key"):
        eng.generate(input_ids=[p, p], sampling_params=GREEDY, extra_key=["k1"])
    with pytest.raises(ValueError, match="cache_salt"):
        eng.generate(input_ids=p, sampling_params=GREEDY, cache_salt=["a"])


def test_disk_blocks_are_namespaced_across_restarts(tiny_llama, tmp_path):
    p = _prompt(3, 70)
    kw = dict(model_path=tiny_llama, dtype="float32", device="cpu", enable_hierarchical_cache=True,
              hicache_compression="none", hicache_storage_dir=str(tmp_path), hicache_storage_block_size=16)
    with Engine(**kw) as e:
        ref = e.generate(input_ids=p, sampling_params=GREEDY, cache_salt="alice")
    with Engine(**kw) as e:  # a restart: only the directory carries over
        bob = e.generate(input_ids=p, sampling_params=GREEDY, cache_salt="bob")
        shared = e.generate(input_ids=p, sampling_params=GREEDY)
        alice = e.generate(input_ids=p, sampling_params=GREEDY, cache_salt="alice")
        assert e.get_server_info()["scheduler_stats"]["hicache_disk_hit_tokens"] == 64
    assert bob["meta_info"]["cached_tokens"] == shared["meta_info"]["cached_tokens"] == 0
    assert alice["meta_info"]["cached_tokens"] == 64
    assert alice["output_ids"] == ref["output_ids"] == bob["output_ids"]


@pytest.mark.slow
def test_every_server_door_takes_the_namespace(tiny_llama):
    import openai
    import requests

    from radixlm.runtime.server import Runtime

    rt = Runtime(model_path=tiny_llama, device="cpu", dtype="float32", log_level="warning", log_interval_s=0.0)
    try:
        def native(body: dict) -> int:
            r = requests.post(rt.url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["meta_info"]["cached_tokens"]

        p = _prompt(4)
        body = {"input_ids": p, "sampling_params": GREEDY}
        assert native({**body, "cache_salt": "s1"}) == 0
        assert native({**body, "cache_salt": "s2"}) == 0
        assert native({**body, "cache_salt": "s1"}) == len(p) - 1
        assert native({**body, "extra_key": "s1"}) == 0
        r = requests.post(rt.url + "/generate", json={**body, "cache_salt": 7}, timeout=60)
        assert r.status_code == 400 and "cache_salt" in r.text

        oai = openai.OpenAI(base_url=rt.url + "/v1", api_key="none", max_retries=0, timeout=60)
        prompt = "the same long system prompt " * 6
        model = oai.models.list().data[0].id

        def completion(**extra) -> int:
            c = oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, extra_body=extra)
            return c.usage.prompt_tokens_details.cached_tokens

        assert completion(cache_salt="t1") == 0
        assert completion(cache_salt="t2") == 0
        assert completion(cache_salt="t1") > 0
        msgs = [{"role": "system", "content": prompt}, {"role": "user", "content": "hi"}]

        def chat(**extra) -> int:
            c = oai.chat.completions.create(model=model, messages=msgs, max_tokens=2, temperature=0, extra_body=extra)
            return c.usage.prompt_tokens_details.cached_tokens

        assert chat(extra_key="u1") == 0
        assert chat(extra_key="u2") == 0
        assert chat(extra_key="u1") > 0
        with pytest.raises(openai.BadRequestError, match="cache_salt"):
            chat(cache_salt=["not", "a", "string"])

        ep = rt.endpoint  # the ZeroMQ front door
        zbody = {"input_ids": _prompt(5), "sampling_params": GREEDY}
        assert ep.generate({**zbody, "cache_salt": "z1"})["meta_info"]["cached_tokens"] == 0
        assert ep.generate({**zbody, "cache_salt": "z2"})["meta_info"]["cached_tokens"] == 0
        assert ep.generate({**zbody, "cache_salt": "z1"})["meta_info"]["cached_tokens"] == 39
    finally:
        rt.shutdown()
