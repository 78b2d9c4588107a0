"""CUDA graphs of decode steps and of short prefills, over static input buffers.

A decode step launches ~10 kernels per layer; at batch 1 on LLaMA-7B that is several hundred
launches per token, each a few microseconds of CPU time, enough to leave the GPU idle between
kernels. Replaying a captured graph launches them all at once. A prefill of a few tokens has
the same launches (and a few more), so it is as host-bound: ``PrefillGraphs`` captures it too.

``CudaGraphs`` (decode) is the one implementation both ways of scheduling use (through
``model_runner.ModelRunner``): the step function reads its inputs from ``buffers`` (tensors
whose first dimension is the batch); a step of ``b`` sequences copies its inputs into rows
``[:b]``, fills the padding rows of the smallest captured bucket >= b, and replays. The logits
returned are a view of the graph's output, overwritten by the next replay.

``PrefillGraphs`` (prefills of prompts with no cached prefix): every prompt of the batch is
padded at its end to one bucket length L (a power of two, ``prefill_bucket``), so the step is
a [batch, L] block whatever the prompts' lengths; one graph per (batch, L) (captured when a
shape comes a second time), each with its own small buffers (tokens, prompt lengths, the first block-table columns). The step computes
positions, cache slots (-1 for padding: it never writes the cache) and the rows to project to
logits from the lengths inside the graph. ``pad_prefill`` is the host side, shared with the
eager run of the same step on the CPU (where the padding logic is tested).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

PREFILL_MIN_LEN = 8   # shortest prefill bucket: a 1..8-token prompt runs as 8 tokens


def graph_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph in inflight batching: 1, 2, 4, 8, then steps
    of 16, and ``max_batch_size``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


def _capture(step: Callable[[dict], torch.Tensor], inputs: dict, pool, warmup: int,
             restore: Callable[[], None] = lambda: None):
    """Warm-up runs of ``step(inputs)`` on a side stream (Triton compiles and tunes outside the
    capture; they run the real step on the buffers), then the capture. -> (graph, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            restore()
            step(inputs)
    torch.cuda.current_stream().wait_stream(s)
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step(inputs)
    return graph, out


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
        """Capture the step for ``b`` rows (``_capture``)."""
        inputs = self.rows(b)
        saved = {k: inputs[k].clone() for k in self.mutable}

        def restore():
            for k, v in saved.items():
                inputs[k].copy_(v)

        self.graphs[b] = _capture(self.step, inputs, self.pool, warmup, restore)

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


# -- prefill ----------------------------------------------------------------------------------
def prefill_bucket(lens: list, batch: int, max_tokens: int, max_len: int) -> Optional[int]:
    """The padded length L of a prefill of prompts of ``lens`` tokens run as ``batch`` rows:
    the smallest power of two >= the longest prompt (at least ``PREFILL_MIN_LEN``); None when
    ``batch * L`` exceeds ``max_tokens`` (longer prefills are not launch-bound: they run
    eagerly) or L exceeds ``max_len`` (the positions the model has RoPE tables for)."""
    if not lens or max_tokens <= 0:
        return None
    L = PREFILL_MIN_LEN
    while L < max(lens):
        L *= 2
    return L if batch * L <= max_tokens and L <= max_len else None


def prefill_batch_bucket(b: int, max_batch_size: int) -> int:
    """Rows a prefill of ``b`` prompts runs as under inflight batching (where the batch varies
    step to step): the next power of two, at most ``max_batch_size`` (and at least ``b``)."""
    rows = 1
    while rows < b:
        rows *= 2
    return max(b, min(rows, max_batch_size))


def pad_prefill(token_lists: list, block_tables: torch.Tensor, L: int, batch: int,
                block_size: int) -> dict[str, torch.Tensor]:
    """The inputs of a padded prefill step: ``tokens`` int64 [batch*L] (each prompt, then
    zeros), ``lens`` int32 [batch] (0 for padding rows) and ``block_tables`` int32
    [batch, ceil(L / block_size)] (the columns a prompt of <= L tokens uses; zeros where a
    table is narrower or the row is padding). tokens and lens are host tensors;
    ``block_tables`` is on the tables' device."""
    b = len(token_lists)
    tokens = torch.zeros(batch, L, dtype=torch.int64)
    for i, p in enumerate(token_lists):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.int64)
    lens = torch.zeros(batch, dtype=torch.int32)
    lens[:b] = torch.tensor([len(p) for p in token_lists], dtype=torch.int32)
    width = -(-L // block_size)
    bt = block_tables[:b, :width]
    if bt.shape != (batch, width):
        bt = torch.nn.functional.pad(bt, (0, width - bt.shape[1], 0, batch - b))
    return dict(tokens=tokens.reshape(-1), lens=lens, block_tables=bt)


class PrefillGraphs:
    """Graphs of the padded prefill ``step(inputs) -> logits [batch, V]`` keyed (batch, L),
    each over its own buffers (``pad_prefill``'s shapes). A shape is captured the second time
    it is seen: the first prefill of a shape runs eagerly (``run`` says None), so a one-off
    prefill (run.py's one prompt) costs no capture, and its kernels are compiled by then."""

    def __init__(self, step: Callable[[dict], torch.Tensor], pool, device, warmup: int):
        self.step, self.pool, self.device, self.warmup = step, pool, device, warmup
        self.graphs: dict[tuple, tuple] = {}   # (batch, L) -> (buffers, graph, logits)
        self.seen: set = set()                 # shapes run once, eagerly
        self.failed = False                    # a capture failed: every prefill eager

    def run(self, inputs: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Copy ``inputs`` into the (batch, L) graph's buffers and replay it (capturing it
        first, its warm-up runs being real steps on these inputs). -> logits [batch, V] (a
        view, overwritten by the next replay of this graph); None the first time a shape is
        seen (the caller runs the step eagerly)."""
        batch = inputs["lens"].shape[0]
        key = (batch, inputs["tokens"].shape[0] // batch)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                return None
            if self.failed:
                return None
            bufs = {k: v.to(self.device, copy=True) for k, v in inputs.items()}
            try:
                graph, logits = _capture(self.step, bufs, self.pool, self.warmup)
            except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
                log.warning("prefill CUDA graph capture failed (%s: %s); prefilling eagerly",
                            type(e).__name__, e)
                self.failed = True
                return None
            self.graphs[key] = entry = (bufs, graph, logits)
        else:
            for name, t in inputs.items():
                entry[0][name].copy_(t, non_blocking=True)
        entry[1].replay()
        return entry[2]
