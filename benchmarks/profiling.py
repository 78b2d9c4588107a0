"""Where a generate call's GPU time goes: a torch.profiler trace of one call and its kernels
summed into categories (weight GEMM/GEMV, attention, all-reduce, ...) by name."""
from __future__ import annotations

import contextlib
import gzip
import json
import time

from torch.profiler import ProfilerActivity, profile

from llama_engine import parallel

from .device import is_cuda, random_prompts, sync

# (category, substrings of a kernel's lower-cased name); the first match wins.
CATEGORIES = [
    ("all-reduce (NCCL or one-shot)", ("nccl", "allreduce", "all_reduce", "all_gather")),
    ("attention", ("decode_attn", "decode_merge", "sdpa", "flash", "fmha", "attention")),
    ("kv-cache write (+RoPE)", ("rope_kv", "write_kv", "kv_write")),
    ("weight GEMM/GEMV", ("skinny", "splitk", "gemv", "gemm", "cutlass", "xmma", "int_mm",
                          "nvjet", "matmul", "quant_per_token", "_w4", "_w8", "dequant")),
    ("RMSNorm", ("rms_norm", "rmsnorm")),
    ("sampling", ("argmax", "topk", "sort", "multinomial")),
]
OTHER = "other (elementwise, copies)"
IDLE = "idle gaps (wall - GPU busy)"


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return OTHER


def categorize_trace(path: str) -> dict:
    """GPU time per category (ms) from a Chrome/Perfetto trace written by --profile: each
    kernel or copy counts the time by which it moves the GPU's busy frontier (its end less
    the latest end before it, or its duration when it starts after that). With programmatic
    dependent launch a kernel starts while its predecessor runs and waits for it; its
    duration then counts the wait too, and durations sum to more than the wall time."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        d = json.load(f)
    events = sorted((e for e in (d["traceEvents"] if isinstance(d, dict) else d)
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                    key=lambda e: e["ts"])
    per_cat: dict = {}
    frontier = None
    for e in events:
        start, end = e["ts"], e["ts"] + e["dur"]
        gain = end - max(start, frontier) if frontier is not None else e["dur"]
        frontier = end if frontier is None else max(frontier, end)
        cat = categorize(e["name"])
        per_cat[cat] = per_cat.get(cat, 0.0) + max(gain, 0.0) / 1e3
    return per_cat


def profile_decode(engine, batch: int, input_len: int, output_len: int, trace_path: str) -> dict:
    """GPU time per kernel category over one generate call, and a Perfetto trace. Under
    torchrun every rank generates (the collectives need them all); rank 0 is profiled."""
    dev = engine.device
    prompts = random_prompts(batch, input_len, engine.config.model.vocab_size)
    engine.generate(prompts, output_len)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(dev) else [])
    main = parallel.get_rank() == 0
    with (profile(activities=acts) if main else contextlib.nullcontext()) as prof:
        t0 = time.perf_counter()
        out = engine.generate(prompts, output_len)
        sync(dev)
        wall = time.perf_counter() - t0
    if not main:
        return {"wall_ms": wall * 1e3, "prefill_ms": out.prefill_s * 1e3, "by_category_ms": {}}
    prof.export_chrome_trace(trace_path)
    per_cat = categorize_trace(trace_path)
    busy = sum(per_cat.values())
    per_cat[IDLE] = max(wall * 1e3 - busy, 0.0)
    return {"wall_ms": wall * 1e3, "prefill_ms": out.prefill_s * 1e3, "by_category_ms": per_cat,
            "trace": trace_path}
