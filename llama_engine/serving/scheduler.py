"""Inflight-batching scheduler: which requests run in the next step, and how many tokens each.

Follows the iteration-level scheduling of Orca (Yu et al., OSDI 2022) as TensorRT-LLM's batch
manager and vLLM do it, with chunked prefill (Agrawal et al., "Sarathi", 2023):

* every step has a token budget (``max_num_tokens``) and a sequence limit (``max_batch_size``);
* running requests that decode get their one token first, oldest first, so a long prompt never
  stalls them; then running requests part-way through their prompt get the next chunk; then
  waiting requests are admitted first-come-first-served while blocks, budget and batch slots
  last (admission stops at the first request that does not fit: no overtaking);
* a prompt longer than what is left of the budget is prefilled in chunks over several steps;
* when the KV cache runs out, the newest running request is preempted by recompute: its blocks
  are freed, its computed count reset, and it goes back to the front of the waiting queue (the
  oldest request is never preempted for a newer one, so the oldest always progresses);
* with prefix caching (block_manager.py), an admitted request first takes the cached blocks
  of its longest cached prefix and prefills only the rest;
* a beam-search request (``Sequence.beam``, llama_engine/beam.py) prefills as one request,
  then decodes as one unit of K rows (K tokens of the budget, a block per beam reserved);
  preempting it drops all its rows;
* a request that could never run (over ``max_input_len``/``max_output_len``/``max_seq_len``
  or longer than the whole cache) finishes at once with an error; the others carry on.

Capacity policy (TensorRT-LLM's ``CapacitySchedulerPolicy`` names): ``max_utilization``
admits a request when the blocks for its next chunk are free, and preempts when running
requests later outgrow the cache; ``guaranteed_no_evict`` admits it only when the blocks for
its whole length (prompt + ``max_tokens``) fit beside what every running request may still
grow to, so nothing is ever preempted (fewer requests at once when outputs end early at EOS).

``schedule()`` returns a ``SchedulerOutput``; the model runner computes it and samples; then
``update(output, tokens)`` appends the tokens and finishes, frees and reports requests.
Pure Python, no tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

from llama_engine.config import ConfigError
from llama_engine.serving.block_manager import BlockManager, cdiv
from llama_engine.serving.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work: ``seqs[i]`` computes its tokens at positions
    ``[num_computed_tokens, num_computed_tokens + num_new_tokens[i])``, and samples a token
    afterwards when ``sample[i]`` (the chunk reaches the end of what it has)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    is_decode: bool = False              # every sequence computes exactly one token
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """FCFS inflight batching over a ``BlockManager``; see the module docstring."""

    POLICIES = ("max_utilization", "guaranteed_no_evict")

    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_tokens: int,
                 max_input_len: Optional[int] = None, max_output_len: Optional[int] = None,
                 max_seq_len: Optional[int] = None, policy: str = "max_utilization"):
        if policy not in self.POLICIES:
            raise ConfigError(f"unknown scheduler policy {policy!r}; choose one of "
                              f"{', '.join(self.POLICIES)}")
        self.policy = policy
        if max_batch_size <= 0:
            raise ConfigError(f"max_batch_size must be positive, got {max_batch_size}")
        if max_num_tokens < max_batch_size:
            # Otherwise some decoding requests could wait for a token budget forever.
            raise ConfigError(f"max_num_tokens ({max_num_tokens}) must be at least "
                              f"max_batch_size ({max_batch_size})")
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_input_len = max_input_len
        self.max_output_len = max_output_len
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()   # WAITING or PREEMPTED, front first
        self.running: list[Sequence] = []         # admission order, oldest first
        self._unfinished: dict = {}               # request_id -> Sequence
        self._finished: list[Sequence] = []       # finished since the last pop_finished()
        self.num_preemptions = 0

    # -- requests ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        """Queue a request. One that can never run is finished with an error instead."""
        if seq.request_id in self._unfinished:
            raise ConfigError(f"request id {seq.request_id!r} is already queued or running")
        error = self._never_fits(seq)
        if error:
            seq.finish(FinishReason.ERROR, error)
            self._finished.append(seq)
            return seq
        seq.status = SequenceStatus.WAITING
        self._unfinished[seq.request_id] = seq
        self.waiting.append(seq)
        return seq

    def _never_fits(self, seq: Sequence) -> Optional[str]:
        rid, n = seq.request_id, seq.num_prompt_tokens
        if n == 0:
            return f"request {rid}: empty prompt"
        if seq.max_tokens < 1:
            return f"request {rid}: max_tokens must be at least 1, got {seq.max_tokens}"
        if self.max_input_len is not None and n > self.max_input_len:
            return (f"request {rid}: prompt of {n} tokens is longer than max_input_len "
                    f"{self.max_input_len}")
        if self.max_output_len is not None and seq.max_tokens > self.max_output_len:
            return (f"request {rid}: max_tokens {seq.max_tokens} is over max_output_len "
                    f"{self.max_output_len}")
        total = n + seq.max_tokens
        if self.max_seq_len is not None and total > self.max_seq_len:
            return (f"request {rid}: prompt {n} + max_tokens {seq.max_tokens} = {total} tokens "
                    f"is over max_seq_len {self.max_seq_len}")
        # The last generated token's K/V is never written, hence total - 1 slots.
        blocks = cdiv(total - 1, self.bm.block_size)
        if seq.beam is not None:     # every beam may end up with private blocks, plus one
            blocks = seq.beam.cfg.num_beams * (blocks + 1)
        if blocks > self.bm.num_blocks:
            return (f"request {rid}: prompt {n} + max_tokens {seq.max_tokens} needs {blocks} KV "
                    f"blocks but the whole cache has {self.bm.num_blocks} "
                    f"({self.bm.capacity_tokens} tokens)")
        return None

    def cancel(self, request_id) -> bool:
        """Finish a queued or running request as cancelled and free its blocks.
        False when it is unknown or already finished."""
        seq = self._unfinished.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.CANCELLED)
        return True

    def fail(self, seq: Sequence, error: str) -> None:
        """Finish a queued or running request with ``FinishReason.ERROR`` (a step failed for
        it); its blocks are freed and the others carry on."""
        if seq.request_id in self._unfinished:
            self._finish(seq, FinishReason.ERROR, error)

    def get(self, request_id) -> Optional[Sequence]:
        return self._unfinished.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def pop_finished(self) -> list[Sequence]:
        """Requests finished (for any reason) since the last call, in finishing order."""
        done, self._finished = self._finished, []
        return done

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        planned: dict[Sequence, int] = {}        # insertion-ordered: decodes, chunks, new
        budget = self.max_num_tokens

        # 1. Decodes, oldest first; 2. prompt chunks of running requests, oldest first.
        for decodes in (True, False):
            for seq in list(self.running):       # a copy: preemption edits self.running
                if budget == 0:
                    break
                if seq.status is not SequenceStatus.RUNNING or seq in planned \
                        or seq.is_decode != decodes:
                    continue
                if seq.beam is not None and seq.beam.started:
                    # a beam group: one token for each of its K rows (beam.BeamGroup)
                    if budget < seq.beam.num_rows:
                        continue
                    ok, refund = self._reserve_beams(seq, planned, out)
                    budget += refund
                    if ok:
                        planned[seq] = 1
                        budget -= seq.beam.num_rows
                    continue
                n = min(seq.num_uncomputed_tokens, budget)
                ok, refund = self._reserve(seq, seq.num_computed_tokens + n, planned, out)
                budget += refund
                if ok:
                    planned[seq] = n
                    budget -= n

        # 3. Admit waiting requests in arrival order; not in a step that had to preempt (the
        # cache is full: admitting now would only preempt again next step).
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.max_batch_size):
            seq = self.waiting[0]
            cached = self.bm.take_cached_prefix(seq)   # prefix caching: skip cached blocks
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.bm.can_allocate(seq, seq.num_computed_tokens + n) or (
                    self.policy == "guaranteed_no_evict" and self._full_blocks(seq)
                    + self._reserved_blocks() > self.bm.num_free_blocks):
                if cached:                               # give the cached blocks back
                    self.bm.free(seq)
                    seq.num_computed_tokens = 0
                break
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            self.bm.record_admission(seq, cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            planned[seq] = n
            budget -= n

        for seq, n in planned.items():
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            out.sample.append(seq.num_computed_tokens + n == seq.num_tokens)
        out.is_decode = bool(planned) and all(n == 1 for n in out.num_new_tokens)
        return out

    def _full_blocks(self, seq: Sequence) -> int:
        """Blocks ``seq`` still lacks for its whole length (the last token's K/V is never
        written, hence prompt + max_tokens - 1 slots)."""
        return self.bm.blocks_needed(seq, seq.num_prompt_tokens + seq.max_tokens - 1)

    def _reserved_blocks(self) -> int:
        """Blocks the running requests may still take before they finish."""
        return sum(self._full_blocks(s) for s in self.running)

    def _reserve(self, seq: Sequence, num_slots: int, planned: dict,
                 out: SchedulerOutput) -> tuple[bool, int]:
        """Blocks for ``num_slots`` of ``seq``, preempting the newest running requests (maybe
        ``seq`` itself) until they fit. Returns (``seq`` still runs, budget given back by
        preempted requests that were already planned this step)."""
        refund = 0
        while not self.bm.can_allocate(seq, num_slots):
            victim = self.running[-1]            # newest; never older than seq
            refund += planned.pop(victim, 0)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False, refund
        self.bm.allocate(seq, num_slots)
        return True, refund

    def _reserve_beams(self, seq: Sequence, planned: dict,
                       out: SchedulerOutput) -> tuple[bool, int]:
        """``_reserve`` for a beam group: a block per beam may be needed; the group's rows
        then take their blocks (``BeamGroup.reserve``)."""
        refund = 0
        while self.bm.num_free_blocks < seq.beam.blocks_needed:
            victim = self.running[-1]
            refund += planned.pop(victim, 0) * (victim.beam.num_rows if victim.beam else 1)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False, refund
        seq.beam.reserve(self.bm)
        return True, refund

    def _free(self, seq: Sequence) -> None:
        self.bm.free(seq)
        if seq.beam is not None:
            seq.beam.free(self.bm)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, requeue at the front (a beam group
        restarts its search: beam search is deterministic)."""
        self._free(seq)
        if seq.beam is not None:
            seq.beam.reset()
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        # Victims are taken newest first, so appendleft keeps the queue in arrival order.
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, tokens: Seq[Optional[int]],
               now: Optional[float] = None) -> None:
        """Account for a computed step. ``tokens[i]`` is the token sampled for ``out.seqs[i]``
        (ignored where ``out.sample[i]`` is False). Finished requests free their blocks and
        are reported by ``pop_finished()``."""
        assert len(tokens) == len(out.seqs)
        for seq, n, sample, tok in zip(out.seqs, out.num_new_tokens, out.sample, tokens):
            if seq.status is not SequenceStatus.RUNNING:
                continue                         # cancelled while the step ran
            seq.num_computed_tokens += n
            self.bm.register_computed(seq)       # prefix caching: full blocks become reusable
            if not sample:
                continue
            tok = int(tok)
            if tok in seq.stop_ids:
                seq.stop_token = tok
                self._finish(seq, FinishReason.STOP, now=now)
                continue
            seq.append_token(tok, now)
            word = seq.ends_with_stop_word() if seq.stop_words else None
            if word is not None:
                seq.drop_last(len(word))
                self._finish(seq, FinishReason.STOP, now=now)
                continue
            if seq.num_output_tokens >= seq.max_tokens or (
                    self.max_seq_len is not None and seq.num_tokens >= self.max_seq_len):
                self._finish(seq, FinishReason.LENGTH, now=now)

    def finish(self, seq: Sequence, reason: FinishReason, now: Optional[float] = None) -> None:
        """Finish a running request whose end its owner decided (a beam group)."""
        if seq.request_id in self._unfinished:
            self._finish(seq, reason, now=now)

    def _finish(self, seq: Sequence, reason: FinishReason, error: Optional[str] = None,
                now: Optional[float] = None) -> None:
        self._free(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        del self._unfinished[seq.request_id]
        seq.finish(reason, error, now)
        self._finished.append(seq)
