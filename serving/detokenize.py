"""A completion's text, decoded a few tokens at a time, and its stop strings, searched in the new text only.

Decoding a row's whole output on every token, and searching all of it for stop strings, costs time
that grows with the square of the completion's length. ``IncrementalText`` decodes only a window: the
tokens committed last (``prefix``) and those since (``read``). The new text is what the window decodes to
beyond what its first part decoded to, so a tokenizer's leading-space and byte-fallback rules see the same
context as in a whole decode. Text that ends in an unfinished character (U+FFFD: a multi-byte character
split across tokens) waits for the next token, and ``add(..., final=True)`` commits it when the row ends. The result
equals ``decode(ids, skip_special_tokens=True)`` (tests/unit/test_detokenize.py checks it on the real
tokenizer and on random ids).

Pure Python over a Hugging Face tokenizer: no torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    """The stable text of a growing list of token ids (see the module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.text = ""
        self.prefix = self.read = 0  # ids[prefix:read] were committed last; ids[read:] are pending
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.searched = 0  # the text before this had no stop string

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int], final: bool = False) -> None:
        """Take in ``ids`` (the whole output so far; only its tail is decoded). ``final``: the row has ended,
        so commit the pending tail even if it ends in an unfinished character."""
        if len(ids) == self.read:
            return
        before = self._decode(ids[self.prefix : self.read])
        now = self._decode(ids[self.prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(ids)

    def find_stop(self) -> int:
        """Where the first stop string starts in ``text``, or -1; searches only text that could hold one
        it has not seen (each call moves the searched mark to the end)."""
        if not self.stop:
            return -1
        start = max(0, self.searched - self.longest + 1)
        self.searched = len(self.text)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits, default=-1)
