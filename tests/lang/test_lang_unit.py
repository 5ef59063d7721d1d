"""The language without a model: IR, argument validation, sampling resolution, chat templates, tracing,
choice methods and HTML rendering."""

from __future__ import annotations

import json

import pytest

import radixlm as sgl
from radixlm.backend.base_backend import BaseBackend
from radixlm.chat_template import (
    ChatTemplate,
    chat_template_from_tokenizer,
    get_chat_template,
    get_chat_template_by_model_path,
    resolve_chat_template,
)
from radixlm.interpreter import Span, StreamExecutor
from radixlm.ir import SglConstantText, SglExprList, SglGen, SglSamplingParams, flatten
from radixlm.render import render_state_html
from radixlm.runtime.sampling_params import SamplingParams


def _executor(template: ChatTemplate | None = None, **defaults) -> StreamExecutor:
    # BaseBackend generates nothing: these executors only ever see text and roles.
    return StreamExecutor(BaseBackend(), {}, SglSamplingParams(SamplingParams.from_dict(defaults)), template)


# --------------------------------------------------------------------------- IR and validation
def test_expressions_concatenate_into_flat_lists():
    e = "Q: " + sgl.gen("a", max_tokens=3) + "\nA:" + sgl.select("b", choices=["x", "y"])
    assert isinstance(e, SglExprList)
    kinds = [type(x).__name__ for x in flatten(e)]
    assert kinds == ["SglConstantText", "SglGen", "SglConstantText", "SglSelect"]
    assert flatten(sgl.user("hi"))[1].value == "hi"


def test_gen_keeps_only_the_fields_it_sets_normalised_by_sampling_params():
    g = sgl.gen("x", max_tokens=7, stop="\n", temperature=0.5, top_k=0)
    assert isinstance(g, SglGen)
    assert g.overrides == {"max_new_tokens": 7, "stop": ["\n"], "temperature": 0.5, "top_k": -1}
    assert sgl.gen("y", min_new_tokens=3).overrides == {"min_new_tokens": 3}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=-2), "max_new_tokens"),
        (dict(repetition_penalty=5.0), "repetition_penalty"),
        (dict(frobnicate=1), "frobnicate"),
        (dict(regex="("), "regex"),
        (dict(dtype="complex"), "dtype"),
        (dict(dtype=list), "dtype"),
        (dict(json_schema="{not json"), "json_schema"),
        (dict(regex="a+", json_schema={"type": "string"}), "regex"),
        (dict(stop_regex="x"), "stop_regex"),
    ],
)
def test_bad_gen_arguments_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sgl.gen("x", **kwargs)


def test_dtype_names_and_types_are_accepted():
    assert sgl.gen("a", dtype=int).dtype == "int"
    assert sgl.gen("a", dtype="float").dtype == "float"
    assert sgl.gen_int("a").dtype == "int"
    assert sgl.gen_string("a").dtype == "str"


def test_json_schema_accepts_dict_string_and_pydantic_model():
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert json.loads(sgl.gen("j", json_schema=schema).overrides["json_schema"]) == schema
    assert sgl.gen("j", json_schema=json.dumps(schema)).overrides["json_schema"] == json.dumps(schema)
    assert json.loads(sgl.gen("p", json_schema=Point).overrides["json_schema"])["required"] == ["x", "y"]


@pytest.mark.parametrize(
    "kwargs",
    [dict(choices=None), dict(choices=[]), dict(choices=["a", ""]), dict(choices=["a", 3]),
     dict(choices=["a"], temperature=0.7), dict(choices=["a"], choices_method="greedy")],
)
def test_bad_select_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="select"):
        sgl.select("x", **kwargs)


def test_gen_with_choices_is_a_select():
    e = sgl.gen("c", choices=["a", "b"], choices_method=sgl.greedy_token_selection)
    assert type(e).__name__ == "SglSelect" and e.choices_method is sgl.greedy_token_selection


def test_nested_and_mismatched_roles_raise_at_the_call():
    exe = _executor()
    exe.submit(sgl.user_begin())
    with pytest.raises(ValueError, match="nested roles"):
        exe.submit(sgl.assistant_begin())
    with pytest.raises(ValueError, match="does not match"):
        exe.submit(sgl.assistant_end())
    exe.submit("hello")
    exe.submit(sgl.user_end())
    exe.submit(sgl.assistant("sure"))  # a complete role after closing is fine
    exe.end()
    assert exe.error() is None
    assert [m["role"] for m in exe.messages()] == ["user", "assistant"]


def test_appending_none_or_objects_raises():
    exe = _executor()
    with pytest.raises(ValueError):
        exe.submit(None)
    with pytest.raises(ValueError):
        exe.submit(42)


