"""The model runner: the one object that runs the network (nano-vllm's ``ModelRunner``).

It owns the model, the paged ``KVCache``, the ``AttentionMeta`` of every step, the CUDA graphs
of decode steps (``cuda_graphs.CudaGraphs``) and of short prefills
(``cuda_graphs.PrefillGraphs``) and sampling. Two ways of scheduling run on it:

* the static batch (``runner.Engine.generate``): ``prefill`` of every prompt, then
  ``decode`` one token per sequence; each sequence owns a fixed block range
  (``kv_cache.static_block_tables``); on CUDA a decode of B sequences replays a graph captured
  for exactly B (and the block-table width), computing positions, slots and the context
  lengths' advance inside the graph; a prefill of B prompts whose bucket (each padded to the
  same power-of-two length L) has at most ``prefill_graph_max_tokens`` tokens replays a graph
  captured for (B, L) (``prefill_padded``; its padding writes nothing to the cache);
* inflight batching (``serving.LLMEngine``): ``setup_serving`` sizes the shared cache and
  captures a graph per bucket (``cuda_graphs.graph_buckets``); ``execute`` turns a
  ``SchedulerOutput`` into one flat batch (prefill chunks and decodes together, vLLM's layout)
  and samples each due sequence; an all-decode step replays the smallest bucket >= B, its
  padding rows writing nothing (slot -1) and reading one cached token. A step made only of
  prompts' first chunks (no cached prefix, no decodes) within ``prefill_graph_max_tokens``
  replays a prefill graph (batch padded to a power of two); other mixed steps, chunks over a
  cached prefix included, run eagerly.

Cache size in serving (TensorRT-LLM's knobs): on CUDA a fraction
(``kv_cache_free_gpu_memory_fraction``) of the memory still free once the weights are loaded
and a largest-step forward has run (its activations must fit too), capped by
``max_kv_cache_tokens``; on the CPU ``max_kv_cache_tokens`` (default: ``max_batch_size``
full-length sequences).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import parallel
from .attention import AttentionMeta, last_token_indices
from .config import ConfigError, EngineConfig
from .cuda_graphs import (CudaGraphs, PrefillGraphs, graph_buckets, pad_prefill,
                          prefill_batch_bucket, prefill_bucket)
from .kernels import ops
from .kv_cache import KVCache, quant_cache_dtype, slots_for
from .logits_processors import Controls
from .sampling import SamplingConfig, sample, token_logprobs
from .serving.block_manager import cdiv
from .serving.scheduler import SchedulerOutput
from .serving.sequence import Sequence

log = logging.getLogger(__name__)
STATIC_GRAPH_WARMUP = 2     # warm-up runs before a static-batch capture (Triton compiles)
SERVING_GRAPH_WARMUP = 1
PREFILL_GRAPH_WARMUP = 1    # (the shape's first, eager prefill compiled its kernels)


class ModelRunner:
    """Runs ``model`` (a ``model.Transformer``) over its paged KV cache."""

    def __init__(self, config: EngineConfig, model, device, kv_scales: Optional[list] = None):
        self.config, self.model, self.device = config, model, torch.device(device)
        self.kv_scales = kv_scales
        # storage of a cache with scales: int8 or FP8 (QuantConfig.kv_cache_quant_algo)
        self.kv_quant_dtype = quant_cache_dtype(config.quant.kv_cache_dtype)
        if kv_scales is not None and config.quant.fp8_kv_cache:
            ops.check_fp8_kv_device(self.device)  # engine load: one line on a pre-Ada GPU
        self.dtype = model.embed.weight.dtype
        self.block_size = config.build.tokens_per_block
        self.cache: Optional[KVCache] = None
        self.cuda_graphs = False            # static batch: replay decode steps (CUDA only)
        self._static_graphs: dict[int, CudaGraphs] = {}   # block-table width -> graphs
        self._serving_graphs: Optional[CudaGraphs] = None
        # Prefills of at most this many (padded) tokens replay CUDA graphs where decode does
        # (options.RuntimeOptions.prefill_graph_max_tokens; 0: always eager).
        self.prefill_graph_max_tokens = 0
        self._prefill_graphs: Optional[PrefillGraphs] = None
        self._serving_prefill_graphs = False
        self._pool = None
        self._generators: dict = {}         # request_id -> torch.Generator (seeded requests)
        self._controls: Optional[Controls] = None  # inflight requests' control state
        self._gen_before: dict = {}         # request_id -> generator state before this step
        self.last_logits: Optional[torch.Tensor] = None   # execute(): the sampled rows' logits
        self.max_batch_size = config.build.max_batch_size
        self.max_num_tokens = 0
        self.max_blocks_per_seq = cdiv(config.build.max_seq_len, self.block_size)

    # -- KV cache ----------------------------------------------------------------------------
    def allocate_cache(self, num_blocks: int) -> KVCache:
        """A new cache of ``num_blocks`` (the old one freed first; graphs pointing at it go)."""
        a = self.config.model
        self.cache = None
        self.invalidate_graphs()
        self.cache = KVCache(a.num_hidden_layers, num_blocks, self.block_size,
                             a.num_key_value_heads, a.head_dim, self.dtype, self.device,
                             self.kv_scales, self.kv_quant_dtype)
        return self.cache

    def ensure_cache(self, num_blocks: int) -> KVCache:
        """The cache, reallocated only when it has fewer than ``num_blocks`` blocks."""
        if self.cache is None or self.cache.num_blocks < num_blocks:
            return self.allocate_cache(num_blocks)
        return self.cache

    def kv_bytes_per_token(self) -> int:
        a = self.config.model
        return KVCache.bytes_per_token(a.num_hidden_layers, a.num_key_value_heads, a.head_dim,
                                       self.kv_scales is not None, self.dtype)

    # -- one forward over a flat batch ---------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seq_index: torch.Tensor,
                block_tables: torch.Tensor, query_lens: list, context_lens: list,
                is_decode: bool, logits_indices: Optional[torch.Tensor],
                cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens int64[N] of several sequences (``seq_index`` says whose, ``positions``
        where) -> fp32 logits of ``logits_indices`` (all N with ``all_logits``)."""
        dev = self.device
        meta = AttentionMeta(
            positions=positions,
            slot_mapping=slots_for(block_tables, seq_index, positions, self.block_size),
            block_tables=block_tables,
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            query_lens=query_lens, is_decode=is_decode, logits_indices=logits_indices,
            context_lens_host=context_lens)
        return self.model(tokens, meta, cache, all_logits=all_logits)

    # -- the static batch -------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, batch_input_ids: list, cache: KVCache, block_tables: torch.Tensor):
        """All prompt tokens of the batch; -> fp32 logits of each prompt's last token [B, V].
        On CUDA with graphs on, a batch within ``prefill_graph_max_tokens`` once padded
        replays a prefill graph; otherwise one eager flat batch."""
        lens = [len(p) for p in batch_input_ids]
        if self.cuda_graphs and cache is self.cache:   # (cuda_graphs: only on CUDA, or a test)
            L = prefill_bucket(lens, len(lens), self.prefill_graph_max_tokens,
                               self.model.max_positions)
            if L is not None:
                return self.prefill_padded(batch_input_ids, cache, block_tables, L,
                                           graphs=True)
        dev = self.device
        tokens = torch.tensor([t for p in batch_input_ids for t in p], dtype=torch.int64,
                              device=dev)
        # Positions and owners built on the host: repeat_interleave with a tensor of counts
        # waits for the device to learn its output size.
        positions = torch.tensor([i for n in lens for i in range(n)], device=dev)
        seq_index = torch.tensor([b for b, n in enumerate(lens) for _ in range(n)],
                                 device=dev)
        return self.forward(tokens, positions, seq_index, block_tables, lens, lens, False,
                            last_token_indices(lens, dev), cache)

    def prefill_padded(self, token_lists: list, cache: KVCache, block_tables: torch.Tensor,
                       L: int, batch: Optional[int] = None,
                       graphs: bool = False) -> torch.Tensor:
        """Prompts with no cached prefix, each padded to ``L`` tokens, as ``batch`` rows
        (default: one per prompt; extra rows are empty). -> fp32 logits of each prompt's last
        token [len(token_lists), V]. With ``graphs`` on CUDA (and the runner's cache) it
        replays the (batch, L) graph (captured when the shape comes a second time); otherwise
        it runs the same step eagerly. Padding writes nothing to the cache."""
        b = len(token_lists)
        x = pad_prefill(token_lists, block_tables, L, batch or b, self.block_size)
        if graphs and self.device.type == "cuda" and cache is self.cache:
            if self._prefill_graphs is None:
                self._prefill_graphs = PrefillGraphs(
                    lambda inp: self._prefill_step(inp, self.cache), self._graph_pool(),
                    self.device, PREFILL_GRAPH_WARMUP)
            logits = self._prefill_graphs.run(x)
            if logits is not None:
                return logits[:b]
        x = {k: v.to(self.device) for k, v in x.items()}
        return self._prefill_step(x, cache)[:b]

    def _prefill_step(self, x: dict, cache: KVCache) -> torch.Tensor:
        """The padded prefill step (``cuda_graphs.pad_prefill``'s inputs): positions, slots
        (-1 past each prompt's length) and logit rows come from the lengths on the device,
        so the step has no host work that depends on the prompts and can be captured."""
        tokens, lens, bt = x["tokens"], x["lens"], x["block_tables"]
        batch = lens.shape[0]
        L = tokens.shape[0] // batch
        dev = tokens.device
        pos = torch.arange(L, device=dev).expand(batch, L)
        positions = pos.reshape(-1)
        seq_index = torch.arange(batch, device=dev)[:, None].expand(batch, L).reshape(-1)
        valid = (pos < lens[:, None]).reshape(-1)
        slots = slots_for(bt, seq_index, positions, self.block_size).masked_fill(~valid, -1)
        last = (torch.arange(batch, device=dev) * L
                + (lens.to(torch.int64) - 1).clamp_min(0))
        meta = AttentionMeta(
            positions=positions, slot_mapping=slots, block_tables=bt,
            context_lens=torch.full((batch,), L, dtype=torch.int32, device=dev),
            query_lens=[L] * batch, is_decode=False, logits_indices=last,
            context_lens_host=[L] * batch)
        return self.model(tokens, meta, cache)

    @torch.inference_mode()
    def forward_all(self, input_ids: list, cache: KVCache, block_tables: torch.Tensor):
        """Teacher-forced fp32 logits of every position of one sequence: [T, V]."""
        dev, n = self.device, len(input_ids)
        positions = torch.arange(n, device=dev)
        return self.forward(torch.tensor(input_ids, device=dev), positions,
                            torch.zeros_like(positions), block_tables, [n], [n], False, None,
                            cache, all_logits=True)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, context_lens: torch.Tensor,
               block_tables: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence. ``context_lens`` (int32[B], tokens cached so far) is
        advanced in place. -> fp32 logits [B, V]."""
        if self.cuda_graphs and self.device.type == "cuda" and cache is self.cache:
            return self._static_replay(tokens, context_lens, block_tables)
        return self.decode_eager(tokens, context_lens, block_tables, cache)

    def decode_eager(self, tokens, context_lens, block_tables, cache) -> torch.Tensor:
        """``decode`` without CUDA graphs (also what the static graphs capture)."""
        positions = context_lens.to(torch.int64)
        seq_index = torch.arange(tokens.shape[0], device=tokens.device)
        context_lens += 1
        meta = AttentionMeta(
            positions=positions,
            slot_mapping=slots_for(block_tables, seq_index, positions, self.block_size),
            block_tables=block_tables, context_lens=context_lens,
            query_lens=[1] * tokens.shape[0], is_decode=True)
        return self.model(tokens, meta, cache)

    def _static_replay(self, tokens, context_lens, block_tables) -> torch.Tensor:
        b, width = tokens.shape[0], block_tables.shape[1]
        graphs = self._static_graphs.get(width)
        if graphs is None or graphs.max_batch_size < b:
            rows = max(b, self.config.build.max_batch_size)
            bufs = dict(tokens=tokens.new_zeros(rows),
                        context_lens=context_lens.new_zeros(rows),
                        block_tables=block_tables.new_zeros(rows, width))
            cache = self.cache
            graphs = CudaGraphs(lambda x: self.decode_eager(x["tokens"], x["context_lens"],
                                                            x["block_tables"], cache),
                                bufs, self._graph_pool(), mutable=("context_lens",))
            self._static_graphs[width] = graphs
        inputs = dict(tokens=tokens, context_lens=context_lens, block_tables=block_tables)
        if b not in graphs.graphs:  # exactly this batch size: no padding in a static batch
            for name, t in inputs.items():
                graphs.buffers[name][:b].copy_(t)
            graphs.capture(b, STATIC_GRAPH_WARMUP)
        logits = graphs.replay(b, inputs)
        context_lens.copy_(graphs.buffers["context_lens"][:b])  # the step advanced it by one
        return logits

    def enable_cuda_graphs(self) -> None:
        """Replay static-batch decode steps from CUDA graphs (one per batch size), and
        prefills within ``prefill_graph_max_tokens`` (one per batch and bucket); CUDA only."""
        self.cuda_graphs = self.device.type == "cuda"

    def invalidate_graphs(self) -> None:
        """Forget every captured graph (they keep the cache and the launches they captured),
        and their memory pool: once the last graph of a private pool is gone the allocator
        releases the pool, and capturing into its old handle again fails an internal assert
        (``use_count > 0``, seen on the H100 when inflight batching followed a static run)."""
        self._static_graphs.clear()
        self._serving_graphs = None
        self._prefill_graphs = None
        self._pool = None

    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    # -- inflight batching -------------------------------------------------------------------
    def setup_serving(self, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                      kv_cache_free_gpu_memory_fraction: float = 0.9,
                      max_kv_cache_tokens: Optional[int] = None,
                      cuda_graphs: bool = True) -> int:
        """Size and allocate the shared cache for inflight batching, capture the decode
        graphs (CUDA). -> the number of cache blocks."""
        if not 0.0 < kv_cache_free_gpu_memory_fraction <= 1.0:
            raise ConfigError("--kv_cache_free_gpu_memory_fraction must be in (0, 1], got "
                              f"{kv_cache_free_gpu_memory_fraction}")
        if max_kv_cache_tokens is not None and max_kv_cache_tokens < self.block_size:
            raise ConfigError(f"--max_kv_cache_tokens {max_kv_cache_tokens} is less than one "
                              f"block ({self.block_size} tokens)")
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.max_blocks_per_seq = cdiv(max_seq_len, self.block_size)
        self.cache = None  # a static batch's cache, if any: its memory is the new cache's
        self.invalidate_graphs()
        self._serving_prefill_graphs = cuda_graphs and self.device.type == "cuda"
        self.allocate_cache(self._kv_cache_blocks(kv_cache_free_gpu_memory_fraction,
                                                  max_kv_cache_tokens))
        if cuda_graphs and self.device.type == "cuda":
            self._capture_serving_graphs()
        return self.cache.num_blocks

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    def _kv_cache_blocks(self, fraction: float, max_tokens: Optional[int]) -> int:
        if self.device.type != "cuda":
            if max_tokens is None:
                max_tokens = self.max_batch_size * self.max_blocks_per_seq * self.block_size
            return cdiv(max_tokens, self.block_size)
        per_token = self.kv_bytes_per_token()
        activations = self._profile_activations()
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = int((free - activations) * fraction)
        blocks = budget // (per_token * self.block_size)
        if max_tokens is not None:
            blocks = min(blocks, cdiv(max_tokens, self.block_size))
        if parallel.get_world_size() > 1:
            # Every rank must size the same cache, or their schedules (and collectives) diverge.
            t = torch.tensor([blocks], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            blocks = int(t)
        if blocks < 1:
            raise ConfigError(f"no GPU memory left for the KV cache ({free / 2**30:.2f} GiB "
                              f"free, {activations / 2**30:.2f} GiB needed by a step of "
                              f"{self.max_num_tokens} tokens); lower --max_num_tokens")
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.block_size,
                 blocks * per_token * self.block_size / 2**30)
        return int(blocks)

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak bytes of a forward over ``max_num_tokens`` prompt tokens (one sequence, on a
        throwaway cache just large enough)."""
        a = self.config.model
        n = min(self.max_num_tokens, self.model.max_positions)
        blocks = cdiv(n, self.block_size)
        scratch = KVCache(a.num_hidden_layers, blocks, self.block_size, a.num_key_value_heads,
                          a.head_dim, self.dtype, self.device, self.kv_scales,
                          self.kv_quant_dtype)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        dev = self.device
        bt = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
        positions = torch.arange(n, device=dev)
        meta = AttentionMeta(
            positions=positions, slot_mapping=positions.clone(), block_tables=bt,
            context_lens=torch.tensor([n], dtype=torch.int32, device=dev), query_lens=[n],
            is_decode=False, context_lens_host=[n],
            logits_indices=torch.full((self.max_batch_size,), n - 1, device=dev))
        self.model(torch.zeros(n, dtype=torch.int64, device=dev), meta, scratch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch, meta
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[Optional[int]]:
        """Compute a scheduled step; -> the sampled token of each ``out.seqs[i]`` (None where
        ``out.sample[i]`` is False)."""
        self._gen_before.clear()
        if out.empty:
            return []
        rows = [i for i, s in enumerate(out.sample) if s]
        if (out.is_decode and self._serving_graphs is not None
                and len(out.seqs) <= self.max_batch_size):
            logits = self._replay(out.seqs)
            if len(rows) < len(out.seqs):
                logits = logits[rows]  # the graph made logits for every sequence
        else:
            logits = (self._padded_prefill(out, rows, graphs=True)
                      if self._serving_prefill_graphs else None)
            if logits is None:
                logits = self._forward(out, rows)
        if not rows:
            return [None] * len(out.seqs)
        self.last_logits = logits   # rows of out.sample; beam search reads them (beam.py)
        tokens = self.sample_rows(logits, [out.seqs[i] for i in rows])
        result: list[Optional[int]] = [None] * len(out.seqs)
        for i, t in zip(rows, tokens):
            result[i] = t
        return result

    def _block_tables(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _padded_prefill(self, out: SchedulerOutput, rows: list[int],
                        graphs: bool) -> Optional[torch.Tensor]:
        """A step of prompts' first chunks only (no cached prefix, no decodes) within
        ``prefill_graph_max_tokens`` once padded (rows to a power of two, each chunk to the
        bucket length): run as ``prefill_padded`` (a graph with ``graphs``). -> logits
        [len(rows), V], or None for any other step."""
        if out.is_decode or self.prefill_graph_max_tokens <= 0 or any(
                s.num_computed_tokens for s in out.seqs):
            return None
        n = list(out.num_new_tokens)
        batch = prefill_batch_bucket(len(n), self.max_batch_size)
        L = prefill_bucket(n, batch, self.prefill_graph_max_tokens, self.model.max_positions)
        if L is None:
            return None
        lists = [s.token_ids(0, k) for s, k in zip(out.seqs, n)]
        width = max(len(s.block_table) for s in out.seqs)
        logits = self.prefill_padded(lists, self.cache, self._block_tables(out.seqs, width),
                                     L, batch, graphs=graphs)
        return logits if len(rows) == len(n) else logits[rows]

    def _forward(self, out: SchedulerOutput, rows: list[int]) -> torch.Tensor:
        """The eager path (any mix of prefill chunks and decodes). -> logits [len(rows), V]."""
        tokens, positions, seq_index, ctx, last = [], [], [], [], []
        total = 0
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):
            start = seq.num_computed_tokens
            tokens += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            seq_index += [i] * n
            ctx.append(start + n)
            total += n
            last.append(total - 1)
        dev = self.device
        width = max(len(s.block_table) for s in out.seqs)
        return self.forward(
            torch.tensor(tokens, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            torch.tensor(seq_index, dtype=torch.int64, device=dev),
            self._block_tables(out.seqs, width), list(out.num_new_tokens), ctx, out.is_decode,
            torch.tensor([last[i] for i in rows], dtype=torch.int64, device=dev), self.cache)

    def _capture_serving_graphs(self) -> None:
        """Capture an all-decode step per bucket size; on failure fall back to eager."""
        B, W, dev = self.max_batch_size, self.max_blocks_per_seq, self.device
        bufs = dict(
            tokens=torch.zeros(B, dtype=torch.int64, device=dev),
            positions=torch.zeros(B, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros((B, W), dtype=torch.int32, device=dev),
            context_lens=torch.ones(B, dtype=torch.int32, device=dev))
        cache = self.cache

        def step(x):
            meta = AttentionMeta(
                positions=x["positions"], slot_mapping=x["slot_mapping"],
                block_tables=x["block_tables"], context_lens=x["context_lens"],
                query_lens=[1] * x["tokens"].shape[0], is_decode=True)
            return self.model(x["tokens"], meta, cache)

        graphs = CudaGraphs(step, bufs, self._graph_pool())
        try:
            for b in sorted(graph_buckets(B), reverse=True):  # largest first: it sizes the pool
                graphs.capture(b, SERVING_GRAPH_WARMUP)
            self._serving_graphs = graphs
        except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly",
                        type(e).__name__, e)
            self._serving_graphs = None
        torch.cuda.synchronize(dev)

    def _replay(self, seqs: list[Sequence]) -> torch.Tensor:
        """All-decode step from the graph of the smallest bucket >= len(seqs).
        -> logits [len(seqs), V] (a view of the graph's output: use before the next replay)."""
        pos = [q.num_computed_tokens for q in seqs]
        # Normally the last sampled token; the last token of a prompt chunk in a recompute.
        tok = [q.token_ids(p, p + 1)[0] for q, p in zip(seqs, pos)]
        return self._replay_rows(tok, pos, [q.block_table for q in seqs])

    def _replay_rows(self, tok: list, pos: list, tables: list) -> torch.Tensor:
        """Rows of one query token each (token, position, block table) from the decode graph
        of the smallest bucket >= len(tok). -> logits [len(tok), V] (a view)."""
        b = len(tok)
        graphs = self._serving_graphs
        rows = graphs.rows(b)
        rows["positions"].copy_(torch.tensor(pos, dtype=torch.int64), non_blocking=True)
        width = self.max_blocks_per_seq
        rows["block_tables"].copy_(torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                dtype=torch.int32, device=self.device))
        slots = slots_for(rows["block_tables"], torch.arange(b, device=self.device),
                          rows["positions"], self.block_size)
        inputs = dict(tokens=torch.tensor(tok, dtype=torch.int64),
                      context_lens=torch.tensor(pos, dtype=torch.int32) + 1,
                      slot_mapping=slots)
        # Padding rows of the bucket: nothing written, one (stale but finite) token read.
        return graphs.replay(
            b, inputs, padding=dict(slot_mapping=-1, context_lens=1, positions=0))

    # -- sampling ----------------------------------------------------------------------------
    def sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits fp32 [R, V] of ``seqs`` -> one token each. Rows of requests with sampling
        controls first get their penalties and bans, all in one batched pass over their
        device state (``logits_processors.Controls``, a slot per request); greedy rows take
        the argmax in one batched op; others are sampled with their own settings (seeded ones
        with their own generator, so batching never changes what they draw). Requests asking
        for log-probs get them on ``seq.next_logprob`` (``Sequence.append_token`` keeps
        them)."""
        controlled = [r for r, q in enumerate(seqs)
                      if q.sampling is not None and q.sampling.has_controls]
        if controlled:
            ctl = self._controls_state(logits.shape[-1])
            slots = [ctl.slot_of(q.request_id) if ctl.slot_of(q.request_id) is not None
                     else ctl.slot(q.request_id, q.sampling, q.prompt_ids + q.output_ids,
                                   q.num_prompt_tokens, sorted(q.stop_ids))
                     for q in (seqs[r] for r in controlled)]
            ngen = [seqs[r].num_output_tokens for r in controlled]
            if len(controlled) == len(seqs):
                ctl.apply(slots, logits, ngen)
            else:
                idx = torch.tensor(controlled, device=self.device)
                logits[idx] = ctl.apply(slots, logits[idx], ngen)
        next_ids = logits.argmax(dim=-1)
        groups: dict = {}
        for r, seq in enumerate(seqs):
            cfg: SamplingConfig = seq.sampling
            if cfg is None or cfg.greedy:
                continue
            key = (cfg.temperature, cfg.top_k, cfg.top_p,
                   seq.request_id if cfg.seed is not None else None)
            groups.setdefault(key, (cfg, seq, []))[2].append(r)
        for cfg, seq, group in groups.values():
            gen = self.generator(seq)
            if gen is not None:
                self._gen_before[seq.request_id] = gen.get_state()  # for rewind()
            idx = torch.tensor(group, device=self.device)
            next_ids[idx] = sample(logits[idx], cfg, gen)
        if controlled:
            ctl.update(slots, next_ids if len(controlled) == len(seqs)
                       else next_ids[torch.tensor(controlled, device=self.device)])
        lp_groups: dict = {}   # rows sharing a log-prob distribution and a top-N
        for r, q in enumerate(seqs):
            cfg = q.sampling
            if cfg is not None and cfg.logprobs is not None:
                key = (None if cfg.greedy else cfg.temperature, cfg.logprobs)
                lp_groups.setdefault(key, (cfg, []))[1].append(r)
        lps = []
        for cfg, rows in lp_groups.values():
            idx = torch.tensor(rows, device=self.device)
            lps.append((rows, token_logprobs(logits[idx], next_ids[idx], cfg)))
        tokens = next_ids.tolist()
        for rows, (lp, ids, vals) in lps:
            lp = lp.tolist()
            ids = ids.tolist() if ids is not None else None
            vals = vals.tolist() if vals is not None else None
            for k, r in enumerate(rows):
                top = list(zip(ids[k], vals[k])) if ids is not None else None
                seqs[r].next_logprob = (lp[k], top)
        return tokens

    def _controls_state(self, vocab_size: int) -> Controls:
        """The device state of every inflight request with sampling controls (a slot each)."""
        if self._controls is None:
            self._controls = Controls(vocab_size, self.config.build.max_seq_len, self.device,
                                      self.max_batch_size)
        return self._controls

    def rewind(self, seq: Sequence) -> None:
        """Undo what the last ``execute`` did to ``seq``'s sampling state (its step failed and
        will be rerun): the generator goes back to where it was before this step's draw, the
        controls are rebuilt from its tokens when it next samples."""
        state = self._gen_before.pop(seq.request_id, None)
        if state is not None:
            self._generators[seq.request_id].set_state(state)
        if self._controls is not None:
            self._controls.release(seq.request_id)
        seq.next_logprob = None

    def generator(self, seq: Sequence) -> Optional[torch.Generator]:
        """The generator of a seeded request (made on first use), None for the others."""
        cfg = seq.sampling
        if cfg is None or cfg.seed is None:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
            self._generators[seq.request_id] = gen
        return gen

    def release(self, seq: Sequence) -> None:
        """Forget per-request state (the sampler's generator, the controls' device state) of
        a finished request."""
        self._generators.pop(seq.request_id, None)
        if self._controls is not None:
            self._controls.release(seq.request_id)

    # -- speculative decoding (llama_engine/speculative.py) ------------------------------------
    # A verify step runs each sequence's last token and its proposed tokens over the cached
    # prefix and returns logits at every position. Query row i of a sequence attends to
    # context + i + 1 tokens: causality is a per-row context length, so the step is a decode
    # step over one row per (sequence, position) with the sequence's block table repeated; the
    # decode kernel and the decode CUDA graphs (captured per row count) serve it unchanged.
    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor, context_lens: torch.Tensor,
               block_tables: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Static batch: tokens int64[B, K1] (each row's last sampled token, then its
        proposals) at positions ``context_lens[b] + i``; ``context_lens`` is not changed.
        -> fp32 logits [B, K1, V]."""
        b, k1 = tokens.shape
        ctx = (context_lens.to(torch.int32)[:, None]
               + torch.arange(k1, dtype=torch.int32, device=tokens.device)).reshape(-1)
        logits = self.decode(tokens.reshape(-1), ctx, block_tables.repeat_interleave(k1, 0),
                             cache)
        return logits.view(b, k1, -1)

    @torch.inference_mode()
    def extend(self, token_lists: list, starts: list, block_tables: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """Each sequence's ``token_lists[b]`` at positions ``starts[b]..`` over its cached
        prefix (a draft model catching up). -> fp32 logits of each one's last token [B, V]."""
        dev = self.device
        lens = [len(t) for t in token_lists]
        tokens = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.int64,
                              device=dev)
        positions = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)],
                                 dtype=torch.int64, device=dev)
        seq_index = torch.tensor([b for b, n in enumerate(lens) for _ in range(n)],
                                 device=dev)   # (no repeat_interleave: it would sync)
        ctx = [s + n for s, n in zip(starts, lens)]
        return self.forward(tokens, positions, seq_index, block_tables, lens, ctx,
                            all(n == 1 for n in lens), last_token_indices(lens, dev), cache)

    @torch.inference_mode()
    def verify_serving(self, seqs: list[Sequence], drafts: list) -> list[torch.Tensor]:
        """Inflight batching: each sequence's last token and ``drafts[i]`` at positions
        ``num_computed_tokens..`` (blocks already allocated). A step of up to
        ``max_batch_size`` rows replays a decode graph. -> per sequence fp32 logits
        [1 + len(drafts[i]), V]."""
        tok, pos, tables, counts = [], [], [], []
        for seq, draft in zip(seqs, drafts):
            p0 = seq.num_computed_tokens
            ids = seq.token_ids(p0, p0 + 1) + list(draft)
            tok += ids
            pos += range(p0, p0 + len(ids))
            tables += [seq.block_table] * len(ids)
            counts.append(len(ids))
        if self._serving_graphs is not None and len(tok) <= self.max_batch_size:
            logits = self._replay_rows(tok, pos, tables).clone()
        else:
            dev, n = self.device, len(tok)
            width = max(len(t) for t in tables)
            bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                              device=dev)
            positions = torch.tensor(pos, dtype=torch.int64, device=dev)
            meta = AttentionMeta(
                positions=positions,
                slot_mapping=slots_for(bt, torch.arange(n, device=dev), positions,
                                       self.block_size),
                block_tables=bt, context_lens=(positions + 1).to(torch.int32),
                query_lens=[1] * n, is_decode=True)
            logits = self.model(torch.tensor(tok, dtype=torch.int64, device=dev), meta,
                                self.cache)
        return list(torch.split(logits, counts))
