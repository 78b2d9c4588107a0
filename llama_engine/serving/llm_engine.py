"""The inflight-batching engine: the API programs use (TensorRT-LLM's ``--use_inflight_batching``).

``LLMEngine.step()`` is nano-vllm's loop of a few lines: the scheduler picks this step's
requests and token counts, the model runner computes them and samples, the scheduler appends
the tokens and finishes requests. Around it:

    engine = LLMEngine("engines/llama-7b", max_batch_size=64)
    rid = engine.add_request(prompt_ids, SamplingConfig(), max_tokens=128, stop_ids=[2])
    while engine.has_unfinished():
        for out in engine.step():            # RequestOutput: request_id, new_token_ids, ...
            ...
    engine.cancel(rid)                       # frees its blocks; reported as finished
    seqs = engine.generate(prompts, max_tokens=128)     # in input order, each a Sequence
    for out in engine.stream(): ...          # step() outputs until nothing is left

Requests are checked when added (``ConfigError``, nothing queued). A request that can never
run (too long for the engine's limits or for the whole cache), or one whose step fails (any
exception while computing or sampling it, found by rerunning the step's requests one by one),
is reported finished with ``FinishReason.ERROR`` and a one-line ``error`` naming it; the
others carry on with the outputs they would have had alone.
"""
from __future__ import annotations

import itertools
import numbers
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

from llama_engine.beam import BeamConfig, BeamGroup, copy_blocks
from llama_engine.config import ConfigError
from llama_engine.options import RuntimeOptions
from llama_engine.runner import Engine, SamplingConfig
from llama_engine.serving.block_manager import BlockManager
from llama_engine.sampling import check_token_ids, held_back
from llama_engine.serving.scheduler import Scheduler, SchedulerOutput
from llama_engine.serving.sequence import FinishReason, Sequence, SequenceStatus
from llama_engine.serving.speculation import SpeculativeStepper
from llama_engine.speculative import SpeculativeConfig

DEFAULT_MAX_NUM_TOKENS = 8192  # TensorRT-LLM's default token budget per step


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: int
    new_token_ids: list
    finished: bool
    sequence: Sequence          # the request itself: output_ids, finish_reason, error, ttft...
    index: Optional[int] = None  # in generate(): the prompt's position in its input list

    @property
    def finish_reason(self) -> Optional[FinishReason]:
        return self.sequence.finish_reason

    @property
    def error(self) -> Optional[str]:
        return self.sequence.error


