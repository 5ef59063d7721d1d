"""Tool-call and reasoning parsers (pure text, fast tier): parsing, streaming reassembly, the constraining
regexes (valid calls match, schema violations and extra calls do not), template detection, and the grammar
compiled against a real tiny vocabulary."""

from __future__ import annotations

import random
import re

import pytest

from radixlm.runtime.parsers.reasoning import ReasoningStream, get_reasoning_parser
from radixlm.runtime.parsers.text_regex import text_without
from radixlm.runtime.parsers.tool_calls import FunctionSpec, ToolCall, ToolCallStream, detect_parser, get_parser
from radixlm.runtime.server_args import REASONING_PARSERS, TOOL_CALL_PARSERS
from radixlm.runtime.tiny_chat_templates import FAMILIES

TOOLS = [
    FunctionSpec("get_weather", {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"]}),
    FunctionSpec("noop", {"type": "object", "properties": {}}),
]
CALLS = [ToolCall("get_weather", '{"city": "Paris", "days": 3}'), ToolCall("noop", "{}")]
SAMPLES = {
    "hermes": ("Let me check.\n", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'),
    "llama3": ("", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; {"name": "noop", "parameters": {}}'),
    "mistral": ("Sure ", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
                '{"name": "noop", "arguments": {}}]'),
}


def _stream(stream, text: str, step: int):
    parts = [stream.feed(text[i:i + step]) for i in range(0, len(text), step)] + [stream.feed("", final=True)]
    return parts


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_parse_and_stream_reassembly(name):
    p = get_parser(name)
    prose, calls = SAMPLES[name]
    res = p.parse(prose + calls)
    assert res.calls == CALLS and res.content == prose.strip()
    for step in (1, 3, 17):
        parts = _stream(ToolCallStream(p), prose + calls, step)
        assert "".join(c for c, _ in parts) == res.content
        assert [k for _, ks in parts for k in ks] == res.calls
    plain = "Just text with < and [ and { inside."
    assert p.parse(plain).calls == [] and p.parse(plain).content == (plain if name != "llama3" else plain)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_regexes_accept_valid_calls_only(name):
    p = get_parser(name)
    prose, calls = SAMPLES[name]
    many = re.compile(p.calls_regex(TOOLS, True, "[ ]?"), re.S)
    one = re.compile(p.calls_regex(TOOLS, False, "[ ]?"), re.S)
    assert many.fullmatch(calls) and not one.fullmatch(calls)
    assert not many.fullmatch(calls.replace('"days": 3', '"days": 9'))  # maximum 7
    assert not many.fullmatch(calls.replace("get_weather", "get_wether"))  # unknown tool
    auto = re.compile(p.auto_regex(TOOLS, True, "[ ]?"), re.S)
    assert auto.fullmatch(prose + calls) and auto.fullmatch("prose only")
    if name != "llama3":  # an unconstrained call can never start inside the prose
        assert not auto.fullmatch(prose + calls.replace('"days": 3', '"days": 9'))


def test_named_call_regex_fixes_the_name():
    p = get_parser("hermes")
    rx = re.compile(p.calls_regex([TOOLS[1]], False, "[ ]?"), re.S)
    assert rx.fullmatch('<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    assert not rx.fullmatch('<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}\n</tool_call>')


def test_text_without_marker_fuzz():
    rng = random.Random(0)
    for m in ("<tool_call>", "[TOOL_CALLS]"):
        r = re.compile(text_without(m), re.S)
        alpha = list(set(m)) + ["x", "\n", "é"]
        for _ in range(3000):
            s = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 14)))
            if rng.random() < 0.3:
                i = rng.randint(0, len(s))
                s = s[:i] + m[: rng.randint(1, len(m))] + s[i:]
            assert bool(r.fullmatch(s)) == (m not in s), s


def test_detection_from_templates_and_names_in_server_args():
    assert detect_parser(FAMILIES["qwen25"]).name == "hermes"
    assert detect_parser(FAMILIES["qwen3"]).name == "hermes"
    assert detect_parser(FAMILIES["llama3"]).name == "llama3"
    assert detect_parser(FAMILIES["mistral"]).name == "mistral"
    assert detect_parser(FAMILIES["chatml"]) is None
    for n in TOOL_CALL_PARSERS[1:]:
        get_parser(n)
    for n in REASONING_PARSERS[1:]:
        get_reasoning_parser(n)
    with pytest.raises(ValueError, match="tool_call_parser"):
        get_parser("nope")


@pytest.mark.parametrize("name,text,reasoning,content", [
    ("qwen3", "<think>\nstep <tool_call> x\n</think>\n\nThe answer.", "step <tool_call> x", "The answer."),
    ("qwen3", "No reasoning here.", "", "No reasoning here."),
    ("deepseek-r1", "I think\n</think>\n\nAnswer", "I think", "Answer"),
    ("deepseek-r1", "never closed  ", "never closed", ""),
])
def test_reasoning_split_and_stream(name, text, reasoning, content):
    p = get_reasoning_parser(name)
    s = p.split(text)
    assert (s.reasoning, s.content) == (reasoning, content)
    for step in (1, 4):
        st = ReasoningStream(p)
        parts = [st.feed(text[i:i + step]) for i in range(0, len(text), step)] + [st.feed("", True)]
        assert "".join(r for r, _ in parts) == reasoning and "".join(c for _, c in parts) == content


def test_tool_grammar_compiles_and_opens_a_call_in_one_token(make_model):
    """On a real tiny vocabulary: in "auto", the single <tool_call> token is allowed at the start, and a
    lone newline after a complete call (continuing past an accepting state) is allowed for parallel calls."""
    from radixlm.runtime.constrained import GrammarBackend
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(make_model("qwen2", family="qwen25"))
    be = GrammarBackend(tok, vocab_size=len(tok), eos_token_ids=[2, 4])
    try:
        p = get_parser("hermes")
        g = be.compile("regex", p.auto_regex(TOOLS, True))
        open_id = tok.convert_tokens_to_ids("<tool_call>")
        m = g.new_matcher()
        import torch

        mask = torch.zeros(len(tok), dtype=torch.bool)
        m.fill_mask(mask)
        assert mask[open_id] and m.is_accepting()
        call = '\n{"name": "noop", "arguments": {}}\n</tool_call>'
        for t in [open_id] + tok(call, add_special_tokens=False).input_ids:
            m.accept_token(t)
        mask.zero_()
        m.fill_mask(mask)
        assert m.is_accepting() and mask[tok("\n", add_special_tokens=False).input_ids[0]]
    finally:
        be.shutdown()


CALL_TEXT = '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("parser, text, ok", [
    ("qwen3", CALL_TEXT, True),  # the block is optional for Qwen3
    ("qwen3", "<think>\nI could write <tool_call> here\n</think>\n\n" + CALL_TEXT, True),
    ("qwen3", "<think>\nstill thinking", False),
    ("qwen3", "prose", False),  # required: an answer is calls
    ("deepseek-r1", "I could write <tool_call> here\n</think>\n\n" + CALL_TEXT, True),
    ("deepseek-r1", CALL_TEXT, False),  # the prompt opened the block: a call inside it is no call
    ("deepseek-r1", "thinking </think>", False),
])
def test_reasoning_models_reason_before_required_calls(parser, text, ok):
    """With a reasoning parser, tool_choice=required lets the model reason (tool-call markers included: they
    are not calls there), then requires the calls; the parse of every accepted output has the calls."""
    from radixlm.runtime.server.openai_tools import ToolPlan, parse_choice

    rp = get_reasoning_parser(parser)
    hermes = get_parser("hermes")
    regex = rp.wrap_grammar(hermes.calls_regex(TOOLS, True), prose_first=False)
    assert bool(re.fullmatch(regex, text)) is ok
    if ok:
        parsed = parse_choice(text, ToolPlan("required", TOOLS, TOOLS, True, False, hermes), rp)
        assert [c.name for c in parsed.calls] == ["noop"]


def test_reasoning_grammar_compiles_on_a_real_vocabulary(make_model):
    from radixlm.runtime.constrained import GrammarBackend
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(make_model("qwen2", family="qwen3"))
    be = GrammarBackend(tok, vocab_size=len(tok), eos_token_ids=[2, 4])
    try:
        for parser in ("qwen3", "deepseek-r1"):
            rp = get_reasoning_parser(parser)
            regex = rp.wrap_grammar(get_parser("hermes").calls_regex(TOOLS, False), prose_first=False)
            m = be.compile("regex", regex).new_matcher()
            text = ("<think>\n" if parser == "qwen3" else "") + "a <tool_call> b\n</think>\n\n" + CALL_TEXT
            for t in tok(text, add_special_tokens=False).input_ids:
                m.accept_token(t)
            assert m.is_accepting()
    finally:
        be.shutdown()
