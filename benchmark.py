"""Speed of our engine against Hugging Face on one GPU: latency grid, ablation, profile.

    python benchmark.py --model_config llama-7b --ablation            # the ablation table
    python benchmark.py --model_config llama-7b --ablation --only hf_eager,fp16
    python benchmark.py --engine_dir ./engines/fp16 --batch 1,16 --input_len 8 --output_len 50
    python benchmark.py --model_config llama-7b --profile --modes fp16,int4

Random weights with LLaMA-7B shapes are built in GPU memory (as TensorRT-LLM's builder does
without a checkpoint); every mode is quantized from the same fp16 weights. Decode tokens/s
exclude the prefill; end-to-end latency includes it. "% of floor" divides the bytes each mode
reads per decode step (weights, scales, lm_head, KV cache) by a read-bandwidth measurement made
in the same run. Results merge into ``--out_json`` so the table can be built in several GPU
calls (``--only``); ``--report`` writes the markdown table and the plot into ``assets/``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch

MODES = {
    # name: (build flags for quantization, description)
    "fp16": ({}, "fp16"),
    "int8": ({"use_weight_only": True, "weight_only_precision": "int8"}, "int8 weight-only"),
    "int4": ({"use_weight_only": True, "weight_only_precision": "int4", "group_size": 128},
             "int4 weight-only g128"),
    "int8kv": ({"int8_kv_cache": True}, "fp16 + INT8 KV cache"),
    "int4_int8kv": ({"use_weight_only": True, "weight_only_precision": "int4", "group_size": 128,
                     "int8_kv_cache": True}, "int4 g128 + INT8 KV"),
    "sq": ({"use_smooth_quant": True, "per_token": True, "per_channel": True},
           "SmoothQuant W8A8 (per-token, per-channel; speed-only calibration)"),
}
ABLATION = ["hf_eager", "hf_compile", "fp16", "int8", "int4", "int4_int8kv", "sq"]


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def free_memory() -> None:
    """Return cached GPU blocks, so that an engine sized from free memory sees them."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def read_bandwidth(gib: float = 2.0, reps: int = 10) -> float:
    """Bytes/s of a pure read (a sum over a buffer far larger than L2), median of ``reps``."""
    if DEVICE != "cuda":
        gib = 0.05
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.float16, device=DEVICE).uniform_()
    times = []
    for _ in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync()
        times.append(time.perf_counter() - t0)
    del x
    return n * 2 / statistics.median(times[2:])


def bytes_per_decode_step(engine, batch: int, context: int) -> int:
    """Bytes a decode step reads: every weight/scale tensor once, plus the KV cache."""
    w = 0
    for name, t in list(engine.model.named_buffers()) + list(engine.model.named_parameters()):
        if name in ("rope_cos", "rope_sin") or name.startswith("embed."):
            continue  # the embedding reads one row per token
        w += t.numel() * t.element_size()
    a = engine.config.model
    kv = batch * context * 2 * a.num_hidden_layers * a.kv_size * (
        1 if engine.config.quant.int8_kv_cache else engine.model.embed.weight.element_size())
    return w + kv


def weight_bytes(engine, linear_only=True) -> int:
    total = 0
    for name, t in list(engine.model.named_buffers()) + list(engine.model.named_parameters()):
        if linear_only and not name.startswith("layers.") or name.endswith("norm.weight"):
            continue
        if name in ("rope_cos", "rope_sin"):
            continue
        total += t.numel() * t.element_size()
    return total


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# Building engines in memory
# ---------------------------------------------------------------------------------------------
class Weights:
    """fp16 random weights (unified names) on the GPU, shared by every mode."""

    def __init__(self, model_config: str, dtype: str = "float16", seed: int = 0):
        import weight
        from llama_engine.checkpoint import hf_to_unified
        from llama_engine.config import ModelArgs
        self.args = ModelArgs.from_preset_or_file(model_config)
        self.dtype = dtype
        sd = weight.random_weights(self.args, dtype, seed=seed, device=DEVICE)
        self.tensors = hf_to_unified(sd, self.args)

    def engine(self, mode: str, max_batch: int, max_input: int, max_output: int):
        import build as build_script
        from llama_engine import quant as q
        from llama_engine.config import BuildConfig, EngineConfig, QuantConfig
        from llama_engine.runner import Engine
        flags, _ = MODES[mode]
        ns = argparse.Namespace(use_weight_only=False, weight_only_precision="int8",
                                group_size=None, use_smooth_quant=False, per_token=False,
                                per_channel=False, int8_kv_cache=False, ckpt_dir=None,
                                device=DEVICE)
        for k, v in flags.items():
            setattr(ns, k, v)
        quant = build_script.resolve_quant(ns, self.args, QuantConfig(), True, True)
        tensors = self.tensors
        if quant.quant_algo or quant.int8_kv_cache:
            calib = {}
            if quant.is_smooth_quant or quant.int8_kv_cache:
                import smoothquant
                calib = smoothquant.synthetic_calibration(self.args, self.tensors, device=DEVICE)
            tensors, _ = q.quantize_checkpoint(self.tensors, self.args, quant, progress=False,
                                               **calib)
        world = 1
        from llama_engine import parallel
        if parallel.get_world_size() > 1:
            # Tensor parallelism (torchrun): every rank made the same random weights from the
            # same seed; each keeps its own shard, as build.py --tp_size writes rank files.
            world = parallel.get_world_size()
            tensors = parallel.shard_checkpoint(tensors, self.args, quant, world,
                                                parallel.get_rank())
        cfg = EngineConfig(model=self.args, quant=quant, dtype=self.dtype, world_size=world,
                           build=BuildConfig(max_batch_size=max_batch, max_input_len=max_input,
                                             max_output_len=max_output))
        return Engine.from_tensors(cfg, tensors, DEVICE)


