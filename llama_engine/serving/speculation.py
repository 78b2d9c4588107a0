"""Speculative decoding under inflight batching: one verify step for a batch of decodes.

``LLMEngine.step`` hands an all-decode step of at most ``SpeculativeConfig.max_batch_size``
sequences to ``SpeculativeStepper.step`` instead of the runner's ``execute``; larger batches
decode plainly (there a step is no longer bound by reading the weights, so verifying extra
tokens would cost throughput). Per sequence: a proposal (``llama_engine.speculative``) of at
most what its ``max_tokens`` leaves, extra KV blocks only when free (never preempting for a
proposal), one ``ModelRunner.verify_serving`` forward for the whole batch, the acceptance
rule (the greedy rows' argmax read back in one host sync per step), then the accepted
tokens fed to the scheduler one position at a time (its ``update``, so stop ids, lengths
and finishing work as in a plain step) and the blocks past the accepted tokens given back
(``BlockManager.truncate``).
"""
from __future__ import annotations

import torch

from llama_engine.serving.scheduler import SchedulerOutput
from llama_engine.serving.sequence import SequenceStatus
from llama_engine.speculative import (SpeculativeConfig, accept, accept_greedy,
                                       make_proposer)


class SpeculativeStepper:
    """Speculation for one ``LLMEngine`` (its runner, scheduler and block manager)."""

    def __init__(self, llm, config: SpeculativeConfig):
        self.llm, self.config = llm, config
        b = llm.engine.config.build
        self.max_seq_len = b.max_seq_len
        self.proposer = make_proposer(config, llm.engine, llm.scheduler.max_batch_size,
                                      b.max_seq_len)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Verify steps summed over their sequences, draft tokens proposed and accepted,
        tokens gained; steps that were too large to speculate."""
        self.stats = {"seq_steps": 0, "proposed": 0, "accepted": 0, "emitted": 0,
                      "verify_steps": 0, "plain_steps": 0}
        self._backoff: dict = {}     # request id -> (rejected verify steps in a row, skip)

    @property
    def tokens_per_step(self) -> float:
        s = self.stats
        return s["emitted"] / s["seq_steps"] if s["seq_steps"] else 0.0

    def applies(self, out: SchedulerOutput) -> bool:
        # Requests with logits processors or log-probs decode plainly (the acceptance rules
        # see the raw distribution only).
        ok = (out.is_decode and 0 < len(out.seqs) <= self.config.max_batch_size
              and not any(s.sampling.has_controls or s.sampling.logprobs for s in out.seqs))
        if out.is_decode and not ok:
            self.stats["plain_steps"] += 1
        return ok

    def step(self, out: SchedulerOutput) -> bool:
        """Compute ``out`` (all decodes) with proposals and account for it in the scheduler;
        False (nothing done) when no sequence has a proposal: the caller runs a plain step,
        which costs less than a verify step of single tokens."""
        runner, bm = self.llm.runner, self.llm.block_manager
        seqs = out.seqs
        kmax = [max(0, min(self.config.max_draft_len, s.max_tokens - s.num_output_tokens - 1,
                           self.max_seq_len - s.num_tokens)) for s in seqs]
        for i, s in enumerate(seqs):
            if self._backoff.get(s.request_id, (0, 0))[1] > 0:
                kmax[i] = 0
        gens = [runner.generator(s) for s in seqs]
        props = self.proposer.propose([s.request_id for s in seqs],
                                      [s.prompt_ids + s.output_ids for s in seqs], kmax,
                                      [s.sampling for s in seqs], gens)
        drafts, qs = [], []
        for s, (d, q) in zip(seqs, props):
            need = s.num_computed_tokens + 1 + len(d)
            if d and not bm.can_allocate(s, need):
                d, q = [], None
            if d:
                bm.allocate(s, need)
            drafts.append(d)
            qs.append(q)
        self._tick(seqs, drafts)
        if not any(drafts):
            self.stats["plain_steps"] += 1
            return False
        logits = runner.verify_serving(seqs, drafts)
        # Greedy sequences: every row's argmax in one host sync (not one per sequence).
        greedy = [s.sampling is None or s.sampling.greedy for s in seqs]
        ids = iter(torch.cat([lg.argmax(dim=-1) for lg, g in zip(logits, greedy) if g])
                   .tolist() if any(greedy) else ())
        new = [accept_greedy(d, [next(ids) for _ in range(len(d) + 1)]) if gr
               else accept(d, lg, q, s.sampling, g)
               for s, d, lg, q, g, gr in zip(seqs, drafts, logits, qs, gens, greedy)]
        st = self.stats
        st["verify_steps"] += 1
        for s, d, n in zip(seqs, drafts, new):
            st["seq_steps"] += 1
            st["proposed"] += len(d)
            st["accepted"] += len(n) - 1
            st["emitted"] += len(n)
            if d:
                self._judge(s.request_id, len(n) > 1)
        self._apply(seqs, new)
        return True

    # Backoff: a sequence whose proposals were all rejected BACKOFF_AFTER verify steps in a
    # row stops proposing for 2, 4, ... up to BACKOFF_MAX steps, then tries again (one
    # accepted token resets it). Text that does not repeat itself (or a model whose output
    # does not follow its prompt) then decodes plainly instead of paying for verify rows.
    BACKOFF_AFTER = 2
    BACKOFF_MAX = 32

    def _judge(self, rid: int, accepted: bool) -> None:
        misses = 0 if accepted else self._backoff.get(rid, (0, 0))[0] + 1
        skip = (min(self.BACKOFF_MAX, 2 ** (misses - self.BACKOFF_AFTER + 1))
                if misses >= self.BACKOFF_AFTER else 0)
        self._backoff[rid] = (misses, skip)

    def _tick(self, seqs: list, drafts: list) -> None:
        """One step passes for every sequence sitting out (those without a draft now)."""
        for s, d in zip(seqs, drafts):
            m, skip = self._backoff.get(s.request_id, (0, 0))
            if skip > 0 and not d:
                self._backoff[s.request_id] = (m, skip - 1)

    def _apply(self, seqs: list, new: list) -> None:
        """Feed position j of every sequence's new tokens to the scheduler as a one-token
        step: each advances ``num_computed_tokens`` by one (the previous token's K/V, written
        by the verify step) and appends, stops or finishes exactly as a plain step does."""
        sched = self.llm.scheduler
        for j in range(max(len(n) for n in new)):
            part = SchedulerOutput(is_decode=True)
            toks = []
            for s, n in zip(seqs, new):
                if j < len(n):
                    part.seqs.append(s)
                    part.num_new_tokens.append(1)
                    part.sample.append(True)
                    toks.append(n[j])
            sched.update(part, toks)
        for s in seqs:
            if s.status is SequenceStatus.RUNNING:
                self.llm.block_manager.truncate(s, s.num_computed_tokens)

    def release(self, seq) -> None:
        self.proposer.release(seq.request_id)
        self._backoff.pop(seq.request_id, None)
