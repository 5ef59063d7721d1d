"""Grammar engines side by side on our vocabularies: compile time and mask time per token.

    python benchmarks/bench_grammar_backends.py [--tokens 64] [--repeats 3]

For each tiny-model vocabulary (``tiny`` and ``small`` presets, built locally) and each grammar, each
engine compiles the grammar from scratch (a fresh compiler, so no cache helps; median of
``--repeats``), then walks one fixed token path the grammar allows (drawn once, with a fixed seed,
from xgrammar's masks) and times "fill the mask, accept the token" per token. Engines: outlines-core
(through radixlm's GrammarBackend: regex and JSON schema only), xgrammar and llguidance (``pip install
llguidance``; not a radixlm dependency, n/a when absent). Prints a Markdown table (milliseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

GRAMMARS = {
    # kind, pattern; the EBNF is GBNF as SGLang takes it, converted for llguidance by its own gbnf_to_lark
    "regex emails": ("regex", r"([a-z]{3,10}@[a-z]{3,10}\.(com|org|net), ){1,16}"),
    "json schema": ("json", json.dumps({
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
        "required": ["name", "age", "tags"]})),
    "ebnf list": ("ebnf", 'root ::= "[" item ("," item)* "]"\nitem ::= [a-z]+ | [0-9]+'),
}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _path(tok, vocab_size: int, eos: list[int], kind: str, pattern: str, n: int) -> list[int]:
    """A token path the grammar allows (never EOS before the end), drawn with a fixed seed from the
    masks of outlines-core (regex, JSON: the strictest about JSON whitespace, so every engine accepts
    the path) or xgrammar (EBNF)."""
    if kind == "ebnf":
        from radixlm.runtime.constrained.cfg import XGrammarCompiler

        m = XGrammarCompiler(tok, vocab_size, eos).compile(kind, pattern).new_matcher()
    else:
        from radixlm.runtime.constrained import GrammarBackend

        m = GrammarBackend(tok, vocab_size, eos_token_ids=eos).compile(kind, pattern).new_matcher()
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        m.fill_mask(allowed)
        allowed[eos] = False
        ids = allowed.nonzero().flatten()
        if not ids.numel():
            break
        t = int(ids[torch.randint(len(ids), (1,), generator=g)])
        m.accept_token(t)
        out.append(t)
    return out


def bench_outlines(tok, V, eos, kind, pattern, path, repeats):
    from radixlm.runtime.constrained import GrammarBackend

    if kind not in ("regex", "json"):
        return None
    compile_s = _median_time(lambda: GrammarBackend(tok, V, eos_token_ids=eos).compile(kind, pattern), repeats)
    g = GrammarBackend(tok, V, eos_token_ids=eos).compile(kind, pattern)
    m = g.new_matcher()
    mask = torch.zeros(V, dtype=torch.bool)
    t = time.perf_counter()
    done = 0
    for tokid in path:
        mask.fill_(False)
        m.fill_mask(mask)
        try:
            m.accept_token(tokid)
        except ValueError:  # the engines tokenize grammars differently; stop where outlines disagrees
            break
        done += 1
    return compile_s, (time.perf_counter() - t) / max(done, 1), done


def bench_xgrammar(tok, V, eos, kind, pattern, path, repeats):
    from radixlm.runtime.constrained.cfg import XGrammarCompiler

    compile_s = _median_time(lambda: XGrammarCompiler(tok, V, eos).compile(kind, pattern), repeats)
    m = XGrammarCompiler(tok, V, eos).compile(kind, pattern).new_matcher()
    mask = torch.zeros(V, dtype=torch.bool)
    t = time.perf_counter()
    for tokid in path:
        mask.fill_(False)
        m.fill_mask(mask)
        m.accept_token(tokid)
    return compile_s, (time.perf_counter() - t) / max(len(path), 1), len(path)


def bench_llguidance(tok, V, eos, kind, pattern, path, repeats):
    try:
        import llguidance
    except ImportError:  # not a dependency of radixlm: pip install llguidance to measure it
        return None
    import llguidance.hf
    import llguidance.torch as llt
    from llguidance.gbnf_to_lark import gbnf_to_lark

    def grammar() -> str:
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(pattern)
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(pattern)
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(pattern))

    def build():
        lt = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=eos[0])
        return lt, llguidance.LLMatcher(lt, grammar())

    compile_s = _median_time(build, repeats)
    lt, m = build()
    bm = llt.allocate_token_bitmask(1, V)
    bits = torch.arange(32, dtype=torch.int32)
    t = time.perf_counter()
    done = 0
    for tokid in path:
        llt.fill_next_token_bitmask(m, bm, 0)
        ((bm[0].unsqueeze(-1) >> bits) & 1).bool().flatten()[:V]  # the same bool row the sampler takes
        if not m.consume_token(tokid):
            break
        done += 1
    return compile_s, (time.perf_counter() - t) / max(done, 1), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from radixlm.runtime.tiny_model import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset in ("tiny", "small"):
            path = Path(d) / preset
            make_tiny_model(str(path), arch="llama", preset=preset, seed=0)
            tok = AutoTokenizer.from_pretrained(path)
            V = json.loads((path / "config.json").read_text())["vocab_size"]
            eos = [tok.eos_token_id]
            for gname, (kind, pattern) in GRAMMARS.items():
                walk = _path(tok, V, eos, kind, pattern, args.tokens)
                for engine, fn in (("outlines-core", bench_outlines), ("xgrammar", bench_xgrammar),
                                   ("llguidance", bench_llguidance)):
                    res = fn(tok, V, eos, kind, pattern, walk, args.repeats)
                    if res is None:
                        rows.append((preset, V, gname, engine, None, None, 0))
                    else:
                        rows.append((preset, V, gname, engine, res[0] * 1e3, res[1] * 1e3, res[2]))
    print("| vocabulary | grammar | engine | compile (ms) | mask + accept per token (ms) | tokens walked |")
    print("|---|---|---|---:|---:|---:|")
    for preset, V, g, e, c, m, n in rows:
        if c is None:
            print(f"| {preset} ({V}) | {g} | {e} | n/a | n/a | - |")
        else:
            print(f"| {preset} ({V}) | {g} | {e} | {c:.2f} | {m:.3f} | {n} |")


if __name__ == "__main__":
    main()