# ---------------------------------------------------------------------------------------------
# Timed runs
# ---------------------------------------------------------------------------------------------
def time_engine(engine, batch: int, input_len: int, output_len: int, reps: int = 3) -> dict:
    prompts = random_prompts(batch, input_len, engine.config.model.vocab_size)
    engine.generate(prompts, output_len)  # warm-up: graphs captured, kernels compiled
    reset_peak()
    lat, pre = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = engine.generate(prompts, output_len)
        sync()
        lat.append(time.perf_counter() - t0)
        pre.append(out.prefill_s)
    latency, prefill = statistics.median(lat), statistics.median(pre)
    decode_tokens = batch * (output_len - 1)
    return {"latency_s": latency, "prefill_s": prefill,
            "decode_tok_s": decode_tokens / max(latency - prefill, 1e-9),
            "e2e_tok_s": batch * output_len / latency,
            "peak_mem_gib": peak_gib()}


def hf_model(weights: Weights):
    from transformers import LlamaConfig, LlamaForCausalLM
    from llama_engine.checkpoint import unified_to_hf
    cfg = LlamaConfig(**{k: v for k, v in weights.args.to_hf_config().items()
                         if k not in ("architectures",)})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = unified_to_hf(weights.tensors, weights.args)
    model.load_state_dict(sd, assign=True, strict=False)
    # The rotary inv_freq buffer was made on the meta device: make the module again for real.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    with torch.device(DEVICE):  # (its device= argument is deprecated in transformers 5.17)
        model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return model.to(dtype=weights.tensors["transformer.ln_f.weight"].dtype).eval()


