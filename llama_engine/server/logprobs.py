"""Log-probabilities in the OpenAI API's two shapes, and the text and bytes of one token.

``/v1/completions`` (``logprobs: N``) answers ``{tokens, token_logprobs, top_logprobs,
text_offset}``: per output token its text, its log-prob, a ``{text: log-prob}`` map of the top
N plus the chosen token, and where its text starts in the completion. ``/v1/chat/completions``
(``logprobs: true, top_logprobs: N``) answers ``{content: [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]}``. The values are the engine's own
(``sampling.token_logprobs``: the log-softmax the token was chosen from).

A token's bytes come from its vocabulary piece: GPT-2's byte-level alphabet (``Ġ`` is a space)
or SentencePiece's (``▁`` is a space, ``<0xNN>`` one byte), told apart once per tokenizer. A
token that is not valid UTF-8 alone (part of a character) is written ``bytes:\\xNN...``.
"""
from __future__ import annotations

import math
import re
from typing import Optional

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>$")
FLOOR = -9999.0       # what -inf (a banned token) is sent as: JSON has no infinity


def _byte_level_alphabet() -> dict:
    """GPT-2's byte-level BPE alphabet, char -> byte: printable bytes stand for themselves,
    the others are moved to code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


_BYTE_OF = _byte_level_alphabet()


def _finite(v: float) -> float:
    return float(v) if math.isfinite(v) else FLOOR


class TokenText:
    """Token id -> its bytes and its text as OpenAI reports them (cached per id)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._bytes: dict[int, bytes] = {}
        # A tokenizer without SentencePiece or HF pieces (the benchmark's id tokenizer on
        # random weights) reports each token as its decoded text.
        self._sp, self._hf = getattr(tokenizer, "sp", None), getattr(tokenizer, "hf", None)
        self.byte_level = False
        if self._sp is not None or self._hf is not None:
            space = self._pieces(tokenizer.encode(" a", add_bos=False)[:1])
            self.byte_level = bool(space) and space[0].startswith("\u0120")

    def _pieces(self, ids: list) -> list:
        if self._sp is not None:
            return [self._sp.id_to_piece(int(i)) for i in ids]
        if self._hf is not None:
            return list(self._hf.convert_ids_to_tokens([int(i) for i in ids]))
        return [self.tok.decode([int(i)]) for i in ids]

    def bytes(self, tid: int) -> bytes:
        b = self._bytes.get(tid)
        if b is None:
            piece = self._pieces([tid])[0] or ""
            m = _BYTE_PIECE.match(piece)
            if m:
                b = bytes([int(m.group(1), 16)])
            elif self.byte_level and all(c in _BYTE_OF for c in piece):
                b = bytes(_BYTE_OF[c] for c in piece)
            else:
                b = piece.replace("\u2581", " ").encode()
            self._bytes[tid] = b
        return b

    def text(self, tid: int) -> str:
        b = self.bytes(tid)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def completion_logprobs(entries: list, tt: TokenText) -> dict:
    """``entries``: [(id, log-prob, top [(id, log-prob)] or None, text offset)]."""
    tops = []
    for tid, lp, top, _ in entries:
        d = {tt.text(i): _finite(v) for i, v in (top or [])}
        d.setdefault(tt.text(tid), _finite(lp))      # the chosen token is always there
        tops.append(d)
    return {"tokens": [tt.text(e[0]) for e in entries],
            "token_logprobs": [_finite(e[1]) for e in entries],
            "top_logprobs": tops, "text_offset": [e[3] for e in entries]}


def chat_logprobs(entries: list, tt: TokenText) -> dict:
    def one(tid: int, lp: float) -> dict:
        return {"token": tt.text(tid), "logprob": _finite(lp), "bytes": list(tt.bytes(tid))}
    return {"content": [dict(one(tid, lp), top_logprobs=[one(i, v) for i, v in (top or [])])
                        for tid, lp, top, _ in entries], "refusal": None}


def shape(kind: str, entries: Optional[list], tt: TokenText) -> Optional[dict]:
    """The ``logprobs`` field of a choice (None when the request did not ask)."""
    if entries is None:
        return None
    return chat_logprobs(entries, tt) if kind == "chat" else completion_logprobs(entries, tt)
