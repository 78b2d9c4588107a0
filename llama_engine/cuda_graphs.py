"""CUDA graphs of decode steps: one graph per batch-size bucket over static input buffers.

A decode step launches ~10 kernels per layer; at batch 1 on LLaMA-7B that is several hundred
launches per token, each a few microseconds of CPU time, enough to leave the GPU idle between
kernels. Replaying a captured graph launches them all at once.

``CudaGraphs`` is the one implementation both ways of scheduling use (through
``model_runner.ModelRunner``): the step function reads its inputs from ``buffers`` (tensors
whose first dimension is the batch); a step of ``b`` sequences copies its inputs into rows
``[:b]``, fills the padding rows of the smallest captured bucket >= b, and replays. The logits
returned are a view of the graph's output, overwritten by the next replay.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def graph_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph in inflight batching: 1, 2, 4, 8, then steps
    of 16, and ``max_batch_size``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class CudaGraphs:
    """Graphs of ``step(inputs) -> logits`` for batch sizes, over ``buffers``.

    ``mutable``: names of buffers the step itself advances (the static batch's context
    lengths): warm-up runs and the capture start from the same values."""

    def __init__(self, step: Callable[[dict], torch.Tensor], buffers: dict[str, torch.Tensor],
                 pool, mutable: tuple = ()):
        self.step, self.buffers, self.pool, self.mutable = step, buffers, pool, mutable
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch_size(self) -> int:
        return next(iter(self.buffers.values())).shape[0]

    def rows(self, b: int) -> dict[str, torch.Tensor]:
        return {k: v[:b] for k, v in self.buffers.items()}

    def capture(self, b: int, warmup: int) -> None:
        """Capture the step for ``b`` rows. Warm-up runs (on a side stream) compile and tune
        the Triton kernels outside the capture; they run the real step on the buffers."""
        inputs = self.rows(b)
        saved = {k: inputs[k].clone() for k in self.mutable}

        def restore():
            for k, v in saved.items():
                inputs[k].copy_(v)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                restore()
                self.step(inputs)
        torch.cuda.current_stream().wait_stream(s)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(inputs)
        self.graphs[b] = (graph, logits)

    def bucket(self, b: int) -> Optional[int]:
        """The smallest captured batch size >= b, or None."""
        fits = [k for k in self.graphs if k >= b]
        return min(fits) if fits else None

    def replay(self, b: int, inputs: dict[str, torch.Tensor],
               padding: Optional[dict] = None) -> torch.Tensor:
        """Copy ``inputs`` (b rows each) into the buffers, fill the bucket's padding rows
        with ``padding`` {name: value}, replay. -> logits [b, V] (a view)."""
        bucket = self.bucket(b)
        for name, t in inputs.items():
            self.buffers[name][:b].copy_(t, non_blocking=True)
        if padding and bucket > b:
            for name, value in padding.items():
                self.buffers[name][b:bucket].fill_(value)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:b]
