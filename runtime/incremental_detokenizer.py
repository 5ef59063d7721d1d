"""IncrementalDetokenizer: token ids → text one step at a time, UTF-8 safe (used by RequestState).

Decoding one token at a time breaks multi-byte characters (a byte-level BPE token can hold half of
"é") and word-boundary spacing. We decode a short window that starts a few tokens back (the
``prefix_offset``) and emit only the text past what that window already produced; if the newest text
ends in U+FFFD (an incomplete UTF-8 sequence), we wait for the next token. The same object serves
the in-process Engine and the server's detokenizer, so both stream the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_INCOMPLETE = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything emitted so far
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly decodable text (possibly empty)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_INCOMPLETE):
            delta = new_text[len(prefix_text) :]
            self.text += delta
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end: emit whatever is left, incomplete characters included."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
        self.text += delta
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta
