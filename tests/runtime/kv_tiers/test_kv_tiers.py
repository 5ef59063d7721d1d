"""KV tiers at the tree level: codecs, the host tier behind the radix tree, the disk tier's crash safety.

The device pool's K/V rows are filled with a deterministic function of each token's whole prefix, so
any slot mix-up anywhere in the tiers shows up as wrong K/V, not just as a wrong count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixlm.runtime.kv_tiers import DiskTier, HiRadixCache, HostTier, KVCodec
from radixlm.runtime.kv_tiers.pool_io import gather_kv, scatter_kv
from radixlm.runtime.memory_pool import KVPool

TOTAL = 24
LAYERS, HEADS, DIM = 2, 2, 4


def _pool(total: int = TOTAL, dtype=torch.float32) -> KVPool:
    return KVPool(total, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, dtype=dtype, device="cpu")


def _rows(key: list[int], start: int, end: int) -> torch.Tensor:
    """Expected K/V [L, 2, end - start, H, D] for positions start..end-1 of ``key``."""
    out = torch.empty(LAYERS, 2, end - start, HEADS, DIM)
    for i in range(start, end):
        h = 0
        for t in key[: i + 1]:
            h = (h * 131 + t + 7) % 100003
        g = torch.Generator().manual_seed(h)
        out[:, :, i - start] = torch.randn(LAYERS, 2, HEADS, DIM, generator=g)
    return out


def _hicache(policy: str = "write_through", host_tokens: int = 40, codec: str = "none", disk=None):
    pool = _pool()
    host = HostTier(pool, host_tokens, KVCodec(codec, pool.dtype))
    return pool, HiRadixCache(pool, host, policy, disk)


def _admit(pool, cache, key, max_load=1 << 30):
    """What KVManager.admit + a forward do: match, load from the tiers, compute the rest, insert."""
    m = cache.match_prefix(key)
    m = cache.load_back(m, max_load)
    if m.host_len == 0:
        m = cache.load_from_disk(key, m, max_load)
    have = len(m.indices)
    cache.inc_lock_ref(m.last_node)
    need = len(key) - have
    if need > pool.available():
        cache.evict(need - pool.available())
    slots = pool.alloc(need)
    if slots is None:
        cache.dec_lock_ref(m.last_node)
        return None
    scatter_kv(pool, slots, _rows(key, have, len(key)))
    value = torch.cat([m.indices, slots])
    n_dup = cache.insert(key, value)
    assert n_dup >= have
    pool.free(value[have:n_dup])
    cache.dec_lock_ref(m.last_node)
    return have


def _assert_kv(pool, cache, key) -> int:
    """Load key's cached prefix to the device and compare its K/V with the expected rows."""
    m = cache.load_back(cache.match_prefix(key), 1 << 30)
    n = len(m.indices)
    if n:
        torch.testing.assert_close(gather_kv(pool, m.indices), _rows(key, 0, n), rtol=0, atol=0)
    return n


def _check(pool, cache) -> None:
    cache.check()
    assert pool.available() + cache.evictable_size() + cache.protected_size() == TOTAL


# ---------------------------------------------------------------------------- codecs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossless_codec_is_bit_exact(dtype):
    x = torch.randn(3, 2, 5, 2, 8).to(dtype)
    codec = KVCodec("none", dtype)
    data, scale = codec.encode(x)
    assert scale is None and torch.equal(codec.decode(data, scale), x)


@pytest.mark.parametrize("name,rel", [("int8", 1 / 127), ("fp8", 1 / 8)])
def test_quantized_codec_error_is_bounded_per_block(name, rel):
    x = torch.randn(4, 2, 16, 2, 64) * torch.logspace(-3, 2, 16).view(1, 1, 16, 1, 1)  # very different scales
    codec = KVCodec(name, torch.float32)
    data, scale = codec.encode(x)
    y = codec.decode(data, scale)
    amax = x.abs().amax(-1, keepdim=True)
    # Per-block scales: each row's error is relative to its own absmax, whatever the other rows hold.
    assert ((y - x).abs() <= amax * rel + 1e-12).all()
    assert torch.equal(codec.decode(*codec.encode(torch.zeros(2, 8))), torch.zeros(2, 8))


def test_compressed_tier_holds_several_times_more_tokens_in_the_same_bytes():
    pool = KVPool(8, num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu")
    nbytes = 1 << 20
    lossless = HostTier.tokens_for_bytes(pool, KVCodec("none", torch.float32), nbytes)
    int8 = HostTier.tokens_for_bytes(pool, KVCodec("int8", torch.float32), nbytes)
    fp8 = HostTier.tokens_for_bytes(pool, KVCodec("fp8", torch.float32), nbytes)
    assert int8 >= 3.5 * lossless and fp8 >= 3.5 * lossless


def test_unknown_codec_is_rejected_by_name():
    with pytest.raises(ValueError, match="hicache_compression"):
        KVCodec("int4", torch.float32)


# ---------------------------------------------------------------------------- host tier + tree
def test_evicted_node_keeps_its_tokens_and_loads_back_exactly():
    pool, cache = _hicache("write_back")
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]
    assert _admit(pool, cache, a) == 0
    assert cache.evict(TOTAL) == 8  # write_back: copied to the host on eviction
    assert pool.available() == TOTAL and cache.host_held() == 8
    m = cache.match_prefix(a)
    assert len(m.indices) == 0 and m.host_len == 8 and m.total_len == 8
    assert _admit(pool, cache, b) == 3  # the shared [1, 2, 3] came back from the host tier
    assert _assert_kv(pool, cache, a) == 8 and _assert_kv(pool, cache, b) == len(b)
    assert cache.host_hit_tokens == 8
    _check(pool, cache)


def test_device_pool_smaller_than_the_working_set_is_served_from_the_host():
    pool, cache = _hicache("write_through", host_tokens=64)
    prompts = [[7, s] + [s * 10 + i for i in range(10)] for s in range(4)]  # 4 x 12 tokens > 24 slots
    for p in prompts:
        _admit(pool, cache, p)
        _check(pool, cache)
    for p in prompts:  # every one is a full hit again, from one tier or the other
        assert _admit(pool, cache, p) == len(p)
        assert _assert_kv(pool, cache, p) == len(p)
        _check(pool, cache)


def test_host_tier_full_drops_lru_and_never_serves_wrong_kv():
    pool, cache = _hicache("write_back", host_tokens=12)
    prompts = [[s] + list(range(100 + 10 * s, 110 + 10 * s)) for s in range(6)]
    for p in prompts:
        _admit(pool, cache, p)
    _check(pool, cache)
    assert cache.host_held() <= 12
    hits = [_assert_kv(pool, cache, p) for p in prompts]
    assert hits[-1] == len(prompts[-1]) and hits[0] == 0  # LRU: the oldest went, the newest stayed
    _check(pool, cache)


def test_load_back_respects_the_budget_and_splits():
    pool, cache = _hicache("write_back")
    key = list(range(1, 21))
    _admit(pool, cache, key)
    cache.evict(TOTAL)
    m = cache.load_back(cache.match_prefix(key), 7)
    assert len(m.indices) == 7 and m.host_len == 13
    torch.testing.assert_close(gather_kv(pool, m.indices), _rows(key, 0, 7), rtol=0, atol=0)
    _check(pool, cache)


def test_write_through_copies_to_the_host_when_a_node_enters_the_tree():
    pool, cache = _hicache("write_through", host_tokens=64)
    key = list(range(1, 11))
    _admit(pool, cache, key)
    assert cache.host_held() == 10 and cache.host.num_backed_up == 10  # at insert, before any eviction
    assert cache.evict(TOTAL) == 10
    assert cache.host.num_backed_up == 10  # eviction copies nothing: the copy already exists
    assert cache.match_prefix(key).host_len == 10 and _assert_kv(pool, cache, key) == 10
    _check(pool, cache)


