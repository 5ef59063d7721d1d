"""The language against a live radixlm server: ``RuntimeEndpoint`` (ZeroMQ front door), the ``OpenAI``
backend on the server's OpenAI-compatible API, and the Jupyter notebook run by nbclient.

The same programs run through both backends and must produce the same text (greedy decoding).
"""

from __future__ import annotations

import os

import pytest
from tests.lang_helpers import scheduler_stats, shared_runtime

import radixlm as sgl
from radixlm.interpreter import ProgramError
from tests import REPO_ROOT

pytestmark = pytest.mark.slow  # starts servers or subprocesses: not in the fast tier

SYSTEM = "You are a terse assistant. You answer every question with a few words and nothing else at all.\n"


@pytest.fixture(scope="module")
def runtime(tiny_llama):
    return shared_runtime(tiny_llama)


@pytest.fixture(scope="module")
def endpoint(runtime):
    ep = sgl.RuntimeEndpoint(runtime.url)
    yield ep
    ep.shutdown()


@pytest.fixture(scope="module")
def openai_completion(runtime, tiny_llama):
    return sgl.OpenAI(tiny_llama, is_chat_model=False, base_url=runtime.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def openai_chat(runtime, tiny_llama):
    return sgl.OpenAI(tiny_llama, is_chat_model=True, base_url=runtime.url + "/v1", api_key="unused")


@sgl.function
def chat_program(s, question):
    s += sgl.system(SYSTEM)
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=12))


@sgl.function
def full_program(s, question):
    s += sgl.system(SYSTEM)
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8))
    s += "Mood:" + sgl.select("mood", choices=[" happy", " sad", " somewhat confused"])
    forks = s.fork(2)
    forks += lambda i: f"\nBranch {i}:" + sgl.gen("branch", max_tokens=5)
    forks.join("concate_and_append")


def test_runtime_endpoint_uses_the_zmq_front_door(endpoint, runtime):
    assert endpoint._client is not None
    assert endpoint.get_chat_template().role_prefix_and_suffix["user"][0] == "<|im_start|>user\n"
    st = full_program.run("What is blue?", backend=endpoint, temperature=0)
    assert st.error() is None
    assert st["mood"] in (" happy", " sad", " somewhat confused")
    assert st.text().count("\nBranch ") == 2
    # A Runtime handle is itself accepted as a backend.
    assert chat_program.run("Hi", backend=runtime, temperature=0)["answer"] == \
        chat_program.run("Hi", backend=endpoint, temperature=0)["answer"]


def test_http_transport_matches_the_front_door(endpoint, runtime):
    """Without the ZeroMQ front door (an SGLang server has none) programs go over HTTP /generate."""
    http = sgl.RuntimeEndpoint(runtime.url, use_zmq=False)
    assert http._client is None
    via_http = full_program.run("What is blue?", backend=http, temperature=0)
    assert via_http.error() is None, via_http.error()
    assert via_http.text() == full_program.run("What is blue?", backend=endpoint, temperature=0).text()
    streamed = chat_program.run("Count to five.", backend=http, temperature=0, stream=True)
    assert "".join(streamed.text_iter()) == chat_program.run("Count to five.", backend=endpoint,
                                                             temperature=0).text()


def test_openai_completion_backend_matches_the_native_backend(endpoint, openai_completion):
    native = full_program.run("Name a fruit.", backend=endpoint, temperature=0)
    via_openai = full_program.run("Name a fruit.", backend=openai_completion, temperature=0)
    assert via_openai.error() is None, via_openai.error()
    assert via_openai.text() == native.text()
    assert via_openai["mood"] == native["mood"]
    for name in ("token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized"):
        method = getattr(sgl, name)

        @sgl.function
        def pick(s):
            s += "The weather today is" + sgl.select("w", choices=[" sunny", " rainy", " very cold"],
                                                     choices_method=method)

        assert pick.run(backend=openai_completion)["w"] == pick.run(backend=endpoint)["w"], name


def test_openai_chat_backend_matches_the_native_backend(endpoint, openai_chat):
    native = chat_program.run("What is two plus two?", backend=endpoint, temperature=0)
    via_chat = chat_program.run("What is two plus two?", backend=openai_chat, temperature=0)
    assert via_chat.error() is None, via_chat.error()
    assert via_chat["answer"] == native["answer"]
    assert via_chat.messages() == native.messages()
    streamed = chat_program.run("What is two plus two?", backend=openai_chat, temperature=0, stream=True)
    assert "".join(streamed.text_iter("answer")) == native["answer"]


