"""Model runner of inflight batching: a scheduled step -> flat token batch -> model -> tokens.

Owns the paged ``KVCache`` shared by all requests and, on CUDA, the decode CUDA graphs. Per
step it turns a ``SchedulerOutput`` into one flat batch (the layout of vLLM's and nano-vllm's
model runners): every sequence contributes the tokens at positions
``[num_computed_tokens, num_computed_tokens + n)``; ``slot_mapping`` places their K/V through
the sequence's block table; ``context_lens`` is what each sequence has in the cache after the
step. One forward pass of ``model.Transformer`` computes prefill chunks and decodes together;
the last token of each sequence that is due a token is projected to logits and sampled with
the runner's ``sample``.

Cache size (TensorRT-LLM's knobs): on CUDA a fraction (``kv_cache_free_gpu_memory_fraction``,
default 0.9) of the memory still free once the weights are loaded and a largest-step forward
has been run (its activations must fit too), capped by ``max_kv_cache_tokens`` when given; on
the CPU ``max_kv_cache_tokens`` (default: ``max_batch_size`` full-length sequences).

CUDA graphs: an all-decode step of B sequences replays a graph captured for the smallest
bucket >= B (1, 2, 4, 8, 16, 32, 48, 64, ... up to ``max_batch_size``); padding rows write
nothing (slot -1) and read one cached token. Other steps, and every step on the CPU, run
eagerly.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from llama_engine import parallel
from llama_engine.attention import AttentionMeta
from llama_engine.config import ConfigError
from llama_engine.kv_cache import KVCache, slots_for
from llama_engine.runner import Engine, SamplingConfig, sample
from llama_engine.serving.block_manager import cdiv
from llama_engine.serving.scheduler import SchedulerOutput
from llama_engine.serving.sequence import Sequence

log = logging.getLogger(__name__)


def graph_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then steps of 16."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class ModelRunner:
    """Runs scheduled steps of one ``Engine``'s model over a shared paged cache."""

    def __init__(self, engine: Engine, max_batch_size: int, max_num_tokens: int,
                 max_seq_len: int, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 max_kv_cache_tokens: Optional[int] = None, cuda_graphs: bool = True):
        self.engine = engine
        self.model = engine.model
        self.device = engine.device
        self.block_size = engine.config.build.tokens_per_block
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_blocks_per_seq = cdiv(max_seq_len, self.block_size)
        if not 0.0 < kv_cache_free_gpu_memory_fraction <= 1.0:
            raise ConfigError("--kv_cache_free_gpu_memory_fraction must be in (0, 1], got "
                              f"{kv_cache_free_gpu_memory_fraction}")
        if max_kv_cache_tokens is not None and max_kv_cache_tokens < self.block_size:
            raise ConfigError(f"--max_kv_cache_tokens {max_kv_cache_tokens} is less than one "
                              f"block ({self.block_size} tokens)")
        engine._cache = None  # the static runner's cache, if any: its memory is ours now
        num_blocks = self._kv_cache_blocks(kv_cache_free_gpu_memory_fraction,
                                           max_kv_cache_tokens)
        a = engine.config.model
        self.cache = KVCache(a.num_hidden_layers, num_blocks, self.block_size,
                             a.num_key_value_heads, a.head_dim, engine.dtype, self.device,
                             engine.kv_scales)
        self._generators: dict = {}   # request_id -> torch.Generator of seeded requests
        self._graphs: dict[int, tuple] = {}
        if cuda_graphs and self.device.type == "cuda":
            self._capture_graphs()

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    # -- cache sizing --------------------------------------------------------------------------
    def _kv_cache_blocks(self, fraction: float, max_tokens: Optional[int]) -> int:
        a = self.engine.config.model
        per_token = KVCache.bytes_per_token(a.num_hidden_layers, a.num_key_value_heads,
                                            a.head_dim, self.engine.kv_scales is not None,
                                            self.engine.dtype)
        if self.device.type != "cuda":
            if max_tokens is None:
                max_tokens = self.max_batch_size * self.max_blocks_per_seq * self.block_size
            return cdiv(max_tokens, self.block_size)
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
        a, n = self.engine.config.model, self.max_num_tokens
        n = min(n, self.model.max_positions)
        blocks = cdiv(n, self.block_size)
        scratch = KVCache(a.num_hidden_layers, blocks, self.block_size, a.num_key_value_heads,
                          a.head_dim, self.engine.dtype, self.device, self.engine.kv_scales)
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

    # -- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[Optional[int]]:
        """Compute a scheduled step; -> the sampled token of each ``out.seqs[i]`` (None where
        ``out.sample[i]`` is False)."""
        if out.empty:
            return []
        rows = [i for i, s in enumerate(out.sample) if s]
        if out.is_decode and self._graphs and len(out.seqs) <= self.max_batch_size:
            logits = self._replay(out.seqs)
            if len(rows) < len(out.seqs):
                logits = logits[rows]  # the graph made logits for every sequence
        else:
            logits = self._forward(out, rows)
        if not rows:
            return [None] * len(out.seqs)
        tokens = self._sample(logits, [out.seqs[i] for i in rows])
        result: list[Optional[int]] = [None] * len(out.seqs)
        for i, t in zip(rows, tokens):
            result[i] = t
        return result

    def _block_tables(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

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
        block_tables = self._block_tables(out.seqs, width)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        idx = torch.tensor(seq_index, dtype=torch.int64, device=dev)
        meta = AttentionMeta(
            positions=pos,
            slot_mapping=slots_for(block_tables, idx, pos, self.block_size),
            block_tables=block_tables,
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            query_lens=list(out.num_new_tokens),
            is_decode=out.is_decode,
            logits_indices=torch.tensor([last[i] for i in rows], dtype=torch.int64,
                                        device=dev),
            context_lens_host=ctx)
        return self.model(torch.tensor(tokens, dtype=torch.int64, device=dev), meta, self.cache)

    # -- sampling --------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits fp32 [R, V] of ``seqs`` -> one token each. Greedy rows take the argmax in
        one batched op; others are sampled with their own settings (seeded ones with their
        own generator, so batching never changes what they draw)."""
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
            gen = None
            if cfg.seed is not None:
                gen = self._generators.get(seq.request_id)
                if gen is None:
                    gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
                    self._generators[seq.request_id] = gen
            idx = torch.tensor(group, device=self.device)
            next_ids[idx] = sample(logits[idx], cfg, gen)
        return next_ids.tolist()

    def release(self, seq: Sequence) -> None:
        """Forget per-request state (the sampler's generator) of a finished request."""
        self._generators.pop(seq.request_id, None)

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        """Capture an all-decode step per bucket size; on failure fall back to eager."""
        B, W, dev = self.max_batch_size, self.max_blocks_per_seq, self.device
        self._static = dict(
            tokens=torch.zeros(B, dtype=torch.int64, device=dev),
            positions=torch.zeros(B, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros((B, W), dtype=torch.int32, device=dev),
            context_lens=torch.ones(B, dtype=torch.int32, device=dev))
        s = self._static
        pool = None
        try:
            for b in sorted(graph_buckets(B), reverse=True):  # largest first: it sizes the pool
                meta = AttentionMeta(
                    positions=s["positions"][:b], slot_mapping=s["slot_mapping"][:b],
                    block_tables=s["block_tables"][:b], context_lens=s["context_lens"][:b],
                    query_lens=[1] * b, is_decode=True)
                self.model(s["tokens"][:b], meta, self.cache)  # warm-up (Triton compiles)
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model(s["tokens"][:b], meta, self.cache)
                pool = graph.pool()
                self._graphs[b] = (graph, logits)
        except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly",
                        type(e).__name__, e)
            self._graphs = {}
        torch.cuda.synchronize(dev)

    def _replay(self, seqs: list[Sequence]) -> torch.Tensor:
        """All-decode step from the graph of the smallest bucket >= len(seqs).
        -> logits [len(seqs), V] (a view of the graph's output: use before the next replay)."""
        b = len(seqs)
        bucket = min(k for k in self._graphs if k >= b)
        s = self._static
        pos = [q.num_computed_tokens for q in seqs]
        # Normally the last sampled token; the last token of a prompt chunk in a recompute.
        tok = [q.token_ids(p, p + 1)[0] for q, p in zip(seqs, pos)]
        s["tokens"][:b].copy_(torch.tensor(tok, dtype=torch.int64), non_blocking=True)
        s["positions"][:b].copy_(torch.tensor(pos, dtype=torch.int64), non_blocking=True)
        s["context_lens"][:b].copy_(torch.tensor(pos, dtype=torch.int32) + 1, non_blocking=True)
        s["block_tables"][:b].copy_(self._block_tables(seqs, self.max_blocks_per_seq))
        idx = torch.arange(b, device=self.device)
        s["slot_mapping"][:b].copy_(slots_for(s["block_tables"][:b], idx, s["positions"][:b],
                                              self.block_size))
        # Padding rows of the bucket: nothing written, one (stale but finite) token read.
        s["slot_mapping"][b:bucket].fill_(-1)
        s["context_lens"][b:bucket].fill_(1)
        s["positions"][b:bucket].zero_()
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:b]
