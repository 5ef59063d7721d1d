"""SGLang's native /generate stream chunks (HTTP and the ZeroMQ front door), built from the
detokenizer's per-step deltas of one sequence.

* Default: each chunk carries everything so far (text, ids, logprob lists), as SGLang does.
* ``--incremental-streaming-output``: each chunk carries only what is new since the previous chunk
  (text, ids and the logprob lists), as SGLang does with that flag.
* Either way ``meta_info`` has ``output_token_logprobs_length``: how many output tokens have logprobs
  so far (when logprobs were asked for), so a client can check it got every entry.
* ``stream_interval`` N (the request's sampling param, else the server's flag): a chunk goes out once
  at least N new tokens have arrived since the last one, and always when the sequence finishes;
  the deltas in between are merged, never dropped.
"""

from __future__ import annotations

from typing import Any

class NativeStreamer:
    """One sequence's chunks. ``add(delta)`` → the chunk to send now, or None to wait."""

    def __init__(self, incremental: bool = False, interval: int = 1) -> None:
        self.incremental = incremental
        self.interval = max(int(interval), 1)
        self.text = ""  # everything so far
        self.output_ids: list[int] = []
        self.meta: dict[str, Any] = {}  # cumulative meta_info
        self._sent_text = 0
        self._sent_ids = 0
        self._sent_lists: dict[str, int] = {}
        self._sent_tokens = 0

    def add(self, delta: dict) -> dict | None:
        self.text += delta.get("text", "")
        self.output_ids.extend(delta.get("output_ids", ()))
        for k, v in (delta.get("meta_info") or {}).items():
            if k.endswith("_logprobs"):
                self.meta.setdefault(k, []).extend(v)
            else:
                self.meta[k] = v
        if "output_token_logprobs" in self.meta:
            self.meta["output_token_logprobs_length"] = len(self.meta["output_token_logprobs"])
        finished = self.meta.get("finish_reason") is not None or "error" in self.meta
        tokens = int(self.meta.get("completion_tokens", len(self.output_ids)))
        if not finished and tokens - self._sent_tokens < self.interval:
            return None
        self._sent_tokens = tokens
        if not self.incremental:
            return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": dict(self.meta)}
        meta = {}
        for k, v in self.meta.items():
            if isinstance(v, list) and k.endswith("_logprobs"):
                meta[k] = v[self._sent_lists.get(k, 0):]
                self._sent_lists[k] = len(v)
            else:
                meta[k] = v
        chunk = {"text": self.text[self._sent_text:], "output_ids": self.output_ids[self._sent_ids:], "meta_info": meta}
        self._sent_text, self._sent_ids = len(self.text), len(self.output_ids)
        return chunk

    def final(self) -> dict:
        """The whole result (what a non-streaming request gets), whatever the mode."""
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": dict(self.meta)}


def native_streamers(server_args: Any, reqs: list) -> list[NativeStreamer]:
    """One streamer per sequence: the server's mode, each request's stream_interval (else the server's)."""
    out = []
    for r in reqs:
        interval = r.sampling_params.stream_interval or server_args.stream_interval
        out.append(NativeStreamer(incremental=server_args.incremental_streaming_output, interval=interval))
    return out
