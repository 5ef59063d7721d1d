"""Tensor parallelism on the CPU (gloo): sharding rules, token-identical greedy outputs, dead ranks.

Every rank is a process and the machine has few cores, so each rank runs torch with one thread
(``OMP_NUM_THREADS=1`` is inherited by the spawned followers).
"""

from __future__ import annotations

import os
import signal

import pytest
import requests
import torch

from radixlm.runtime.distributed.sharding import head_split
from radixlm.runtime.engine import Engine, EngineError
from radixlm.runtime.server_args import ServerArgs

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [f"Prompt {i}: " + "the quick brown fox " * (i % 4) + f"number {i * 7}" for i in range(16)]
LONG = "A long story about many things. " * 12  # > 3 chunks of CHUNK tokens
CHUNK = 32


# ---------------------------------------------------------------------------- fast: rules
def test_head_split_shards_and_replicates_kv_heads():
    assert head_split(8, 4, 2, 1) == (range(4, 8), range(2, 4))
    # fewer KV heads than ranks: ranks whose query heads share a KV head each hold a copy of it
    assert [head_split(4, 2, 4, r)[1] for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [head_split(4, 2, 4, r)[0] for r in range(4)] == [range(r, r + 1) for r in range(4)]
    with pytest.raises(ValueError, match="num_attention_heads"):
        head_split(6, 2, 4, 0)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        head_split(12, 3, 2, 0)


@pytest.mark.parametrize("kwargs,field", [
    ({"tp_size": 0}, "tp_size"), ({"dp_size": 0}, "dp_size"), ({"tp_size": 3, "nnodes": 2}, "nnodes"),
    ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, "node_rank"),
    ({"tp_size": 2, "nnodes": 2}, "dist_init_addr"), ({"dist_init_addr": "nohost"}, "dist_init_addr"),
])
def test_parallel_args_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServerArgs(model_path="m", **kwargs)


# ---------------------------------------------------------------------------- slow: ranks as processes
@pytest.fixture(scope="module")
def one_thread():
    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


def _engine(path: str, tp: int) -> Engine:
    return Engine(path, device="cpu", max_total_tokens=4096, chunked_prefill_size=CHUNK, tp_size=tp,
                  log_level="warning")


@pytest.fixture(scope="module")
def tp1(tiny_llama, one_thread):
    eng = _engine(tiny_llama, 1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tp2(tiny_llama, one_thread):
    eng = _engine(tiny_llama, 2)
    yield eng
    eng.shutdown()


def _run(eng: Engine, prompts: list[str]) -> list[dict]:
    return eng.generate(prompts, GREEDY, return_logprob=True)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["output_ids"] == y["output_ids"]
        lx = [e[0] for e in x["meta_info"]["output_token_logprobs"]]
        ly = [e[0] for e in y["meta_info"]["output_token_logprobs"]]
        assert max(abs(p - q) for p, q in zip(lx, ly)) < 1e-4


@pytest.mark.slow
def test_tp2_greedy_matches_tp1_on_16_prompts(tp1, tp2):
    assert tp2.get_server_info()["tp_size"] == 2
    _assert_same(_run(tp1, PROMPTS), _run(tp2, PROMPTS))


@pytest.mark.slow
def test_tp2_chunked_prefill_matches_tp1(tp1, tp2):
    n = len(tp1.tokenizer.encode(LONG))
    assert n > 3 * CHUNK  # prefilled in several chunks
    a, b = _run(tp1, [LONG]), _run(tp2, [LONG])
    _assert_same(a, b)
    # and again, now from the radix cache (a cached prefix plus a chunked suffix)
    _assert_same(_run(tp1, [LONG + " and more"]), _run(tp2, [LONG + " and more"]))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_tp_group_per_process_and_a_killed_rank_fails_engine_requests(tiny_llama, tp2, one_thread):
    with pytest.raises(ValueError, match="tp_size"):
        _engine(tiny_llama, 2)
    tp2.shutdown()
    eng = _engine(tiny_llama, 2)  # the group was released: a new one can start
    try:
        assert eng.generate("hello", GREEDY)["meta_info"]["completion_tokens"] == 12
        (follower,) = eng._tp_procs
        follower.kill()
        follower.join(10)
        with pytest.raises(EngineError):
            eng.generate("hello again", GREEDY)
    finally:
        eng.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_server_tp4_replicates_kv_heads_matches_and_a_killed_rank_fails_clients(tiny_llama, tp1, one_thread):
    from radixlm.runtime.server import Runtime

    # the tiny model has 2 KV heads: with 4 ranks each KV head lives on two ranks
    rt = Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=4096, chunked_prefill_size=CHUNK,
                 tp_size=4, log_level="warning", log_interval_s=0.0)
    try:
        body = {"text": PROMPTS[:4], "sampling_params": GREEDY}
        got = requests.post(rt.url + "/generate", json=body, timeout=60).json()
        want = tp1.generate(PROMPTS[:4], GREEDY)
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        os.kill(rt.server_info["pids"]["tp2"], signal.SIGKILL)
        try:
            r = requests.post(rt.url + "/generate", json={"text": "x", "sampling_params": GREEDY}, timeout=60)
            assert r.status_code >= 500
        except requests.ConnectionError:
            pass  # the server already noticed and exited: the client got an error, not a hang
        assert rt.process.wait(30) == 1
    finally:
        rt.shutdown()
