"""One request of the inflight-batching server and its lifecycle.

A request (``Sequence``) holds its prompt ids, the tokens generated so far, how to sample, when
to stop, and where its keys/values live in the paged KV cache (``block_table``). The layout
follows nano-vllm's ``Sequence`` and vLLM's ``Request``; chunked prefill and recompute are
expressed by one counter, ``num_computed_tokens`` (tokens whose K/V are already in the cache):

* a fresh request has ``num_computed_tokens == 0`` and needs its whole prompt computed;
* a chunk of a long prompt advances it by the chunk's length;
* a decode step computes exactly one token: the one sampled last step;
* preemption by recompute frees the blocks and resets it to 0, so the prompt *and* the tokens
  already generated are prefilled again when the request is readmitted.

A step samples a new token only when it brings ``num_computed_tokens`` up to ``num_tokens``.

States: WAITING -> RUNNING -> FINISHED, with RUNNING -> PREEMPTED -> RUNNING when the cache runs
out (a preempted request waits at the front of the queue). FINISHED carries a reason: length,
stop, cancelled or error (with a one-line message).
"""
from __future__ import annotations

import enum
import time
from typing import Any, Iterable, Optional


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"        # max_tokens generated (or the engine's max sequence length reached)
    STOP = "stop"            # a stop id was sampled (it is not part of output_ids)
    CANCELLED = "cancelled"  # cancel(request_id)
    ERROR = "error"          # the request can never run, or a step failed for it; see error


class Sequence:
    """A request and its state. Mutated only by the scheduler and the block manager."""

    def __init__(self, request_id, prompt_ids: Iterable[int], max_tokens: int,
                 sampling: Any = None,
                 stop_ids: Iterable[int] = (), arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt_ids: list[int] = [int(t) for t in prompt_ids]
        self.output_ids: list[int] = []
        self.max_tokens = int(max_tokens)
        # How to sample (runner.SamplingConfig); the scheduler never looks at it.
        self.sampling = sampling
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        # Token sequences that end the request when the output ends with one (not output).
        self.stop_words: list[list[int]] = [list(w) for w in
                                            (getattr(sampling, "stop_words", None) or [])]
        # Per output token, when the sampling asks for log-probs: the chosen token's log-prob
        # and the top N (id, log-prob) pairs (None without N). ``next_logprob`` is set by the
        # model runner for the token about to be appended.
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.next_logprob: Optional[tuple] = None

        # Beam search (llama_engine/beam.py): the request's BeamGroup; once finished, its
        # num_return_sequences best outputs and their scores (output_ids is the best one).
        self.beam: Any = None
        self.beam_output_ids: Optional[list] = None
        self.beam_scores: Optional[list] = None

        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[FinishReason] = None
        self.error: Optional[str] = None
        self.stop_token: Optional[int] = None   # the stop id that ended it, if any

        self.block_table: list[int] = []        # physical KV block of each logical block
        self.num_computed_tokens = 0            # tokens whose K/V are in the cache
        self.num_preemptions = 0

        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None
        self.token_times: list[float] = []      # perf_counter() when each output token came

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens (the stop token excluded)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to be run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decode(self) -> bool:
        """Exactly one token (normally the last sampled one) is missing from the cache."""
        return self.num_uncomputed_tokens == 1

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    # -- state -------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: FinishReason, error: Optional[str] = None,
               now: Optional[float] = None) -> None:
        """Mark finished. The caller frees the blocks first (asserted)."""
        assert not self.block_table, f"request {self.request_id}: finish() before free()"
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.finish_time = time.perf_counter() if now is None else now

    def append_token(self, token: int, now: Optional[float] = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.output_ids.append(int(token))
        if self.next_logprob is not None:
            lp, top = self.next_logprob
            self.logprobs.append(lp)
            self.top_logprobs.append(top)
            self.next_logprob = None

    def ends_with_stop_word(self) -> Optional[list[int]]:
        """The stop word the output now ends with, if any."""
        out = self.output_ids
        for w in self.stop_words:
            if len(out) >= len(w) and out[-len(w):] == w:
                return w
        return None

    def drop_last(self, n: int) -> None:
        """Remove the last ``n`` output tokens (a stop word, which is not output)."""
        if n:
            del self.output_ids[-n:]
            del self.token_times[-n:]
            if self.logprobs:
                del self.logprobs[-n:]
                del self.top_logprobs[-n:]

    # -- latency -----------------------------------------------------------------------------
    @property
    def ttft(self) -> Optional[float]:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> Optional[float]:
        """Mean seconds per output token after the first one (None with fewer than two)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}/{self.max_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
