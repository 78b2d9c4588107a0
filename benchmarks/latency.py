"""Timed generate calls: our engine (latency, prefill, decode tokens/s) and Hugging Face
(eager, static cache + compile) on the same weights; the ablation rows, the latency grid and
the peak-memory measurement built from them; prefill latency per mode with CUDA graphs on and
off (``run_prefill``).

Decode tokens/s exclude the prefill; end-to-end latency includes it. Each figure is the median
of ``reps`` calls after a warm-up call (CUDA graphs captured, kernels compiled)."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Optional

import torch

from llama_engine import parallel
from llama_engine.kv_cache import static_block_tables

from . import profiling, roofline
from .device import free_memory, peak_gib, random_prompts, reset_peak, sync
from .modes import ABLATION, ABLATION_SHAPE, HF_ROWS, MODES
from .weights import Weights, load_engine


def time_engine(engine, batch: int, input_len: int, output_len: int, reps: int = 3) -> dict:
    dev = engine.device
    prompts = random_prompts(batch, input_len, engine.config.model.vocab_size)
    engine.generate(prompts, output_len)  # warm-up: graphs captured, kernels compiled
    reset_peak(dev)
    lat, pre = [], []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        out = engine.generate(prompts, output_len)
        sync(dev)
        lat.append(time.perf_counter() - t0)
        pre.append(out.prefill_s)
    latency, prefill = statistics.median(lat), statistics.median(pre)
    decode_tokens = batch * (output_len - 1)
    return {"latency_s": latency, "prefill_s": prefill,
            "decode_tok_s": decode_tokens / max(latency - prefill, 1e-9),
            "e2e_tok_s": batch * output_len / latency,
            "peak_mem_gib": peak_gib(dev)}


def hf_generation_config(output_len: int, compile_=False):
    """Greedy, exactly ``output_len`` new tokens. ``compile_``: True lets transformers compile
    its decoding step (static cache; its default mode, reduce-overhead, uses CUDA graphs);
    "default" compiles without CUDA graphs."""
    from transformers import CompileConfig, GenerationConfig
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    if compile_:
        # Wrapping model.forward in torch.compile(mode="reduce-overhead") ourselves failed on
        # the H100 (CUDA-graph outputs overwritten by the next run inside generate).
        gen.cache_implementation = "static"
        if compile_ == "default":
            gen.compile_config = CompileConfig(fullgraph=True, mode="default")
    return gen


def time_hf(model, batch: int, input_len: int, output_len: int, compile_,
            reps: int = 3) -> dict:
    dev = model.device
    prompts = torch.tensor(random_prompts(batch, input_len, model.config.vocab_size),
                           device=dev)
    gen = hf_generation_config(output_len, compile_)
    mask = torch.ones_like(prompts)
    with torch.inference_mode():
        for _ in range(2 if compile_ else 1):
            model.generate(prompts, generation_config=gen, attention_mask=mask)
        reset_peak(dev)
        lat = []
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            model.generate(prompts, generation_config=gen, attention_mask=mask)
            sync(dev)
            lat.append(time.perf_counter() - t0)
    latency = statistics.median(lat)
    return {"latency_s": latency, "e2e_tok_s": batch * output_len / latency,
            "peak_mem_gib": peak_gib(dev)}


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def hf_row(weights: Weights, key: str) -> dict:
    """An HF ablation row; a failing baseline is reported in the row, not fatal."""
    B, I, O = ABLATION_SHAPE
    model = weights.hf_model()
    label = HF_ROWS[key]
    try:
        r = time_hf(model, B, I, O, compile_=key == "hf_compile")
    except Exception as e:  # noqa: BLE001
        print(f"{key} failed: {_error(e)}", flush=True)
        r = {"error": _error(e)}
        torch._dynamo.reset()
        if key == "hf_compile":
            # transformers' default compile (mode reduce-overhead: CUDA graphs) failed;
            # measure its compile without CUDA graphs instead, labelled as such.
            try:
                r = time_hf(model, B, I, O, compile_="default")
                label += " (mode default: no CUDA graphs)"
            except Exception as e2:  # noqa: BLE001
                print(f"{key} (mode default) failed: {type(e2).__name__}", flush=True)
                torch._dynamo.reset()
    r["label"] = label
    return r


def engine_row(weights: Weights, mode: str, max_input_len: int, bandwidth: float) -> dict:
    """An engine ablation row, with its bandwidth floor and weight bytes."""
    B, I, O = ABLATION_SHAPE
    eng = weights.engine(mode, B, max_input_len, 512)
    eng.enable_cuda_graphs()
    r = time_engine(eng, B, I, O)
    r["floor_tok_s"] = bandwidth / roofline.bytes_per_decode_step(eng, B, I + O // 2)
    r["pct_floor"] = 100 * r["decode_tok_s"] / r["floor_tok_s"]
    r["weight_gib"] = roofline.weight_bytes(eng) / 2**30
    r["label"] = MODES[mode][1]
    return r


def run_ablation(weights: Weights, only: Optional[set], max_input_len: int,
                 save: Callable[[dict], None]) -> dict:
    """The ablation rows (``only`` those, if given), each passed to ``save`` as measured;
    -> {"ablation": rows, "meta": {"read_TBps": ...}}."""
    bw = roofline.read_bandwidth(weights.device)
    out: dict = {}
    order = [k for k in ABLATION if k != "hf_compile"] + ["hf_compile"]  # slowest last
    for key in order:
        if only and key not in only:
            continue
        print(f"== {key}", flush=True)
        if key in HF_ROWS:
            r = hf_row(weights, key)
        else:
            r = engine_row(weights, key, max_input_len, bw)
        free_memory(weights.device)
        print(json.dumps(r), flush=True)
        out[key] = r
        save({"ablation": {key: r}, "meta": {"read_TBps": bw / 1e12}})
    return {"ablation": out, "meta": {"read_TBps": bw / 1e12, "ablation_model": weights.name}}


def grid_key(mode: str, batch: int, input_len: int, output_len: int, model_config: str,
             from_dir: bool, all_reduce: str) -> str:
    """A grid row's name: "<mode> b<B> i<I> o<O>", then " tpN" under tensor parallelism and
    the all-reduce path unless NCCL; prefixed by the model unless LLaMA-7B (or an engine dir)."""
    world = parallel.get_world_size()
    key = f"{mode} b{batch} i{input_len} o{output_len}" + (f" tp{world}" if world > 1 else "")
    if all_reduce not in ("none", "nccl"):  # rows without a path name: NCCL
        key += f" {all_reduce}"
    if model_config != "llama-7b" and not from_dir:
        key = f"{model_config} {key}"
    return key


def trace_path(assets: str, mode: str, batch: int, all_reduce: str) -> str:
    world = parallel.get_world_size()
    tp = f"_tp{world}" if world > 1 else ""
    tp += "_" + all_reduce.replace("+", "_") if all_reduce not in ("none", "nccl") else ""
    return os.path.join(assets, f"trace_{mode}_b{batch}{tp}.json")


def run_grid(weights: Optional[Weights], engine_dir: Optional[str], model_config: str,
             modes: list, batches: list, input_lens: list, output_lens: list,
             profile_to: Optional[str], device: str, engine_kw: dict) -> dict:
    """Every (mode, batch, input, output) combination: time_engine rows, or profile rows with
    traces written into ``profile_to``. Engines come from ``engine_dir`` when given (one
    engine, whatever ``mode`` says), else from ``weights``."""
    grid = {}
    for mode in modes:
        for B in batches:
            for I in input_lens:
                for O in output_lens:
                    if engine_dir:
                        eng = load_engine(engine_dir, device, engine_kw)
                    else:
                        eng = weights.engine(mode, B, max(I, 8), max(O, 8))
                    eng.enable_cuda_graphs()
                    ar = parallel.all_reduce_path(device)
                    key = grid_key(mode, B, I, O, model_config, bool(engine_dir), ar)
                    if profile_to is not None:
                        r = profiling.profile_decode(eng, B, I, O,
                                                     trace_path(profile_to, mode, B, ar))
                    else:
                        r = time_engine(eng, B, I, O)
                    print(key, json.dumps(r), flush=True)
                    grid[key] = r
                    del eng
                    free_memory(device)
    return grid


def measure_memory(model_config: str, mode: str, device: str, engine_kw: dict,
                   context: int = 2048) -> dict:
    """Peak memory of one engine at batch 1 with a ``context``-token sequence, the fp16
    master weights freed first (as an engine built once and loaded would have it)."""
    weights = Weights(model_config, device, engine_kw=engine_kw)
    eng = weights.engine(mode, 1, context, 64)
    weights.tensors = None
    del weights
    free_memory(device)
    eng.enable_cuda_graphs()
    prompt = random_prompts(1, context - 16, eng.config.model.vocab_size)
    reset_peak(device)
    eng.generate(prompt, 16)
    sync(device)
    return {"mode": mode, "context": context,
            "weight_gib": roofline.weight_bytes(eng, False) / 2**30,
            "peak_mem_gib": peak_gib(device)}


# -- prefill latency, CUDA graphs on and off -------------------------------------------------
PREFILL_SHAPES = [(1, 8), (64, 128)]   # (batch, prompt tokens): the two targets


def time_prefill(engine, batch: int, input_len: int, reps: int) -> dict:
    """Median wall time of ``runner.prefill`` (device synchronised before and after) of
    ``batch`` random prompts of ``input_len`` tokens, after two warm-up calls (the first runs
    eagerly and compiles kernels, the second captures the shape's graph where graphs are on),
    with their times and the device memory they added (the capture's pool)."""
    dev = engine.device
    runner = engine.runner
    prompts = random_prompts(batch, input_len, engine.config.model.vocab_size)
    cache = engine.kv_cache(batch, input_len + 8)
    bt = static_block_tables(batch, input_len + 8, engine.block_size, dev)
    cuda = dev.type == "cuda"
    sync(dev)
    mem0 = torch.cuda.memory_reserved() if cuda else 0
    warm = []
    for _ in range(2):
        t0 = time.perf_counter()
        runner.prefill(prompts, cache, bt)
        sync(dev)
        warm.append(1e3 * (time.perf_counter() - t0))
    mem1 = torch.cuda.memory_reserved() if cuda else 0
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        runner.prefill(prompts, cache, bt)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"prefill_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "first_call_ms": warm[0], "second_call_ms": warm[1],
            "warmup_reserved_mib": (mem1 - mem0) / 2**20}


def run_prefill(weights: Weights, modes: list, save: Callable[[dict], None],
                shapes: Optional[list] = None) -> dict:
    """Per mode and (batch, tokens) shape: the prefill with CUDA graphs (every prefill of
    the shape replayed from a graph: ``prefill_graph_max_tokens`` raised to the shape) and
    eagerly; at batch 1 also end to end (``time_engine``, 50 new tokens) with prefill graphs
    on and off (decode graphs on both times). Each row passed to ``save`` as measured."""
    out: dict = {}
    shapes = shapes or PREFILL_SHAPES
    for mode in modes:
        # one engine per mode for every shape (quantizing LLaMA-7B takes a while)
        eng = weights.engine(mode, max(b for b, _ in shapes), max(max(n for _, n in shapes), 8),
                             64)
        eng.enable_cuda_graphs()
        runner = eng.runner
        for batch, n in shapes:
            reps = 20 if batch * n <= 512 else 5
            row: dict = {"label": MODES[mode][1]}
            for graphs in (True, False):
                runner.prefill_graph_max_tokens = batch * max(n, 8) if graphs else 0
                runner.invalidate_graphs()
                r = time_prefill(eng, batch, n, reps)
                row["graphs" if graphs else "eager"] = r
                if batch == 1:
                    row["e2e_o50_" + ("graphs" if graphs else "eager")] = time_engine(
                        eng, 1, n, 50)
            row["speedup"] = row["eager"]["prefill_ms"] / row["graphs"]["prefill_ms"]
            key = f"prefill {mode} b{batch} i{n}"
            print(key, json.dumps(row), flush=True)
            out[key] = row
            save({"prefill": {key: row}})
        del eng, runner
        free_memory(weights.device)
    return out
