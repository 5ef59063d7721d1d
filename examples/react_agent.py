"""A ReAct-style agent loop: the model picks an action with ``select``, writes its input with ``gen``,
and a Python tool answers. The program is ordinary Python around the state.

    python examples/react_agent.py

With the tiny random model the tool inputs are nonsense, so the tools answer with errors and the
loop ends at the step limit; with a real model the same program does the task.
"""

import ast
import operator

import radixlm as sgl
from common import default_backend

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg}
FACTS = {"paris": "Paris has about 2.1 million inhabitants.", "everest": "Mount Everest is 8849 m high."}


def calculator(expression: str) -> str:
    """Evaluate + - * / ** on numbers, nothing else (no eval of model output)."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("unsupported expression")

    try:
        return str(ev(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"


def lookup(topic: str) -> str:
    return FACTS.get(topic.strip().lower(), f"error: nothing known about {topic.strip()!r}")


TOOLS = {"calculator": calculator, "lookup": lookup}


@sgl.function
def agent(s, task, max_steps=4):
    s += "Answer the task using the tools calculator (arithmetic) and lookup (facts).\n"
    s += "Use the format: Thought, Action, Action Input, Observation; end with Action: finish.\n\n"
    s += "Task: " + task + "\n"
    for step in range(max_steps):
        s += f"Thought {step + 1}:" + sgl.gen("thought", max_tokens=24, stop="\n") + "\n"
        s += f"Action {step + 1}: " + sgl.select("action", choices=["calculator", "lookup", "finish"]) + "\n"
        if s["action"] == "finish":  # reading a variable waits for it
            s += "Final answer:" + sgl.gen("answer", max_tokens=24, stop="\n")
            return
        s += f"Action Input {step + 1}:" + sgl.gen("action_input", max_tokens=16, stop="\n") + "\n"
        s += f"Observation {step + 1}: " + TOOLS[s["action"]](s["action_input"]) + "\n"
    s += "Final answer: (step limit reached)"


def main() -> None:
    print("tool check:", calculator("2 * (3 + 4)"), "|", lookup("Everest"))
    with default_backend():
        st = agent.run(task="How many metres higher is Everest than 8000 m?", temperature=0)
        print(st.text())


if __name__ == "__main__":
    main()
