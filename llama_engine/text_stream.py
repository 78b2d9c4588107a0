"""Token ids to text as they arrive: the one incremental detokenizer (``IncrementalText``,
the server's streams) and ``--streaming``'s printer (``TextStream``, run.py).

``IncrementalText``: decoding a window of recent ids twice (with and without the newest ones)
yields the text the newest ids add, constant work per token; a piece ending in U+FFFD (half
of a multi-byte character) waits for the next token. ``stop`` strings (the server's) are
matched across token boundaries and cut exactly where the first one begins; text that could
still be the start of one is held back until it no longer can be. With ``offsets=True`` ids
are read one at a time and each one's start in the text is kept (``offsets``), so per-token
data (log-probs) can be sent with the text it belongs to (``released``).

``TextStream`` prints each sequence's text as its tokens come, with the engines' one stopping
rule (``sampling.cut_at_stop``: end ids, token-id stop words): tokens that could still be the
start of a stop word are held back (``sampling.held_back``) and a completed stop word is never
shown, so the streamed text ends exactly where the final output does. One sequence streams as
plain text; several print ``[Text i] <new text>`` lines.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional, Sequence

from .sampling import cut_at_stop, held_back

WINDOW = 6  # ids decoded before the new ones, enough for any merge across a boundary


class IncrementalText:
    """Feed token ids with ``push``; each call returns the text safe to send now (the
    server's streams, and each sequence of ``TextStream``)."""

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


class TextStream:
    """run.py's ``--streaming``: ``step`` (the static engine's streamer) or
    ``request_output`` (the inflight engine's) feed it; it prints as text becomes final."""

    def __init__(self, tokenizer, batch: Sequence[Sequence[int]], end_ids: Iterable[int] = (),
                 file=None, stop_words: Sequence[Sequence[int]] = ()):
        self.prompts = [list(p) for p in batch]
        self.end_ids = [int(i) for i in end_ids]
        self.stop_words = [list(w) for w in stop_words]
        self.file = file or sys.stdout
        self.ids: list[list[int]] = [[] for _ in batch]      # generated so far (uncut)
        self.fed = [0 for _ in batch]                         # ids given to the detokenizer
        self.text = [IncrementalText(tokenizer) for _ in batch]
        self.done = [False for _ in batch]
        self._claimed: dict = {}

    def push(self, index: int, tokens: Iterable[int]) -> None:
        """New tokens of sequence ``index``; prints the text that is now final."""
        if self.done[index]:
            return
        self.ids[index].extend(int(t) for t in tokens)
        kept, stopped = cut_at_stop(self.ids[index], self.end_ids, self.stop_words)
        if stopped:
            self.done[index] = True
            ready = len(kept)
        else:
            ready = len(kept) - held_back(kept, self.stop_words)
        out = self.text[index]
        new = out.push(kept[self.fed[index]:ready]) if ready > self.fed[index] else ""
        self.fed[index] = max(self.fed[index], ready)
        if stopped:
            new += out.finish()
        self._print(index, new)

    def _print(self, index: int, new: str) -> None:
        if not new:
            return
        if len(self.ids) == 1:
            print(new, end="", file=self.file, flush=True)
        else:
            print(f"[Text {index}] {new}", file=self.file, flush=True)

    def step(self, step: int, tokens: Sequence[int]) -> None:
        """The static engine's streamer: one new token per sequence."""
        for i, t in enumerate(tokens):
            self.push(i, [t])

    def request_output(self, out) -> None:
        """The inflight engine's streamer: a RequestOutput (matched to its prompt)."""
        rid = out.request_id
        if rid not in self._claimed:
            taken = set(self._claimed.values())
            prompt = list(out.sequence.prompt_ids)
            self._claimed[rid] = next(i for i, p in enumerate(self.prompts)
                                      if p == prompt and i not in taken)
        self.push(self._claimed[rid], out.new_token_ids)

    def close(self) -> None:
        """The end of generation: the text still held back (a stop word's start that never
        completed, half a character) is final now."""
        for i in range(len(self.ids)):
            if not self.done[i]:
                kept, _ = cut_at_stop(self.ids[i], self.end_ids, self.stop_words)
                new = self.text[i].push(kept[self.fed[i]:]) + self.text[i].finish()
                self.fed[i], self.done[i] = len(kept), True
                self._print(i, new)
        if len(self.ids) == 1:
            print(file=self.file, flush=True)
