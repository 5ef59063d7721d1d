"""Backends that speak SGLang's native ``/generate`` protocol (a radixlm server, an in-process Engine).

Subclasses provide one transport (``_request`` / ``_request_stream`` taking a ``/generate`` body);
everything the interpreter needs is built on it here:

* ``generate``: the state's text + resolved sampling params;
* ``commit_lazy_operations`` / ``cache_prefix``: a ``max_new_tokens=0`` request, which leaves the text
  in the radix cache;
* ``select``: commit the prefix, then ONE batch request scoring every ``prefix + choice`` with
  ``logprob_start_len`` just before the prefix's end (so the prefix comes from the cache and only the
  choice tokens are computed), then the choice method decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from radixlm.backend.base_backend import BaseBackend
from radixlm.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized

if TYPE_CHECKING:
    from radixlm.interpreter import StreamExecutor
    from radixlm.ir import SglSamplingParams


class BackendError(RuntimeError):
    """The runtime answered a request with an error."""


def _entry(e: Any) -> tuple[Optional[float], int, Optional[str]]:
    """A logprob entry as (logprob, token_id, text) whatever container the transport used."""
    if isinstance(e, dict):
        return e.get("logprob"), int(e.get("token_id", -1)), e.get("text")
    seq = list(e)
    return seq[0], int(seq[1]), (seq[2] if len(seq) > 2 else None)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


class NativeBackend(BaseBackend):
    support_concate_and_append = False
    # The server streams deltas (radixlm or SGLang with --incremental-streaming-output).
    incremental_stream = False

    # ------------------------------------------------------------------ transport (subclasses)
    def _request(self, data: dict[str, Any]) -> Union[dict, list[dict]]:
        raise NotImplementedError

    def _request_stream(self, data: dict[str, Any]) -> Iterator[dict]:
        raise NotImplementedError

    # ------------------------------------------------------------------ interface
    def cache_prefix(self, prefix_str: str) -> None:
        self._request({"text": prefix_str, "sampling_params": {"max_new_tokens": 0}})

    def commit_lazy_operations(self, s: "StreamExecutor") -> None:
        self._request({"text": s.text_, "sampling_params": {"max_new_tokens": 0}})

    def _body(self, s: "StreamExecutor", sp: "SglSamplingParams") -> dict[str, Any]:
        return {"text": s.text_, "sampling_params": sp.to_srt_kwargs(), **sp.logprob_kwargs()}

    def generate(self, s: "StreamExecutor", sampling_params: "SglSamplingParams"):
        obj = self._request(self._body(s, sampling_params))
        if isinstance(obj, list):  # n > 1
            return [o["text"] for o in obj], [o.get("meta_info", {}) for o in obj]
        return obj["text"], obj.get("meta_info", {})

    def generate_stream(self, s: "StreamExecutor", sampling_params: "SglSamplingParams") -> Iterator[tuple[str, Any]]:
        data = self._body(s, sampling_params)
        data["stream"] = True
        sent = ""
        meta: dict[str, Any] = {}
        for chunk in self._request_stream(data):
            if chunk.get("index", 0) != 0:
                continue  # n > 1: the program's text follows the first sequence
            text = chunk.get("text", "")
            delta_meta = chunk.get("meta_info", {})
            if self.incremental_stream:  # --incremental-streaming-output: chunks are deltas
                new = text
                for k, v in delta_meta.items():
                    if k.endswith("_logprobs") and isinstance(v, list):
                        meta.setdefault(k, []).extend(v)
                    else:
                        meta[k] = v
            else:  # chunks carry everything so far (SGLang's default)
                new = text[len(sent):] if text.startswith(sent) else text
                meta = delta_meta
            sent += new
            if new or delta_meta.get("finish_reason") is not None:
                # Always cumulative (the program's meta_info is the whole result); a snapshot, since
                # the lists keep growing.
                yield new, {k: list(v) if isinstance(v, list) else v for k, v in meta.items()}

    def select(
        self,
        s: "StreamExecutor",
        choices: list[str],
        temperature: float,
        choices_method: Optional[ChoicesSamplingMethod] = None,
    ) -> ChoicesDecision:
        method = choices_method or token_length_normalized
        prefix = s.text_
        # 1. The prefix alone: cached once, and its length tells where the choices start.
        committed = self._request({"text": prefix, "sampling_params": {"max_new_tokens": 0}})
        n_prefix = int(committed["meta_info"]["prompt_tokens"])
        start = max(n_prefix - 1, 0)
        # 2. One batch: the prefix again (to learn its last token) and prefix + each choice. Logprobs
        #    start at the prefix's last token, so a choice whose first characters merge with it into a
        #    different token ("token healing") is still scored from the boundary.
        res = self._request({
            "text": [prefix] + [prefix + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": start,
            "return_text_in_logprobs": True,
        })
        if not isinstance(res, list) or len(res) != len(choices) + 1:
            raise BackendError("select: the runtime returned a malformed batch")
        base = [_entry(e) for e in res[0]["meta_info"]["input_token_logprobs"]]
        last_id = base[0][1] if n_prefix > 0 and base else None
        input_token_logprobs: list[list[tuple]] = []
        for r in res[1:]:
            entries = [_entry(e) for e in r["meta_info"]["input_token_logprobs"]]
            if n_prefix > 0 and entries and entries[0][1] == last_id:
                entries = entries[1:]  # the boundary token is the prefix's own: not part of the choice
            input_token_logprobs.append(entries)
        normalized = [_mean([e[0] for e in ent if e[0] is not None]) for ent in input_token_logprobs]
        unconditional = None
        if method.requires_unconditional_logprobs:
            # 3. The same choice tokens scored with no context at all.
            ures = self._request({
                "input_ids": [[e[1] for e in ent] for ent in input_token_logprobs],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True,
                "logprob_start_len": 0,
                "return_text_in_logprobs": True,
            })
            ures = ures if isinstance(ures, list) else [ures]
            unconditional = [[_entry(e) for e in r["meta_info"]["input_token_logprobs"]] for r in ures]
        decision = method(
            choices=list(choices),
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
        # Per choice: its whole prompt (prefix + choice) and how much of it the radix cache served.
        meta = dict(decision.meta_info or {})
        meta["prompt_tokens"] = [int(r["meta_info"]["prompt_tokens"]) for r in res[1:]]
        meta["cached_tokens"] = [int(r["meta_info"].get("cached_tokens", 0)) for r in res[1:]]
        decision.meta_info = meta
        return decision
