"""Beam search: its settings (``BeamConfig``), its per-step bookkeeping (``BeamSearch``) and
the static batch's beam loop (``generate``).

Scoring follows Hugging Face ``generate(num_beams=N, do_sample=False)``: each step takes the
fp32 log-softmax of every beam's logits plus the beam's running score, keeps the best
``max(2, 1 + n_end_ids) * N`` continuations of a prompt, moves those among the first N that
end (an end id, or the last allowed token) to the finished hypotheses with the score
``sum(log p) / generated_len ** length_penalty``, and continues with the N best that did not
end. ``early_stopping``: True stops a prompt once N hypotheses are finished; False stops it
when the best running beam, scored at its current length, cannot beat the worst finished
one; "never" scores it at the longest length allowed when ``length_penalty > 0``. The
result of a prompt is its best ``num_return_sequences`` finished hypotheses.

KV cache: every beam is a row with its own block table. After a step a beam takes its
parent's table by reference (``BlockManager.fork``: full blocks are shared, never written
again), and the block it writes next is copied first when it is shared
(``BlockManager.cow``): one batched block copy per step, however long the sequences. The
static batch here and inflight batching (``serving/llm_engine.py``) use the same two calls.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .config import ConfigError
from .kv_cache import KVCache, blocks_for
from .sampling import GenerationOutput
from .serving.block_manager import BlockManager
from .serving.sequence import Sequence as Seq

NEG = -1.0e9     # the score of impossible candidates (HF's value: same ties, same results)
EARLY_STOPPING = (True, False, "never")


@dataclass
class BeamConfig:
    """Beam search settings (TensorRT-LLM / HF names). ``num_beams == 1`` is no beam search."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1

    @property
    def enabled(self) -> bool:
        return self.num_beams > 1

    def validate(self, what: str = "beam search") -> None:
        k, r = self.num_beams, self.num_return_sequences
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"{what}: num_beams must be an integer >= 1, got {k!r}")
        if not isinstance(r, numbers.Integral) or isinstance(r, bool) or not 1 <= r <= k:
            raise ConfigError(f"{what}: num_return_sequences must be in 1..num_beams ({k}), "
                              f"got {r!r}")
        if not isinstance(self.length_penalty, numbers.Real) or isinstance(
                self.length_penalty, bool):
            raise ConfigError(f"{what}: length_penalty must be a number, got "
                              f"{self.length_penalty!r}")
        if self.early_stopping not in EARLY_STOPPING or not isinstance(
                self.early_stopping, (bool, str)):
            raise ConfigError(f"{what}: early_stopping must be True, False or 'never', got "
                              f"{self.early_stopping!r}")

    def check_sampling(self, sampling, what: str = "beam search") -> None:
        """Beams are deterministic: no sampling settings or logits controls alongside them."""
        if not self.enabled or sampling is None:
            return
        if not sampling.greedy:
            raise ConfigError(f"{what}: num_beams {self.num_beams} searches deterministically; "
                              "drop --temperature/--top_k/--top_p (beam sampling is not "
                              "supported)")
        if sampling.has_controls or sampling.logprobs is not None:
            raise ConfigError(f"{what}: num_beams {self.num_beams} does not combine with "
                              "penalties, bans, stop words or log-probs yet")


