"""Sampling: the settings of a request (``SamplingConfig``) and their checks, the result of a
static batch (``GenerationOutput``), the sampler turning fp32 logits into token ids, and the
host-side stopping rule (``cut_at_stop``: end ids and stop words). Shared by our runner, the
inflight-batching engine and the TensorRT-LLM backend's runner. The device-side controls
(penalties, bans, stop-word detection) live in ``logits_processors.py``."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from .config import ConfigError

MAX_TOP_LOGPROBS = 20


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_token_ids(ids, vocab_size: int, what: str) -> list[int]:
    """``ids`` as a list of ints in ``0..vocab_size-1``; a one-line ``ConfigError`` (naming
    ``what``) for floats, bools, other objects or ids out of range."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ConfigError(f"{what}: token ids must be a list of integers, got {ids!r}")
    if isinstance(ids, list) and all(type(t) is int for t in ids) \
            and (not ids or (min(ids) >= 0 and max(ids) < vocab_size)):
        return list(ids)  # the common case, checked at C speed
    out = []
    for i, t in enumerate(ids):
        if not _is_int(t):
            # a 0-d integer tensor is an int; a float (3.0) or bool is not
            if getattr(t, "ndim", None) == 0 and not t.is_floating_point() \
                    and t.dtype != torch.bool:
                t = int(t)
            else:
                raise ConfigError(f"{what}: token id {t!r} at position {i} is not an integer")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise ConfigError(f"{what}: token id {t} at position {i} is outside the "
                              f"vocabulary 0..{vocab_size - 1}")
        out.append(t)
    return out


@dataclass
class SamplingConfig:
    """How one request samples and stops. TensorRT-LLM's defaults: ``top_k=1`` is greedy.

    Controls, with Hugging Face ``generate`` semantics where HF has the control:
    ``repetition_penalty`` (HF/CTRL: divide a positive logit, multiply a negative one, for
    every token in the prompt or the output; 1 = off), ``presence_penalty`` /
    ``frequency_penalty`` (OpenAI: subtract ``presence * (count > 0) + frequency * count``,
    counting the generated tokens only; 0 = off), ``no_repeat_ngram_size`` (an n-gram of the
    prompt + output never occurs twice; 0 = off), ``min_length`` (HF's ``min_new_tokens``:
    end ids are banned until that many tokens were generated), ``end_id`` (replaces the
    model's end ids), ``pad_id`` (what padded outputs are filled with), ``stop_words``
    (token sequences that end generation when the output ends with one; the stop sequence
    is not output), ``bad_words`` (token sequences never produced: the last token is banned
    when the output ends with the others), ``seed`` (TensorRT-LLM's ``random_seed``) and
    ``logprobs`` (None = off; 0 = the log-prob of each chosen token; N = also the top N)."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    stop_words: list = field(default_factory=list)   # [[token ids], ...]
    bad_words: list = field(default_factory=list)    # [[token ids], ...]
    logprobs: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    @property
    def has_controls(self) -> bool:
        """Whether any logits processor or stop-word check runs (the plain greedy path runs
        none: no extra kernel)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or self.no_repeat_ngram_size > 0
                or self.min_length > 0 or bool(self.bad_words) or bool(self.stop_words))

    def end_ids(self, default: Iterable[int] = ()) -> list[int]:
        """The ids that end generation: ``end_id`` when set, else ``default`` (the model's,
        ``Tokenizer.end_ids``)."""
        if self.end_id is not None:
            return [int(self.end_id)]
        return [int(i) for i in default]

    def validate(self, vocab_size: int, where: str = "sampling") -> "SamplingConfig":
        """Every field in its range and of its exact type, else a one-line ``ConfigError``
        starting with ``where``. -> self."""
        def bad(name, why):
            raise ConfigError(f"{where}: {name} {why}, got {getattr(self, name)!r}")

        def real(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                bad(name, "must be a finite number")
            if lo is not None and (v <= lo if lo_open else v < lo):
                bad(name, f"must be {'>' if lo_open else '>='} {lo}")
            if hi is not None and v > hi:
                bad(name, f"must be <= {hi}")

        def integer(name, lo, optional=False, hi=None):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not _is_int(v):
                bad(name, "must be an integer")
            if v < lo or (hi is not None and v > hi):
                bad(name, f"must be in {lo}..{hi}" if hi is not None else f"must be >= {lo}")

        real("temperature", 0.0)
        integer("top_k", 0)
        real("top_p", 0.0, 1.0)
        integer("seed", -2**63, optional=True, hi=2**64 - 1)
        real("repetition_penalty", 0.0, lo_open=True)
        real("presence_penalty", -2.0, 2.0)
        real("frequency_penalty", -2.0, 2.0)
        integer("no_repeat_ngram_size", 0)
        integer("min_length", 0)
        integer("end_id", 0, optional=True, hi=vocab_size - 1)
        integer("pad_id", 0, optional=True, hi=vocab_size - 1)
        integer("logprobs", 0, optional=True, hi=min(MAX_TOP_LOGPROBS, vocab_size))
        for name in ("stop_words", "bad_words"):
            words = getattr(self, name)
            if isinstance(words, (str, bytes)) or not isinstance(words, (list, tuple)):
                bad(name, "must be a list of token-id lists")
            for k, w in enumerate(words):
                if isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)) or not w:
                    raise ConfigError(f"{where}: {name}[{k}] must be a non-empty list of "
                                      f"token ids, got {w!r}")
                check_token_ids(w, vocab_size, f"{where}: {name}[{k}]")
        return self


