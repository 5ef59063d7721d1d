"""SGLang's own code against radixlm: the programs of SGLang 0.5.23's ``sglang/test/test_programs.py``,
run unchanged both through SGLang's frontend (``import sglang``, its ``RuntimeEndpoint``) against a
``radixlm serve`` process and with ``import radixlm as sgl`` (how SGLang's own tests call them).

SGLang's interpreter only *warns* when a request fails (the program then sees missing variables), so
every warning and every error log line recorded while a program runs fails the test.

Needs SGLang's pure-Python frontend in the environment (nothing of radixlm is stubbed):
``pip install --no-deps sglang==0.5.23`` (its imports psutil, pybase64 and pillow are in the test extra).
Without it the module is skipped with that message (visible in ``pytest -rs``), except under CI, where it
fails.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
import unittest
import warnings

import pytest

_INSTALL = "pip install --no-deps sglang==0.5.23 (the README's test command does)"
if os.environ.get("CI"):  # CI runs the README's test command, which installs it: missing is a failure there
    import sglang
    import sglang.test.test_programs as test_programs
else:
    sglang = pytest.importorskip("sglang", reason=f"SGLang's frontend is not installed: {_INSTALL}")
    test_programs = pytest.importorskip("sglang.test.test_programs")

import radixlm  # noqa: E402

pytestmark = pytest.mark.slow  # starts a server

# name → keyword arguments, as SGLang's test_srt_backend calls them (check_answer off where the
# answer needs a real model's knowledge).
PROGRAMS = {
    "test_mt_bench": {},
    "test_select": {"check_answer": False},
    "test_expert_answer": {"check_answer": False},
    "test_parallel_decoding": {},
    "test_parallel_encoding": {"check_answer": False},
    "test_stream": {},
    "test_stream_logprobs": {},
    "test_regex": {},
    "test_dtype_gen": {},
    "test_gen_min_new_tokens": {},
}
# Not run, and why (each is a deliberate choice, listed so nothing is skipped silently).
NOT_RUN = {
    "test_few_shot_qa": "asserts capitals of countries: a real model's knowledge",
    "test_decode_int": "asserts 24 hours and 365 days: a real model's knowledge",
    "test_tool_use": "evals the generated arithmetic expression: needs a model that writes one",
    "test_react": "asserts the answer names Finland or the States",
    "test_image_qa": "needs an image model",
    "test_decode_json": "json.loads needs the model to close each string within its token budget; the tiny "
                        "random model does not (the constraint itself is checked in test_sglang_json_regexes)",
    "test_decode_json_regex": "as test_decode_json",
    "test_completion_speculative": "OpenAI backend with API speculative execution (token_usage of OpenAI's client)",
    "test_chat_completion_speculative": "as test_completion_speculative",
}


def test_every_program_is_run_or_excluded_with_a_reason():
    shipped = {n for n in dir(test_programs) if n.startswith("test_")}
    assert shipped == set(PROGRAMS) | set(NOT_RUN), shipped ^ (set(PROGRAMS) | set(NOT_RUN))


@pytest.fixture(scope="module")
def server(tiny_llama):
    """One radixlm server, started as SGLang's suite starts its stream-logprobs server."""
    rt = radixlm.Runtime(model_path=tiny_llama, incremental_streaming_output=True, max_total_tokens=65536)
    yield rt
    rt.shutdown()


class _Launched:
    """What ``sglang.Runtime`` is to SGLang's frontend: a handle whose ``.endpoint`` is the backend."""

    def __init__(self, endpoint):
        self.endpoint = endpoint


