"""CUDA graphs for decode steps: one graph per (batch size, block-table width, cache).

A decode step launches ~10 kernels per layer; at batch 1 on LLaMA-7B that is several hundred
launches per token, each a few microseconds of CPU time, enough to leave the GPU idle between
kernels. Replaying a captured graph launches them all at once. Inputs are copied into the
graph's static buffers before each replay; the logits buffer is overwritten by the next replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, engine, warmup: int = 2):
        self.engine = engine
        self.warmup = warmup
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()

    def invalidate(self) -> None:
        """Forget graphs (their buffers point at a KV cache that is being replaced)."""
        self.graphs.clear()

    def _capture(self, tokens, context_lens, block_tables, cache) -> _Graph:
        eng = self.engine
        tok, ctx, bt = tokens.clone(), context_lens.clone(), block_tables.clone()
        # Warm-up runs compile/tune Triton kernels outside the capture. They execute the real
        # step (writing this token's K/V to its slot), which the replay repeats identically.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(self.warmup):
                ctx.copy_(context_lens)
                eng.decode_eager(tok, ctx, bt, cache)
        torch.cuda.current_stream().wait_stream(s)
        ctx.copy_(context_lens)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = eng.decode_eager(tok, ctx, bt, cache)
        return _Graph(graph, tok, ctx, bt, logits)

    def step(self, tokens, context_lens, block_tables, cache) -> torch.Tensor:
        key = (tokens.shape[0], tuple(block_tables.shape), id(cache))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(tokens, context_lens, block_tables, cache)
        g.tokens.copy_(tokens)
        g.context_lens.copy_(context_lens)
        g.block_tables.copy_(block_tables)
        g.graph.replay()
        context_lens.copy_(g.context_lens)  # the step advanced it by one
        return g.logits
