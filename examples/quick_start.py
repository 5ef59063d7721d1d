"""radixlm quick start: one command, nothing to download.

    python examples/quick_start.py

Builds a tiny random model into ./tiny-model (once), starts the embedded runtime, runs a program with
gen, select, fork and a JSON extraction, and prints the cache statistics. The model's weights are
random, so its words are gibberish; everything else is what you get with a real checkpoint
(``RADIXLM_MODEL=/path/to/model python examples/quick_start.py``).
"""

import json
import os

import radixlm as sgl
from radixlm.runtime.tiny_model import make_tiny_model

MODEL_DIR = os.environ.get("RADIXLM_MODEL", "tiny-model")

TRIP = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "budget": {"enum": ["low", "medium", "high"]},
    },
    "required": ["city", "days", "budget"],
}


@sgl.function
def travel_planner(s, city):
    s += sgl.system("You are a concise travel planner.")
    s += sgl.user("I want to visit " + city + ". What should I know?")
    s += sgl.assistant(sgl.gen("overview", max_tokens=32))
    s += sgl.user("Is summer or winter the better season?")
    s += sgl.assistant(sgl.select("season", choices=["summer", "winter"]))

    # Two branches share everything above (computed once, then found in the radix cache).
    forks = s.fork(2)
    for branch, topic in zip(forks, ["food", "museums"]):
        branch += sgl.user("One tip about " + topic + ", please.")
        branch += sgl.assistant(sgl.gen("tip", max_tokens=24))
    forks.join()

    s += sgl.user("Summarise the trip as JSON.")
    s += sgl.assistant(sgl.gen("plan", max_tokens=64, json_schema=TRIP))


def cache_line(what: str, meta: dict) -> str:
    return f"  {what:<34} {meta['prompt_tokens']:>5} prompt tokens, {meta['cached_tokens']:>5} from the cache"


def main() -> None:
    if not os.path.exists(os.path.join(MODEL_DIR, "config.json")):
        print(f"Building a tiny random model in {MODEL_DIR}/ (a few seconds) ...")
        make_tiny_model(MODEL_DIR)
    print("Starting the runtime: a server process loads the model and reports below ...", flush=True)
    runtime = sgl.Runtime(model_path=MODEL_DIR)
    sgl.set_default_backend(runtime)
    try:
        print("Running the program ...", flush=True)
        state = travel_planner.run(city="Lisbon", temperature=0)
        print("\n--- the program's text ---")
        print(state.text())
        print("--- variables ---")
        print("overview:", repr(state["overview"]))
        print("season:  ", state["season"])
        print("tips:    ", state["tip"])  # one per branch
        print("plan:    ", json.loads(state["plan"]))  # valid JSON, whatever the weights

        stats = sgl.get_server_info()["scheduler_stats"]
        prompt, cached = stats["total_prompt_tokens"], stats["total_cached_tokens"]
        print("--- the radix cache ---")
        print(f"prompt tokens {prompt}, served from the radix cache {cached} "
              f"(hit rate {stats['cache_hit_rate']:.0%}), computed {stats['total_computed_prompt_tokens']}")
        print("each call's prompt, and how much of it an earlier call had already computed:")
        print(cache_line("overview (the first gen)", state.get_meta_info("overview")))
        season = state.get_meta_info("season")
        for choice, p, c in zip(["summer", "winter"], season["prompt_tokens"], season["cached_tokens"]):
            print(cache_line(f"select: scoring {choice!r}", {"prompt_tokens": p, "cached_tokens": c}))
        for i, meta in enumerate(state.get_meta_info("tip")):
            print(cache_line(f"fork branch {i + 1} (shares the parent)", meta))
        print(cache_line("plan (JSON after the fork)", state.get_meta_info("plan")))
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
