"""The KV slot allocator: which slots it hands out, and in what order."""

from __future__ import annotations

import torch

from radixlm.runtime.memory_pool import KVPool, SlotAllocator


def test_freed_slots_are_reused_before_slots_never_handed_out():
    """A long-running server must keep its working set compact: after requests free their slots, new
    ones get those (resident, warm pages) rather than walking on into the untouched pool."""
    a = SlotAllocator(100)
    first = a.alloc(10)
    assert first.tolist() == list(range(1, 11))
    a.free(first[2:6])
    again = a.alloc(4)
    assert sorted(again.tolist()) == [3, 4, 5, 6]
    assert a.alloc(2).tolist() == [11, 12]
    assert a.available() == 100 - 10 - 2


def test_the_free_list_holds_each_slot_once_and_never_slot_0():
    a = SlotAllocator(16)
    s = a.alloc(16)
    assert a.alloc(1) is None
    a.free(s[::2])
    a.free(s[1::2])
    got = a.alloc(16)
    assert sorted(got.tolist()) == list(range(1, 17))


def test_the_pool_zeroes_its_padding_slot():
    kv = KVPool(64, num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    assert all((b[0] == 0).all() for b in kv.k_buffers + kv.v_buffers)


def test_defragment_puts_the_free_list_in_slot_order():
    """Decode steps free slots interleaved across requests; after a defragment (a cache flush does one)
    allocation hands out contiguous runs from the lowest slot again."""
    a = SlotAllocator(32)
    s = a.alloc(32)
    a.free(s[1::2])
    a.free(s[::2])
    a.defragment()
    assert a.alloc(32).tolist() == list(range(1, 33))


def test_a_flush_leaves_the_pool_in_order(tiny_llama):
    from radixlm.runtime.engine import Engine

    with Engine(model_path=tiny_llama, device="cpu", max_total_tokens=2048) as eng:
        eng.generate(["one prompt", "and another one", "a third, longer than the others"], {"max_new_tokens": 6})
        assert eng.flush_cache()["success"]  # the tree gives back decode slots interleaved across requests
        free = eng._call(lambda: eng.scheduler.runner.kv_pool._free.clone())
        assert torch.equal(free, torch.arange(1, 2049))
        eng.check_memory()
