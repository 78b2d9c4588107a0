"""``--streaming``: text printed as it is generated, decoded incrementally.

Each sequence's ids are decoded whole after every new token and only the text not yet shown
is printed, so a word split over several tokens (or a UTF-8 character over byte tokens) comes
out right; a decode ending in the replacement character waits for the next token. One
sequence streams as plain text; several print ``[Text i] <new text>`` lines.
"""
from __future__ import annotations

import sys
from typing import Iterable, Sequence


class TextStream:
    def __init__(self, tokenizer, batch: Sequence[Sequence[int]], end_ids: Iterable[int] = (),
                 file=None):
        self.tokenizer = tokenizer
        self.prompts = [list(p) for p in batch]
        self.end_ids = set(end_ids)
        self.file = file or sys.stdout
        self.ids = [[] for _ in batch]
        self.shown = ["" for _ in batch]
        self.done = [False for _ in batch]
        self._claimed: dict = {}

    def push(self, index: int, tokens: Iterable[int]) -> None:
        """New tokens of sequence ``index``; prints what they add to its text."""
        if self.done[index]:
            return
        for t in tokens:
            if int(t) in self.end_ids:
                self.done[index] = True
                break
            self.ids[index].append(int(t))
        text = self.tokenizer.decode(self.ids[index])
        if text.endswith("\ufffd") or not text.startswith(self.shown[index]):
            return
        new, self.shown[index] = text[len(self.shown[index]):], text
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
        if len(self.ids) == 1:
            print(file=self.file, flush=True)
