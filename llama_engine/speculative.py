"""Speculative decoding: propose several tokens, check them all in one forward pass.

At batch 1 a decode step reads every weight once, so a step over k+1 tokens costs about what a
step over one costs; when proposals are often right, several tokens come out of each step.
This module owns:

* ``SpeculativeConfig``: the mode (TensorRT-LLM's names ``prompt_lookup`` and
  ``draft_tokens_external``), ``max_draft_len`` (k), the draft engine, the n-gram sizes and
  the batch size above which inflight batching decodes plainly;
* the proposers: ``propose_prompt_lookup`` (the tokens that followed the latest earlier
  occurrence of the last n tokens of prompt + output) and ``DraftModelProposer`` (a second,
  cheaper engine with the same vocabulary and its own KV cache; what it cached past the
  accepted tokens is rolled back by its per-sequence length, so it is overwritten next time);
* the acceptance rules: ``accept_greedy`` (the longest prefix equal to the target's argmax,
  then the target's own token: greedy output equals plain decoding token for token) and
  ``accept_sampled`` (rejection sampling, Leviathan et al. 2023 / Chen et al. 2023: the
  output tokens are distributed exactly as the target's sampling distribution);
* ``generate_static``: the static-batch loop ``runner.Engine.generate`` runs when given a
  config (prefill, then verify steps over each sequence's last token and its proposals).

The verify forward itself is ``ModelRunner.verify`` / ``verify_serving``; inflight batching's
step is ``serving/speculation.py``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .config import ConfigError
from .kv_cache import blocks_for, static_block_tables
from .runner import Engine
from .sampling import GenerationOutput, SamplingConfig, probabilities, sample

MODES = ("prompt_lookup", "draft_tokens_external")
DEFAULT_MAX_BATCH_SIZE = 8  # inflight steps with more sequences decode without speculation


@dataclass
class SpeculativeConfig:
    """How to speculate. ``draft_engine``: a loaded ``runner.Engine`` (draft_tokens_external)
    other than the target engine object. ``max_batch_size``: inflight batching speculates
    only in decode steps of at most this many sequences (at large batch a step is no longer
    bound by reading the weights, and verifying k extra tokens per sequence costs time)."""

    mode: str = "prompt_lookup"
    max_draft_len: int = 4
    draft_engine: Any = None
    max_ngram: int = 3
    min_ngram: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"speculative_decoding_mode must be one of {', '.join(MODES)}, "
                              f"got {self.mode!r}")
        if self.max_draft_len < 1:
            raise ConfigError(f"max_draft_len must be at least 1, got {self.max_draft_len}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                              f"{self.max_ngram}")
        if self.max_batch_size < 0:
            raise ConfigError(f"speculative max_batch_size must be >= 0, got "
                              f"{self.max_batch_size}")
        if (self.mode == "draft_tokens_external") != (self.draft_engine is not None):
            raise ConfigError("a draft engine (--draft_engine_dir) goes with "
                              "--speculative_decoding_mode draft_tokens_external, and only "
                              "with it")

    def generate(self, engine, *args, **kwargs) -> "SpeculativeOutput":
        """``runner.Engine.generate`` with this config: see ``generate_static``."""
        return generate_static(engine, self, *args, **kwargs)


@dataclass
class SpeculativeOutput(GenerationOutput):
    """A static batch's result plus acceptance: ``num_steps`` verify steps summed over the
    sequences still running in each, ``num_proposed`` / ``num_accepted`` draft tokens,
    ``num_emitted`` tokens those steps produced (accepted + one from the target each)."""

    num_steps: int = 0
    num_proposed: int = 0
    num_accepted: int = 0
    num_emitted: int = 0
    verify_s: float = 0.0       # time in the verify forwards (synced on CUDA)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a sequence gains per verify step (1.0: speculation never helped)."""
        return self.num_emitted / self.num_steps if self.num_steps else 0.0


