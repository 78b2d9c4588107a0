"""The bandwidth floor of decoding: the bytes one decode step must read (every weight and
scale once, plus the KV cache) and the device's read bandwidth measured in the same run.
Their ratio is the tokens/s no kernel can beat; "% of floor" compares a mode with it."""
from __future__ import annotations

import statistics
import time

import torch

from .device import is_cuda, sync

_SKIP = ("rope_cos", "rope_sin")  # tables indexed per position, not read whole


def _tensors(engine) -> list:
    model = engine.model
    return list(model.named_buffers()) + list(model.named_parameters())


def read_bandwidth(device, gib: float = 2.0, reps: int = 10) -> float:
    """Bytes/s of a pure read (a sum over a buffer far larger than L2), median of ``reps``."""
    if not is_cuda(device):
        gib = 0.05
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.float16, device=device).uniform_()
    times = []
    for _ in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        times.append(time.perf_counter() - t0)
    del x
    return n * 2 / statistics.median(times[2:])  # the first two: warm-up


def bytes_per_decode_step(engine, batch: int, context: int) -> int:
    """Bytes a decode step reads: every weight/scale tensor once, plus the KV cache."""
    w = 0
    for name, t in _tensors(engine):
        if name in _SKIP or name.startswith("embed."):
            continue  # the embedding reads one row per token
        w += t.numel() * t.element_size()
    a = engine.config.model
    kv = batch * context * 2 * a.num_hidden_layers * a.kv_size * (
        1 if engine.config.quant.kv_cache_dtype else engine.model.embed.weight.element_size())
    return w + kv


def weight_bytes(engine, linear_only: bool = True) -> int:
    """Bytes of the weights: the decoder layers' linears (``linear_only``), else all but norms."""
    total = 0
    for name, t in _tensors(engine):
        if linear_only and not name.startswith("layers.") or name.endswith("norm.weight"):
            continue
        if name in _SKIP:
            continue
        total += t.numel() * t.element_size()
    return total