def test_write_through_selective_copies_only_nodes_hit_twice():
    pool, cache = _hicache("write_through_selective", host_tokens=64)
    hot, cold = [5, 6, 7, 8, 9, 10], [20, 21, 22, 23]
    _admit(pool, cache, hot)
    _admit(pool, cache, cold)
    assert cache.host_held() == 0  # one hit each (their creation): nothing copied yet
    _admit(pool, cache, hot + [11, 12])  # the second hit of the hot prefix backs it up
    assert cache.host_held() == 6
    cache.evict(TOTAL)
    # The cold node had no copy: eviction drops it (SGLang: only write_back copies on eviction).
    assert cache.match_prefix(cold).total_len == 0
    assert cache.match_prefix(hot + [11, 12]).host_len == 6
    assert _assert_kv(pool, cache, hot) == 6
    _check(pool, cache)


def test_write_back_copies_to_the_host_only_on_eviction():
    pool, cache = _hicache("write_back", host_tokens=64)
    key = list(range(40, 52))
    for _ in range(3):  # hits do not copy under write_back
        _admit(pool, cache, key)
    assert cache.host_held() == 0 and cache.host.num_backed_up == 0
    assert cache.evict(5) >= 5
    assert cache.host.num_backed_up == cache.host_held() == 12
    assert cache.match_prefix(key).host_len == 12 and _assert_kv(pool, cache, key) == 12
    _check(pool, cache)


def test_reset_frees_every_tier():
    pool, cache = _hicache("write_through")
    _admit(pool, cache, list(range(30, 50)))
    cache.evict(5)
    cache.reset(free_slots=True)
    assert pool.available() == TOTAL and cache.host.available() == cache.host.size
    _check(pool, cache)


_keys = st.lists(st.integers(0, 3), min_size=1, max_size=14)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), _keys),
        st.tuples(st.just("verify"), _keys),
        st.tuples(st.just("lock"), _keys),
        st.tuples(st.just("unlock"), st.integers(0, 100)),
        st.tuples(st.just("evict"), st.integers(1, 30)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["write_through", "write_through_selective", "write_back"]), st.integers(0, 40), _ops)
def test_hierarchy_never_loses_a_slot_or_serves_wrong_kv(policy, host_tokens, ops):
    pool, cache = _hicache(policy, host_tokens=host_tokens)
    inserted: set[tuple[int, ...]] = set()
    locked = []
    for op, arg in ops:
        if op == "admit":
            if _admit(pool, cache, arg) is not None:
                inserted.update(tuple(arg[:i]) for i in range(1, len(arg) + 1))
        elif op == "verify":
            n = _assert_kv(pool, cache, arg)
            assert n == 0 or tuple(arg[:n]) in inserted
        elif op == "lock":
            m = cache.load_back(cache.match_prefix(arg), 1 << 30)
            cache.inc_lock_ref(m.last_node)
            locked.append((m.last_node, list(arg[: len(m.indices)])))
        elif op == "unlock" and locked:
            node, _ = locked.pop(arg % len(locked))
            cache.dec_lock_ref(node)
        elif op == "evict":
            cache.evict(arg)
            for _, prefix in locked:  # locked prefixes stay on the device
                assert len(cache.match_prefix(prefix).indices) == len(prefix)
        _check(pool, cache)
    for node, _ in locked:
        cache.dec_lock_ref(node)
    cache.evict(TOTAL)
    assert pool.available() == TOTAL
    cache.reset(free_slots=True)
    assert cache.host.available() == cache.host.size
    _check(pool, cache)


# ---------------------------------------------------------------------------- disk tier
def _disk(path, identity="model-a", codec="none", block=4, max_bytes=1 << 30, rescan_s=2.0) -> DiskTier:
    return DiskTier(str(path), identity, KVCodec(codec, torch.float32), (LAYERS, HEADS, DIM), block, max_bytes,
                    rescan_s=rescan_s)