# -- proposers ----------------------------------------------------------------------------------
def propose_prompt_lookup(tokens: list, k: int, max_ngram: int = 3, min_ngram: int = 1) -> list:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens of
    ``tokens`` (prompt + output so far), trying n = max_ngram down to min_ngram; [] if none."""
    n_tok = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        pattern = tokens[n_tok - n:]
        last = pattern[-1]
        for i in range(n_tok - 2, n - 2, -1):   # i: where a match's last token would sit
            if tokens[i] == last and tokens[i - n + 1:i + 1] == pattern:
                return list(tokens[i + 1:i + 1 + k])
    return []


class PromptLookupProposer:
    """Proposals from the sequence itself; nothing to cache or roll back."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, keys, histories, kmaxes, samplings, generators):
        c = self.config
        return [(propose_prompt_lookup(h, m, c.max_ngram, c.min_ngram), None)
                for h, m in zip(histories, kmaxes)]

    def release(self, key) -> None:
        pass


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModelProposer:
    """A draft engine proposing k tokens per sequence from its own KV cache.

    Each sequence (``key``) gets a row of the draft engine's cache (a fixed block range, as a
    static batch). The draft remembers which tokens its cache holds for each key; before
    proposing it keeps the longest prefix the new history shares with them (the rollback:
    the rest was rejected and is overwritten) and runs the missing tokens in one forward."""

    def __init__(self, config: SpeculativeConfig, target: Engine, rows: int, max_seq_len: int):
        draft = config.draft_engine
        if draft is target:
            raise ConfigError("the draft engine must be a separate Engine object (it needs "
                              "its own KV cache); load the directory twice")
        if draft.config.model.vocab_size != target.config.model.vocab_size:
            raise ConfigError(f"draft vocabulary {draft.config.model.vocab_size} != target "
                              f"vocabulary {target.config.model.vocab_size}: the draft must "
                              "share the target's tokenizer")
        span = max_seq_len + config.max_draft_len + 1
        if span > draft.model.max_positions:
            raise ConfigError(f"the draft engine covers {draft.model.max_positions} positions, "
                              f"fewer than the {span} speculation needs; rebuild it with a "
                              "larger --max_input_len/--max_output_len")
        self.runner, self.device = draft.runner, draft.device
        if target.runner.cuda_graphs:     # the draft's steps replay graphs when the target's do
            draft.enable_cuda_graphs()
        self.max_catch_up = config.max_draft_len + 1
        width = blocks_for(span, self.runner.block_size)
        self.cache = self.runner.ensure_cache(rows * width)
        self.tables = static_block_tables(rows, span, self.runner.block_size, self.device)
        self.free_rows = list(range(rows - 1, -1, -1))
        self.row_of: dict = {}
        self.cached: dict = {}   # key -> the tokens whose K/V the draft cache holds

    def _row(self, key, active: set) -> int:
        if key not in self.row_of:
            if not self.free_rows:
                # A preempted sequence may still hold a row: take one not proposing now.
                idle = next((k for k in self.row_of if k not in active), None)
                if idle is None:
                    raise ConfigError("more sequences than the draft engine's cache has rows")
                self.release(idle)
            self.row_of[key] = self.free_rows.pop()
            self.cached[key] = []
        return self.row_of[key]

    def release(self, key) -> None:
        if key in self.row_of:
            self.free_rows.append(self.row_of.pop(key))
            self.cached.pop(key, None)

    @torch.inference_mode()
    def propose(self, keys, histories, kmaxes, samplings, generators):
        """-> per sequence (draft tokens, their draft distributions [n, V] or None (greedy))."""
        out: list = [([], None)] * len(keys)
        live = [i for i, m in enumerate(kmaxes) if m > 0]
        if not live:
            return out
        if self.cache is not self.runner.cache:   # someone reallocated the draft's cache
            raise ConfigError("the draft engine's KV cache was replaced while speculating")
        active = {keys[i] for i in live}
        rows = [self._row(keys[i], active) for i in live]
        hist = [histories[i] for i in live]
        starts = [min(_common_prefix(self.cached[keys[i]], h), len(h) - 1)
                  for i, h in zip(live, hist)]
        tables = self.tables[rows]
        logits = self._catch_up([h[s:] for h, s in zip(hist, starts)], starts, tables)
        kk = max(kmaxes[i] for i in live)
        ctx = torch.tensor([len(h) for h in hist], dtype=torch.int32, device=self.device)
        qs: list = [[] for _ in live]
        picked = []
        for j in range(kk):
            picks = logits.argmax(dim=-1)
            for r, i in enumerate(live):
                cfg = samplings[i]
                if cfg is not None and not cfg.greedy:
                    q = probabilities(logits[r:r + 1], cfg)[0]
                    q = q / q.sum()
                    picks[r] = torch.multinomial(q, 1, generator=generators[i])[0]
                    qs[r].append(q)
            picked.append(picks)
            if j < kk - 1:
                logits = self.runner.decode(picks, ctx, tables, self.cache)
        # The picks stay on the device between draft steps: one host sync for all k of them.
        toks = torch.stack(picked, dim=1).tolist()
        for r, i in enumerate(live):
            self.cached[keys[i]] = hist[r] + toks[r][:kk - 1]
            n = min(kmaxes[i], kk)
            out[i] = (toks[r][:n], torch.stack(qs[r][:n]) if qs[r] else None)
        return out

    def _catch_up(self, token_lists: list, starts: list, tables) -> torch.Tensor:
        """Run each sequence's tokens the draft cache lacks; -> logits of each one's last.
        The usual case, the one or two tokens of the last step, is a verify step (a decode
        step over rows: CUDA graphs replay it); rows shorter than the longest are padded and
        write K/V past their end, which later steps overwrite before anything reads it.
        A new sequence's prompt is an extend (prefill) forward."""
        lens = [len(t) for t in token_lists]
        width = max(lens)
        if width > self.max_catch_up:
            return self.runner.extend(token_lists, starts, tables, self.cache)
        rows = torch.tensor([t + [0] * (width - len(t)) for t in token_lists],
                            dtype=torch.int64, device=self.device)
        ctx = torch.tensor(starts, dtype=torch.int32, device=self.device)
        logits = self.runner.verify(rows, ctx, tables, self.cache)
        last = torch.tensor([n - 1 for n in lens], device=self.device)
        return logits[torch.arange(len(lens), device=self.device), last]


