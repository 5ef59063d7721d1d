"""The serving comparison's client (benchmarks/bench_serving_vllm.py) against a radixlm server: exact token
counts from the continuous usage stats, and the greedy ids of the agreement check. vLLM is not needed."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.bench_serving_vllm import _drive, _greedy_ids, _model_id, make_workload
from radixlm.runtime.server import Runtime
from tests.server_helpers import check_kv_invariant

pytestmark = pytest.mark.slow  # starts a server


def test_the_client_counts_every_token_and_reads_greedy_ids(tiny_llama):
    wl = make_workload(vocab=200, n=4, lo=8, hi=24, output_len=6, rate=0.0, seed=0)
    assert all(8 <= len(p) <= 24 and p[0] == 1 for p in wl.prompts)
    with Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=4096, log_level="warning") as rt:
        model = _model_id(rt.url)
        results = asyncio.run(_drive(rt.url, model, wl))
        assert [r.error for r in results] == [None] * 4
        for r in results:
            assert r.output_tokens == 6 and r.first is not None and r.done >= r.first
            # one gap per token after the first chunk (chunks that arrive together may carry several)
            assert 1 <= len(r.itls) <= 5
        ids = _greedy_ids(rt.url, model, wl.prompts[:2], 5, native=True)
        assert [len(x) for x in ids] == [5, 5]
        assert ids == _greedy_ids(rt.url, model, wl.prompts[:2], 5, native=True)  # greedy: the same again
        check_kv_invariant(rt.url)
