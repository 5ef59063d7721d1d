"""Router logic without servers: the approximate prefix tree, the policies, routing keys, arguments,
and the trees' correction from worker summaries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from radixlm.router.args import RouterArgs, normalize_worker_url
from radixlm.router.policy import CacheAware, CacheAwareConfig, PowerOfTwo, RoundRobin, make_policy
from radixlm.router.prefix_tree import ApproxPrefixTree, common_prefix_len
from radixlm.router.request_key import chat_key, completion_key, generate_key, request_rids
from radixlm.router.workers import Worker


def test_common_prefix_len_across_chunks():
    a = "x" * 200 + "abc"
    assert common_prefix_len(a, "x" * 200 + "abd") == 202
    assert common_prefix_len(a, "x" * 10, start=5) == 10
    assert common_prefix_len("", "abc") == 0


def test_tree_match_insert_split_and_size():
    t = ApproxPrefixTree()
    assert t.insert("hello world") == 11
    assert t.match("hello there") == 6
    assert t.insert("hello there") == 5  # split at "hello "
    assert t.size == 16
    assert t.match("hello world!") == 11
    assert t.match("help") == 3
    assert t.insert("hello world") == 0
    assert t.match("zzz") == 0


def test_tree_evicts_least_recently_used_leaves_first():
    t = ApproxPrefixTree()
    t.insert("S" * 50 + "a" * 20)
    t.insert("S" * 50 + "b" * 20)
    t.insert("T" * 30)
    t.match("S" * 50 + "a")  # refresh the a-branch
    dropped = t.evict(25)
    assert dropped >= 25
    assert t.match("T" * 30) == 0 and t.match("S" * 50 + "b" * 20) == 50
    assert t.match("S" * 50 + "a" * 20) == 70
    assert t.size == 70
    t.evict(10**6)
    assert t.size == 0 and t.match("S") == 0


def test_tree_matches_a_random_reference():
    rng = random.Random(0)
    t, seen = ApproxPrefixTree(), []
    for _ in range(300):
        s = "".join(rng.choice("ab") for _ in range(rng.randint(1, 12)))
        best = max((common_prefix_len(s, x) for x in seen), default=0)
        assert t.match(s) == best, s
        t.insert(s)
        seen.append(s)


@dataclass
class _W:
    load: int = 0
    tree: ApproxPrefixTree = field(default_factory=ApproxPrefixTree)


def test_cache_aware_keeps_a_prefix_on_one_worker_and_spreads_groups():
    pol = CacheAware(CacheAwareConfig())
    ws = [_W(), _W()]
    homes = {}
    for g in range(8):
        for q in range(6):
            prompt = f"system prompt of group {g}: " + "context " * 20 + f"question {q}"
            d = pol.select(prompt, ws)
            homes.setdefault(g, set()).add(d.index)
    assert all(len(v) == 1 for v in homes.values())
    assert sorted(sum(1 for v in homes.values() if i in v) for i in range(2)) == [4, 4]  # miss → smallest tree


def test_cache_aware_balances_when_imbalanced_and_spreads_hot_prefixes():
    cfg = CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5, spread_threshold=100)
    ws = [_W(load=10), _W(load=1)]
    ws[0].tree.insert("shared prefix " * 10)
    d = CacheAware(cfg).select("shared prefix " * 10 + "q", ws)
    assert (d.index, d.reason) == (1, "imbalanced")
    # balanced by the thresholds, but the prefix's worker is past the spreading bound
    ws = [_W(load=8), _W(load=3)]
    ws[0].tree.insert("shared prefix " * 10)
    cfg = CacheAwareConfig(balance_abs_threshold=64, spread_threshold=8)
    d = CacheAware(cfg).select("shared prefix " * 10 + "q", ws)
    assert (d.index, d.reason) == (1, "spread")
    # now both hold it: the less loaded of the two gets the next one
    ws[1].load = 2
    d = CacheAware(cfg).select("shared prefix " * 10 + "r", ws)
    assert (d.index, d.reason) == (1, "cache_hit")


def test_cache_aware_threshold():
    ws = [_W(), _W()]
    ws[0].tree.insert("abcdefghij")
    ws[1].tree.insert("zzzzzzzzzzzzzzzzzzzzzzzzzz")
    assert CacheAware(CacheAwareConfig(cache_threshold=0.3)).select("abcd" + "x" * 6, ws).reason == "cache_hit"
    ws = [_W(), _W()]
    ws[0].tree.insert("abcdefghij")
    d = CacheAware(CacheAwareConfig(cache_threshold=0.5)).select("abcd" + "x" * 6, ws)
    assert (d.index, d.reason) == (1, "cache_miss")  # 40% match is below 0.5: the smaller tree


def test_round_robin_and_power_of_two():
    ws = [_W(), _W(), _W()]
    rr = RoundRobin()
    assert [rr.select("", ws).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    ws = [_W(load=5), _W(load=0)]
    p2 = PowerOfTwo(seed=1)
    assert all(p2.select("", ws).index == 1 for _ in range(10))
    with pytest.raises(ValueError, match="policy"):
        make_policy("nope")


def test_routing_keys_share_prefixes():
    assert generate_key({"text": ["abc", "abcd"]}) == "abc"
    assert generate_key({"input_ids": [1, 2, 3]}).endswith("1 2 3")
    assert generate_key({"input_ids": [[1, 2], [3]]}).endswith("1 2")
    assert completion_key({"prompt": "hi"}) == "hi"
    a = chat_key({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}]})
    b = chat_key({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "q2"}]}]})
    assert common_prefix_len(a, b) == len(a) - 1
    assert request_rids({"rid": "x"}) == ["x"] and request_rids({"rid": ["a", "b"]}) == ["a", "b"]
    assert request_rids({}) == []


@pytest.mark.parametrize("kwargs,fld", [
    ({"worker_urls": ("ftp://x",)}, "url"), ({"worker_urls": ("http://a:1", "http://a:1/")}, "worker_urls"),
    ({"policy": "lpm"}, "policy"), ({"cache_threshold": 1.5}, "cache_threshold"),
    ({"balance_rel_threshold": 0.5}, "balance_rel_threshold"), ({"health_check_interval_s": 0}, "health_check"),
    ({"balance_abs_threshold": -1}, "balance_abs_threshold"),
])
def test_router_args_are_validated(kwargs, fld):
    with pytest.raises(ValueError, match=fld):
        RouterArgs(**kwargs)


def test_worker_url_normalized():
    assert normalize_worker_url("http://h:1/") == "http://h:1"
    with pytest.raises(ValueError, match="url"):
        normalize_worker_url("http://h:1/v1")


def _info(prompt_tokens: int, cached: int, pid: int = 7) -> dict:
    return {"pids": {"scheduler": pid}, "scheduler_stats": {
        "total_prompt_tokens": prompt_tokens, "evictable_tokens": cached, "protected_tokens": 0}}


def test_worker_tree_is_trimmed_to_the_workers_cache_and_cleared_on_flush_or_restart():
    w = Worker("http://w:1")
    w.apply_info(_info(0, 0))
    assert w.healthy
    for g in range(10):  # 10 prompts of 400 characters, 100 tokens each: 4 characters per token
        key = f"{g}" * 400
        w.routed(key)
        w.tree.insert(key)
        w.finished(key, failed=False)
    w.apply_info(_info(1000, 1000))
    assert w.chars_per_token() == pytest.approx(4.0)
    assert w.tree.size == 4000  # the worker holds everything: nothing to trim
    w.apply_info(_info(1000, 300))  # it evicted 70%
    assert w.tree.size <= 1200 and w.tree.match("9" * 400) == 400  # the most recent prompts stay
    w.apply_info(_info(10, 10))  # counters went back: the cache was flushed
    assert w.tree.size == 0
    w.tree.insert("abc")
    w.apply_info(_info(20, 10, pid=8))  # a new scheduler process
    assert w.tree.size == 0


def test_dp_policies_are_the_routers_and_the_cli_has_a_router(capsys):
    from radixlm.router.policy import POLICIES
    from radixlm.runtime.cli import main
    from radixlm.runtime.server_args import DP_POLICIES, ServerArgs

    assert DP_POLICIES == POLICIES
    with pytest.raises(ValueError, match="load_balance_method"):
        ServerArgs(model_path="m", load_balance_method="shortest_queue")
    with pytest.raises(SystemExit) as e:
        main(["router", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--worker-urls", "--policy", "--cache-threshold", "--balance-abs-threshold",
                 "--balance-rel-threshold", "--spread-threshold"):
        assert flag in out
    with pytest.raises(SystemExit) as e:
        main(["router", "--worker-urls", "nowhere"])
    assert e.value.code == 2 and "url" in capsys.readouterr().err


def test_trees_are_bounded_without_summaries():
    import httpx

    from radixlm.router.workers import WorkerSet

    ws = WorkerSet(("http://w:1",), httpx.AsyncClient(), {}, 1.0, 1, max_tree_chars=1000)
    tree = ws.workers["http://w:1"].tree
    for i in range(30):
        tree.insert(f"{i:02d}" * 50)
    ws.bound_trees()
    assert tree.size <= 900 and tree.match("29" * 50) == 100


def test_a_refused_check_takes_a_worker_out_at_once_a_timeout_counts_to_the_threshold():
    import asyncio

    import httpx

    from radixlm.router.workers import WorkerSet

    failure: list[Exception] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if failure:
            raise failure[0]
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json=_info(0, 0))

    async def run() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        ws = WorkerSet(("http://w:1",), client, {}, 1.0, 3, max_tree_chars=1000)
        w = ws.workers["http://w:1"]
        assert await ws.check(w) and w.available
        failure.append(httpx.ReadTimeout("slow"))  # a busy worker: one strike of three
        assert not await ws.check(w) and w.available and not w.dead.is_set()
        assert not await ws.check(w) and w.available
        failure[0] = httpx.ConnectError("refused")  # nothing listens: out now
        assert not await ws.check(w)
        assert not w.available and w.dead.is_set() and "ConnectError" in w.last_error
        failure.clear()
        assert await ws.check(w) and w.available  # back when it answers again
        await client.aclose()

    asyncio.run(run())


def test_dp_replicas_get_their_own_port_devices_and_rendezvous():
    from radixlm.runtime.distributed.data_parallel import replica_args
    from radixlm.runtime.server_args import ServerArgs

    a = ServerArgs(model_path="m", dp_size=3, tp_size=2, base_gpu_id=1, host="0.0.0.0", port=8000,
                   dist_init_addr="127.0.0.1:29500", api_key="k")
    reps = [replica_args(a, i, 9000 + i) for i in range(3)]
    assert [r.base_gpu_id for r in reps] == [1, 3, 5]  # tp ranks of replica i: base + i * tp_size ...
    assert all(r.dp_size == 1 and r.tp_size == 2 and r.host == "127.0.0.1" for r in reps)
    assert [r.port for r in reps] == [9000, 9001, 9002]
    assert all(r.dist_init_addr is None for r in reps)  # each picks its own free rendezvous port
    assert all(r.api_key == "k" for r in reps)  # the front door passes the client's key on
