"""The Engine against Hugging Face transformers on the same directories (float32, CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from radixlm.runtime.attention import cpu_paged_decode
from radixlm.runtime.engine import Engine

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "1, 2, 3, 4,",
    '{"name": "Ada", "age":',
    "def add(a, b):\n    return",
    "Once upon a time there was a small model that",
    "é中文 emoji 🙂 multi-byte",
    "a",
    "The capital of France is",
    "In the beginning the scheduler admitted every request that fit, and then",
    "x = [",
    "Question: what is two plus two?\nAnswer:",
    "radix trees share prefixes",
    "SELECT * FROM",
    "The weather today is sunny with a chance of",
    "List three colors: red,",
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def arch_engine(request, make_model):
    path = make_model(request.param)
    eng = Engine(model_path=path, dtype="float32", device="cpu", max_total_tokens=4096, random_seed=0)
    yield request.param, path, eng
    eng.shutdown()


@pytest.fixture(scope="module")
def llama_engine(make_model):
    eng = Engine(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=2048)
    yield eng
    eng.shutdown()


def _hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_greedy_matches_transformers(arch_engine):
    """The default CPU path: decodes through the native paged kernel (when a compiler can build it)."""
    _, path, eng = arch_engine
    if cpu_paged_decode.load() is not None:
        assert eng.scheduler.runner.attn_backend._paged is not None
    model, tok = _hf(path)
    outs = eng.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 12})
    assert len(outs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids))
        assert out["output_ids"] == ref[0, ids.shape[1] :].tolist(), prompt
        assert out["meta_info"]["prompt_tokens"] == ids.shape[1]


@pytest.mark.parametrize("preset,flags", [
    pytest.param("tiny", {"enable_torch_compile": True}, marks=pytest.mark.slow, id="compiled-elementwise-ops"),
    pytest.param("tiny", {"disable_cpu_paged_decode": True}, id="gathered-decode"),
    pytest.param("tiny", {"disable_cpu_decoder_ops": True}, id="eager-decoder-ops"),
    pytest.param("tiny64", {}, id="native-kernels-head-size-64"),
    pytest.param("tiny64", {"disable_cpu_paged_extend": True}, id="flash-extends-head-size-64"),
])
def test_other_paths_match_transformers(make_model, preset, flags):
    """--enable-torch-compile (inductor-fused elementwise ops; a cold cache compiles for tens of seconds),
    the gather path for decodes, torch's eager elementwise ops instead of the native ones, and at head size 64 the native extend kernel (fresh prompts, then
    extends behind their cached prefixes) or torch's flash kernel instead: greedy tokens identical to
    transformers, logprobs within 1e-4 (float32)."""
    from radixlm.runtime.attention import cpu_paged_extend
    from radixlm.runtime.models import cpu_decoder_ops
    from radixlm.runtime.models.decoder_ops import COMPILED_FROM_ROWS, EAGER

    path = make_model("llama", preset)
    model, tok = _hf(path)
    # One long prompt, so the first prefill step has enough rows to take the compiled ops (decodes do not).
    prompts = PROMPTS + [" ".join(f"step {i} of the long prompt" for i in range(60))]
    assert sum(len(tok(p).input_ids) for p in prompts) >= COMPILED_FROM_ROWS
    with Engine(model_path=path, dtype="float32", device="cpu", max_total_tokens=4096, **flags) as eng:
        backend = eng.scheduler.runner.attn_backend
        norm_ops = eng.scheduler.runner.model.model.norm.ops
        if flags.get("enable_torch_compile"):
            assert norm_ops is not EAGER
        elif flags.get("disable_cpu_decoder_ops"):
            assert norm_ops is EAGER
        elif cpu_decoder_ops.load() is not None:
            assert norm_ops is cpu_decoder_ops.load()
        elif flags.get("disable_cpu_paged_decode"):
            assert backend._paged is None
        native = preset == "tiny64" and not flags and cpu_paged_extend.load() is not None
        assert (backend._extend is not None) == native
        _check_against_transformers(eng, model, tok, prompts)
        # the same prompts continued: each an extend behind its own cached prompt (the masked path)
        _check_against_transformers(eng, model, tok, [p + " and then a few more words" for p in prompts])
        # several extends at once behind one cached prefix: the cascade (with the native kernel, its
        # suffixes read in place)
        cascades = []
        if native:
            suffix_cascade = backend._suffix_cascade
            backend._suffix_cascade = lambda *a: cascades.append(a[1]) or suffix_cascade(*a)
        head = " ".join(f"shared context line {i}" for i in range(12))
        _check_against_transformers(eng, model, tok, [head])
        _check_against_transformers(eng, model, tok, [head + t for t in (" what follows", " and a question", " then more")])
        assert bool(cascades) == native and all(len(m) == 3 for m in cascades)
        eng.check_memory()


def _check_against_transformers(eng, model, tok, prompts: list[str]) -> None:
    outs = eng.generate(prompts, {"temperature": 0, "max_new_tokens": 12}, return_logprob=True)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids),
                                 output_scores=True, return_dict_in_generate=True)
        assert out["output_ids"] == ref.sequences[0, ids.shape[1]:].tolist(), prompt
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        want = [torch.log_softmax(sc[0].float(), -1)[t].item() for sc, t in zip(ref.scores, out["output_ids"])]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, prompt


def test_logprobs_match_transformers(arch_engine):
    _, path, eng = arch_engine
    model, tok = _hf(path)
    prompts = PROMPTS[:4]
    outs = eng.generate(
        prompts,
        {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    for prompt, out in zip(prompts, outs):
        prompt_ids = tok(prompt).input_ids
        full = torch.tensor([prompt_ids + out["output_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0].float(), dim=-1)  # [L, V]
        meta = out["meta_info"]
        inp = meta["input_token_logprobs"]
        assert len(inp) == len(prompt_ids) and inp[0][0] is None and inp[0][1] == prompt_ids[0]
        for i in range(1, len(prompt_ids)):
            assert inp[i][1] == prompt_ids[i]
            assert abs(inp[i][0] - lp[i - 1, prompt_ids[i]].item()) < 1e-4
        outp = meta["output_token_logprobs"]
        n = len(prompt_ids)
        for j, (val, tid, _) in enumerate(outp):
            assert tid == out["output_ids"][j]
            assert abs(val - lp[n - 1 + j, tid].item()) < 1e-4
        top = meta["output_top_logprobs"][0]
        ref_top = lp[n - 1].topk(3)
        assert [t[1] for t in top] == ref_top.indices.tolist()
        assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"][1]) == 3


def test_logprob_start_len_and_text(llama_engine):
    out = llama_engine.generate(
        "The capital of France is",
        {"temperature": 0, "max_new_tokens": 3},
        return_logprob=True,
        logprob_start_len=2,
        return_text_in_logprobs=True,
    )
    n = out["meta_info"]["prompt_tokens"]
    inp = out["meta_info"]["input_token_logprobs"]
    assert len(inp) == n - 2
    assert all(isinstance(e[2], str) for e in inp)
    # Without input logprobs requested, only outputs are reported.
    out = llama_engine.generate("Hi there", {"temperature": 0, "max_new_tokens": 3}, return_logprob=True)
    assert out["meta_info"]["input_token_logprobs"] == []
    assert len(out["meta_info"]["output_token_logprobs"]) == out["meta_info"]["completion_tokens"]


def test_token_ids_logprob_matches_the_full_distribution(llama_engine, make_model):
    """token_ids_logprob: per position, exactly the asked ids' logprobs, equal to the same ids' entries of
    the full distribution (transformers' log-softmax over prompt + output), for the prompt from
    logprob_start_len and for every output token; the top-logprob path agrees where both report an id;
    absent without return_logprob; streamed entries add up to the final ones."""
    ids = [5, 17, 3, 17]  # order and duplicates are kept, as SGLang gathers them
    kw = dict(return_logprob=True, logprob_start_len=0, return_text_in_logprobs=True)
    sp = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    res = llama_engine.generate("The quick brown fox", sp, token_ids_logprob=ids, top_logprobs_num=64, **kw)
    meta = res["meta_info"]
    assert len(meta["input_token_ids_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_ids_logprobs"][0] is None  # the first prompt token has no logprob
    assert len(meta["output_token_ids_logprobs"]) == meta["completion_tokens"] == 5
    model, _ = _hf(make_model("llama"))
    seq = [e[1] for e in meta["input_token_logprobs"]] + res["output_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)  # row p scores token p + 1
    rows = meta["input_token_ids_logprobs"][1:] + meta["output_token_ids_logprobs"]
    tops = meta["input_top_logprobs"][1:] + meta["output_top_logprobs"]
    assert len(rows) == len(seq) - 1
    for p, (got, top) in enumerate(zip(rows, tops)):
        assert [e[1] for e in got] == ids
        assert all(abs(e[0] - float(lp[p, e[1]])) < 1e-4 for e in got), (p, got)
        assert all(e[2] == llama_engine.tokenizer.decode([e[1]]) for e in got)
        table = {e[1]: e[0] for e in top}
        assert all(abs(e[0] - table[e[1]]) < 1e-4 for e in got if e[1] in table)
    # a batch may give one list per prompt; a flat list is every prompt's
    batch = llama_engine.generate(["a b", "c d"], sp, token_ids_logprob=[[1], [2, 3]], return_logprob=True)
    assert [[e[1] for e in row] for row in batch[1]["meta_info"]["output_token_ids_logprobs"]] == [[2, 3]] * 5
    assert [e[1] for e in batch[0]["meta_info"]["output_token_ids_logprobs"][0]] == [1]
    off = llama_engine.generate("a b", sp, token_ids_logprob=ids)
    assert "output_token_ids_logprobs" not in off["meta_info"]
    chunks = list(llama_engine.generate("The quick brown fox", sp, token_ids_logprob=ids, stream=True, **kw))
    assert chunks[-1]["meta_info"]["output_token_ids_logprobs"] == meta["output_token_ids_logprobs"]


def test_seed_same_alone_and_in_batch(llama_engine):
    sp = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    alone = llama_engine.generate("Once upon a time", sp)
    batch = llama_engine.generate(
        ["Some other prompt", "Once upon a time", "x"],
        [{"temperature": 1.0, "max_new_tokens": 16}, sp, {"temperature": 0.7, "max_new_tokens": 5}],
    )
    assert batch[1]["output_ids"] == alone["output_ids"]
    other_seed = llama_engine.generate("Once upon a time", {**sp, "seed": 99})
    assert other_seed["output_ids"] != alone["output_ids"]


def test_sampling_knobs_change_distribution(llama_engine):
    base = {"max_new_tokens": 8, "ignore_eos": True, "seed": 7}
    greedy = llama_engine.generate("The weather", {**base, "temperature": 0})
    top1 = llama_engine.generate("The weather", {**base, "temperature": 1.0, "top_k": 1})
    assert top1["output_ids"] == greedy["output_ids"]
    minp = llama_engine.generate("The weather", {**base, "temperature": 1.0, "min_p": 1.0})
    assert minp["output_ids"] == greedy["output_ids"]
    rep = llama_engine.generate("The weather", {**base, "temperature": 0, "repetition_penalty": 2.0, "max_new_tokens": 24})
    freq = llama_engine.generate("The weather", {**base, "temperature": 0, "frequency_penalty": 2.0, "max_new_tokens": 24})
    plain = llama_engine.generate("The weather", {**base, "temperature": 0, "max_new_tokens": 24})
    assert len(set(rep["output_ids"])) >= len(set(plain["output_ids"]))
    assert len(set(freq["output_ids"])) >= len(set(plain["output_ids"]))


def test_stop_string_across_token_boundary(llama_engine):
    tok = llama_engine.tokenizer
    sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    full = llama_engine.generate("Once upon a time", sp)
    ids = full["output_ids"]
    # Pick a stop string made of the tail of token 3 and the head of token 4.
    t3, t4 = tok.decode(ids[3:4]), tok.decode(ids[4:5])
    prefix = tok.decode(ids[:3])
    stop = t3[-1:] + t4[:1]
    assert len(stop) == 2
    out = llama_engine.generate("Once upon a time", {**sp, "stop": [stop]})
    expected = full["text"][: full["text"].find(stop)]
    assert out["text"] == expected
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert prefix.startswith(expected) or expected.startswith(prefix)
    kept = llama_engine.generate("Once upon a time", {**sp, "stop": [stop], "no_stop_trim": True})
    assert kept["text"].endswith(stop) or stop in kept["text"]


def test_stop_token_ids_min_and_max_tokens(llama_engine):
    sp = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    full = llama_engine.generate("Hello world", sp)
    assert full["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert full["meta_info"]["completion_tokens"] == 10
    stop_id = full["output_ids"][4]
    first = full["output_ids"].index(stop_id)
    out = llama_engine.generate("Hello world", {**sp, "stop_token_ids": [stop_id]})
    assert out["output_ids"] == full["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    out = llama_engine.generate("Hello world", {**sp, "stop_token_ids": [stop_id], "min_new_tokens": first + 2})
    assert len(out["output_ids"]) >= first + 2
    assert stop_id not in out["output_ids"][: first + 2]


def test_eos_stops_unless_ignored(llama_engine):
    eos = llama_engine.tokenizer.eos_token_id
    outs = llama_engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 40})
    for o in outs:
        if o["meta_info"]["finish_reason"]["type"] == "stop":
            assert o["output_ids"][-1] == eos
            assert o["meta_info"]["finish_reason"]["matched"] == eos
        else:
            assert eos not in o["output_ids"]
    outs = llama_engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True})
    assert all(len(o["output_ids"]) == 40 for o in outs)


def test_n_samples(llama_engine):
    outs = llama_engine.generate("Tell me", {"temperature": 1.0, "n": 3, "max_new_tokens": 8, "seed": 5})
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    outs = llama_engine.generate(["a", "b"], {"temperature": 0, "n": 2, "max_new_tokens": 4})
    assert len(outs) == 4 and outs[0]["output_ids"] == outs[1]["output_ids"]


def test_streaming_equals_final(llama_engine):
    sp = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    final = llama_engine.generate("é中文 stream", sp)
    chunks = list(llama_engine.generate("é中文 stream", sp, stream=True))
    assert chunks[-1]["text"] == final["text"]
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"])  # never retracts what it streamed
    assert "\ufffd" not in "".join(c["text"] for c in chunks[:-1]) or "\ufffd" in final["text"]


def test_concurrent_threads(llama_engine):
    sp = {"temperature": 0, "max_new_tokens": 8}
    expected = {p: llama_engine.generate(p, sp)["output_ids"] for p in PROMPTS[:6]}
    results: dict = {}

    def run(p):
        results[p] = llama_engine.generate(p, sp)["output_ids"]

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS[:6]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sampling_params": {"temperature": -1}}, "temperature"),
        ({"sampling_params": {"top_p": 0}}, "top_p"),
        ({"sampling_params": {"top_k": -5}}, "top_k"),
        ({"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"sampling_params": {"min_new_tokens": 5, "max_new_tokens": 2}}, "min_new_tokens"),
        ({"sampling_params": {"n": 0}}, "n"),
        ({"sampling_params": {"temprature": 0.5}}, "temprature"),
        ({"sampling_params": {"json_schema": "{not json"}}, "json_schema"),
        ({"prompt": "x" * 10, "input_ids": [1, 2]}, "input_ids"),
        ({"prompt": None, "input_ids": []}, "input_ids"),
        ({"prompt": None, "input_ids": [10**9]}, "input_ids"),
        ({"prompt": "hello", "return_logprob": True, "logprob_start_len": 99}, "logprob_start_len"),
        ({"prompt": "word " * 3000}, "input_ids"),
        ({"return_logprob": True, "token_ids_logprob": [1, 10**9]}, "token_ids_logprob"),
        ({"return_logprob": True, "token_ids_logprob": [-1]}, "token_ids_logprob"),
        ({"return_logprob": True, "token_ids_logprob": [[1], [2]]}, "token_ids_logprob"),
        ({"return_logprob": True, "token_ids_logprob": ["a"]}, "token_ids_logprob"),
    ],
)
def test_bad_input_is_rejected_and_engine_carries_on(llama_engine, kwargs, field):
    kwargs = {"prompt": "hello", **kwargs}
    with pytest.raises(ValueError, match=field):
        llama_engine.generate(**kwargs)
    ok = llama_engine.generate("hello", {"temperature": 0, "max_new_tokens": 2})
    assert ok["meta_info"]["completion_tokens"] == 2