def test_openai_chat_rules_surface_as_program_errors(openai_chat):
    @sgl.function
    def no_assistant(s):
        s += sgl.user("hi") + sgl.gen("x", max_tokens=2)

    @sgl.function
    def chat_select(s):
        s += sgl.user("hi") + sgl.assistant(sgl.select("x", choices=["a", "b"]))

    for prog in (no_assistant, chat_select):
        st = prog.run(backend=openai_chat)
        assert isinstance(st.error(), ValueError)
        with pytest.raises(ProgramError):
            st["x"]


def test_streaming_over_the_front_door_equals_the_final_text(endpoint):
    reference = chat_program.run("Count to five.", backend=endpoint, temperature=0).text()
    st = chat_program.run("Count to five.", backend=endpoint, temperature=0, stream=True)
    chunks = list(st.text_iter())
    assert "".join(chunks) == st.text() == reference and len(chunks) > 2


def test_run_batch_shares_the_prefix_on_the_server(endpoint, tiny_llama):
    from transformers import AutoTokenizer

    sgl.flush_cache(endpoint)
    before = scheduler_stats(sgl.get_server_info(endpoint))
    states = chat_program.run_batch([{"question": f"Question {k}?"} for k in range(16)], backend=endpoint,
                                    temperature=0, max_new_tokens=3)
    after = scheduler_stats(sgl.get_server_info(endpoint))
    assert [f"Question {k}?" in st.text() for k, st in enumerate(states)] == [True] * 16
    sys_prefix, sys_suffix = endpoint.get_chat_template().role_prefix_and_suffix["system"]
    n_shared = len(AutoTokenizer.from_pretrained(tiny_llama)(sys_prefix + SYSTEM + sys_suffix).input_ids) - 1
    # Every program found the system message cached: the warm-up computed it once.
    assert all(st.get_meta_info("answer")["cached_tokens"] >= n_shared for st in states)
    assert after["total_cached_tokens"] - before["total_cached_tokens"] >= 16 * n_shared


def test_server_errors_surface_in_the_program(endpoint):
    @sgl.function
    def too_long(s):
        s += "word " * 3000 + sgl.gen("x", max_tokens=2)

    st = too_long.run(backend=endpoint)
    assert st.error() is not None
    with pytest.raises(ProgramError):
        st["x"]
    # The server keeps serving.
    assert chat_program.run("Still there?", backend=endpoint, max_new_tokens=2).error() is None


def test_notebook_executes_against_the_live_runtime(runtime, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("RADIXLM_URL", runtime.url)
    nb = nbformat.read(os.path.join(REPO_ROOT, "examples", "notebook.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3").execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("rl-gen" in h and "rl-role" in h for h in html)  # the program state rendered
    text = "".join(str(o.get("text", "")) + str(o.get("data", {})) for o in outputs)
    assert "topic:" in text and "cache_hit_rate" in text


def test_notebook_with_its_own_runtime_runs_quietly(tiny_llama, monkeypatch):
    """Run as a newcomer would (no RADIXLM_URL): it starts its own runtime, and the server's log lines
    stay out of the cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.delenv("RADIXLM_URL", raising=False)
    monkeypatch.setenv("RADIXLM_MODEL", tiny_llama)
    nb = nbformat.read(os.path.join(REPO_ROOT, "examples", "notebook.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3").execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    streams = "".join(str(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    assert " INFO " not in streams and "Uvicorn" not in streams, streams[:2000]


def test_program_text_does_not_depend_on_the_client_folder(tiny_llama, tmp_path, monkeypatch):
    """The server publishes how prompts are written; a client run from any folder renders the same text,
    even when the server was started with a model path relative to its own folder."""
    from transformers import AutoTokenizer

    from radixlm.chat_template import chat_template_from_tokenizer

    expected = chat_template_from_tokenizer(AutoTokenizer.from_pretrained(tiny_llama))
    assert expected is not None and expected.role_prefix_and_suffix["user"][0]  # ChatML, not "USER:"
    monkeypatch.chdir(os.path.dirname(tiny_llama))
    rt = sgl.Runtime(model_path=os.path.basename(tiny_llama), log_level="warning")
    try:
        info = rt.get("/get_model_info")
        assert info["chat_template"] and info["eos_token_ids"] and info["special_tokens"]["eos_token"]
        assert info["stop_strings"] == list(expected.stop_str)
        for folder in (tmp_path, os.path.dirname(tiny_llama)):
            monkeypatch.chdir(folder)
            ep = sgl.RuntimeEndpoint(rt.url)
            try:
                assert ep.chat_template.role_prefix_and_suffix == expected.role_prefix_and_suffix
                state = chat_program.run(question="hi", backend=ep, temperature=0)
                assert state.text().startswith(expected.role_prefix_and_suffix["system"][0] + SYSTEM)
            finally:
                ep.shutdown()
    finally:
        rt.shutdown()