class LLMEngine:
    """Inflight batching over one ``runner.Engine`` (an engine directory or a loaded one).

    ``max_batch_size`` / ``max_num_tokens`` default to the engine's build config (the token
    budget to 8192); the KV cache is sized by ``kv_cache_free_gpu_memory_fraction`` on CUDA
    and by ``max_kv_cache_tokens`` (a cap on CUDA, the size on the CPU). ``scheduler_policy``:
    ``max_utilization`` (preempt when the cache runs out) or ``guaranteed_no_evict``
    (scheduler.py). ``options`` (options.RuntimeOptions): run-time choices, applied when the
    engine is loaded here; ``options.cuda_graphs=False`` decodes eagerly. ``enable_prefix_caching``: reuse the
    KV blocks of prompt prefixes seen before (serving/block_manager.py). ``speculative``
    (speculative.SpeculativeConfig): speculative decoding in small all-decode steps."""

    def __init__(self, engine: Union[Engine, str], max_batch_size: Optional[int] = None,
                 max_num_tokens: Optional[int] = None,
                 kv_cache_free_gpu_memory_fraction: float = 0.9,
                 max_kv_cache_tokens: Optional[int] = None, cuda_graphs: bool = True,
                 device: Optional[str] = None, dtype: Optional[str] = None,
                 scheduler_policy: str = "max_utilization",
                 options: Optional[RuntimeOptions] = None,
                 enable_prefix_caching: bool = False,
                 speculative: Optional[SpeculativeConfig] = None):
        if isinstance(engine, str):
            engine = Engine.from_dir(engine, device=device, dtype=dtype, options=options)
        if options is not None:
            cuda_graphs = cuda_graphs and options.cuda_graphs
        self.engine = engine
        b = engine.config.build
        max_batch_size = max_batch_size or b.max_batch_size
        if max_num_tokens is None:
            max_num_tokens = max(b.max_num_tokens or DEFAULT_MAX_NUM_TOKENS, max_batch_size)
        # The engine's one ModelRunner, set up for inflight batching: the shared cache sized,
        # decode graphs captured per bucket.
        self.runner = engine.runner
        num_blocks = self.runner.setup_serving(max_batch_size, max_num_tokens, b.max_seq_len,
                                               kv_cache_free_gpu_memory_fraction,
                                               max_kv_cache_tokens, cuda_graphs)
        self.block_manager = BlockManager(num_blocks, b.tokens_per_block,
                                          enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_batch_size, max_num_tokens,
                                   max_input_len=b.max_input_len, max_output_len=b.max_output_len,
                                   max_seq_len=b.max_seq_len, policy=scheduler_policy)
        # Speculative decoding (serving/speculation.py): small all-decode steps verify
        # proposals instead of decoding one token.
        self.speculation = SpeculativeStepper(self, speculative) if speculative else None
        self._ids = itertools.count()
        self._reported: dict = {}   # request_id -> output tokens already returned by step()
        self.num_steps = 0
        self.reset_step_stats()

    def reset_step_stats(self) -> None:
        """Per step kind (``decode``: one token per sequence; ``mixed``: prompt chunks too):
        steps, wall seconds, tokens computed and sequences, summed since the last reset."""
        self.step_stats = {k: {"steps": 0, "seconds": 0.0, "tokens": 0, "seqs": 0}
                           for k in ("decode", "mixed")}
        self._preemptions_at_reset = self.scheduler.num_preemptions

    def step_summary(self) -> dict:
        """step_stats with means: ms per step, sequences per step, tokens per step."""
        out = {}
        for k, st in self.step_stats.items():
            n = max(st["steps"], 1)
            out[k] = {**st, "ms_per_step": 1e3 * st["seconds"] / n,
                      "seqs_per_step": st["seqs"] / n, "tokens_per_step": st["tokens"] / n}
        out["preemptions"] = self.scheduler.num_preemptions - self._preemptions_at_reset
        return out

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, prompt_ids: Iterable[int], sampling: Optional[SamplingConfig] = None,
                    max_tokens: Optional[int] = None, stop_ids: Iterable[int] = (),
                    arrival_time: Optional[float] = None,
                    beam: Optional[BeamConfig] = None) -> int:
        """Queue a request; -> its id. ``max_tokens`` defaults to the engine's max_output_len;
        ``stop_ids`` (the model's end ids, ``Tokenizer.end_ids``) end it, replaced by
        ``sampling.end_id`` when set; ``sampling.stop_words`` end it too (neither is output).
        The request is checked first (ids are ints in the vocabulary, ``max_tokens`` >= 1,
        the sampling settings in range): a one-line ``ConfigError`` naming it otherwise,
        and nothing is queued. ``beam`` (beam.BeamConfig): beam search for this request; it
        is reported once, finished, with ``beam_output_ids`` / ``beam_scores`` on its
        sequence."""
        rid = next(self._ids)
        prompt, sampling, max_tokens, stops = self._checked(
            f"request {rid}", prompt_ids, sampling, max_tokens, stop_ids, beam)
        seq = Sequence(rid, prompt, max_tokens, sampling, stops, arrival_time)
        if beam is not None and beam.enabled:
            seq.beam = BeamGroup(seq, beam)
        self._reported[rid] = 0
        self.scheduler.add(seq)
        return rid

    def _checked(self, name: str, prompt_ids, sampling, max_tokens, stop_ids,
                 beam: Optional[BeamConfig] = None) -> tuple:
        vocab = self.engine.config.model.vocab_size
        if max_tokens is None:
            max_tokens = self.engine.config.build.max_output_len
        if not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool):
            raise ConfigError(f"{name}: max_tokens must be an integer, got {max_tokens!r}")
        if max_tokens < 1:
            raise ConfigError(f"{name}: max_tokens must be at least 1, got {max_tokens}")
        prompt = check_token_ids(prompt_ids, vocab, name)
        if not prompt:
            raise ConfigError(f"{name}: empty prompt")
        sampling = sampling if sampling is not None else SamplingConfig()
        if not isinstance(sampling, SamplingConfig):
            raise ConfigError(f"{name}: sampling must be a SamplingConfig, got "
                              f"{type(sampling).__name__}")
        sampling.validate(vocab, name)
        if beam is not None:
            if not isinstance(beam, BeamConfig):
                raise ConfigError(f"{name}: beam must be a BeamConfig, got "
                                  f"{type(beam).__name__}")
            beam.validate(name)
            beam.check_sampling(sampling, name)
        stops = sampling.end_ids(check_token_ids(list(stop_ids), vocab, f"{name}: stop_ids"))
        return prompt, sampling, int(max_tokens), stops

    def cancel(self, request_id: int) -> bool:
        """Stop a queued or running request and free its blocks; the next ``step()`` reports
        it finished (``FinishReason.CANCELLED``). False when unknown or already finished."""
        return self.scheduler.cancel(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; -> a RequestOutput for each request that got tokens or
        finished (cancelled and never-fitting requests included)."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if any(s.beam is not None for s in out.seqs):
            self._beam_step(out)
        elif (self.speculation is not None and self.speculation.applies(out)
              and self.speculation.step(out)):
            pass      # speculated (a step where nobody had a proposal falls through: plain)
        else:
            try:
                tokens = self.runner.execute(out)  # the sampled ids come back to the host: synced
            except Exception as e:  # noqa: BLE001 - isolated below, re-raised if no request's own
                tokens = self._isolate(out, e)
            self.scheduler.update(out, tokens)
        self.num_steps += 1
        if out.seqs:
            kind = "decode" if out.is_decode else "mixed"
            st = self.step_stats[kind]
            st["steps"] += 1
            st["seconds"] += time.perf_counter() - t0
            st["tokens"] += out.num_tokens
            st["seqs"] += len(out.seqs)
        results = []
        finished = self.scheduler.pop_finished()
        done = {id(s) for s in finished}
        for seq in out.seqs:
            if id(seq) not in done:
                self._report(seq, False, results)
        for seq in finished:
            self.runner.release(seq)
            if self.speculation is not None:
                self.speculation.release(seq)
            self._report(seq, True, results)
            self._reported.pop(seq.request_id, None)
        return results

    def _beam_step(self, out: SchedulerOutput) -> None:
        """A step with beam-search requests (beam.BeamGroup): each decoding group runs as
        its K rows in the same batch as the others (after its block copies); their logits
        advance the search. Plain requests go through ``Scheduler.update`` as usual."""
        run = SchedulerOutput(is_decode=out.is_decode)
        for seq, n, smp in zip(out.seqs, out.num_new_tokens, out.sample):
            if seq.beam is not None and seq.beam.started:
                copy_blocks(self.runner.cache, seq.beam.copies)
                run.seqs += seq.beam.rows
                run.num_new_tokens += [1] * len(seq.beam.rows)
                run.sample += [True] * len(seq.beam.rows)
            else:
                run.seqs.append(seq)
                run.num_new_tokens.append(n)
                run.sample.append(smp)
        try:
            tokens = self.runner.execute(run)
        except Exception as e:  # noqa: BLE001 - beam groups fail; the rest are isolated
            msg = str(e).splitlines()[0] if str(e) else ""
            for seq in out.seqs:
                if seq.beam is not None:
                    self.scheduler.fail(seq, f"request {seq.request_id}: failed during a "
                                             f"step ({type(e).__name__}: {msg})")
            plain = SchedulerOutput(is_decode=out.is_decode)
            for seq, n, smp in zip(out.seqs, out.num_new_tokens, out.sample):
                if seq.beam is None:
                    plain.seqs.append(seq)
                    plain.num_new_tokens.append(n)
                    plain.sample.append(smp)
            if plain.seqs:
                self.scheduler.update(plain, self._isolate(plain, e))
            return
        logits = self.runner.last_logits
        row_of = {}                      # index in run -> row of logits
        for i, smp in enumerate(run.sample):
            if smp:
                row_of[i] = len(row_of)
        plain, plain_tokens, i = SchedulerOutput(is_decode=out.is_decode), [], 0
        for seq, n, smp in zip(out.seqs, out.num_new_tokens, out.sample):
            group = seq.beam
            if group is None:
                plain.seqs.append(seq)
                plain.num_new_tokens.append(n)
                plain.sample.append(smp)
                plain_tokens.append(tokens[i])
                i += 1
                continue
            if seq.status is not SequenceStatus.RUNNING:
                i += len(group.rows) if group.started else 1
                continue                           # cancelled while the step ran
            if group.started:
                k = len(group.rows)
                group.advance(logits[row_of[i]:row_of[i] + k])
                i += k
            else:
                seq.num_computed_tokens += n
                self.block_manager.register_computed(seq)
                if smp:
                    group.start(self.block_manager, logits[row_of[i]], sorted(seq.stop_ids))
                i += 1
            if group.done:
                self.scheduler.finish(seq, FinishReason(group.finish()))
        if plain.seqs:
            self.scheduler.update(plain, plain_tokens)

    def _isolate(self, out, error: Exception) -> list:
        """A step failed: run each of its requests alone to find whose it was. Those that fail
        alone are finished with ``FinishReason.ERROR`` (the message names the request); the
        others get their tokens as if nothing happened (a rerun recomputes the same K/V). When
        every request of a step of several fails alone the fault is not theirs: re-raised."""
        for seq in out.seqs:
            self.runner.rewind(seq)    # draws and control updates of tokens never kept
        tokens, failed = [None] * len(out.seqs), []
        for i, (seq, n, smp) in enumerate(zip(out.seqs, out.num_new_tokens, out.sample)):
            alone = SchedulerOutput(seqs=[seq], num_new_tokens=[n], sample=[smp],
                                    is_decode=n == 1)
            try:
                tokens[i] = self.runner.execute(alone)[0]
            except Exception as e:  # noqa: BLE001 - this request's own fault
                self.runner.release(seq)
                seq.next_logprob = None
                failed.append((seq, e))
        if len(out.seqs) > 1 and len(failed) == len(out.seqs):
            raise error
        for seq, e in failed:
            msg = str(e).splitlines()[0] if str(e) else ""
            self.scheduler.fail(seq, f"request {seq.request_id}: failed during a step "
                                     f"({type(e).__name__}: {msg})")
        return tokens

    def _report(self, seq: Sequence, finished: bool, results: list) -> None:
        if seq.beam is not None and not finished:
            return                       # beams change until the end: reported once, finished
        start = self._reported.get(seq.request_id, 0)
        end = len(seq.output_ids)
        if not finished and seq.stop_words:
            end -= held_back(seq.output_ids[start:], seq.stop_words)  # maybe a stop word
        new = seq.output_ids[start:end]
        if new or finished:
            self._reported[seq.request_id] = start + len(new)
            results.append(RequestOutput(seq.request_id, new, finished, seq))

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding each step's outputs."""
        while True:
            yield from self.step()
            if not self.scheduler.has_unfinished():
                return

    def generate(self, prompts: list, max_tokens: Union[int, list, None] = None,
                 sampling: Optional[SamplingConfig] = None, stop_ids: Iterable[int] = (),
                 streamer: Optional[Callable[[RequestOutput], None]] = None,
                 beam: Optional[BeamConfig] = None) -> list[Sequence]:
        """Run ``prompts`` (lists of ids, all arriving now) to completion. -> their finished
        ``Sequence`` objects in input order (``output_ids``, ``finish_reason``, ``error``,
        ``ttft``, ``tpot``). ``max_tokens`` may be one int or one per prompt. ``streamer``
        sees every RequestOutput of these requests as it is produced. ``beam``: beam search
        for each prompt (``beam_output_ids`` / ``beam_scores`` on its sequence)."""
        if isinstance(max_tokens, (list, tuple)):
            if len(max_tokens) != len(prompts):
                raise ConfigError(f"{len(max_tokens)} max_tokens for {len(prompts)} prompts")
            limits = list(max_tokens)
        else:
            limits = [max_tokens] * len(prompts)
        stop_ids = list(stop_ids)
        for i, (p, m) in enumerate(zip(prompts, limits)):  # all checked before any is queued
            self._checked(f"prompt {i}", p, sampling, m, stop_ids, beam)
        now = time.perf_counter()
        ids = [self.add_request(p, sampling, m, stop_ids, now, beam)
               for p, m in zip(prompts, limits)]
        mine = {rid: i for i, rid in enumerate(ids)}
        results: dict = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.request_id not in mine:
                    continue
                out.index = mine[out.request_id]
                if streamer:
                    streamer(out)
                if out.finished:
                    results[out.request_id] = out.sequence
        return [results[i] for i in ids]


def latency_stats(seqs: list[Sequence]) -> dict:
    """Throughput and latency of finished requests: output tok/s over the span from the first
    arrival to the last finish, and p50/p99 time to first token and time per output token."""
    done = [s for s in seqs if s.finish_time is not None]
    if not done:
        return {"num_requests": 0}
    span = max(s.finish_time for s in done) - min(s.arrival_time for s in done)
    tokens = sum(s.num_output_tokens for s in done)
    stats = {"num_requests": len(done), "output_tokens": tokens, "elapsed_s": span,
             "tokens_per_s": tokens / span if span > 0 else float("inf"),
             "num_preempted": sum(1 for s in done if s.num_preemptions)}
    for name in ("ttft", "tpot"):
        vals = sorted(v for v in (getattr(s, name) for s in done) if v is not None)
        if vals:
            stats[f"{name}_p50_s"] = percentile(vals, 50)
            stats[f"{name}_p99_s"] = percentile(vals, 99)
            stats[f"{name}_mean_s"] = statistics.fmean(vals)
    return stats


def percentile(sorted_vals: list, q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)
