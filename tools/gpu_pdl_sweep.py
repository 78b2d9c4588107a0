#!/usr/bin/env python3
"""Decode speed with programmatic dependent launch off and on (kernels/pdl.py), on one engine.

Builds one random-weight engine (``benchmarks.weights.Weights``), then for each setting switches
``pdl.set_mode`` in-process, drops the captured CUDA graphs and times ``generate`` as
benchmark.py's latency grid does (median of 3 after a warm-up). Settings: ``off``, ``on``,
``auto``.
Every setting must give the greedy tokens of the first, bit for bit (PDL changes when kernels
start, not their arithmetic): a mismatch is
reported and makes the exit status 1. One GPU, or tensor parallelism under ``torchrun``
(rank 0 prints).

    python3 tools/gpu_pdl_sweep.py --model_config llama-13b --batch 1 \\
        --settings off,on,off,on --json OUT.json
    python3 -m torch.distributed.run --standalone --nproc_per_node 2 tools/gpu_pdl_sweep.py ...
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_setting(s: str) -> str:
    """'off' | 'on' | 'auto': the PDL mode of kernels/pdl.py."""
    if s not in ("off", "on", "auto"):
        raise SystemExit(f"error: setting {s!r} is not off, on or auto")
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_config", default="llama-13b")
    p.add_argument("--mode", default="fp16")
    p.add_argument("--batch", default="1")
    p.add_argument("--input_len", type=int, default=8)
    p.add_argument("--output_len", type=int, default=50)
    p.add_argument("--settings", default="off,on,off,on")
    p.add_argument("--json", default=None)
    p.add_argument("--tp_allreduce", default="auto", choices=("auto", "oneshot", "nccl"))
    a = p.parse_args()
    settings = [(s, parse_setting(s)) for s in a.settings.split(",")]
    t0 = time.time()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from llama_engine.config import ConfigError
    try:
        from benchmarks import latency
        from benchmarks.device import random_prompts
        from benchmarks.weights import Weights
        from llama_engine import parallel
        from llama_engine.kernels import pdl
        from llama_engine.options import RuntimeOptions
    except ConfigError as e:          # e.g. a misspelt LLAMA_ENGINE_* switch
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        parallel.init_from_env("cuda")
        parallel.quiet_non_main_ranks()
    batches = [int(b) for b in a.batch.split(",")]
    w = Weights(a.model_config, engine_kw={"options": RuntimeOptions(
        tp_allreduce=a.tp_allreduce, cuda_graphs=False)})
    eng = w.engine(a.mode, max(batches), max(a.input_len, 8), max(a.output_len, 8))
    eng.enable_cuda_graphs()
    rows, ok = [], True
    for B in batches:
        prompts = random_prompts(B, a.input_len, eng.config.model.vocab_size)
        ref = None
        for name, mode in settings:
            pdl.set_mode(mode)
            eng.runner.invalidate_graphs()        # graphs keep the launches they captured
            r = latency.time_engine(eng, B, a.input_len, a.output_len)
            toks = eng.generate(prompts, a.output_len).output_ids
            same = ref is None or toks == ref
            ref = toks if ref is None else ref
            ok &= same
            row = {"t_s": round(time.time() - t0, 1), "model": a.model_config, "mode": a.mode,
                   "batch": B, "tp": world,
                   "all_reduce": parallel.all_reduce_path(torch.device("cuda")),
                   "setting": name, "pdl": pdl.enabled(torch.zeros(1, device="cuda")),
                   "decode_tok_s": round(r["decode_tok_s"], 1),
                   "prefill_ms": round(r["prefill_s"] * 1e3, 2), "tokens_match": same}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json and parallel.get_rank() == 0:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    if not ok:
        print("FAIL: some setting changed the greedy tokens", flush=True)
    del eng
    gc.collect()
    torch.cuda.synchronize()
    parallel.shutdown()
    print("done", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
