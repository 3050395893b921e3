"""Turning generated tokens into text pieces, and cutting the text at a stop string.

Text goes out in pieces as tokens arrive (streaming), but a piece must never be taken back:
text that could still become a stop string, or half of a multi-byte character, is held until
the next token decides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a tokenizer decodes half of a UTF-8 character to


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def undecided_tail(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could still be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """The text of one request's generated tokens, handed out once, in order, cut at stop strings."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.token_ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now certain. Sets `stopped` when a stop string appeared."""
        self.token_ids.append(token_id)
        text = self._decode()
        cut = find_stop(text, self.stops) if self.stops else None
        if cut is not None:
            self.stopped = True
            return self._take(text, max(cut, self.sent))
        end = len(text) - undecided_tail(text, self.stops)
        while end > self.sent and text[end - 1] == REPLACEMENT:  # a character still being spelled out
            end -= 1
        return self._take(text, end)

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        return "" if self.stopped else self._take(self._decode(), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece
