"""The sampling controls on the device, batched: ``Controls`` keeps, per slot (a row of the
static batch, or a request under inflight batching), the state the controls need as device
tensors — a seen-token mask, generated-token counts, the prompt + output history and its
length — and applies the penalties and bans of any mix of requests to one batch of logits
with a fixed number of kernels, advances the state with the sampled tokens and detects stop
words, without reading anything back to the host. Per-batch index tensors (which slot each
row is, its penalties, its bad/stop words) are built once per set of rows and reused while
the batch stays the same. Only used for rows whose ``SamplingConfig.has_controls``: the plain
greedy path runs none of this.

Semantics (Hugging Face ``generate``'s processors where HF has the control): repetition
penalty over every token seen (prompt + output); presence/frequency penalties (OpenAI) over
the generated tokens; no-repeat n-grams over prompt + output; bad words matched against the
end of prompt + output; ``min_length`` counts generated tokens only (HF's
``min_new_tokens``); stop words are matched in the generated tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .sampling import SamplingConfig

NEG_INF = float("-inf")


@dataclass
class _Plan:
    """Index tensors of one set of slots (rows of a batch), built on the host once."""

    slots: torch.Tensor                     # int64 [R]
    rep: Optional[torch.Tensor] = None      # [R, 1] repetition penalties (1 = off)
    pres: Optional[torch.Tensor] = None     # [R, 1] presence penalties
    freq: Optional[torch.Tensor] = None     # [R, 1] frequency penalties
    ngrams: tuple = ()                      # ((n, row index tensor), ...)
    single_bad: Optional[tuple] = None      # (rows, tokens) to ban always
    multi_bad: Optional[tuple] = None       # (rows [K], prefixes [K, W], last [K])
    stop: Optional[tuple] = None            # (rows [K], words [K, W], lengths [K])
    min_len: tuple = ()                     # ((row, min_length, end ids), ...) on the host


def _words_table(rows: list, words: list, device) -> tuple:
    """Words right-aligned in [K, W] (-1 = no token), with their row and length."""
    width = max(len(w) for w in words)
    t = torch.full((len(words), width), -1, dtype=torch.int64)
    for k, w in enumerate(words):
        t[k, width - len(w):] = torch.tensor(list(w), dtype=torch.int64)
    lens = torch.tensor([len(w) for w in words], dtype=torch.int64)
    return (torch.tensor(rows, dtype=torch.int64, device=device), t.to(device),
            lens.to(device))


class Controls:
    """Control state of up to ``capacity`` slots (grows on demand), for sequences of at most
    ``max_len`` tokens over a vocabulary of ``vocab_size``."""

    def __init__(self, vocab_size: int, max_len: int, device, capacity: int = 8):
        self.V, self.L, self.device = vocab_size, max_len + 1, torch.device(device)
        self.capacity = capacity
        self.seen: Optional[torch.Tensor] = None    # bool [C, V]: in prompt or output
        self.counts: Optional[torch.Tensor] = None  # fp32 [C, V]: times generated
        self.hist: Optional[torch.Tensor] = None    # int64 [C, L]: prompt + output, -1 after
        self.lens = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.prompt_lens = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.info: dict = {}                        # slot -> (SamplingConfig, end ids)
        self._slot_of: dict = {}                    # key -> slot
        self._free = list(range(capacity - 1, -1, -1))
        self._plans: dict = {}

    # -- slots -----------------------------------------------------------------------------
    def slot(self, key, cfg: SamplingConfig, history: Sequence[int], prompt_len: int,
             end_ids: Sequence[int]) -> int:
        """The slot of ``key`` (a row, a request id); a new one is filled from ``history``
        (prompt then any output so far)."""
        s = self._slot_of.get(key)
        if s is not None:
            return s
        if not self._free:
            self._grow()
        s = self._free.pop()
        h = torch.tensor(list(history), dtype=torch.int64, device=self.device)
        if cfg.repetition_penalty != 1.0:
            self.seen = self._alloc(self.seen, torch.bool, False)
            self.seen[s] = False
            self.seen[s, h] = True
        if cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0:
            self.counts = self._alloc(self.counts, torch.float32, 0)
            self.counts[s] = 0
            out = h[prompt_len:]
            self.counts[s].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        if cfg.no_repeat_ngram_size > 0 or cfg.bad_words or cfg.stop_words:
            self.hist = self._alloc(self.hist, torch.int64, -1, self.L)
            self.hist[s] = -1
            self.hist[s, :len(h)] = h[:self.L]
        self.lens[s] = len(h)
        self.prompt_lens[s] = prompt_len
        self.info[s] = (cfg, tuple(int(e) for e in end_ids))
        self._slot_of[key] = s
        self._plans.clear()
        return s

    def slot_of(self, key) -> Optional[int]:
        """The slot ``key`` holds, None when it holds none."""
        return self._slot_of.get(key)

    def release(self, key) -> None:
        s = self._slot_of.pop(key, None)
        if s is not None:
            del self.info[s]
            self._free.append(s)
            self._plans.clear()

    def _alloc(self, t, dtype, fill, width=None):
        if t is None:
            t = torch.full((self.capacity, width or self.V), fill, dtype=dtype,
                           device=self.device)
        return t

    def _grow(self) -> None:
        old, self.capacity = self.capacity, self.capacity * 2

        def grown(t, fill):
            if t is None:
                return None
            new = torch.full((self.capacity, *t.shape[1:]), fill, dtype=t.dtype,
                             device=self.device)
            new[:old] = t
            return new
        self.seen, self.counts = grown(self.seen, False), grown(self.counts, 0)
        self.hist = grown(self.hist, -1)
        self.lens, self.prompt_lens = grown(self.lens, 0), grown(self.prompt_lens, 0)
        self._free = list(range(self.capacity - 1, old - 1, -1))

    # -- plans -----------------------------------------------------------------------------
    def _plan(self, slots: tuple) -> _Plan:
        plan = self._plans.get(slots)
        if plan is not None:
            return plan
        dev = self.device
        cfgs = [self.info[s][0] for s in slots]
        plan = _Plan(torch.tensor(slots, dtype=torch.int64, device=dev))

        def column(name):
            return torch.tensor([[float(getattr(c, name))] for c in cfgs], device=dev)
        if any(c.repetition_penalty != 1.0 for c in cfgs):
            plan.rep = column("repetition_penalty")
        if any(c.presence_penalty != 0.0 or c.frequency_penalty != 0.0 for c in cfgs):
            plan.pres, plan.freq = column("presence_penalty"), column("frequency_penalty")
        groups: dict = {}
        for r, c in enumerate(cfgs):
            if c.no_repeat_ngram_size > 0:
                groups.setdefault(c.no_repeat_ngram_size, []).append(r)
        plan.ngrams = tuple((n, torch.tensor(rs, device=dev)) for n, rs in groups.items())
        single = [(r, w[0]) for r, c in enumerate(cfgs) for w in c.bad_words if len(w) == 1]
        if single:
            plan.single_bad = tuple(torch.tensor(x, device=dev) for x in zip(*single))
        multi = [(r, w) for r, c in enumerate(cfgs) for w in c.bad_words if len(w) > 1]
        if multi:
            rows, pre, _ = _words_table([r for r, _ in multi], [w[:-1] for _, w in multi], dev)
            last = torch.tensor([w[-1] for _, w in multi], device=dev)
            plan.multi_bad = (rows, pre, last)
        stops = [(r, w) for r, c in enumerate(cfgs) for w in c.stop_words]
        if stops:
            plan.stop = _words_table([r for r, _ in stops], [w for _, w in stops], dev)
        plan.min_len = tuple((r, c.min_length, self.info[s][1])
                             for r, (c, s) in enumerate(zip(cfgs, slots))
                             if c.min_length > 0 and self.info[s][1])
        self._plans[slots] = plan
        return plan

    # -- helpers -------------------------------------------------------------------------
    def _tail(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """The last ``width`` tokens of each slot's history [K, width] (-2 before its start)."""
        lens = self.lens[slots]
        idx = lens[:, None] - width + torch.arange(width, device=self.device)
        tail = self.hist[slots].gather(1, idx.clamp(min=0))
        return tail.masked_fill(idx < 0, -2)

    def _ends_with(self, slots: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """[K]: history of slot k ends with word k (right-aligned, -1 = no token there)."""
        return ((self._tail(slots, words.shape[1]) == words) | (words < 0)).all(-1)

    # -- the step ----------------------------------------------------------------------------
    def apply(self, slots: Sequence[int], logits: torch.Tensor,
              num_generated: Union[int, Sequence[int]]) -> torch.Tensor:
        """Penalties and bans on fp32 ``logits`` [R, V] of the rows in ``slots`` (in place;
        returned). ``num_generated``: tokens generated so far, per row or for all."""
        plan = self._plan(tuple(slots))
        S = plan.slots
        if plan.rep is not None:
            p = plan.rep
            logits.copy_(torch.where(self.seen[S], torch.where(logits < 0, logits * p,
                                                                 logits / p), logits))
        if plan.pres is not None:
            c = self.counts[S]
            logits -= c * plan.freq + (c > 0).to(c.dtype) * plan.pres
        for n, rows in plan.ngrams:
            logits[rows] = logits[rows].masked_fill(self._ngram_ban(S[rows], n), NEG_INF)
        if plan.single_bad is not None:
            logits[plan.single_bad] = NEG_INF
        if plan.multi_bad is not None:
            rows, prefix, last = plan.multi_bad
            match = self._ends_with(S[rows], prefix).to(logits.dtype)
            ban = torch.zeros_like(logits).index_put_((rows, last), match, accumulate=True)
            logits.masked_fill_(ban > 0, NEG_INF)
        if plan.min_len:
            ngen = ([num_generated] * len(slots) if isinstance(num_generated, int)
                    else list(num_generated))
            ban = [(r, e) for r, m, ends in plan.min_len if ngen[r] < m for e in ends]
            if ban:
                rows, ids = zip(*ban)
                logits[torch.tensor(rows, device=self.device),
                       torch.tensor(ids, device=self.device)] = NEG_INF
        return logits

    def _ngram_ban(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        """Bool [K, V]: tokens that would repeat an n-gram of the slot's history."""
        hist, lens = self.hist[slots], self.lens[slots]
        if n == 1:
            valid = torch.arange(hist.shape[1], device=self.device)[None] < lens[:, None]
            ban = torch.zeros(len(slots), self.V, device=self.device)
            return ban.scatter_add_(1, hist.clamp(min=0), valid.float()) > 0
        windows = hist.unfold(1, n, 1)                                   # [K, W, n]
        prefix = self._tail(slots, n - 1)                                # [K, n-1]
        start = torch.arange(windows.shape[1], device=self.device)[None]
        match = (windows[..., :-1] == prefix[:, None, :]).all(-1) & (start + n <= lens[:, None])
        ban = torch.zeros(len(slots), self.V, device=self.device)
        return ban.scatter_add_(1, windows[..., -1].clamp(min=0), match.float()) > 0

    def update(self, slots: Sequence[int], tokens: torch.Tensor) -> None:
        """Advance the state of ``slots`` by their sampled ``tokens`` (int64 [R], device)."""
        S = self._plan(tuple(slots)).slots
        if self.seen is not None:
            self.seen[S, tokens] = True
        if self.counts is not None:
            self.counts.index_put_((S, tokens), torch.ones_like(tokens, dtype=torch.float32),
                                   accumulate=True)
        if self.hist is not None:
            self.hist[S, self.lens[S].clamp(max=self.L - 1)] = tokens
        self.lens[S] += 1

    def stopped(self, slots: Sequence[int]) -> torch.Tensor:
        """Bool [R]: the row's output now ends with one of its stop words (after ``update``)."""
        plan = self._plan(tuple(slots))
        hit = torch.zeros(len(slots), dtype=torch.int64, device=self.device)
        if plan.stop is None:
            return hit.bool()
        rows, words, wlen = plan.stop
        s = plan.slots[rows]
        match = self._ends_with(s, words) & (self.lens[s] - self.prompt_lens[s] >= wlen)
        return hit.index_add_(0, rows, match.long()) > 0