def time_hf(model, batch: int, input_len: int, output_len: int, compile_: bool,
            reps: int = 3) -> dict:
    from transformers import GenerationConfig
    prompts = torch.tensor(random_prompts(batch, input_len, model.config.vocab_size),
                           device=DEVICE)
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    if compile_:
        # transformers compiles its decoding step itself when the cache is static; wrapping
        # model.forward in torch.compile(mode="reduce-overhead") ourselves failed on the H100
        # (CUDA-graph outputs overwritten by the next run inside generate).
        gen.cache_implementation = "static"
        if compile_ == "default":
            from transformers import CompileConfig
            gen.compile_config = CompileConfig(fullgraph=True, mode="default")
    with torch.inference_mode():
        for _ in range(2 if compile_ else 1):
            model.generate(prompts, generation_config=gen, attention_mask=torch.ones_like(prompts))
        reset_peak()
        lat = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            model.generate(prompts, generation_config=gen, attention_mask=torch.ones_like(prompts))
            sync()
            lat.append(time.perf_counter() - t0)
    latency = statistics.median(lat)
    return {"latency_s": latency, "e2e_tok_s": batch * output_len / latency,
            "peak_mem_gib": peak_gib()}


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------
CATEGORIES = [
    ("all-reduce (NCCL or one-shot)", ("nccl", "allreduce", "all_reduce", "all_gather")),
    ("attention", ("decode_attn", "decode_merge", "sdpa", "flash", "fmha", "attention")),
    ("kv-cache write (+RoPE)", ("rope_kv", "write_kv", "kv_write")),
    ("weight GEMM/GEMV", ("skinny", "splitk", "gemv", "gemm", "cutlass", "xmma", "int_mm",
                          "nvjet", "matmul", "quant_per_token", "_w4", "_w8", "dequant")),
    ("RMSNorm", ("rms_norm", "rmsnorm")),
    ("sampling", ("argmax", "topk", "sort", "multinomial")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (elementwise, copies)"


def categorize_trace(path: str) -> dict:
    """GPU time per category (ms) from a Chrome/Perfetto trace written by --profile: each
    kernel or copy counts the time by which it moves the GPU's busy frontier (its end less
    the latest end before it, or its duration when it starts after that). With programmatic
    dependent launch a kernel starts while its predecessor runs and waits for it; its
    duration then counts the wait too, and durations sum to more than the wall time."""
    import gzip
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
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    from llama_engine import parallel
    prompts = random_prompts(batch, input_len, engine.config.model.vocab_size)
    engine.generate(prompts, output_len)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    main = parallel.get_rank() == 0
    with (profile(activities=acts) if main else contextlib.nullcontext()) as prof:
        t0 = time.perf_counter()
        out = engine.generate(prompts, output_len)
        sync()
        wall = time.perf_counter() - t0
    if not main:
        return {"wall_ms": wall * 1e3, "prefill_ms": out.prefill_s * 1e3, "by_category_ms": {}}
    prof.export_chrome_trace(trace_path)
    per_cat = categorize_trace(trace_path)
    busy = sum(per_cat.values())
    per_cat["idle gaps (wall - GPU busy)"] = max(wall * 1e3 - busy, 0.0)
    return {"wall_ms": wall * 1e3, "prefill_ms": out.prefill_s * 1e3, "by_category_ms": per_cat,
            "trace": trace_path}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def measure_memory(model_config: str, mode: str, context: int = 2048) -> dict:
    """Peak GPU memory of one engine at batch 1 with a ``context``-token sequence, the fp16
    master weights freed first (as an engine built once and loaded would have it)."""
    weights = Weights(model_config)
    eng = weights.engine(mode, 1, context, 64)
    weights.tensors = None
    del weights
    gc.collect()
    torch.cuda.empty_cache()
    eng.enable_cuda_graphs()
    prompt = random_prompts(1, context - 16, eng.config.model.vocab_size)
    torch.cuda.reset_peak_memory_stats()
    eng.generate(prompt, 16)
    sync()
    return {"mode": mode, "context": context, "weight_gib": weight_bytes(eng, False) / 2**30,
            "peak_mem_gib": peak_gib()}


def run_serving(weights: "Weights", num_requests: int, mixed_requests: int,
                parts: Optional[set] = None, hf_batches: int = 2, mode: str = "fp16",
                policy: str = "max_utilization", save=None) -> dict:
    """Inflight batching throughput (issue 5 scenarios), fp16, end-of-sequence ignored.

    parts: ``uniform`` (``num_requests`` x 128 in / 128 out, all at once), ``mixed`` (inputs
    32-1024, outputs 16-512: inflight vs our static batching, same batch limit), ``cnn``
    (cnn_dailymail-shaped: inputs 800-1000, outputs 100), ``hf`` (HF padded batch 32 on the
    uniform shape and on the first 32 mixed requests). Under torchrun the keys end in tpN (then
    _oneshot or _oneshot_norm for the one-shot all-reduce paths), for a ``mode`` other than
    fp16 in _mode. ``save(out)`` is called after each part."""
    import random

    from llama_engine import parallel
    from llama_engine.serving.llm_engine import LLMEngine, latency_stats
    parts = parts or {"uniform", "mixed", "hf"}
    world = parallel.get_world_size()
    sfx = (f"_{mode}" if mode != "fp16" else "") + (f"_tp{world}" if world > 1 else "") + (
        "_no_evict" if policy == "guaranteed_no_evict" else "")
    out: dict = {}
    save = save or (lambda _: None)
    vocab = weights.args.vocab_size
    eng = weights.engine(mode, 256, 1024, 512)
    ar = parallel.all_reduce_path(DEVICE)  # LLAMA_ENGINE_TP_ALLREDUCE (no suffix: NCCL)
    if ar not in ("none", "nccl"):
        sfx += "_" + ar.replace("+", "_")

    def timed(llm, prompts, max_tokens) -> dict:
        sync()
        llm.reset_step_stats()
        t0 = time.perf_counter()
        seqs = llm.generate(prompts, max_tokens)
        sync()
        return {**latency_stats(seqs), "wall_s": time.perf_counter() - t0,
                "steps": llm.step_summary(), "kv_cache_tokens": llm.block_manager.capacity_tokens}

    if "uniform" in parts:
        llm = LLMEngine(eng, max_batch_size=256, max_num_tokens=8192,
                        scheduler_policy=policy)
        prompts = random_prompts(num_requests, 128, vocab)
        llm.generate(prompts[:64], 8)  # warm-up: graphs, kernels
        out["uniform_128_128" + sfx] = {"num_requests": num_requests, "max_batch": 256,
                                        **timed(llm, prompts, 128)}
        print("uniform", json.dumps(out["uniform_128_128" + sfx]), flush=True)
        save(out)
        del llm
        free_memory()  # the next LLMEngine sizes its KV cache from the free GPU memory
    if "cnn" in parts:
        rng = random.Random(3)
        g = torch.Generator().manual_seed(3)
        n = min(num_requests, 500)
        prompts = [torch.randint(3, vocab, (rng.randint(800, 1000),), generator=g).tolist()
                   for _ in range(n)]
        llm = LLMEngine(eng, max_batch_size=256, max_num_tokens=8192, scheduler_policy=policy)
        out["cnn_shaped" + sfx] = {"num_requests": n, "max_batch": 256, "input": "800-1000",
                                   "output": 100, **timed(llm, prompts, 100)}
        print("cnn", json.dumps(out["cnn_shaped" + sfx]), flush=True)
        save(out)
        del llm
        free_memory()
    rng = random.Random(0)
    ins = [rng.randint(32, 1024) for _ in range(mixed_requests)]
    outs = [rng.randint(16, 512) for _ in range(mixed_requests)]
    g = torch.Generator().manual_seed(1)
    mixed = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in ins]
    if "mixed" in parts and mixed_requests:
        limit = 64
        llm = LLMEngine(eng, max_batch_size=limit, max_num_tokens=8192, scheduler_policy=policy)
        inflight = timed(llm, mixed, outs)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        sync()
        t0 = time.perf_counter()
        for i in range(0, mixed_requests, limit):  # padded static batches of the same limit
            eng.generate(mixed[i:i + limit], max(outs[i:i + limit]))
        sync()
        static_s = time.perf_counter() - t0
        useful = sum(outs)
        out["mixed" + sfx] = {"num_requests": mixed_requests, "max_batch": limit,
                              "inflight": inflight, "static_tok_s": useful / static_s,
                              "static_wall_s": static_s,
                              "inflight_vs_static": inflight["tokens_per_s"] / (useful / static_s)}
        print("mixed", json.dumps(out["mixed" + sfx]), flush=True)
        save(out)
    if "hf" in parts and world == 1 and mode == "fp16":
        del eng
        gc.collect()
        torch.cuda.empty_cache()
        model = hf_model(weights)
        r = time_hf(model, 32, 128, 128, compile_=False, reps=hf_batches)
        out["hf_batch32_128_128"] = r
        if "uniform_128_128" in out:
            out["uniform_vs_hf"] = out["uniform_128_128"]["tokens_per_s"] / r["e2e_tok_s"]
        print("hf", json.dumps(r), flush=True)
        save(out)
        if mixed_requests >= 32:
            # HF padded static batch of the first 32 mixed requests: the batch runs to its
            # longest output; useful tokens are what each request asked for.
            from transformers import GenerationConfig
            batch, want = mixed[:32], outs[:32]
            width = max(map(len, batch))
            ids = torch.zeros((32, width), dtype=torch.long, device=DEVICE)
            mask = torch.zeros_like(ids)
            for j, pr in enumerate(batch):  # left padding, as HF decoder-only generation needs
                ids[j, width - len(pr):] = torch.tensor(pr)
                mask[j, width - len(pr):] = 1
            gen = GenerationConfig(max_new_tokens=max(want), min_new_tokens=max(want),
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
            with torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                model.generate(ids, generation_config=gen, attention_mask=mask)
                sync()
            hf_s = time.perf_counter() - t0
            out["hf_batch32_mixed"] = {"num_requests": 32, "wall_s": hf_s,
                                       "useful_tok_s": sum(want) / hf_s,
                                       "peak_mem_gib": peak_gib()}
            print("hf_mixed", json.dumps(out["hf_batch32_mixed"]), flush=True)
    return out


def run_poisson(llm, prompts: list, out_len: int, rate: float, seed: int = 0) -> dict:
    """Requests arriving as a Poisson process of ``rate`` per second; -> latency_stats."""
    import random

    from llama_engine.serving.llm_engine import latency_stats
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in prompts:
        t += rng.expovariate(rate)
        arrivals.append(t)
    start, i, done = time.perf_counter(), 0, []
    while i < len(prompts) or llm.has_unfinished():
        now = time.perf_counter() - start
        while i < len(prompts) and arrivals[i] <= now:
            llm.add_request(prompts[i], max_tokens=out_len, arrival_time=start + arrivals[i])
            i += 1
        if llm.has_unfinished():
            done += [o.sequence for o in llm.step() if o.finished]
        else:
            time.sleep(max(0.0, min(0.002, arrivals[i] - now)))
    return {"rate_per_s": rate, **latency_stats(done)}


def run_serving_poisson(weights: "Weights", rates: list, num_requests: int) -> dict:
    """Poisson arrivals at several rates (input 128, output 128, fp16)."""
    from llama_engine.serving.llm_engine import LLMEngine
    eng = weights.engine("fp16", 256, 1024, 512)
    llm = LLMEngine(eng, max_batch_size=256, max_num_tokens=8192)
    prompts = random_prompts(num_requests, 128, weights.args.vocab_size, seed=2)
    llm.generate(prompts[:32], 8)  # warm-up
    out = {}
    for r in rates:
        out[f"{r:g}/s"] = run_poisson(llm, prompts, 128, r)
        print("poisson", json.dumps(out[f"{r:g}/s"]), flush=True)
    return out


def serving_plot(res: dict, assets: str) -> None:
    """Throughput vs latency under Poisson arrivals -> assets/serving.png."""
    pts = (res.get("serving") or {}).get("poisson") or {}
    if not pts:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(pts.values(), key=lambda r: r["rate_per_s"])
    tput = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for key, lab in (("ttft_p50_s", "p50"), ("ttft_p99_s", "p99")):
        ax[0].plot(tput, [r[key] for r in rows], "o-", label=lab)
    for key, lab in (("tpot_p50_s", "p50"), ("tpot_p99_s", "p99")):
        ax[1].plot(tput, [1e3 * r[key] for r in rows], "o-", label=lab)
    for r, x in zip(rows, tput):
        ax[0].annotate(f"{r['rate_per_s']:g}/s", (x, r["ttft_p50_s"]), fontsize=7)
    ax[0].set(xlabel="output tokens/s", ylabel="time to first token (s)")
    ax[1].set(xlabel="output tokens/s", ylabel="time per output token (ms)")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"Inflight batching, Poisson arrivals, input 128 / output 128 - "
                 f"{res.get('meta', {}).get('gpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(assets, "serving.png"), dpi=120)


def merge_json(path: str, new: dict) -> dict:
    """Merge ``new`` into the JSON at ``path``: a section's rows are replaced one by one
    (a re-measured row drops its old keys, e.g. an old error); ``meta`` is updated."""
    from llama_engine import parallel
    if parallel.get_rank() != 0:  # tensor parallelism: rank 0 alone reads and writes
        return new
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    for section, rows in new.items():
        if isinstance(rows, dict) and isinstance(old.get(section), dict):
            for k, v in rows.items():
                if section == "meta" and isinstance(v, dict) and isinstance(
                        old[section].get(k), dict):
                    old[section][k].update(v)
                else:
                    old[section][k] = v
        else:
            old[section] = rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(old, f, indent=2)
    os.replace(tmp, path)  # a reader never sees a half-written file
    return old


def ablation_markdown(res: dict) -> str:
    rows = res.get("ablation", {})
    meta = res.get("meta", {})
    base = rows.get("hf_eager", {}).get("latency_s")
    shapes = {"llama-7b": "LLaMA-7B", "llama-13b": "LLaMA-13B"}.get(
        meta.get("ablation_model", "llama-7b"), meta.get("ablation_model"))
    lines = [f"{shapes} shapes, random weights, batch 1, input 8, output 50; "
             f"{meta.get('gpu', '?')}, {meta.get('date', '?')}; read bandwidth "
             f"{meta.get('read_TBps', float('nan')):.2f} TB/s measured in the same run.", "",
             "| configuration | latency (s) | decode tok/s | speedup vs HF eager | % of floor |"
             " weight bytes (GiB) | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for key in ABLATION + [k for k in rows if k not in ABLATION]:
        r = rows.get(key)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {r.get('label', key)} | failed: {r['error'][:120]} | - | - | - | - "
                         "| - |")
            continue
        sp = f"{base / r['latency_s']:.2f}x" if base else "-"
        dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        floor = f"{r['pct_floor']:.0f}%" if "pct_floor" in r else "-"
        wb = f"{r['weight_gib']:.2f}" if "weight_gib" in r else "-"
        lines.append(f"| {r.get('label', key)} | {r['latency_s']:.3f} | {dec} | {sp} | {floor} "
                     f"| {wb} | {r.get('peak_mem_gib', float('nan')):.1f} |")
    return "\n".join(lines)


def sections_markdown(res: dict) -> str:
    """The non-ablation sections as small tables."""
    out = []
    for section, title in (("grid", "Batch sweep (input 128, output 128)"),
                           ("kv_long", "INT8 KV cache at long context"),
                           ("prefill", "Prefill, batch 1, 2048 tokens"),
                           ("tp", "Tensor parallelism (rows ending tpN ran on N GPUs)"),
                           ("tp_h200", "Tensor parallelism on 2x NVIDIA H200 (one-GPU rows on "
                            "one of the same GPUs; oneshot: the one-shot all-reduce, +norm: "
                            "fused with the next RMSNorm; no suffix: NCCL)"),
                           ("tp_h200_pdl", "Tensor parallelism on 2x NVIDIA H200 with "
                            "programmatic dependent launch (run 7 call g; oneshot: the "
                            "one-shot all-reduce, not fused; no suffix: NCCL)"),
                           ("tp_h100_run8", "Tensor parallelism on 2x NVIDIA H100 80GB HBM3, "
                            "run 8 (final code; call f: one GPU and the default one-shot + fused "
                            "norm; call g: NCCL)"),
                           ("tp_h200_run8", "Tensor parallelism on 2x NVIDIA H200, run 8 "
                            "(RoPE in decode attention, one-shot logits all-gather, embedding "
                            "gathered; call d, pemb rows call c with "
                            "LLAMA_ENGINE_TP_PARALLEL_EMBEDDING=1; oneshot: not fused with the "
                            "norm; +norm: the default; no suffix: NCCL)")):
        rows = res.get(section) or {}
        if rows:
            out += ["", f"### {title}", "",
                    "| run | latency (s) | prefill (ms) | decode tok/s | peak mem (GiB) |",
                    "|---|---|---|---|---|"]
            out += [f"| {k} | {r['latency_s']:.3f} | {1e3 * r['prefill_s']:.1f} | "
                    f"{r['decode_tok_s']:.0f} | {r.get('peak_mem_gib', float('nan')):.1f} |"
                    for k, r in rows.items()]
    for mode, r in (res.get("memory") or {}).items():
        out += ["", "### Memory", "", f"{mode}: weights {r['weight_gib']:.2f} GiB, peak "
                f"{r['peak_mem_gib']:.2f} GiB (torch.cuda.max_memory_allocated) at batch 1 with "
                f"a {r['context']}-token sequence."]
    prof = res.get("profile") or {}
    if prof:
        out += ["", "### Profile (GPU time per kernel category over one generate call, ms)", ""]
        cats = sorted({c for r in prof.values() for c in r["by_category_ms"]})
        out += ["| run | wall | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
        out += [f"| {k} | {r['wall_ms']:.1f} | " + " | ".join(
            f"{r['by_category_ms'].get(c, 0.0):.1f}" for c in cats) + " |"
            for k, r in prof.items()]
    serving = res.get("serving") or {}
    if serving:
        out += ["", "### Inflight batching (fp16 unless the run's name says otherwise)", "",
                "| run | requests | output tok/s | TTFT p50 / p99 (s) | TPOT p50 (ms) | "
                "preempted | decode steps: ms (seqs) | mixed steps: ms (tokens) |",
                "|---|---|---|---|---|---|---|---|"]
        for k, r in serving.items():
            r = (r.get("inflight") if isinstance(r, dict) and "inflight" in r else r)
            if not isinstance(r, dict) or "tokens_per_s" not in r:
                continue
            st = r.get("steps") or {}
            dec, mix = st.get("decode"), st.get("mixed")
            out.append(
                f"| {k} | {r['num_requests']} | {r['tokens_per_s']:.0f} | "
                f"{r.get('ttft_p50_s', float('nan')):.2f} / {r.get('ttft_p99_s', float('nan')):.2f}"
                f" | {1e3 * r.get('tpot_p50_s', float('nan')):.1f} | {r.get('num_preempted', '-')} | "
                + (f"{dec['ms_per_step']:.1f} ({dec['seqs_per_step']:.0f})" if dec else "-") + " | "
                + (f"{mix['ms_per_step']:.1f} ({mix['tokens_per_step']:.0f})" if mix else "-")
                + " |")
        m = serving.get("mixed")
        if m:
            out += ["", f"Mixed lengths ({m['num_requests']} requests, inputs 32-1024, outputs "
                    f"16-512, batch limit {m['max_batch']}): inflight "
                    f"{m['inflight']['tokens_per_s']:.0f} tok/s, our static batching "
                    f"{m['static_tok_s']:.0f} tok/s ({m['inflight_vs_static']:.2f}x)."]
        for key, what in (("hf_batch32_128_128", "HF padded static batch 32 (input 128, "
                           "output 128)"),
                          ("hf_batch32_128_128_run4", "The same HF baseline in a later call")):
            h = serving.get(key)
            if h:
                out.append(f"{what}: {h['e2e_tok_s']:.0f} tok/s.")
        if "uniform_vs_hf" in serving:
            out.append(f"Ours (uniform_128_128) / HF batch 32 in the same call: "
                       f"{serving['uniform_vs_hf']:.2f}x.")
        hm = serving.get("hf_batch32_mixed")
        if hm:
            out.append(f"HF padded static batch of the first 32 mixed requests: "
                       f"{hm['useful_tok_s']:.0f} useful tok/s.")
        pts = serving.get("poisson") or {}
        if pts:
            out += ["", "Poisson arrivals (input 128, output 128):", "",
                    "| rate (req/s) | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
                    "|---|---|---|---|"]
            for r in sorted(pts.values(), key=lambda r: r["rate_per_s"]):
                out.append(f"| {r['rate_per_s']:g} | {r['tokens_per_s']:.0f} | "
                           f"{1e3 * r['ttft_p50_s']:.0f} / {1e3 * r['ttft_p99_s']:.0f} | "
                           f"{1e3 * r['tpot_p50_s']:.1f} / {1e3 * r['tpot_p99_s']:.1f} |")
    return "\n".join(out)


def write_report(res: dict, assets: str) -> None:
    from llama_engine import parallel
    if parallel.get_rank() != 0:
        return
    os.makedirs(assets, exist_ok=True)
    try:
        serving_plot(res, assets)
    except ImportError:
        pass
    md = ablation_markdown(res) + "\n" + sections_markdown(res)
    with open(os.path.join(assets, "benchmark.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = res.get("ablation", {})
    keys = [k for k in ABLATION if k in rows and "latency_s" in rows[k]]
    if not keys:
        return
    short = {"hf_eager": "HF eager", "hf_compile": "HF compile", "fp16": "ours fp16",
             "int8": "int8 WO", "int4": "int4 WO g128", "int4_int8kv": "int4 + INT8 KV",
             "sq": "SmoothQuant\nW8A8"}
    e2e = [50 / rows[k]["latency_s"] for k in keys]
    dec = [rows[k].get("decode_tok_s", 0.0) for k in keys]
    floor = [rows[k].get("floor_tok_s", 0.0) for k in keys]
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    b1 = ax.bar([i - 0.2 for i in x], e2e, 0.4, label="end to end (prefill included)",
                color="#4a7ab5")
    b2 = ax.bar([i + 0.2 for i in x], dec, 0.4, label="decode only", color="#e08a3c")
    ax.scatter([i + 0.2 for i in x if floor[i]], [f for f in floor if f], marker="_", s=400,
               color="black", label="bandwidth floor (bytes read per token)")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, labels=[f"{v:.0f}" if v > 0 else "n/a" for v in dec], fontsize=8)
    ax.set_xticks(list(x), [short.get(k, k) for k in keys])
    ax.set_ylabel("tokens/s")
    meta = res.get("meta", {})
    ax.set_title(f"LLaMA-7B shapes, batch 1, input 8, output 50 - {meta.get('gpu', 'GPU')}, "
                 f"{meta.get('date', '')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(assets, "benchmark.png"), dpi=120)


# ---------------------------------------------------------------------------------------------
def run_ablation(a, weights: Weights, only: Optional[set]) -> dict:
    from llama_engine.builder import tensor_bytes  # noqa: F401
    bw = read_bandwidth()
    out: dict = {}
    B, I, O = 1, 8, 50
    order = [k for k in ABLATION if k != "hf_compile"] + ["hf_compile"]  # slowest last
    for key in order:
        if only and key not in only:
            continue
        print(f"== {key}", flush=True)
        if key.startswith("hf_"):
            model = hf_model(weights)
            label = {"hf_eager": "HF eager", "hf_compile": "HF static cache + compile"}[key]
            try:
                r = time_hf(model, B, I, O, compile_=key == "hf_compile")
            except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f"{key} failed: {msg}", flush=True)
                r = {"error": msg}
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
            del model
        else:
            eng = weights.engine(key, max(B, 1), a.max_input_len, 512)
            eng.enable_cuda_graphs()
            r = time_engine(eng, B, I, O)
            step_bytes = bytes_per_decode_step(eng, B, I + O // 2)
            r["floor_tok_s"] = bw / step_bytes
            r["pct_floor"] = 100 * r["decode_tok_s"] / r["floor_tok_s"]
            r["weight_gib"] = weight_bytes(eng) / 2**30
            r["label"] = MODES[key][1] + (f" [{a.row_suffix.strip('_')}]" if a.row_suffix else "")
            del eng
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        name = key + a.row_suffix if not key.startswith("hf_") else key
        out[name] = r
        merge_json(a.out_json, {"ablation": {name: r}, "meta": {"read_TBps": bw / 1e12}})
    return {"ablation": out, "meta": {"read_TBps": bw / 1e12, "ablation_model": a.model_config}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_config", default="llama-7b")
    p.add_argument("--engine_dir", default=None)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--only", default=None, help="comma list of ablation rows to run")
    p.add_argument("--row_suffix", default="", help="ablation and grid rows are saved as "
                   "<row><suffix> (e.g. _swiglu: a variant beside the default rows of the "
                   "same call)")
    p.add_argument("--modes", default="fp16", help="modes for the grid/profile")
    p.add_argument("--batch", default="1")
    p.add_argument("--max_input_len", type=int, default=2048)
    p.add_argument("--input_len", default="8")
    p.add_argument("--output_len", default="50")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--selfcheck", action="store_true", help="kernel correctness+speed checks")
    p.add_argument("--out_json", default="assets/benchmark.json")
    p.add_argument("--assets", default="assets")
    p.add_argument("--report", action="store_true", help="only write table/plot from out_json")
    p.add_argument("--device", default="cuda", help="cuda; cpu only dry-runs the flow")
    p.add_argument("--memory", default=None, help="mode: peak memory at batch 1, 2048 context")
    p.add_argument("--section", default="grid", help="JSON section for grid results")
    p.add_argument("--serving", action="store_true", help="inflight batching throughput")
    p.add_argument("--num_requests", type=int, default=1000)
    p.add_argument("--mixed_requests", type=int, default=300)
    p.add_argument("--scheduler_policy", default="max_utilization",
                   choices=("max_utilization", "guaranteed_no_evict"))
    p.add_argument("--serving_parts", default="uniform,mixed,hf",
                   help="with --serving: which scenarios (uniform, cnn, mixed, hf)")
    p.add_argument("--poisson_rates", default=None, help="with --serving: arrival rates, e.g. "
                   "10,20,40,80 requests/s")
    a = p.parse_args(argv)
    a.serving_parts = set(a.serving_parts.split(","))
    if a.report:
        with open(a.out_json) as f:
            write_report(json.load(f), a.assets)
        return 0
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: benchmark.py needs a CUDA GPU (--device cpu only dry-runs the flow on a "
              "tiny model)", file=sys.stderr)
        return 2
    from llama_engine import parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # torchrun --nproc_per_node N benchmark.py ...: tensor parallelism over N GPUs (NCCL);
        # rank 0 prints and writes the results.
        parallel.init_from_env(DEVICE)
        parallel.quiet_non_main_ranks()
        if a.ablation or a.memory or a.engine_dir or a.poisson_rates:
            print("error: under torchrun benchmark.py runs the latency grid, --profile (rank 0 "
                  "traced) and --serving (random weights); not --ablation, --memory, "
                  "--engine_dir or --poisson_rates (arrivals by each rank's clock would "
                  "diverge)", file=sys.stderr)
            return 2
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    meta = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    results: dict = {"meta": meta}
    if a.selfcheck:
        from llama_engine.kernels import attn, linear
        results["selfcheck"] = {"linear": linear.gpu_selfcheck("cuda"),
                                "attn": attn.gpu_selfcheck("cuda")}
    if a.serving:
        if "," in a.modes:
            print("error: --serving runs one mode (--modes fp16|int8|int4|int8kv|...)",
                  file=sys.stderr)
            return 2
        w = Weights(a.model_config)
        if a.poisson_rates:
            r = {"poisson": run_serving_poisson(
                w, [float(x) for x in a.poisson_rates.split(",")], a.num_requests)}
        else:
            r = run_serving(w, a.num_requests, a.mixed_requests, parts=a.serving_parts,
                            mode=a.modes, policy=a.scheduler_policy, save=lambda part: merge_json(a.out_json,
                                                                       {"serving": part}))
        merged = merge_json(a.out_json, {"meta": meta, "serving": r})
        write_report(merged, a.assets)
        return 0
    if a.memory:
        r = measure_memory(a.model_config, a.memory)
        print(json.dumps(r), flush=True)
        results["memory"] = {a.memory: r}
        merge_json(a.out_json, results)
        return 0
    weights = None
    if a.ablation or not a.engine_dir:
        weights = Weights(a.model_config)
    if a.ablation:
        r = run_ablation(a, weights, set(a.only.split(",")) if a.only else None)
        results["ablation"] = r["ablation"]
        meta.update(r["meta"])
    grid = {}
    if not a.ablation or a.profile:
        for mode in a.modes.split(","):
            for B in map(int, a.batch.split(",")):
                for I in map(int, a.input_len.split(",")):
                    for O in map(int, a.output_len.split(",")):
                        if a.engine_dir:
                            from llama_engine.runner import Engine
                            eng = Engine.from_dir(a.engine_dir, DEVICE)
                        else:
                            eng = weights.engine(mode, B, max(I, 8), max(O, 8))
                        eng.enable_cuda_graphs()
                        key = f"{mode} b{B} i{I} o{O}" + (f" tp{world}" if world > 1 else "")
                        ar = parallel.all_reduce_path(DEVICE)
                        if ar not in ("none", "nccl"):  # rows without a path name: NCCL
                            key += f" {ar}"
                        key += a.row_suffix
                        if a.model_config != "llama-7b" and not a.engine_dir:
                            key = f"{a.model_config} {key}"
                        if a.profile:
                            tp = f"_tp{world}" if world > 1 else ""
                            tp += "_" + ar.replace("+", "_") if ar not in ("none", "nccl") else ""
                            r = profile_decode(eng, B, I, O, os.path.join(
                                a.assets, f"trace_{mode}_b{B}{tp}.json"))
                        else:
                            r = time_engine(eng, B, I, O)
                        print(key, json.dumps(r), flush=True)
                        grid[key] = r
                        del eng
                        gc.collect()
                        if DEVICE == "cuda":
                            torch.cuda.empty_cache()
        results["profile" if a.profile else a.section] = grid
    merged = merge_json(a.out_json, results)
    write_report(merged, a.assets)
    return 0


if __name__ == "__main__":
    from llama_engine.cli import run_main   # a ConfigError (e.g. a misspelt LLAMA_ENGINE_*
    sys.exit(run_main(main))                # switch) is one line, not a traceback