class BeamSearch:
    """Beam bookkeeping of G prompts with K beams each, rows ``g*K + k``, on ``device``.

    ``advance(logits)`` takes fp32 logits [G*K, V] of step t -> (next tokens [G*K], parent
    row of each new row [G*K]); ``done`` says when every prompt stopped; ``results()`` the
    finished hypotheses."""

    def __init__(self, cfg: BeamConfig, num_groups: int, max_new_tokens: int,
                 end_ids: Sequence[int], device):
        G, K, T = num_groups, cfg.num_beams, max_new_tokens
        self.cfg, self.G, self.K, self.T, self.device = cfg, G, K, T, device
        self.end_t = torch.tensor(list(end_ids), dtype=torch.int64, device=device)
        self.keep = max(2, 1 + len(end_ids)) * K
        self.top_mask = torch.arange(self.keep, device=device) < K
        self.run_scores = torch.zeros(G, K, dtype=torch.float32, device=device)
        self.run_scores[:, 1:] = NEG          # only beam 0 expands the prompt
        self.run_tokens = torch.zeros(G, K, T, dtype=torch.int64, device=device)
        self.fin_tokens = torch.zeros_like(self.run_tokens)
        self.fin_scores = torch.full((G, K), NEG, dtype=torch.float32, device=device)
        self.fin_lens = torch.zeros(G, K, dtype=torch.int64, device=device)
        self.fin_done = torch.zeros(G, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(G, 1, dtype=torch.bool, device=device)
        self.step = 0
        self.done = False
        self._row0 = (torch.arange(G, device=device) * K)[:, None]

    @staticmethod
    def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """t [G, N, ...] gathered along dim 1 by idx [G, M]."""
        while idx.dim() < t.dim():
            idx = idx.unsqueeze(-1)
        return torch.take_along_dim(t, idx, dim=1)

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, K, t, cfg = self.G, self.K, self.step, self.cfg
        V = logits.shape[-1]
        lp = torch.log_softmax(logits.to(torch.float32), dim=-1).view(G, K, V)
        total = (lp + self.run_scores[:, :, None]).reshape(G, K * V)
        cand_scores, cand = torch.topk(total, k=self.keep)
        parent, tok = cand // V, cand % V
        cand_tokens = self._take(self.run_tokens, parent)
        cand_tokens[:, :, t] = tok
        ends = torch.isin(tok, self.end_t) if self.end_t.numel() else torch.zeros_like(
            tok, dtype=torch.bool)
        if t + 1 >= self.T:
            ends = torch.ones_like(ends)
        # the K best candidates that did not end carry on
        live = cand_scores + ends.to(torch.float32) * NEG
        pick = torch.topk(live, k=K)[1]
        self.run_tokens = self._take(cand_tokens, pick)
        self.run_scores = self._take(live, pick)
        new_parent = self._take(parent, pick)
        # ended candidates among the first K join the finished hypotheses if good enough
        just = ends & self.top_mask[None, :]
        fin = cand_scores / ((t + 1) ** cfg.length_penalty)
        full = torch.all(self.fin_done, dim=-1, keepdim=True) & (cfg.early_stopping is True)
        fin = fin + full.to(torch.float32) * NEG
        fin = fin + (~self.improvable).to(torch.float32) * NEG
        fin = fin + (~just) * NEG
        scores = torch.cat((self.fin_scores, fin), dim=1)
        best = torch.topk(scores, k=K)[1]
        self.fin_tokens = self._take(torch.cat((self.fin_tokens, cand_tokens), dim=1), best)
        self.fin_scores = self._take(scores, best)
        lens = torch.cat((self.fin_lens, torch.full_like(tok, t + 1)), dim=1)
        self.fin_lens = self._take(lens, best)
        self.fin_done = self._take(torch.cat((self.fin_done, just), dim=1), best)
        # can a prompt still improve?
        self.step = t = t + 1
        if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
            best_len = self.T
        else:
            best_len = t
        best_run = self.run_scores[:, :1] / (best_len ** cfg.length_penalty)
        worst = torch.where(self.fin_done, torch.min(self.fin_scores, dim=1, keepdim=True)[0],
                            NEG)
        self.improvable = self.improvable & torch.any(best_run > worst, dim=-1, keepdim=True)
        going = (torch.any(self.improvable)
                 & ~(torch.all(self.fin_done) & (cfg.early_stopping is True))
                 & ~torch.all(ends))
        self.done = not bool(going)
        rows = (new_parent + self._row0).reshape(-1)
        return self.run_tokens[:, :, t - 1].reshape(-1), rows

    def results(self, n: Optional[int] = None) -> tuple[list, list, list]:
        """-> (tokens, scores, reasons): per prompt its best ``n`` hypotheses (default
        ``num_return_sequences``), flattened as rows ``g*n + i``; each row's tokens end
        before its end id (reason "stop", else "length"); scores are the length-penalized
        sums of log-probs."""
        n = n or self.cfg.num_return_sequences
        toks, lens = self.fin_tokens[:, :n].tolist(), self.fin_lens[:, :n].tolist()
        scores = self.fin_scores[:, :n].tolist()
        ends = set(self.end_t.tolist())
        out_t, out_s, why = [], [], []
        for g in range(self.G):
            for i in range(n):
                row = toks[g][i][:lens[g][i]]
                stop = bool(row) and row[-1] in ends
                out_t.append(row[:-1] if stop else row)
                out_s.append(scores[g][i])
                why.append("stop" if stop else "length")
        return out_t, out_s, why


# -- KV blocks of beams ----------------------------------------------------------------------
def reorder_blocks(bm: BlockManager, beams: list, parents: list, write_pos: list) -> list:
    """Beam ``r`` becomes a copy of beam ``parents[r]`` (tables shared by reference), then
    gets a private block for position ``write_pos[r]``. -> (src, dst) block copies to do."""
    tables = [list(beams[p].block_table) for p in parents]
    for t in tables:
        bm.share(t)
    for b in beams:
        bm.free(b)
    copies = []
    for b, t, pos in zip(beams, tables, write_pos):
        b.block_table = t
        c = bm.cow(b, pos)
        if c is not None:
            copies.append(c)
        bm.allocate(b, pos + 1)
    return copies


def copy_blocks(cache: KVCache, copies: list) -> None:
    """Copy whole KV blocks src -> dst in every layer (one indexed copy per layer and K/V)."""
    if not copies:
        return
    dev = cache.k[0].device
    src = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=dev)
    dst = torch.tensor([d for _, d in copies], dtype=torch.int64, device=dev)
    for k, v in zip(cache.k, cache.v):
        k.index_copy_(0, dst, k.index_select(0, src))
        v.index_copy_(0, dst, v.index_select(0, src))


