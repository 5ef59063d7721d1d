"""Parallel branches: fork a state, expand each branch, then join.

    python examples/parallel_branches.py

``s.fork(n)`` sends the shared prefix once and copies the state; the branches run concurrently.
``join()`` gathers each branch's variables into lists; ``join("concate_and_append")`` appends the
text each branch added, in order.
"""

import radixlm as sgl
from common import default_backend

ASPECTS = ["cost", "time", "risk"]


@sgl.function
def decide(s, question):
    s += "Question: " + question + "\n"
    s += "Let us look at it from several angles.\n"

    # Gather: one expert opinion per aspect, collected into a list.
    forks = s.fork(len(ASPECTS))
    forks += lambda i: "Considering " + ASPECTS[i] + ":" + sgl.gen("opinion", max_tokens=20, stop="\n")
    forks.join()
    for aspect, opinion in zip(ASPECTS, s["opinion"]):
        s += f"- {aspect}: {opinion.strip()}\n"

    # Concatenate: two drafts written side by side, appended to the main text.
    drafts = s.fork(2)
    drafts += ["\nShort answer:", "\nLong answer:"]
    drafts += sgl.gen("draft", max_tokens=16, stop="\n")
    drafts.join("concate_and_append")

    s += "\nVerdict:" + sgl.select("verdict", choices=[" do it", " wait", " do not do it"])


def main() -> None:
    with default_backend():
        st = decide.run(question="Should we rewrite the billing system?", temperature=0.7, seed=3)
        print(st.text())
        print("opinions:", st["opinion"])
        print("verdict:", st["verdict"])


if __name__ == "__main__":
    main()
