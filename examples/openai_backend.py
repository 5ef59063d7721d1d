"""The same programs through the OpenAI-compatible API, here radixlm's own server
(``/v1/completions`` and ``/v1/chat/completions``); point ``base_url`` at any compatible server.

    python examples/openai_backend.py

Chat models take messages, so a ``gen`` must come right after ``assistant_begin`` and ``select`` is
not available (as in SGLang); completion models take the program text and support ``select``.
"""

import requests

import radixlm as sgl
from common import server


@sgl.function
def chat(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=24))


@sgl.function
def completion(s, animal):
    s += "Q: What sound does a " + animal + " make?\nA:" + sgl.gen("sound", max_tokens=12, stop="\n")
    s += "\nIs it loud?" + sgl.select("loud", choices=[" yes", " no"])


def main() -> None:
    with server() as url:
        model = requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        chat_model = sgl.OpenAI(model, base_url=url + "/v1", api_key="unused")
        text_model = sgl.OpenAI(model, is_chat_model=False, base_url=url + "/v1", api_key="unused")

        st = chat.run(question="Name three colours.", backend=chat_model, temperature=0)
        print("chat answer:", repr(st["answer"]))
        print("messages:", st.messages())

        streamed = chat.run(question="Count to three.", backend=chat_model, temperature=0, stream=True)
        print("streamed:", end=" ")
        for chunk in streamed.text_iter("answer"):
            print(repr(chunk), end=" ", flush=True)
        print()

        st = completion.run(animal="cow", backend=text_model, temperature=0)
        print(st.text())
        print("tokens used:", text_model.token_usage, chat_model.token_usage)


if __name__ == "__main__":
    main()