@dataclass
class GenerationOutput:
    output_ids: list            # per prompt, generated tokens only (end id / stop word excluded)
    num_generated_tokens: int = 0
    latency_s: float = 0.0
    prefill_s: float = 0.0
    log_probs: Optional[list] = None      # per prompt, the log-prob of each output token
    top_logprobs: Optional[list] = None   # per prompt, per token: [(id, log-prob)] * N
    finish_reasons: Optional[list] = None  # per prompt: "stop" (end id / stop word) or "length"
    # Beam search (beam.py): rows are num_return_sequences per prompt, each with its score
    beam_scores: Optional[list] = None
    num_return_sequences: int = 1

    @property
    def cum_log_probs(self) -> Optional[list]:
        """Per prompt, the sum of its output tokens' log-probs (TensorRT-LLM's
        ``cum_log_probs``); under beam search each row's beam score."""
        if self.beam_scores is not None:
            return list(self.beam_scores)
        if self.log_probs is None:
            return None
        return [float(sum(lp)) for lp in self.log_probs]

    def padded(self, pad_id: int) -> list:
        """output_ids as one rectangle, short rows filled with ``pad_id``."""
        width = max((len(r) for r in self.output_ids), default=0)
        return [list(r) + [pad_id] * (width - len(r)) for r in self.output_ids]


def cut_at_stop(tokens: Sequence[int], end_ids: Iterable[int],
                stop_words: Sequence[Sequence[int]] = ()) -> tuple[list[int], bool]:
    """The one stopping rule on a row of generated tokens: the tokens before the first end id
    or before the first complete stop word (whichever ends first); -> (tokens, stopped)."""
    ends = set(end_ids)
    words = [list(w) for w in stop_words]
    out: list[int] = []
    for t in tokens:
        t = int(t)
        if t in ends:
            return out, True
        out.append(t)
        for w in words:
            if len(out) >= len(w) and out[-len(w):] == w:
                return out[:-len(w)], True
    return out, False


def held_back(tokens: Sequence[int], stop_words: Sequence[Sequence[int]]) -> int:
    """How many trailing tokens could still be the start of a stop word (a streamer must not
    show them yet: if the word completes, they are not output)."""
    best = 0
    for w in stop_words:
        for k in range(min(len(w) - 1, len(tokens)), best, -1):
            if list(tokens[-k:]) == list(w[:k]):
                best = k
                break
    return best


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits fp32 [B, V] -> token ids int64 [B]."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, cfg), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits fp32 [B, V] -> the distribution ``sample`` draws from (temperature, top-k,
    top-p applied) [B, V]; speculative decoding's rejection rule needs it explicitly."""
    logits = logits / max(cfg.temperature, 1e-5)
    if cfg.top_k > 1:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop tokens once the mass before them already reaches top_p (keep at least one).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, cfg: SamplingConfig):
    """Log-probs of the chosen ``tokens`` [B] under the distribution sampling drew from
    (after the logits processors; divided by the temperature when sampling), and the top
    ``cfg.logprobs`` (ids, log-probs) when > 0. -> (lp [B], top_ids [B, N] | None,
    top_lp [B, N] | None), all on the device."""
    x = logits if cfg.greedy else logits / max(cfg.temperature, 1e-5)
    lsm = torch.log_softmax(x.to(torch.float64) if x.dtype == torch.float64 else x.float(), -1)
    lp = lsm.gather(1, tokens.view(-1, 1)).squeeze(1)
    if cfg.logprobs:
        top = torch.topk(lsm, cfg.logprobs, dim=-1)
        return lp, top.indices, top.values
    return lp, None, None


def word_list_tensor(words: list, batch_size: int) -> torch.Tensor:
    """Token-id words in TensorRT-LLM's stop/bad words layout, the same for every prompt:
    int32 [B, 2, L], row 0 the ids of all words one after another, row 1 the end offset of
    each word (padded with -1)."""
    flat = [int(t) for w in words for t in w]
    offsets, n = [], 0
    for w in words:
        n += len(w)
        offsets.append(n)
    width = max(len(flat), 1)
    t = torch.full((2, width), -1, dtype=torch.int32)
    t[0, :len(flat)] = torch.tensor(flat, dtype=torch.int32)
    t[1, :len(offsets)] = torch.tensor(offsets, dtype=torch.int32)
    t[0, len(flat):] = 0
    return t[None].repeat(batch_size, 1, 1).contiguous()


def trtllm_generate_kwargs(sampling: SamplingConfig, end_ids: Sequence[int],
                           batch_size: int) -> dict:
    """TensorRT-LLM ``ModelRunner.generate`` arguments of ``sampling``: the first end id as
    ``end_id``, the others and the stop words as ``stop_words_list``; controls passed only
    when set, so runners of releases without them still work."""
    eos = end_ids[0] if end_ids else -1  # -1: never stops early
    kw = dict(end_id=eos, pad_id=sampling.pad_id if sampling.pad_id is not None else max(eos, 0),
              temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if sampling.seed is not None:
        kw["random_seed"] = sampling.seed
    for name, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                      ("frequency_penalty", 0.0), ("min_length", 0),
                      ("no_repeat_ngram_size", 0)):
        if getattr(sampling, name) != off:
            kw[name] = getattr(sampling, name)
    stops = [[i] for i in end_ids[1:]] + [list(w) for w in sampling.stop_words]
    if stops:
        kw["stop_words_list"] = word_list_tensor(stops, batch_size)
    if sampling.bad_words:
        kw["bad_words_list"] = word_list_tensor(sampling.bad_words, batch_size)
    return kw
