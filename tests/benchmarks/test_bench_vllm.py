"""The side-by-side runner's own logic (benchmarks/bench_vllm.py, sbs_worker.py), without vLLM."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks.bench_vllm import agreement, build_workloads, model_flops
from benchmarks.sbs_worker import run_rounds


class _Tok:
    all_special_ids = [0, 1]
    bos_token_id = 1

    def __len__(self) -> int:
        return 300


def test_rounds_build_prompts_from_each_systems_own_history():
    rounds = [
        {"new_tokens": 2, "items": [[-1, [1, 5]], [-1, [1, 6]]]},
        {"new_tokens": 1, "items": [[1, [7]], [0, [8]], [0, [9]]]},
    ]
    seen = []

    def generate(prompts, n):
        seen.append([list(p) for p in prompts])
        return [[100 + len(p)] * n for p in prompts], [len(p) // 2 for p in prompts]

    res = run_rounds(rounds, generate)
    assert seen[0] == [[1, 5], [1, 6]]
    # round 2: parent's prompt + parent's output + suffix
    assert seen[1] == [[1, 6, 102, 102, 7], [1, 5, 102, 102, 8], [1, 5, 102, 102, 9]]
    assert res["new_tokens"] == 2 * 2 + 3 * 1 and res["logit_rows"] == 7
    assert res["prompt_tokens"] == 4 + 15 and res["cached_tokens"] == 2 + 6


def test_workloads_are_deterministic_and_shaped_as_documented():
    a, b = build_workloads(_Tok(), quick=False), build_workloads(_Tok(), quick=False)
    assert a == b
    ns = a["no-sharing"]["rounds"][0]["items"]
    assert len(ns) == 64 and all(64 <= len(s) <= 512 and s[0] == 1 and p == -1 for p, s in ns)
    assert [s for _, s in a["prefill-only"]["rounds"][0]["items"]] == [s for _, s in ns]
    fs = a["few-shot"]["rounds"][0]["items"]
    assert len(fs) == 200 and len({tuple(s[:1000]) for _, s in fs}) == 1
    chat = a["chat"]["rounds"]
    assert len(chat) == 4 and all(p == c for r in chat[1:] for c, (p, _) in enumerate(r["items"]))
    fork = a["fork-tree"]["rounds"]
    assert len(fork[0]["items"]) == 8 and len(fork[1]["items"]) == 32


def test_agreement_counts_positions():
    assert agreement([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == 1.0
    assert agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == 0.5  # 2 of max(4, 3) positions


def test_model_flops_of_the_small_preset():
    cfg = SimpleNamespace(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=6144,
                          num_attention_heads=8, num_key_value_heads=4)
    layers, lm = model_flops(cfg)
    assert round(layers / 1e6, 1) == 47.2 and round(lm / 1e6, 1) == 6.3  # the numbers
