"""Grammar side of constrained decoding, without the engine: vocabulary bytes, masks, random walks over
allowed tokens (every finished output must match / validate), jump-forward, errors, background compiles."""

from __future__ import annotations

import json
import random
import re
import threading
import zlib

import pytest
import torch

from tests.tiers import fast_subset
from tests.constrained_cases import (BAD_REGEXES, BAD_SCHEMAS, JSON_SCHEMA_CASES, REGEX_CASES, Walker,
                               output_is_valid, schema_json)
from radixlm.runtime.constrained import JSON_OBJECT_SCHEMA, CompiledGrammar, GrammarBackend, build_vocab
from radixlm.runtime.constrained.json_schema import bounded_number_regex, integer_range_regex
from radixlm.runtime.constrained.patterns import ascii_shorthands

SAMPLES = 100
EOS = (2, 4)  # tiny models: </s> and <|im_end|>


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe_tokenizer(make_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model("llama"))


@pytest.fixture(scope="module")
def backend(bpe_tokenizer):
    # The model's logits are wider than the tokenizer here, as with padded real checkpoints.
    be = GrammarBackend(bpe_tokenizer, vocab_size=len(bpe_tokenizer) + 64, eos_token_ids=list(EOS))
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def compact_backend(bpe_tokenizer):
    be = GrammarBackend(bpe_tokenizer, vocab_size=len(bpe_tokenizer), eos_token_ids=list(EOS),
                        json_whitespace_pattern="")
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A Llama-2-style SentencePiece BPE: '▁' for spaces, <0xNN> byte-fallback tokens, no byte-level map."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"the {w} of {n} and café {w}s naïve" for n in range(40) for w in ("red", "blue", "green", "answer")]
    corpus += ['{"name": "x", "age": 12}', "true false null", "0123456789 - . : , [ ] { }"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    # Byte-fallback pieces are ordinary vocabulary entries in SentencePiece models, so add them to the model.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sp_backend(sp_tokenizer):
    be = GrammarBackend(sp_tokenizer, vocab_size=len(sp_tokenizer))
    yield be
    be.shutdown()


def text_of(backend: GrammarBackend, ids: list[int]) -> str:
    return backend.vocab.decode(ids)


def run_walks(backend, tokenizer, kind: str, pattern: str, seed: int, jump_forward: bool,
              samples: int = SAMPLES) -> tuple[int, int]:
    """Walk ``samples`` times; assert every finished output is valid. Returns (finished, jumps)."""
    grammar = backend.compile(kind, pattern)
    walker = Walker(grammar)
    rng = random.Random(seed)
    finished = total_jumps = 0
    for _ in range(samples):
        ids, done, jumps = walker.walk(rng, jump_forward)
        total_jumps += jumps
        if not done:
            continue
        finished += 1
        text = text_of(backend, ids)
        assert tokenizer.decode(ids) == text  # our byte table agrees with the real detokenizer
        assert output_is_valid(kind, pattern, text), f"{kind} {pattern!r}: invalid output {text!r}"
    assert finished >= samples * 0.9
    return finished, total_jumps


# --------------------------------------------------------------------------- vocabulary
def test_byte_level_vocabulary_round_trips_multibyte(backend, bpe_tokenizer):
    text = 'café naïve 日本語 😀👍🏽 {"a": [1, 2.5]}\n\ttabs'
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    assert text_of(backend, ids) == text
    v = backend.vocab
    assert v.scheme == "byte_level"
    assert v.token_bytes[bpe_tokenizer.convert_tokens_to_ids("Ġs")] == b" s"
    for special in (0, 1, 3, *EOS):  # pad, bos, im_start never emitted by a grammar; EOS handled apart
        assert v.token_bytes[special] is None
    assert all(b is None for b in v.token_bytes[len(bpe_tokenizer):])  # padded logits
    assert all(v.single_byte_ids[b] >= 0 for b in range(256) if b != 0xF4)  # 0xF4: see vocab.END_MARK


def test_sentencepiece_vocabulary(sp_backend, sp_tokenizer):
    v = sp_backend.vocab
    assert v.scheme == "sentencepiece"
    assert v.eos_token_ids == (sp_tokenizer.eos_token_id,)
    assert v.token_bytes[sp_tokenizer.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert any(b is not None and b.startswith(b" ") for b in v.token_bytes)  # '▁the' → b' the'
    text = " the answer is 日本語 😀"  # CJK and emoji are not in the trained vocabulary: byte fallback
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    assert any(sp_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    assert text_of(sp_backend, ids) == text


def test_vocab_rejects_bad_arguments(bpe_tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        build_vocab(bpe_tokenizer, vocab_size=10)
    with pytest.raises(ValueError, match="eos_token_ids"):
        build_vocab(bpe_tokenizer, vocab_size=len(bpe_tokenizer), eos_token_ids=[10**6])


# --------------------------------------------------------------------------- regex building blocks
def test_integer_range_regex_is_exact():
    rng = random.Random(0)
    for _ in range(150):
        lo = rng.choice([None, rng.randint(-400, 400)])
        hi = rng.choice([None, rng.randint(-400, 400)])
        r = integer_range_regex(lo, hi)
        compiled = re.compile(f"(?:{r})") if r else None
        for x in range(-450, 450):
            want = (lo is None or x >= lo) and (hi is None or x <= hi)
            assert bool(compiled and compiled.fullmatch(str(x))) == want, (lo, hi, x, r)
        assert not (compiled and any(compiled.fullmatch(s) for s in ("-0", "007", "+1", "")))


def test_bounded_number_regex_never_leaves_the_bounds():
    rng = random.Random(1)
    keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    fracs = ("", ".0", ".25", ".5", ".99")
    texts = [f"{sign}{m}{frac}" for sign in ("", "-") for m in range(0, 40) for frac in fracs]
    checked = 0
    for _ in range(300):
        node = {k: rng.choice([rng.randint(-30, 30), round(rng.uniform(-30, 30), 2)])
                for k in keys if rng.random() < 0.4}
        if not node:
            continue
        try:
            compiled = re.compile(f"(?:{bounded_number_regex(node, integer=False)})")
        except ValueError:
            continue  # no number fits (e.g. minimum > maximum)
        for text in texts:
            if compiled.fullmatch(text):
                v = float(text)
                assert node.get("minimum", v) <= v <= node.get("maximum", v), (node, text)
                assert "exclusiveMinimum" not in node or v > node["exclusiveMinimum"], (node, text)
                assert "exclusiveMaximum" not in node or v < node["exclusiveMaximum"], (node, text)
                checked += 1
    assert checked > 1000
    # Interior fractions are kept, not just integers.
    assert re.fullmatch(bounded_number_regex({"minimum": 0, "maximum": 1}, integer=False), "0.375")


def test_ascii_shorthands():
    assert ascii_shorthands(r"\d+\.\d") == r"[0-9]+\.[0-9]"
    assert ascii_shorthands(r"[\d\s_]") == "[0-9\\t\\n\\v\\f\\r _]"
    assert ascii_shorthands(r"\\d") == r"\\d"  # an escaped backslash, then a literal d
    assert ascii_shorthands(r"[]\w]\D") == r"[]0-9A-Za-z_]\D"


# --------------------------------------------------------------------------- masks and matcher
def test_continuing_past_an_accepting_state(backend):
    """outlines-core alone drops a token whose last byte leaves an accepting position for a non-accepting
    one (after "a", "b" of a(?:bc)?); END_MARK keeps it, and EOS stays allowed exactly where the pattern
    may end."""
    v = backend.vocab.bytes_to_id
    for pattern, prefix, nxt in [(r"a(?:bc)?", b"a", b"b"), (r"1(?:\.5)?", b"1", b"."), (r"x(?:<y>|)", b"x", b"<")]:
        m = backend.compile("regex", pattern).new_matcher()
        m.accept_token(v[prefix])
        mask = torch.zeros(backend.vocab.vocab_size, dtype=torch.bool)
        m.fill_mask(mask)
        assert mask[v[nxt]] and mask[list(EOS)].all(), pattern
        m.accept_token(v[nxt])
        mask.zero_()
        m.fill_mask(mask)
        assert not mask[list(EOS)].any() and not m.is_accepting(), pattern


def test_mask_matches_index_and_eos_only_when_accepting(backend):
    g = backend.compile("regex", r"ab(c|de)")
    m = g.new_matcher()
    V = backend.vocab.vocab_size
    mask = torch.zeros(V, dtype=torch.bool)
    m.fill_mask(mask)
    # The Index also allows the END_MARK token (id V) where the pattern may end; it is never in a mask.
    assert set(mask.nonzero().flatten().tolist()) == set(g.index.get_allowed_tokens(g.initial_state)) - {V}
    assert not mask[list(EOS)].any()
    for t in (backend.vocab.bytes_to_id[b"a"], backend.vocab.bytes_to_id[b"b"], backend.vocab.bytes_to_id[b"c"]):
        assert not m.is_finished()
        m.accept_token(t)
    mask.zero_()
    m.fill_mask(mask)
    assert mask[list(EOS)].all() and mask.sum() == len(EOS)  # complete: only EOS
    assert m.is_finished() and m.is_accepting()
    m.accept_token(EOS[1])
    assert m.is_finished()
    with pytest.raises(ValueError):
        m.accept_token(backend.vocab.bytes_to_id[b"a"])


def test_accept_rejects_disallowed_tokens(backend):
    m = backend.compile("regex", r"[0-9]+").new_matcher()
    with pytest.raises(ValueError, match="not allowed"):
        m.accept_token(backend.vocab.bytes_to_id[b"x"])
    with pytest.raises(ValueError, match="EOS"):
        m.accept_token(EOS[0])  # nothing generated yet: not accepting
    with pytest.raises(ValueError):
        m.accept_token(0)  # <pad>, a special token
    with pytest.raises(ValueError):
        m.fill_mask(torch.zeros(5, dtype=torch.bool))
    m.accept_token(backend.vocab.bytes_to_id[b"7"])
    assert m.is_accepting() and not m.is_finished()  # more digits may follow


def test_dense_and_sparse_states_fill_the_same_rows(backend):
    # Inside a JSON string almost every token is allowed (dense row); after '{' only a few are (id list).
    g = backend.compile("json", schema_json("person"))
    m = g.new_matcher()
    for chunk in (b'{', b'"name"', b':', b' "', b'ab'):
        mask = torch.zeros(backend.vocab.vocab_size, dtype=torch.bool)
        m.fill_mask(mask)
        V = backend.vocab.vocab_size  # the END_MARK token's id, never in a mask
        assert set(mask.nonzero().flatten().tolist()) == set(g.index.get_allowed_tokens(m.state)) - {V} | (
            set(EOS) if m.is_accepting() else set())
        for t in g.retokenize(chunk, m.state):
            m.accept_token(t)
    kinds = {("dense" if info.dense is not None else "sparse") for info in g._info.values()}
    assert kinds == {"dense", "sparse"}


# --------------------------------------------------------------------------- random walks
@pytest.mark.parametrize("name", sorted(REGEX_CASES))
def test_regex_random_walks_match(backend, bpe_tokenizer, name):
    pattern = REGEX_CASES[name]
    run_walks(backend, bpe_tokenizer, "regex", pattern, seed=zlib.crc32(name.encode()), jump_forward=False)
    run_walks(backend, bpe_tokenizer, "regex", pattern, seed=zlib.crc32(name.encode()) + 1, jump_forward=True)


@pytest.mark.parametrize("name", fast_subset(sorted(JSON_SCHEMA_CASES),
                                             ["optional_fields", "const_and_bool", "any_of_nullable", "enums",
                                              "array_of_objects", "json_object"]))
def test_json_schema_random_walks_validate(backend, compact_backend, bpe_tokenizer, name):
    schema = schema_json(name)
    run_walks(backend, bpe_tokenizer, "json", schema, seed=7, jump_forward=False)
    run_walks(compact_backend, bpe_tokenizer, "json", schema, seed=8, jump_forward=True)


@pytest.mark.parametrize("kind,pattern", [
    ("regex", REGEX_CASES["unicode_words"]),
    ("regex", REGEX_CASES["forced_sentence"]),
    ("json", schema_json("person")),
])
def test_sentencepiece_random_walks(sp_backend, sp_tokenizer, kind, pattern):
    class Decoding:  # SentencePiece drops the space at the very start of a sequence; compare mid-sequence
        @staticmethod
        def decode(ids):
            return sp_tokenizer.decode([sp_tokenizer.convert_tokens_to_ids("▁the")] + ids)[len("the"):]

    for jf in (False, True):
        _, jumps = run_walks(sp_backend, Decoding, kind, pattern, seed=3, jump_forward=jf, samples=40)
        if jf and "answer" in pattern:
            assert jumps > 0  # "The answer is" is forced


def test_ascii_digit_shorthand(backend):
    """\\d means [0-9] (as in JSON Schema's ECMA-262 and JavaScript), not Rust's Unicode digits."""
    g = backend.compile("regex", r"\d")
    allowed = [backend.vocab.token_bytes[t] for t in g.index.get_allowed_tokens(g.initial_state)]
    assert allowed and all(b.decode("utf-8", "replace") in "0123456789" for b in allowed if b)


# --------------------------------------------------------------------------- jump-forward
def test_jump_forward_skips_forced_text(compact_backend, bpe_tokenizer):
    schema = schema_json("const_and_bool")
    g = compact_backend.compile("json", schema)
    m = g.new_matcher()
    jf = m.jump_forward(None)
    assert jf is not None and jf.num_rollback == 0
    assert text_of(compact_backend, jf.token_ids) == '{"kind":"event","ok":'
    # The tokenizer's own encoding of the forced text, not byte-by-byte.
    assert jf.token_ids == bpe_tokenizer.encode('{"kind":"event","ok":', add_special_tokens=False)
    assert m.jump_forward(jf.token_ids[-1]) is None  # true/false: nothing forced now
    ids = g.retokenize(b"true", m.state)
    for t in ids:
        m.accept_token(t)
    jf2 = m.jump_forward(ids[-1])
    assert jf2 is not None
    assert text_of(compact_backend, [ids[-1]] * jf2.num_rollback + jf2.token_ids).endswith(',"count":')


def test_jump_forward_retokenizes_with_the_sampled_token(backend, bpe_tokenizer):
    g = backend.compile("regex", r"(xyz|The answer is (yes|no)\.)")
    m = g.new_matcher()
    assert m.jump_forward(None) is None  # 'x' or 'T': nothing forced yet
    t = backend.vocab.bytes_to_id[b"T"]
    m.accept_token(t)
    jf = m.jump_forward(t)
    # 'T' + 'he answer is ' re-encodes as 'The', ' answer', ' is' (space left to sampling): 'T' is dropped.
    assert jf.num_rollback == 1
    assert text_of(backend, jf.token_ids) == "The answer is"
    assert jf.token_ids == bpe_tokenizer.encode("The answer is", add_special_tokens=False)
    assert g.walk(g.initial_state, jf.token_ids) == m.state
    with pytest.raises(ValueError, match="last accepted"):
        m.jump_forward(t)  # 't' is no longer the last token


def test_jump_forward_never_crosses_an_accepting_state(backend):
    g = backend.compile("regex", r"ab(cd)?")
    m = g.new_matcher()
    jf = m.jump_forward(None)
    assert text_of(backend, jf.token_ids) == "ab"
    assert m.is_accepting() and m.jump_forward(jf.token_ids[-1]) is None  # EOS or 'cd': a real choice


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", sorted(BAD_REGEXES))
def test_bad_regex_rejected(backend, name):
    pattern = BAD_REGEXES[name]
    with pytest.raises(ValueError, match="regex"):
        backend.validate("regex", pattern)
    with pytest.raises(ValueError, match="regex"):
        backend.submit("regex", pattern).result()


@pytest.mark.parametrize("name", sorted(BAD_SCHEMAS))
def test_bad_schema_rejected(backend, name):
    schema = BAD_SCHEMAS[name]
    with pytest.raises(ValueError, match="json_schema"):
        backend.validate("json", schema)
    with pytest.raises(ValueError, match="json_schema"):
        backend.compile("json", schema)


def test_bad_arguments_rejected(backend):
    with pytest.raises(ValueError, match="kind"):
        backend.submit("lark", "x").result()  # ebnf and structural_tag are kinds (xgrammar)
    with pytest.raises(ValueError, match="regex"):
        backend.compile("regex", "")
    assert backend.compile("json", JSON_OBJECT_SCHEMA) is backend.compile("json", JSON_OBJECT_SCHEMA)


# --------------------------------------------------------------------------- cache and background compile
def test_cache_shares_and_evicts(bpe_tokenizer):
    be = GrammarBackend(bpe_tokenizer, vocab_size=len(bpe_tokenizer), cache_size=2, eos_token_ids=list(EOS))
    try:
        f1 = be.submit("regex", "a+")
        assert be.submit("regex", "a+") is f1  # concurrent requests share one compile
        g1 = f1.result()
        be.compile("regex", "b+")
        assert be.compile("regex", "a+") is g1  # still cached (and now most recent)
        be.compile("regex", "c+")  # evicts "b+", the least recently used
        assert be.compile("regex", "a+") is g1
        assert be.cache_info() == {"size": 2, "capacity": 2}
        f_bad = be.submit("regex", "(")
        assert be.submit("regex", "(") is f_bad  # deterministic errors are cached too
    finally:
        be.shutdown()


def test_slow_compile_does_not_block_other_work(bpe_tokenizer):
    """While a large grammar compiles in the pool, another thread keeps stepping its own matcher."""
    be = GrammarBackend(bpe_tokenizer, vocab_size=len(bpe_tokenizer), eos_token_ids=list(EOS))
    try:
        fast = be.compile("regex", r"[a-z]{1,4}( [a-z]{1,4}){0,50}")
        # A DFA with 2^15 states: about a second to build on one idle core.
        slow = be.submit("regex", "(a|b)*a(a|b){14}")
        assert not slow.done()  # submit returned at once
        steps = 0
        stepped = threading.Event()
        walker = Walker(fast)
        rng = random.Random(0)
        while not slow.done():
            walker.walk(rng, jump_forward=True, max_tokens=20)
            steps += 1
            if steps == 20:
                stepped.set()
        assert stepped.is_set(), f"only {steps} walks ran during the slow compile"
        assert isinstance(slow.result(), CompiledGrammar)
    finally:
        be.shutdown()
