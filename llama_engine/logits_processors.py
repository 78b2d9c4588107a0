"""The sampling controls on the device: ``Controls`` holds, for a batch of rows sharing one
``SamplingConfig``, the state the controls need (token counts, the prompt + output history)
as device tensors, applies the penalties and bans to a batch of logits, advances the state
with the sampled tokens and detects stop words, all without reading anything back to the
host. The static batch keeps one ``Controls`` for the whole batch; inflight batching keeps
one per request (``model_runner``). Only built when ``SamplingConfig.has_controls``.

Semantics (Hugging Face ``generate``'s processors where HF has the control): repetition
penalty over every token seen (prompt + output); presence/frequency penalties (OpenAI) over
the generated tokens; no-repeat n-grams over prompt + output; bad words matched against the
end of prompt + output; ``min_length`` counts generated tokens only (HF's
``min_new_tokens``); stop words are matched in the generated tokens only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .sampling import SamplingConfig

NEG_INF = float("-inf")


def _right_aligned(words: Sequence[Sequence[int]], width: int, device) -> torch.Tensor:
    """Words as rows of ``width`` ids, right-aligned, padded on the left with -1."""
    t = torch.full((len(words), width), -1, dtype=torch.int64)
    for k, w in enumerate(words):
        if w:
            t[k, width - len(w):] = torch.tensor(list(w), dtype=torch.int64)
    return t.to(device)


class Controls:
    """Device state of the controls of ``cfg`` for ``len(histories)`` rows.

    ``histories[b]``: the tokens of row b so far (prompt, then any output already generated),
    ``prompt_lens[b]``: how many of them are the prompt; ``capacity``: the longest a row can
    grow; ``end_ids``: what ``min_length`` bans."""

    def __init__(self, cfg: SamplingConfig, histories: Sequence[Sequence[int]],
                 prompt_lens: Sequence[int], end_ids: Sequence[int], vocab_size: int,
                 capacity: int, device):
        self.cfg, self.device, self.V = cfg, torch.device(device), vocab_size
        B = len(histories)
        rows = torch.arange(B, device=self.device)
        self.rows = rows
        self.end_ids = torch.tensor(sorted(set(end_ids)), dtype=torch.int64, device=self.device)
        self.num_generated = min(len(h) - p for h, p in zip(histories, prompt_lens))
        flat = [torch.tensor(list(h), dtype=torch.int64) for h in histories]
        self.seen = self.counts = self.hist = None
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=self.device)
            for b, h in enumerate(flat):
                self.seen[b, h.to(self.device)] = True
        if cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0:
            self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=self.device)
            for b, (h, p) in enumerate(zip(flat, prompt_lens)):
                out = h[p:].to(self.device)
                self.counts[b].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        multi_bad = [w for w in cfg.bad_words if len(w) > 1]
        self.single_bad = torch.tensor(sorted({w[0] for w in cfg.bad_words if len(w) == 1}),
                                       dtype=torch.int64, device=self.device)
        if cfg.no_repeat_ngram_size > 0 or multi_bad or cfg.stop_words:
            cap = max(capacity, max(len(h) for h in histories)) + 1
            self.hist = torch.full((B, cap), -1, dtype=torch.int64)
            for b, h in enumerate(flat):
                self.hist[b, :len(h)] = h
            self.hist = self.hist.to(self.device)
            self.lens = torch.tensor([len(h) for h in histories], dtype=torch.int64,
                                     device=self.device)
            self.prompt_lens = torch.tensor(list(prompt_lens), dtype=torch.int64,
                                            device=self.device)
        if multi_bad:
            w = max(len(x) for x in multi_bad) - 1
            self.bad_prefix = _right_aligned([x[:-1] for x in multi_bad], w, self.device)
            self.bad_last = torch.tensor([x[-1] for x in multi_bad], dtype=torch.int64,
                                         device=self.device)
        self.multi_bad = bool(multi_bad)
        if cfg.stop_words:
            w = max(len(x) for x in cfg.stop_words)
            self.stop = _right_aligned(cfg.stop_words, w, self.device)
            self.stop_len = torch.tensor([len(x) for x in cfg.stop_words], dtype=torch.int64,
                                         device=self.device)

    # -- helpers -------------------------------------------------------------------------
    def _tail(self, width: int) -> torch.Tensor:
        """The last ``width`` tokens of every row [B, width] (-2 before a row's start)."""
        idx = self.lens[:, None] - width + torch.arange(width, device=self.device)
        tail = self.hist.gather(1, idx.clamp(min=0))
        return tail.masked_fill(idx < 0, -2)

    def _suffix_match(self, words: torch.Tensor) -> torch.Tensor:
        """[B, K]: row b ends with word k (right-aligned, -1 = no token there)."""
        tail = self._tail(words.shape[1])
        return ((tail[:, None, :] == words[None]) | (words[None] < 0)).all(-1)

    # -- the step --------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, num_generated: int) -> torch.Tensor:
        """Penalties and bans on fp32 ``logits`` [B, V] (in place; returned).
        ``num_generated``: tokens generated so far (the same for every row)."""
        cfg = self.cfg
        if self.seen is not None:
            p = cfg.repetition_penalty
            pen = torch.where(logits < 0, logits * p, logits / p)
            logits.copy_(torch.where(self.seen, pen, logits))
        if self.counts is not None:
            sub = self.counts * cfg.frequency_penalty
            if cfg.presence_penalty != 0.0:
                sub = sub + (self.counts > 0).to(sub.dtype) * cfg.presence_penalty
            logits -= sub.to(logits.dtype)
        n = cfg.no_repeat_ngram_size
        if n > 0:
            self._ban_ngrams(logits, n)
        if self.single_bad.numel():
            logits[:, self.single_bad] = NEG_INF
        if self.multi_bad:
            match = self._suffix_match(self.bad_prefix).to(logits.dtype)  # [B, K]
            ban = torch.zeros_like(logits).scatter_add_(
                1, self.bad_last[None].expand_as(match), match)
            logits.masked_fill_(ban > 0, NEG_INF)
        if num_generated < cfg.min_length and self.end_ids.numel():
            logits[:, self.end_ids] = NEG_INF
        return logits

    def _ban_ngrams(self, logits: torch.Tensor, n: int) -> None:
        """Ban every token that would repeat an n-gram of the row's history."""
        if self.hist.shape[1] < n:
            return
        if n == 1:  # every token seen is banned
            valid = torch.arange(self.hist.shape[1], device=self.device)[None] < self.lens[:, None]
            ban = torch.zeros_like(logits).scatter_add_(
                1, self.hist.clamp(min=0), valid.to(logits.dtype))
            logits.masked_fill_(ban > 0, NEG_INF)
            return
        windows = self.hist.unfold(1, n, 1)                          # [B, W, n]
        prefix = self._tail(n - 1)                                   # [B, n-1]
        start = torch.arange(windows.shape[1], device=self.device)[None]
        complete = start + n <= self.lens[:, None]                   # window inside history
        match = (windows[..., :-1] == prefix[:, None, :]).all(-1) & complete
        ban = torch.zeros_like(logits).scatter_add_(
            1, windows[..., -1].clamp(min=0), match.to(logits.dtype))
        logits.masked_fill_(ban > 0, NEG_INF)

    def update(self, tokens: torch.Tensor) -> None:
        """Advance the state by the sampled ``tokens`` (int64 [B], on the device)."""
        t = tokens.view(-1, 1)
        if self.seen is not None:
            self.seen.scatter_(1, t, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, t, torch.ones_like(t, dtype=self.counts.dtype))
        if self.hist is not None:
            self.hist.scatter_(1, self.lens.clamp(max=self.hist.shape[1] - 1)[:, None], t)
            self.lens += 1
        self.num_generated += 1

    def stopped(self) -> torch.Tensor:
        """Bool [B]: the row's output now ends with a stop word (call after ``update``)."""
        match = self._suffix_match(self.stop)                        # [B, K]
        long_enough = (self.lens - self.prompt_lens)[:, None] >= self.stop_len[None]
        return (match & long_enough).any(-1)
