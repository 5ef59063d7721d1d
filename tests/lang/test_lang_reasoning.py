"""The DSL's ``separate_reasoning(expr, model_type=...)`` (SGLang's API) against an in-process Engine: the
variable keeps the answer, ``<name>_reasoning_content`` the reasoning, the program text only the answer.
Outputs are shaped by a regex, so the split is known whatever the random weights write."""

from __future__ import annotations

import pytest

import radixlm as sgl
from radixlm.backend.engine_backend import EngineBackend


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from radixlm.runtime.engine import Engine

    eng = Engine(model_path=tiny_llama, random_seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def backend(engine):
    return EngineBackend(engine)


@sgl.function
def think_then_answer(s, model_type, regex):
    s += "Q: colour of the sky?\nA: "
    s += sgl.separate_reasoning(sgl.gen("a", max_tokens=64, regex=regex, temperature=0.7), model_type=model_type)
    s += "\nDone."


@pytest.mark.parametrize("model_type, regex", [
    ("qwen3", r"<think>\n[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n[a-z]{2,8}( [a-z]{2,8}){0,2}"),
    ("deepseek-r1", r"[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n[a-z]{2,8}( [a-z]{2,8}){0,2}"),
])
def test_separate_reasoning_splits_variable_and_text(backend, engine, model_type, regex):
    st = think_then_answer.run(model_type=model_type, regex=regex, backend=backend, seed=3)
    raw = st.get_meta_info("a")  # meta_info is the generation's, untouched
    assert raw["finish_reason"]["type"] == "stop"
    answer, reasoning = st["a"], st["a_reasoning_content"]
    assert answer and reasoning
    assert "<think>" not in answer and "</think>" not in answer and "</think>" not in reasoning
    assert reasoning.replace(" ", "").isalpha() and answer.replace(" ", "").isalpha()
    assert st.text() == "Q: colour of the sky?\nA: " + answer + "\nDone."
    engine.check_memory()


def test_separate_reasoning_without_a_block_keeps_everything_as_answer(backend):
    st = think_then_answer.run(model_type="qwen3", regex=r"[a-z]{3,8}", backend=backend, seed=1)
    assert st["a_reasoning_content"] == "" and len(st["a"]) >= 3


def test_separate_reasoning_needs_a_known_model_type():
    with pytest.raises(ValueError, match="model_type"):
        sgl.separate_reasoning(sgl.gen("a"), model_type="gpt")
    with pytest.raises(ValueError, match="model_type"):
        sgl.separate_reasoning(sgl.gen("a"))
