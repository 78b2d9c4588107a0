"""The speculative-decoding section of benchmark.py (``--speculative``): at batch 1, what a
verify step over k+1 tokens costs against a decode step, per mode, with CUDA graphs.

For each mode the engine prefills one random prompt of ``context`` tokens, then times a decode
step (``ModelRunner.decode``) and verify steps of k+1 = 2..9 tokens
(``ModelRunner.verify``) at the same context, each replayed from its CUDA graph (captured on
the first call), as the mean over ``reps`` steps after warm-up. Random weights cannot measure
acceptance, so the projection takes it from ``tools/spec_acceptance.py``'s JSON (SmolLM2,
prompt lookup): projected tokens/s at k = tokens_per_step(k) / t_verify(k+1), against plain
decoding's 1 / t_decode. It is a projection from two measurements, not a measured run."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from llama_engine.kv_cache import static_block_tables

from .device import free_memory, random_prompts, sync
from .weights import Weights

WIDTHS = tuple(range(2, 10))       # k + 1 = 2..9


def time_steps(engine, context: int, widths=WIDTHS, reps: int = 50) -> dict:
    """-> {"decode_ms": t, "verify_ms": {k+1: t}} at batch 1 after ``context`` tokens."""
    dev, runner = engine.device, engine.runner
    engine.enable_cuda_graphs()
    max_seq = context + max(widths) + 1
    cache = engine.kv_cache(1, max_seq)
    tables = static_block_tables(1, max_seq, engine.block_size, dev)
    vocab = engine.config.model.vocab_size
    engine.prefill(random_prompts(1, context, vocab), cache, tables)
    ctx = torch.tensor([context], dtype=torch.int32, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step(width: int):
        tokens = torch.randint(3, vocab, (1, width), generator=gen).to(dev)
        if width == 1:
            return runner.decode(tokens[:, 0], ctx.clone(), tables, cache)
        return runner.verify(tokens, ctx, tables, cache)

    def timed(width: int) -> float:
        for _ in range(3):               # capture + warm-up
            step(width)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            step(width)
        sync(dev)
        return 1e3 * (time.perf_counter() - t0) / reps

    decode = timed(1)
    verify = {w: timed(w) for w in widths}
    decode = min(decode, timed(1))       # again after the others: clocks and caches warm
    return {"context": context, "decode_ms": decode, "verify_ms": verify,
            "ratio": {w: v / decode for w, v in verify.items()}}


def acceptance(path: Optional[str]) -> dict:
    """k -> pooled tokens per verify step from tools/spec_acceptance.py's JSON ({} if none)."""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    return {int(k): r["pooled_tokens_per_step"] for k, r in doc["prompt_lookup"].items()}


def run_speculative(model_config: str, modes: list, device: str, engine_kw: dict,
                    context: int, acceptance_json: Optional[str], reps: int = 50) -> dict:
    """The section: per mode the step timings and, with acceptance, projected tokens/s."""
    weights = Weights(model_config, device, engine_kw=engine_kw)
    acc = acceptance(acceptance_json)
    out = {}
    for mode in modes:
        engine = weights.engine(mode, 1, context + 16, 16)
        r = time_steps(engine, context, reps=reps)
        r["plain_tok_s"] = 1e3 / r["decode_ms"]
        r["projected_tok_s"] = {k: tps * 1e3 / r["verify_ms"][k + 1]
                                for k, tps in acc.items() if k + 1 in r["verify_ms"]}
        r["tokens_per_step"] = acc
        out[mode] = r
        print(format_rows(mode, r), flush=True)
        del engine
        free_memory(device)
    return out


def format_rows(mode: str, r: dict) -> str:
    lines = [f"{mode}: decode step {r['decode_ms']:.3f} ms at context {r['context']} "
             f"({r['plain_tok_s']:.1f} tok/s)",
             "  k+1  verify ms  x decode  tokens/step  projected tok/s"]
    for w, v in r["verify_ms"].items():
        k = w - 1
        tps = r["tokens_per_step"].get(k)
        proj = r["projected_tok_s"].get(k)
        lines.append(f"  {w:>3}  {v:9.3f}  {r['ratio'][w]:8.3f}  "
                     f"{'' if tps is None else f'{tps:11.3f}':>11}  "
                     f"{'' if proj is None else f'{proj:15.1f}':>15}")
    return "\n".join(lines)