# --------------------------------------------------------------------------- sampling resolution
def test_run_defaults_gen_overrides_dtype_and_template_stops_are_layered():
    tpl = get_chat_template("chatml")
    exe = _executor(tpl, temperature=0.0, max_new_tokens=50, stop=["END"])
    sp = exe.resolve_sampling_params(sgl.gen("x", max_tokens=5))
    assert (sp.temperature, sp.max_new_tokens) == (0.0, 5)
    assert sp.stop == ["END", "<|im_end|>"]
    sp = exe.resolve_sampling_params(sgl.gen_int("n"))
    assert sp.regex is not None and " " in sp.stop and "\n" in sp.stop and sp.dtype == "int"
    sp = exe.resolve_sampling_params(sgl.gen("x", return_logprob=True, top_logprobs_num=2))
    assert sp.logprob_kwargs() == {"return_logprob": True, "top_logprobs_num": 2}
    srt = sp.to_srt_kwargs()
    assert SamplingParams.from_dict(srt).max_new_tokens == 50  # the wire dict is SamplingParams-valid


def test_min_tokens_above_the_default_max_is_checked_when_the_run_sets_the_max():
    g = sgl.gen("x", min_tokens=200)
    ok = _executor(max_new_tokens=300).resolve_sampling_params(g)
    assert ok.min_new_tokens == 200
    with pytest.raises(ValueError, match="min_new_tokens"):
        _executor().resolve_sampling_params(g)


def test_run_keyword_arguments_split_between_program_and_sampling():
    @sgl.function
    def prog(s, n, topic="x"):
        pass

    program, sampling = prog._split_kwargs({"n": 3, "topic": "y", "temperature": 0.1, "max_new_tokens": 9})
    assert program == {"n": 3, "topic": "y"}
    assert sampling == {"temperature": 0.1, "max_new_tokens": 9}
    with pytest.raises(ValueError, match="temperature"):
        prog.run(n=1, temperature=-3.0, backend=BaseBackend())
    with pytest.raises(ValueError, match="bind"):
        prog.bind(nope=1)
    assert prog.bind(topic="z").bind_arguments == {"topic": "z"}
    assert prog._batch_kwargs([(1,), (2, "t")]) == [{"n": 1}, {"n": 2, "topic": "t"}]
    with pytest.raises(ValueError):
        prog._batch_kwargs([(1, 2, 3)])


def test_openai_kwargs_put_non_openai_fields_in_extra_body():
    sp = SglSamplingParams(SamplingParams.from_dict(
        {"max_new_tokens": 5, "top_k": 4, "stop": "x", "json_schema": {"type": "string"}}))
    kw = sp.to_openai_kwargs()
    assert kw["max_tokens"] == 5 and kw["stop"] == ["x"]
    assert kw["extra_body"] == {"top_k": 4}
    assert kw["response_format"]["json_schema"]["schema"] == {"type": "string"}


def test_no_backend_is_a_clear_error():
    @sgl.function
    def prog(s):
        s += "x"

    sgl.set_default_backend(None)
    with pytest.raises(ValueError, match="backend"):
        prog.run()


# --------------------------------------------------------------------------- chat templates
CHATML = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('no system') }}{% endif %}{% endfor %}"
)
# The system prompt is folded into the first user turn: not expressible as per-role prefix/suffix.
FOLDED = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% elif m['role'] == 'user' %}"
    "{{ '<u>' + (sys ~ ' ' if loop.index0 == 1 else '') + m['content'] + '</u>' }}{% else %}"
    "{{ '<a>' + m['content'] + '</a>' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _with_template(tok, template):
    import copy

    t = copy.copy(tok)
    t.chat_template = template
    return t


def _apply(tok, messages, gen=False):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    return text[len(tok.bos_token):] if text.startswith(tok.bos_token) else text


@pytest.mark.parametrize("template", [CHATML, QWEN, LLAMA3, MISTRAL])
def test_template_derived_from_the_tokenizer_matches_apply_chat_template(tokenizer, template):
    tok = _with_template(tokenizer, template)
    tpl = chat_template_from_tokenizer(tok)
    assert tpl is not None
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"}]
    if template is not MISTRAL:
        msgs = [{"role": "system", "content": "sys"}] + msgs
    # The interpreter writes exactly what apply_chat_template writes (minus the BOS the tokenizer adds).
    exe = _executor(tpl)
    for m in msgs:
        exe.submit(getattr(sgl, m["role"])(m["content"]))
    exe.submit(sgl.assistant_begin())
    exe.end()
    assert exe.text() == _apply(tok, msgs, gen=True)
    assert exe.messages() == msgs


def test_default_system_prompt_is_detected_and_written(tokenizer):
    tpl = chat_template_from_tokenizer(_with_template(tokenizer, QWEN))
    assert tpl.default_system_prompt == "You are a helpful assistant."
    exe = _executor(tpl)
    exe.submit(sgl.user("hi"))
    exe.end()
    assert exe.text() == _apply(_with_template(tokenizer, QWEN), [{"role": "user", "content": "hi"}])