# -- the static batch --------------------------------------------------------------------------
def generate(engine, prompts: list, max_new_tokens: int, cfg: BeamConfig,
             end_ids: list) -> GenerationOutput:
    """Beam search over a static batch on ``engine`` (``runner.Engine``; prompts checked).
    -> ``num_return_sequences`` rows per prompt (in prompt order) with their beam scores as
    ``beam_scores`` (and ``cum_log_probs``)."""
    G, K = len(prompts), cfg.num_beams
    rows = G * K
    limit = engine.config.build.max_batch_size
    if rows > limit:
        raise ConfigError(f"{G} prompt(s) x num_beams {K} = {rows} rows exceeds the engine's "
                          f"max_batch_size {limit} (rebuild with --max_batch_size {rows} or "
                          "use fewer beams/prompts)")
    dev, bs = engine.device, engine.block_size
    max_seq = max(len(p) for p in prompts) + max_new_tokens
    width = blocks_for(max_seq, bs)
    cache = engine.kv_cache(rows, max_seq)
    bm = BlockManager(cache.num_blocks, bs)
    beams = [Seq(r, prompts[r // K], max_new_tokens) for r in range(rows)]
    heads = beams[::K]
    for s in heads:
        bm.allocate(s, s.num_prompt_tokens)

    def tables(seqs):
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                            dtype=torch.int32, device=dev)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    search = BeamSearch(cfg, G, max_new_tokens, end_ids, dev)
    t0 = time.perf_counter()
    logits = engine.prefill(prompts, cache, tables(heads)).repeat_interleave(K, dim=0)
    sync()
    t_prefill = time.perf_counter() - t0
    ctx = [len(prompts[r // K]) for r in range(rows)]
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    while True:
        tok, parent = search.advance(logits)
        if search.done:
            break
        copy_blocks(cache, reorder_blocks(bm, beams, parent.tolist(), ctx))
        logits = engine.decode_step(tok, context_lens, tables(beams), cache)
        ctx = [c + 1 for c in ctx]
    sync()
    latency = time.perf_counter() - t0
    out_ids, scores, reasons = search.results()
    for s in beams:
        bm.free(s)
    return GenerationOutput(out_ids, sum(len(r) for r in out_ids), latency, t_prefill,
                            finish_reasons=reasons, beam_scores=scores,
                            num_return_sequences=cfg.num_return_sequences)


# -- inflight batching -------------------------------------------------------------------------
class BeamGroup:
    """One beam-search request under inflight batching (``serving.LLMEngine``).

    The scheduler sees only the request's ``head`` ``Sequence`` (``head.beam`` is this
    group): it prefills the prompt like any request; then ``start`` gives its blocks to K
    beam rows (``rows``: ``Sequence`` objects outside the scheduler that share the prompt's
    blocks by reference). Each later step the scheduler calls ``reserve`` (beams take their
    parents' tables, copy-on-write of the block each writes next: the block copies to run
    before the forward are left in ``copies``), the engine runs the K rows in the step's
    batch and hands their logits to ``advance``. ``head.output_ids`` follows the best running
    beam (so the head stays a one-token decode) until the group finishes; then it holds the
    best hypothesis and ``head.beam_output_ids`` / ``head.beam_scores`` the
    ``num_return_sequences`` best. Preemption drops every row (``free``) and ``reset``
    restarts the search from the prompt (it is deterministic: the same result)."""

    def __init__(self, head: Seq, cfg: BeamConfig):
        self.head, self.cfg = head, cfg
        self.reset()

    def reset(self) -> None:
        h = self.head
        self.rows: list = []
        self.search: Optional[BeamSearch] = None
        self.parents: list = []
        self.copies: list = []
        del h.output_ids[:]
        del h.token_times[:]
        h.first_token_time = None

    @property
    def started(self) -> bool:
        return self.search is not None

    @property
    def num_rows(self) -> int:
        """Rows this request computes in a decode step (1 while it prefills)."""
        return self.cfg.num_beams if self.started else 1

    @property
    def blocks_needed(self) -> int:
        """At most one new block per beam per step (copy-on-write or a new block)."""
        return self.cfg.num_beams

    def start(self, bm: BlockManager, logits: torch.Tensor, end_ids: list) -> None:
        """The prompt is computed (``logits`` [V] of its last token): K rows share its
        blocks, the first step of the search runs."""
        h, K = self.head, self.cfg.num_beams
        self.search = BeamSearch(self.cfg, 1, h.max_tokens, end_ids, logits.device)
        self.rows = [Seq((h.request_id, k), h.prompt_ids, h.max_tokens) for k in range(K)]
        for r in self.rows:
            r.block_table = list(h.block_table)
            bm.share(r.block_table)
            r.num_computed_tokens = h.num_prompt_tokens
        bm.free(h)
        self.advance(logits[None].expand(K, -1))

    def advance(self, logits: torch.Tensor) -> None:
        """Logits [K, V] of the rows -> the next tokens; rows take their parents' tokens
        (their KV blocks follow in ``reserve``)."""
        tok, parent = self.search.advance(logits)
        tok, parent = tok.tolist(), parent.tolist()
        outs = [list(self.rows[p].output_ids) for p in parent]
        for r, o, t in zip(self.rows, outs, tok):
            r.output_ids = o + [t]
        self.parents = parent
        h = self.head
        now = time.perf_counter()
        if h.first_token_time is None:
            h.first_token_time = now
        h.output_ids[:] = self.rows[0].output_ids
        h.token_times.append(now)
        h.num_computed_tokens = h.num_tokens - 1

    @property
    def done(self) -> bool:
        return self.search is not None and self.search.done

    def reserve(self, bm: BlockManager) -> None:
        """Before a decode step: beams take their parents' blocks, and each a private block
        for the position it writes (copies to run: ``copies``)."""
        pos = [r.num_tokens - 1 for r in self.rows]
        self.copies = reorder_blocks(bm, self.rows, self.parents, pos)
        self.parents = list(range(len(self.rows)))
        for r, p in zip(self.rows, pos):
            r.num_computed_tokens = p

    def finish(self) -> str:
        """Put the results on the head. -> the finish reason ("stop" or "length")."""
        toks, scores, why = self.search.results()
        h = self.head
        h.beam_output_ids, h.beam_scores = toks, scores
        h.output_ids[:] = toks[0]
        return why[0]

    def free(self, bm: BlockManager) -> None:
        for r in self.rows:
            bm.free(r)
