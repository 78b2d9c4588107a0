"""Token ids to text as they arrive (incremental detokenization) and ``stop`` strings matched
across token boundaries, cut exactly where the first one begins.

Decoding a window of recent ids twice (with and without the newest ones) yields the text the
newest ids add, constant work per token; a piece ending in U+FFFD (half of a multi-byte
character) waits for the next token. Text that could still be the start of a stop string is
held back until it no longer can be. With ``offsets=True`` ids are read one at a time and
each one's start in the text is kept (``offsets``), so per-token data (log-probs) can be sent
with the text it belongs to (``released``).
"""
from __future__ import annotations

from typing import Optional, Sequence

WINDOW = 6  # ids decoded before the new ones, enough for any merge across a boundary


class TextStream:
    """Feed token ids with ``push``; each call returns the text safe to send now."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), offsets: bool = False):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0          # ids[prefix:read] is the context window already turned to text
        self.read = 0
        self.text = ""           # all text so far (not cut)
        self.sent = 0            # chars of text already returned
        self.stopped = False     # a stop string was found: nothing more is returned
        self.finished = False
        # With offsets: where each id's text starts in ``text`` (ids after a stop: none).
        self.offsets: Optional[list[int]] = [] if offsets else None

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped or not ids:
            return ""
        if self.offsets is not None:
            if len(ids) > 1:
                return "".join(self.push([i]) for i in ids)
            self.offsets.append(len(self.text))
        self.ids.extend(int(i) for i in ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""                                   # an incomplete character: wait
        self.text += after[len(before):]
        self.prefix = max(self.prefix, len(self.ids) - WINDOW)
        self.read = len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the request."""
        self.finished = True
        if self.stopped:
            return ""
        if self.read < len(self.ids):                   # trailing incomplete bytes
            self.text += self.tok.decode(self.ids[self.prefix:])[
                len(self.tok.decode(self.ids[self.prefix:self.read])):]
            self.read = len(self.ids)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                out = self.text[self.sent:cut]
                self.text = self.text[:cut]
                self.sent = cut
                self.stopped = True
                return out
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def released(self, start: int = 0) -> int:
        """How many ids (with offsets) have text in what was returned so far (counting on
        from ``start``): all of them after ``finish``; else those starting before the end of
        the returned text."""
        offs = self.offsets or []
        if self.finished and not self.stopped:
            return len(offs)
        n = start
        while n < len(offs) and offs[n] < self.sent:
            n += 1
        return n

    @property
    def output_text(self) -> str:
        return self.text[:self.sent]
