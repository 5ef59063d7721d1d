"""How ``select`` turns per-choice token logprobs into a decision.

Every method is called with the same keyword arguments (SGLang's signature):

* ``choices``: the candidate strings;
* ``normalized_prompt_logprobs``: per choice, the mean logprob of its tokens given the prompt;
* ``input_token_logprobs``: per choice, a list of ``(logprob, token_id, token_text)`` entries for the
  choice's tokens (the first may be a "healed" token that straddles the prompt boundary);
* ``output_token_logprobs``: per choice, generated-token entries (empty: select generates nothing);
* ``unconditional_token_logprobs``: per choice, entries for the choice's tokens scored without the
  prompt (only for methods whose ``requires_unconditional_logprobs`` is True).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: Optional[dict[str, Any]] = None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _logprobs(entries: Sequence[Sequence[Any]]) -> list[float]:
    """The logprob column; a missing logprob (the very first token of a sequence) counts as 0."""
    return [float(e[0]) if e[0] is not None else 0.0 for e in entries]


def _first_argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: Optional[list[list[Any]]] = None,
    ) -> ChoicesDecision: ...

    def __repr__(self) -> str:
        return type(self).__name__


class TokenLengthNormalized(ChoicesSamplingMethod):
    """Highest mean token logprob (SGLang's default)."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        best = _first_argmax(normalized_prompt_logprobs)
        return ChoicesDecision(
            choices[best],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
            },
        )


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Walk the choices token by token, keeping those with the best logprob at each position.

    A choice that has run out of tokens keeps competing with its own mean logprob, so a choice that
    is a prefix of a longer one is not favoured or penalised merely for being shorter.
    """

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        rows = [_logprobs(entries) for entries in input_token_logprobs]
        width = max((len(r) for r in rows), default=0)
        matrix = [r + [_mean(r)] * (width - len(r)) for r in rows]
        alive = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in alive)
            alive = [i for i in alive if matrix[i][j] == best]
            if len(alive) == 1:
                break
        return ChoicesDecision(
            choices[alive[0]],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
                "greedy_logprob_matrix": matrix,
            },
        )


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Highest mean of (logprob given the prompt − logprob without it) over the choice's tokens.

    Corrects for choices that are likely in any context. When the two tokenizations have the same
    length this is exactly SGLang's token-wise mean difference; otherwise it is the difference of the
    two means (mathematically the same quantity when lengths agree).
    """

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_token_logprobs are required for unconditional_likelihood_normalized")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            c, u = _logprobs(cond), _logprobs(uncond)
            if len(c) == len(u):
                scores.append(_mean([a - b for a, b in zip(c, u)]))
            else:
                scores.append(_mean(c) - _mean(u))
        best = _first_argmax(scores)
        return ChoicesDecision(
            choices[best],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
                "unconditional_token_logprobs": unconditional_token_logprobs,
                "normalized_unconditional_prompt_logprobs": scores,
            },
        )


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