def test_tiny_model_template_is_chatml_with_im_end_stop(tokenizer):
    tpl = chat_template_from_tokenizer(tokenizer)
    assert tpl.role_prefix_and_suffix["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert tpl.stop_str == ("<|im_end|>",)
    assert tpl.stop_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_underivable_template_falls_back_to_named_templates(tokenizer):
    tok = _with_template(tokenizer, FOLDED)
    assert chat_template_from_tokenizer(tok) is None
    assert resolve_chat_template(None, tok, "/models/Llama-2-7b-chat-hf").name == "llama-2-chat"
    assert resolve_chat_template(None, tok, "/models/whatever").name == "default"
    assert resolve_chat_template("chatml", tok, "x").name == "chatml"
    assert get_chat_template_by_model_path("Qwen2-7B-Instruct").name == "qwen"
    with pytest.raises(ValueError, match="chat_template"):
        get_chat_template("no-such-template")


def test_llama2_style_puts_the_system_prompt_inside_the_first_inst():
    tpl = get_chat_template("llama-2-chat")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert tpl.get_prompt(msgs) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]A </s><s>"


# --------------------------------------------------------------------------- tracing
PREFIX = "You are a careful assistant. Answer every question in one short sentence, please.\n"


@sgl.function
def qa(s, question, style="plain"):
    s += sgl.system(PREFIX)
    s += "Question: " + question + "\n"
    s += sgl.assistant(sgl.gen("answer", max_tokens=8))


def test_prefix_by_tracing_stops_at_the_first_unknown():
    from radixlm.tracer import extract_prefix_by_tracing

    backend = BaseBackend()  # template "default": SYSTEM: ... \n
    assert extract_prefix_by_tracing(qa, backend) == "SYSTEM:" + PREFIX + "\n" + "Question: "

    @sgl.function
    def fstring(s, q):
        s += "Intro. "
        s += f"Q: {q}"  # an argument in an f-string cannot be traced

    assert extract_prefix_by_tracing(fstring, backend) == "Intro. "
    assert extract_prefix_by_tracing(qa.bind(question="What?"), backend).endswith("Question: What?\nASSISTANT:")


def test_trace_records_the_whole_program():
    tracer = qa.trace(backend=BaseBackend())
    kinds = [type(n).__name__ for n in tracer.flatten_nodes()]
    assert "SglGen" in kinds and "SglArgument" in kinds
    assert "answer" in tracer.variables


# --------------------------------------------------------------------------- choices
def _entries(*lps):
    return [(lp, i, f"t{i}") for i, lp in enumerate(lps)]


def test_the_three_choice_methods_decide_differently_on_a_constructed_case():
    choices = ["A", "B", "C"]
    cond = [_entries(-1.0, -5.0), _entries(-2.0, -2.0), _entries(-0.5, -9.0)]
    normalized = [-3.0, -2.0, -4.75]
    uncond = [_entries(None, -8.0), _entries(None, -1.0), _entries(None, -0.1)]
    kw = dict(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=cond,
              output_token_logprobs=[[], [], []])
    assert sgl.token_length_normalized(**kw).decision == "B"
    greedy = sgl.greedy_token_selection(**kw)
    assert greedy.decision == "C"  # best first token
    assert greedy.meta_info["greedy_logprob_matrix"][2] == [-0.5, -9.0]
    unc = sgl.unconditional_likelihood_normalized(**kw, unconditional_token_logprobs=uncond)
    # A: mean(-1-0, -5+8)=1.0; B: mean(-2, -1)=-1.5; C: mean(-0.5, -8.9)=-4.7
    assert unc.decision == "A"
    assert unc.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([1.0, -1.5, -4.7])
    with pytest.raises(ValueError):
        sgl.unconditional_likelihood_normalized(**kw)


def test_greedy_extends_short_choices_with_their_mean():
    kw = dict(choices=["ab", "a"], normalized_prompt_logprobs=[0, 0],
              input_token_logprobs=[_entries(-1.0, -3.0), _entries(-1.0)], output_token_logprobs=[[], []])
    # "a" continues with its mean (-1.0), which beats "ab"'s second token (-3.0).
    assert sgl.greedy_token_selection(**kw).decision == "a"


# --------------------------------------------------------------------------- rendering
def test_html_marks_roles_and_generated_spans():
    text = "<u>hi</u><a>yes & no</a>"
    spans = [Span(0, 9, "role", "user"), Span(12, 20, "gen", "answer"), Span(9, 24, "role", "assistant")]
    out = render_state_html(text, spans, None)
    assert out.count('class="rl-role"') == 2
    assert 'title="gen: answer"' in out and "yes &amp; no" in out
    assert "&lt;u&gt;hi&lt;/u&gt;" in out
    assert "rl-error" in render_state_html("x", [], RuntimeError("boom"))


def test_state_renders_html_after_constant_roles():
    exe = _executor(get_chat_template("chatml"))
    exe.submit(sgl.user("hello"))
    exe.end()
    html = sgl.ProgramState(exe)._repr_html_()
    assert "rl-role-name" in html and ">user<" in html and "hello" in html


def test_constant_text_is_a_node():
    assert isinstance(flatten(sgl.user("x"))[1], SglConstantText)