def make_proposer(config: SpeculativeConfig, target: Engine, rows: int, max_seq_len: int):
    if config.mode == "prompt_lookup":
        return PromptLookupProposer(config)
    return DraftModelProposer(config, target, rows, max_seq_len)


# -- acceptance -----------------------------------------------------------------------------------
def accept_greedy(draft: list, target_ids: list) -> list:
    """``target_ids[i]``: the target's argmax after the draft's first i tokens (len(draft)+1
    of them). -> the tokens this step outputs: the agreeing draft prefix, then the target's
    token where they first differ (or its token after the whole draft)."""
    out = []
    for d, t in zip(draft, target_ids):
        out.append(t)
        if d != t:
            return out
    out.append(target_ids[len(draft)])
    return out


def accept_sampled(draft: list, p: torch.Tensor, q: Optional[torch.Tensor],
                   generator: Optional[torch.Generator] = None) -> list:
    """Rejection sampling. ``p`` [n+1, V]: the target's sampling distribution at each
    position; ``q`` [n, V]: the draft's (None: the proposals were deterministic, a point
    mass, as prompt lookup's). Draft token x is kept with probability min(1, p(x)/q(x));
    at the first rejection the output is drawn from max(p - q, 0) renormalized, and when
    every token is kept one more is drawn from p[n]. -> the tokens this step outputs."""
    out = []
    for i, x in enumerate(draft):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        u = float(torch.rand((), generator=generator, device=p.device, dtype=torch.float64))
        if u * qx < px:
            out.append(x)
            continue
        if q is None:
            resid = p[i].clone()
            resid[x] = 0.0
        else:
            resid = (p[i] - q[i]).clamp_(min=0.0)
        total = float(resid.sum())
        if total <= 0.0:   # only by rounding (p(x) ~ q(x) everywhere): p itself is exact
            resid, total = p[i], float(p[i].sum())
        out.append(int(torch.multinomial(resid / total, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=generator)))
    return out


def accept(draft: list, logits: torch.Tensor, q: Optional[torch.Tensor],
           cfg: Optional[SamplingConfig], generator=None) -> list:
    """The step's output tokens from the target's logits [len(draft)+1, V]."""
    if cfg is None or cfg.greedy:
        return accept_greedy(draft, logits.argmax(dim=-1).tolist())
    p = probabilities(logits, cfg)
    return accept_sampled(draft, p / p.sum(-1, keepdim=True), q, generator)