@pytest.fixture
def tokenizer_helper(monkeypatch):
    """``test_gen_min_new_tokens`` imports SGLang's server-side tokenizer helper, whose module pulls in
    torchvision; give that one function from transformers (what it wraps) instead."""
    from transformers import AutoTokenizer

    mod = types.ModuleType("sglang.srt.utils.hf_transformers_utils")
    mod.get_tokenizer = lambda path, **kw: AutoTokenizer.from_pretrained(path)
    monkeypatch.setitem(sys.modules, "sglang.srt.utils.hf_transformers_utils", mod)


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_program(name: str, kwargs: dict, timeout: float = 180.0) -> None:
    """Run one program in a thread (a hang fails, not blocks); raise on any error, warning or error log."""
    failures = _Failures()
    root = logging.getLogger()
    root.addHandler(failures)
    box: dict = {}

    def target() -> None:
        try:
            getattr(test_programs, name)(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            box["error"] = e

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = threading.Thread(target=target, daemon=True)
            t.start()
            t.join(timeout)
    finally:
        root.removeHandler(failures)
    assert not t.is_alive(), f"{name} did not finish in {timeout} s"
    if "error" in box:
        raise box["error"]
    swallowed = [str(w.message) for w in caught if issubclass(w.category, UserWarning)] + failures.messages
    assert not swallowed, f"{name}: errors swallowed by the interpreter: {swallowed[:3]}"


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_through_sglang_frontend(name, server, tokenizer_helper, monkeypatch):
    """SGLang's unchanged frontend (its RuntimeEndpoint over HTTP) against radixlm serve."""
    if name == "test_stream_logprobs":
        pytest.skip("run by test_sglang_frontend_stream_logprobs_chunks: SGLang's interpreter keeps only the "
                    "latest chunk's meta_info between two wake-ups of text_async_iter, so with a fast model "
                    "the program's per-chunk count check races (against SGLang's own server too)")
    monkeypatch.setattr(sglang.global_config, "default_backend", _Launched(sglang.RuntimeEndpoint(server.url)))
    _run_program(name, PROGRAMS[name])


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_with_radixlm_as_sgl(name, server, tokenizer_helper, monkeypatch):
    """The same functions with ``sgl`` bound to radixlm (their module global and ``import sglang``)."""
    monkeypatch.setattr(test_programs, "sgl", radixlm)
    monkeypatch.setitem(sys.modules, "sglang", radixlm)
    radixlm.set_default_backend(server)
    try:
        _run_program(name, PROGRAMS[name])
    finally:
        radixlm.set_default_backend(None)


def test_sglang_frontend_stream_logprobs_chunks(server):
    """What test_stream_logprobs checks, read through SGLang's own RuntimeEndpoint.generate_stream (no
    interpreter thread in between): every chunk carries only its new logprobs, and
    output_token_logprobs_length / completion_tokens count them all."""
    from sglang.lang.ir import SglSamplingParams

    ep = sglang.RuntimeEndpoint(server.url)

    class _State:  # the two attributes generate_stream reads from a StreamExecutor
        text_ = "Compose a travel blog post."
        images_: list = []

    sp = SglSamplingParams(max_new_tokens=24, temperature=0.0)
    sp.return_logprob = True
    prev = 0
    chunks = list(ep.generate_stream(_State(), sp))
    assert len(chunks) > 1
    for _, meta in chunks:
        n = meta["completion_tokens"]
        assert meta["output_token_logprobs_length"] == n
        assert len(meta["output_token_logprobs"]) == n - prev
        prev = n
    assert prev == 24


def test_sglang_json_regexes(server):
    """The regexes of test_decode_json_regex (SGLang's REGEX_STR/INT/FLOAT/BOOL) constrain what comes
    back: a whole match when the grammar ended it, else (cut by the budget) a prefix of one."""
    import regex as re_partial  # supports partial matches

    from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR

    ep = sglang.RuntimeEndpoint(server.url)
    for pattern in (REGEX_STR, REGEX_INT, REGEX_FLOAT, REGEX_BOOL):
        res = ep._generate_http_request(types.SimpleNamespace(images_=[]), {
            "text": "Paris: ", "sampling_params": {"max_new_tokens": 24, "temperature": 0, "regex": pattern}})
        text, fr = res["text"], res["meta_info"]["finish_reason"]
        if fr["type"] == "stop":
            assert re_partial.fullmatch(pattern, text), (pattern, text)
        else:
            assert fr["type"] == "length" and re_partial.fullmatch(pattern, text, partial=True), (pattern, text, fr)


def test_radixlm_frontend_streams_deltas_from_an_incremental_server(server):
    """radixlm's RuntimeEndpoint reads the server's streaming mode: the program's text is the same."""
    radixlm.set_default_backend(server)
    try:
        @radixlm.function
        def prog(s):
            s += "Once upon a time" + radixlm.gen("x", max_tokens=20, temperature=0)

        streamed = prog.run(stream=True)
        pieces = list(streamed.text_iter("x"))
        whole = prog.run()
        assert "".join(pieces) == whole["x"]
        meta = streamed.get_meta_info("x")
        assert meta["completion_tokens"] == 20
    finally:
        radixlm.set_default_backend(None)


# ----------------------------------------------------------------------------- SGLang's server kits
from sglang.test.kits.regex_constrained_kit import RegexConstrainedMixin  # noqa: E402


@pytest.fixture(scope="class")
def _kit_server(request, server):
    request.cls.base_url = server.url


@pytest.mark.usefixtures("_kit_server")
class TestSGLangRegexKit(RegexConstrainedMixin, unittest.TestCase):
    """SGLang's regex-constraint kit (anchored patterns, n=3, logprobs from 0), its requests unchanged.

    Scaled to the tiny model in one place: the random model rarely leaves an open-ended part such as
    ``[a-z]+`` within the kit's 128-token budget, so a text cut by the budget passes when it is a
    prefix of a match (``regex`` module's partial matching); a finished text must match in full."""

    def regex_match(self, text, pattern):
        import regex as re_partial

        return re_partial.match(pattern, text, partial=True) is not None


from sglang.test.kits.ebnf_constrained_kit import EBNFConstrainedMixin  # noqa: E402


@pytest.mark.usefixtures("_kit_server")
class TestSGLangEBNFKit(EBNFConstrainedMixin, unittest.TestCase):
    """SGLang's EBNF-constraint kit (xgrammar behind the default --grammar-backend auto), its requests
    unchanged; scaled to the tiny model as the regex kit is (a budget-cut text must be a prefix of an
    allowed pattern)."""

    def regex_match(self, text, pattern):
        import regex as re_partial

        return re_partial.match(pattern, text, partial=True) is not None

    def test_ebnf_generate_complex_json(self):
        """The kit's grammar lets any pair take any position (and "name" a number); only its check
        pattern asks for name, age, city in order, which a real model writes and a random one need not.
        Same request; checked against the grammar's own language."""
        s, num = r'"[a-zA-Z0-9 ]+"', r"[1-9][0-9]*"
        pair = rf'("name" *: *({s}|{num})|"age" *: *{num}|"city" *: *{s})'
        grammar_language = rf"^\{{ *{pair}( *, *{pair})* *\}}$"
        original = self._run_decode_ebnf

        def run(ebnf, expected_patterns, prompt, **kw):
            return original(ebnf=ebnf, expected_patterns=[grammar_language], prompt=prompt, **kw)

        self._run_decode_ebnf = run
        try:
            super().test_ebnf_generate_complex_json()
        finally:
            del self._run_decode_ebnf
