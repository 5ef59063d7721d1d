"""Multi-turn chat with roles: the model's own chat template writes the prompt, ``messages()`` gives
the conversation in OpenAI format, and a finished state can be continued turn by turn.

    python examples/multi_turn_chat.py
"""

import radixlm as sgl
from common import default_backend


@sgl.function
def conversation(s, turns):
    s += sgl.system("You are a patient tutor who answers in one sentence.")
    for i, question in enumerate(turns):
        with s.user():
            s += question
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=24))


def main() -> None:
    with default_backend():
        st = conversation.run(turns=["What is a prime number?", "Is 21 prime?"], temperature=0)
        # Continue the same conversation after the program returned.
        st += sgl.user("Give me one more example.")
        st += sgl.assistant(sgl.gen("extra", max_tokens=24, temperature=0))
        for m in st.messages():
            print(f"{m['role']:>9}: {m['content']!r}")
        print("\nthe prompt text the model saw:\n" + st.text())


if __name__ == "__main__":
    main()
