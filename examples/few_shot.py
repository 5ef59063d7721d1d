"""Few-shot prompting: a fixed block of examples, then a classification (select) and a short reason.

    python examples/few_shot.py

run_batch sends the few-shot block once before the batch, so every question finds it in the radix
cache; the cache statistics at the end show how much of the prompt was served from it.
"""

import radixlm as sgl
from common import default_backend

EXAMPLES = """Classify the sentiment of each review as positive, negative or neutral.

Review: The battery lasts all day and the screen is gorgeous.
Sentiment: positive
Reason: praises battery and screen.

Review: It broke after two days and support never answered.
Sentiment: negative
Reason: product failed, bad support.

Review: It is a phone. It makes calls.
Sentiment: neutral
Reason: states facts without opinion.

"""


@sgl.function
def classify(s, review):
    s += EXAMPLES
    s += "Review: " + review + "\n"
    s += "Sentiment: " + sgl.select("sentiment", choices=["positive", "negative", "neutral"]) + "\n"
    s += "Reason:" + sgl.gen("reason", max_tokens=16, stop="\n")


REVIEWS = [
    "Fast shipping and it works exactly as described.",
    "The worst purchase I have made this year.",
    "Arrived on Tuesday.",
    "Great sound, terrible microphone.",
]


def main() -> None:
    with default_backend() as backend:
        states = classify.run_batch([{"review": r} for r in REVIEWS], temperature=0, progress_bar=True)
        for review, st in zip(REVIEWS, states):
            print(f"{st['sentiment']:>8} | {review} | reason:{st['reason']!r}")
        stats = backend.get_server_info()["scheduler_stats"]
        print(f"cache hit rate {stats['cache_hit_rate']:.0%} "
              f"({stats['total_cached_tokens']} of {stats['total_prompt_tokens']} prompt tokens cached)")


if __name__ == "__main__":
    main()