# -- the static batch -------------------------------------------------------------------------
@torch.inference_mode()
def generate_static(engine: Engine, config: SpeculativeConfig, batch_input_ids: list,
                    max_new_tokens: int, sampling: Optional[SamplingConfig] = None,
                    end_id=None,
                    streamer: Optional[Callable[[int, list], None]] = None
                    ) -> SpeculativeOutput:
    """``Engine.generate`` with speculation: the same outputs under greedy sampling (and the
    same distribution otherwise). Each step proposes up to k tokens per running sequence and
    verifies them with the last sampled token in one forward; the step is as wide as the
    longest proposal (a step with no proposal at all is a plain decode). ``streamer(i,
    tokens)`` gets output position i of every sequence once all running ones have it."""
    sampling = sampling or SamplingConfig()
    batch_input_ids = engine.check_request(batch_input_ids, max_new_tokens, sampling)
    if sampling.has_controls or sampling.logprobs:
        raise ConfigError("speculative decoding takes temperature, top_k, top_p and seed only "
                          "(not the penalties, n-gram and word controls, min_length or "
                          "logprobs): drop them or --speculative_decoding_mode")
    # The one stopping rule: ``end_id`` (one id or the model's several), or sampling.end_id.
    ends = set(sampling.end_ids([end_id] if isinstance(end_id, int) else (end_id or ())))
    runner, dev, k = engine.runner, engine.device, config.max_draft_len
    gen = None
    if sampling.seed is not None and not sampling.greedy:
        gen = torch.Generator(device=dev).manual_seed(sampling.seed)
    prompts = [list(map(int, p)) for p in batch_input_ids]
    bsz = len(prompts)
    max_seq = max(len(p) for p in prompts) + max_new_tokens + k  # a verify writes k ahead
    cache = engine.kv_cache(bsz, max_seq)
    tables = static_block_tables(bsz, max_seq, engine.block_size, dev)
    proposer = make_proposer(config, engine, bsz, max_seq)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res = SpeculativeOutput([])

    t0 = time.perf_counter()
    first = sample(engine.prefill(prompts, cache, tables), sampling, gen).tolist()
    sync()
    t_prefill = time.perf_counter() - t0
    outs = [[t] for t in first]
    done = [max_new_tokens <= 1 or t in ends for t in first]
    ctx = [len(p) for p in prompts]       # tokens in the cache per sequence
    emitted = _stream(streamer, outs, done, 0)
    try:
        while not all(done):
            live = [b for b in range(bsz) if not done[b]]
            kmax = [min(k, max_new_tokens - len(outs[b]) - 1) if not done[b] else 0
                    for b in range(bsz)]
            hist = [prompts[b] + outs[b] for b in range(bsz)]
            gens = [gen] * bsz
            props = proposer.propose(list(range(bsz)), hist, kmax, [sampling] * bsz, gens)
            width = 1 + max(len(d) for d, _ in props)
            rows = [[outs[b][-1]] + d + [0] * (width - 1 - len(d)) for b, (d, _) in
                    enumerate(props)]
            tv = time.perf_counter()
            logits = runner.verify(torch.tensor(rows, dtype=torch.int64, device=dev),
                                   torch.tensor(ctx, dtype=torch.int32, device=dev),
                                   tables, cache)
            if dev.type == "cuda" and not sampling.greedy:
                sync()
            greedy_ids = logits.argmax(dim=-1).tolist() if sampling.greedy else None
            res.verify_s += time.perf_counter() - tv
            for b in live:
                draft, q = props[b]
                n = len(draft)
                if greedy_ids is not None:
                    new = accept_greedy(draft, greedy_ids[b][:n + 1])
                else:
                    new = accept(draft, logits[b, :n + 1], q, sampling, gen)
                res.num_steps += 1
                res.num_proposed += n
                res.num_accepted += len(new) - 1
                res.num_emitted += len(new)
                ctx[b] += len(new)     # the last token and the accepted proposals are cached
                outs[b] += new
                if ends.intersection(new):
                    done[b] = True
                if len(outs[b]) >= max_new_tokens:
                    del outs[b][max_new_tokens:]
                    done[b] = True
            emitted = _stream(streamer, outs, done, emitted)
    finally:
        for b in range(bsz):
            proposer.release(b)
    sync()
    res.latency_s, res.prefill_s = time.perf_counter() - t0, t_prefill
    for row in outs:
        cut = next((i for i, t in enumerate(row) if t in ends), len(row))
        row = row[:cut]
        res.output_ids.append(row)
        res.num_generated_tokens += len(row)
    return res


def _stream(streamer, outs: list, done: list, emitted: int) -> int:
    """Hand ``streamer`` the output positions every running sequence has reached."""
    if streamer is None:
        return emitted
    running = [len(o) for o, d in zip(outs, done) if not d]
    upto = min(running) if running else max(len(o) for o in outs)
    for i in range(emitted, upto):
        streamer(i, [o[i] if i < len(o) else o[-1] for o in outs])
    return max(emitted, upto)


# -- scripts --------------------------------------------------------------------------------
def config_from_args(args, engine) -> Optional[SpeculativeConfig]:
    """The config of ``cli.add_speculative_args``' flags for ``engine`` (None without
    ``--speculative_decoding_mode``); loads the draft engine on the target's device."""
    mode = getattr(args, "speculative_decoding_mode", None)
    if mode is None:
        if getattr(args, "draft_engine_dir", None):
            raise ConfigError("--draft_engine_dir needs --speculative_decoding_mode "
                              "draft_tokens_external")
        return None
    if not isinstance(engine, Engine):
        raise ConfigError("speculative decoding runs on our engine only (not a TensorRT-LLM "
                          "engine directory)")
    draft = None
    if mode == "draft_tokens_external":
        if not args.draft_engine_dir:
            raise ConfigError("--speculative_decoding_mode draft_tokens_external needs "
                              "--draft_engine_dir")
        draft = Engine.from_dir(args.draft_engine_dir, device=str(engine.device),
                                dtype=engine.config.dtype if engine.device.type == "cpu"
                                else None)
    return SpeculativeConfig(mode=mode, max_draft_len=args.max_draft_len, draft_engine=draft,
                             max_batch_size=args.speculative_max_batch_size)
