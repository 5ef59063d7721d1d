"""``OpenAI(model_name, ...)``: any OpenAI-compatible server (OpenAI, vLLM, SGLang, radixlm's own).

* Chat models (``is_chat_model=True``): a ``gen`` must come right after ``assistant_begin`` (SGLang's
  rule); the request carries ``s.messages()``.
* Completion models: the request carries the program text, so roles are written with the chat
  template (for a model path on this machine, the model's own template).
* ``select`` (completion models only, as in SGLang) sends ``prefix`` and every ``prefix + choice`` in
  one ``/v1/completions`` request with ``echo`` and ``logprobs``, and scores the choice tokens the
  same way the native backends do.
* Sampling fields OpenAI does not define (top_k, min_p, regex, ...) travel in ``extra_body``, which
  radixlm, SGLang and vLLM read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from radixlm.backend.base_backend import BaseBackend
from radixlm.chat_template import ChatTemplate, load_local_tokenizer, resolve_chat_template
from radixlm.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized

if TYPE_CHECKING:
    from radixlm.interpreter import StreamExecutor
    from radixlm.ir import SglSamplingParams

INSTRUCT_MODEL_NAMES = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002")


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


class OpenAI(BaseBackend):
    def __init__(
        self,
        model_name: str,
        is_chat_model: Optional[bool] = None,
        chat_template: Optional[ChatTemplate] = None,
        is_azure: bool = False,
        *args: Any,
        **kwargs: Any,
    ):
        """Extra arguments go to ``openai.OpenAI`` (``base_url=...``, ``api_key=...``)."""
        super().__init__()
        import openai

        self._openai = openai
        self.client = openai.AzureOpenAI(*args, **kwargs) if is_azure else openai.OpenAI(*args, **kwargs)
        self.model_name = model_name
        self.is_chat_model = (model_name not in INSTRUCT_MODEL_NAMES) if is_chat_model is None else is_chat_model
        self.chat_template = chat_template or resolve_chat_template(
            None, load_local_tokenizer(model_name), model_name
        )
        self.chat_prefix = self.chat_template.role_prefix_and_suffix["assistant"][0]
        self.token_usage = TokenUsage()

    def get_model_name(self) -> str:
        return self.model_name

    # ------------------------------------------------------------------ generation
    def _prompt(self, s: "StreamExecutor") -> Any:
        if not self.is_chat_model:
            return s.text_
        if s.cur_role != "assistant" or not s.text_.endswith(self.chat_prefix):
            raise ValueError(
                "OpenAI chat models: a gen must come right after assistant_begin() "
                "(e.g. s += sgl.assistant(sgl.gen('answer')))"
            )
        return [dict(m) for m in s.messages_]

    def _create(self, prompt: Any, **kwargs: Any) -> Any:
        if self.is_chat_model:
            return self.client.chat.completions.create(model=self.model_name, messages=prompt, **kwargs)
        return self.client.completions.create(model=self.model_name, prompt=prompt, **kwargs)

    def _count(self, usage: Any) -> None:
        if usage is not None:
            self.token_usage.prompt_tokens += usage.prompt_tokens or 0
            self.token_usage.completion_tokens += usage.completion_tokens or 0

    def generate(self, s: "StreamExecutor", sampling_params: "SglSamplingParams"):
        ret = self._create(self._prompt(s), **sampling_params.to_openai_kwargs())
        self._count(ret.usage)
        texts = [(c.message.content or "") if self.is_chat_model else c.text for c in ret.choices]
        metas = [{"id": ret.id, "finish_reason": c.finish_reason,
                  "prompt_tokens": getattr(ret.usage, "prompt_tokens", None),
                  "completion_tokens": getattr(ret.usage, "completion_tokens", None)} for c in ret.choices]
        if len(texts) == 1:
            return texts[0], metas[0]
        return texts, metas

    def generate_stream(self, s: "StreamExecutor", sampling_params: "SglSamplingParams") -> Iterator[tuple[str, Any]]:
        kwargs = sampling_params.to_openai_kwargs()
        stream = self._create(self._prompt(s), stream=True, stream_options={"include_usage": True}, **kwargs)
        meta: dict[str, Any] = {}
        for chunk in stream:
            self._count(getattr(chunk, "usage", None))
            for c in chunk.choices:
                if c.index != 0:
                    continue
                text = (c.delta.content or "") if self.is_chat_model else (c.text or "")
                if c.finish_reason is not None:
                    meta = {"id": chunk.id, "finish_reason": c.finish_reason}
                if text:
                    yield text, meta

    # ------------------------------------------------------------------ select
    def _echo_logprobs(self, prompts: list[Any]) -> list[tuple[list[str], list[Optional[float]]]]:
        """Score prompts (strings or token lists) with echo: their tokens and logprobs, in order."""
        kwargs = dict(model=self.model_name, prompt=prompts, echo=True, logprobs=0, temperature=0.0)
        generated = 0
        try:
            ret = self.client.completions.create(max_tokens=0, **kwargs)
        except self._openai.BadRequestError:
            # A server that wants max_tokens >= 1 (vLLM): the one generated token is dropped below.
            ret = self.client.completions.create(max_tokens=1, **kwargs)
            generated = 1
        self._count(ret.usage)
        out: list[tuple[list[str], list[Optional[float]]]] = [([], [])] * len(prompts)
        for c in ret.choices:
            tokens, logprobs = list(c.logprobs.tokens), list(c.logprobs.token_logprobs)
            keep = len(tokens) - generated
            out[c.index] = (tokens[:keep], logprobs[:keep])
        return out

    def select(
        self,
        s: "StreamExecutor",
        choices: list[str],
        temperature: float,
        choices_method: Optional[ChoicesSamplingMethod] = None,
    ) -> ChoicesDecision:
        if self.is_chat_model:
            raise ValueError("select is not supported for OpenAI chat models; use a completion model "
                             "(OpenAI(..., is_chat_model=False))")
        method = choices_method or token_length_normalized
        prefix = s.text_
        scored = self._echo_logprobs([prefix] + [prefix + c for c in choices])
        base_tokens = scored[0][0]
        input_token_logprobs: list[list[tuple]] = []
        for tokens, logprobs in scored[1:]:
            # The choice's tokens start where its tokenization leaves the prefix's: right after the
            # prefix's last token, or at a boundary token that merged prefix and choice characters.
            k = 0
            while k < min(len(base_tokens), len(tokens)) and base_tokens[k] == tokens[k]:
                k += 1
            input_token_logprobs.append([(lp, None, t) for t, lp in zip(tokens[k:], logprobs[k:])])
        if len(choices) and any(len(e) == 0 for e in input_token_logprobs):
            raise ValueError("select: a choice produced no tokens")
        normalized = [_mean([e[0] for e in ent if e[0] is not None]) for ent in input_token_logprobs]
        unconditional = None
        if method.requires_unconditional_logprobs:
            unc = self._echo_logprobs(["".join(e[2] for e in ent) for ent in input_token_logprobs])
            unconditional = []
            for (tokens, logprobs), ent in zip(unc, input_token_logprobs):
                tail = list(zip(tokens, logprobs))[-len(ent):] if len(tokens) >= len(ent) else list(zip(tokens, logprobs))
                unconditional.append([(lp, None, t) for t, lp in tail])
        return method(
            choices=list(choices),
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