def _write(disk: DiskTier, key: list[int]) -> None:
    for s, e, name in disk.missing_blocks(key):
        disk.write_async(name, key[s:e], _rows(key, s, e))
    disk.flush()


def test_disk_blocks_round_trip_and_are_keyed_by_prefix_model_and_namespace(tmp_path):
    key = list(range(50, 63))  # 3 whole blocks of 4 + 1 token
    d = _disk(tmp_path)
    _write(d, key)
    assert d.writes == 3
    rows = d.read_run(key, 0, len(key))
    torch.testing.assert_close(rows, _rows(key, 0, 12), rtol=0, atol=0)
    torch.testing.assert_close(d.read_run(key, 5, 9), _rows(key, 5, 8), rtol=0, atol=0)  # a block's tail
    assert d.read_run([0] + key[1:], 0, 12) is None  # another prefix: another chain
    assert d.read_run(key, 0, 12, namespace="tenant-b") is None  # another namespace
    assert _disk(tmp_path, identity="model-b").read_run(key, 0, 12) is None  # another model
    assert _disk(tmp_path, codec="int8").read_run(key, 0, 12) is None  # another codec
    d.close()


def test_truncated_or_corrupt_block_is_a_miss_and_is_rewritten(tmp_path):
    key = list(range(10, 22))
    d = _disk(tmp_path)
    _write(d, key)
    names = d.chain(key, 3)
    p1, p2 = d.path(names[1]), d.path(names[2])
    p1.write_bytes(p1.read_bytes()[:-7])  # torn: the tail never reached the disk
    raw = bytearray(p2.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the payload
    p2.write_bytes(bytes(raw))
    rows = d.read_run(key, 0, 12)
    assert rows.shape[2] == 4  # only block 0 survives; the run stops at the first bad block
    torch.testing.assert_close(rows, _rows(key, 0, 4), rtol=0, atol=0)
    assert d.corrupt == 1 and not p1.exists()
    assert d.read_run(key, 8, 12) is None and d.corrupt == 2
    _write(d, key)  # both are written again
    torch.testing.assert_close(d.read_run(key, 0, 12), _rows(key, 0, 12), rtol=0, atol=0)
    d.close()


@pytest.mark.slow  # kills a writer subprocess
def test_writer_killed_mid_write_leaves_a_miss_never_a_block(tmp_path):
    """A replica killed while writing (here: stopped inside the write, before the rename) publishes
    nothing under the block's name; a reader sees a miss and the stale temporary file is cleaned up."""
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        from radixlm.runtime.kv_tiers import DiskTier, KVCodec
        d = DiskTier({str(tmp_path)!r}, "model-a", KVCodec("none", torch.float32), ({LAYERS}, {HEADS}, {DIM}), 4, 1 << 30)
        real_replace = os.replace
        def stuck(src, dst):
            print("WRITING", flush=True)
            time.sleep(600)
        os.replace = stuck
        key = list(range(4))
        for s, e, name in d.missing_blocks(key):
            d.write_async(name, key[s:e], torch.randn({LAYERS}, 2, 4, {HEADS}, {DIM}))
        time.sleep(600)
        """
    )
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    tmp_files = [p for p in tmp_path.rglob(".tmp-*")]
    assert tmp_files, "the killed writer should have left its temporary file"
    d = _disk(tmp_path)
    assert d.read_run(list(range(4)), 0, 4) is None
    for p in tmp_files:  # old enough to be stale: the next scan removes it
        os.utime(p, (0, 0))
    d._scan_size()
    assert not any(p.exists() for p in tmp_files)
    d.close()


def test_disk_tier_is_bounded_and_evicts_least_recently_used(tmp_path):
    probe = _disk(tmp_path / "probe")
    _write(probe, [1, 2, 3, 4])
    block_bytes = probe._bytes
    probe.close()
    d = _disk(tmp_path / "d", max_bytes=int(block_bytes * 5.5))
    keys = [[s] * 4 for s in range(10)]
    for i, k in enumerate(keys):
        _write(d, k)
        if i == 2:
            assert d.read_run(keys[0], 0, 4) is not None  # a read refreshes keys[0]
            os.utime(d.path(d.chain(keys[1], 1)[0]), (1, 1))  # and keys[1] is the oldest
    assert d._scan_size() <= block_bytes * 5.5 and d.evicted >= 4
    assert d.read_run(keys[-1], 0, 4) is not None
    assert d.read_run(keys[1], 0, 4) is None
    d.close()


def test_two_replicas_share_a_directory(tmp_path):
    a, b = _disk(tmp_path), _disk(tmp_path)
    key = list(range(40, 48))
    _write(a, key)
    assert list(b.missing_blocks(key)) == []  # b sees a's blocks and does not rewrite them
    torch.testing.assert_close(b.read_run(key, 0, 8), _rows(key, 0, 8), rtol=0, atol=0)
    a.close()
    b.close()


def test_a_block_another_replica_evicted_is_written_again(tmp_path):
    a, b = _disk(tmp_path), _disk(tmp_path)
    key = list(range(8))
    _write(a, key)
    assert b.probe(key, 0, 8) == 8
    for _, _, name in [(0, 4, n) for n in a.chain(key, 2)]:
        b.path(name).unlink()  # as b's eviction would
    assert b.probe(key, 0, 8) == 0 and a.read_run(key, 0, 8) is None
    assert [s for s, _, _ in a.missing_blocks(key)] == [0, 4]  # a does not trust what it wrote earlier
    _write(a, key)
    torch.testing.assert_close(b.read_run(key, 0, 8), _rows(key, 0, 8), rtol=0, atol=0)
    a.close()
    b.close()


def test_replicas_sharing_a_directory_keep_it_under_the_bound_together(tmp_path):
    probe = _disk(tmp_path / "probe")
    _write(probe, [1, 2, 3, 4])
    block_bytes = probe._bytes
    probe.close()
    bound = int(block_bytes * 6.5)
    a = _disk(tmp_path / "d", max_bytes=bound, rescan_s=0)
    b = _disk(tmp_path / "d", max_bytes=bound, rescan_s=0)
    for s in range(12):  # each replica alone stays under the bound; together they would not
        _write(a if s % 2 else b, [s] * 4)
        assert a._scan_size() <= bound
    assert a.evicted + b.evicted >= 5
    assert a.read_run([11] * 4, 0, 4) is not None and b.read_run([10] * 4, 0, 4) is not None
    a.close()
    b.close()


def test_hierarchy_reads_a_miss_from_disk(tmp_path):
    disk = _disk(tmp_path)
    pool, cache = _hicache("write_through", disk=disk)
    key = list(range(60, 75))
    _admit(pool, cache, key)
    disk.flush()
    cache.reset(free_slots=True)  # as after a restart: nothing in memory
    pool2, cache2 = _hicache("write_through", disk=_disk(tmp_path))
    assert _admit(pool2, cache2, key + [1, 2]) == 12  # 3 whole blocks from disk
    assert cache2.disk_hit_tokens == 12 and _assert_kv(pool2, cache2, key) == len(key)
    _check(pool2, cache2)
    cache.close()
    cache2.close()


def test_host_tier_never_takes_more_than_its_share_of_free_memory(tiny_llama, monkeypatch, caplog):
    import radixlm.runtime.kv_tiers as kv_tiers
    from radixlm.runtime.server_args import ServerArgs

    monkeypatch.setattr(kv_tiers, "_HOST_MEMORY_FRACTION", 1e-6)  # a few KB of today's free memory
    args = ServerArgs(model_path=tiny_llama, enable_hierarchical_cache=True, hicache_size=1000.0)
    pool = _pool()
    cache = kv_tiers.create_cache(args, pool)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert cache.host.nbytes() <= 2e-6 * free + 4096  # not the 1000 GB asked
    assert "KV host tier" in caplog.text
    cache.close()
