"""Incremental detokenization and stop-sequence matching for one request.

Byte-level BPE splits a multi-byte character over several tokens; decoding a token alone
then yields U+FFFD. `IncrementalDetokenizer` re-decodes a short window of recent tokens and
only emits text once it decodes cleanly (the prefix/read offsets scheme of TGI and vLLM),
so the concatenation of the emitted pieces equals `tokenizer.decode(all generated tokens)`.

Stop sequences are matched on the decoded generated text; the result text ends right after
the stop string (TGI keeps the stop sequence in `generated_text`).
"""
from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoded context for the next piece
        self._read_offset = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly decodable text ("" if incomplete)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (a trailing incomplete character)."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):]


def find_stop(text: str, new_piece_len: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """(end index (exclusive) in `text`, the stop string) of the earliest stop string that the
    last `new_piece_len` characters completed, or None."""
    if not stops or new_piece_len == 0:
        return None
    best: tuple[int, str] | None = None
    for s in stops:
        start = max(0, len(text) - new_piece_len - len(s) + 1)
        i = text.find(s, start)
        if i >= 0 and (best is None or i + len(s) < best[0]):
            best = (i + len(s), s)
    return best
