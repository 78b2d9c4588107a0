"""Inflight-batching load (issue 5's scenarios) on our LLMEngine, end-of-sequence ignored:
all requests at once (uniform, cnn-shaped, mixed lengths against our static batching), the HF
padded static batch as baseline, and Poisson arrivals at several rates."""
from __future__ import annotations

import json
import random
import time
from typing import Callable, Optional

import torch

from llama_engine import parallel
from llama_engine.serving.llm_engine import LLMEngine, latency_stats

from .device import free_memory, peak_gib, random_prompts, sync
from .latency import hf_generation_config, time_hf
from .weights import Weights

PARTS = ("uniform", "cnn", "mixed", "hf")
MAX_BATCH = 256
MIXED_LIMIT = 64  # the mixed scenario's batch limit, inflight and static alike


def mixed_requests(n: int, vocab: int) -> tuple[list, list]:
    """``n`` prompts of 32-1024 tokens and their output lengths, 16-512 (fixed seeds)."""
    rng = random.Random(0)
    ins = [rng.randint(32, 1024) for _ in range(n)]
    outs = [rng.randint(16, 512) for _ in range(n)]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in ins], outs


def cnn_requests(n: int, vocab: int) -> list:
    """``n`` cnn_dailymail-shaped prompts: 800-1000 tokens (fixed seeds)."""
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (rng.randint(800, 1000),), generator=g).tolist()
            for _ in range(n)]


def row_suffix(mode: str, policy: str, all_reduce: str) -> str:
    """Serving keys end in _<mode> (unless fp16), _tpN under torchrun, _no_evict for the
    guaranteed_no_evict policy, then _oneshot or _oneshot_norm for the one-shot all-reduce."""
    world = parallel.get_world_size()
    sfx = (f"_{mode}" if mode != "fp16" else "") + (f"_tp{world}" if world > 1 else "") + (
        "_no_evict" if policy == "guaranteed_no_evict" else "")
    if all_reduce not in ("none", "nccl"):
        sfx += "_" + all_reduce.replace("+", "_")
    return sfx


class ServingRun:
    """One engine under the scenarios of ``run``; results gather in ``out`` (saved after each
    part, so a part that runs out of time keeps the ones before it)."""

    def __init__(self, weights: Weights, mode: str, policy: str, save: Callable[[dict], None],
                 prefix_caching: bool = False):
        self.prefix_caching = prefix_caching
        self.weights, self.device, self.policy, self.mode = weights, weights.device, policy, mode
        self.vocab = weights.args.vocab_size
        self.eng = weights.engine(mode, MAX_BATCH, 1024, 512)
        self.sfx = row_suffix(mode, policy, parallel.all_reduce_path(self.device))
        self.save = save
        self.out: dict = {}

    def llm(self, max_batch: int = MAX_BATCH) -> LLMEngine:
        return LLMEngine(self.eng, max_batch_size=max_batch, max_num_tokens=8192,
                         scheduler_policy=self.policy, enable_prefix_caching=self.prefix_caching)

    def timed(self, llm: LLMEngine, prompts: list, max_tokens) -> dict:
        sync(self.device)
        llm.reset_step_stats()
        t0 = time.perf_counter()
        seqs = llm.generate(prompts, max_tokens)
        sync(self.device)
        return {**latency_stats(seqs), "wall_s": time.perf_counter() - t0,
                "steps": llm.step_summary(), "kv_cache_tokens": llm.block_manager.capacity_tokens}

    def record(self, key: str, tag: str, row: dict) -> None:
        self.out[key] = row
        print(tag, json.dumps(row), flush=True)
        self.save(self.out)

    def uniform(self, num_requests: int) -> None:
        """``num_requests`` x 128 in / 128 out, all at once."""
        llm = self.llm()
        prompts = random_prompts(num_requests, 128, self.vocab)
        llm.generate(prompts[:64], 8)  # warm-up: graphs, kernels
        self.record("uniform_128_128" + self.sfx, "uniform",
                    {"num_requests": num_requests, "max_batch": MAX_BATCH,
                     **self.timed(llm, prompts, 128)})
        del llm
        free_memory(self.device)  # the next LLMEngine sizes its KV cache from the free memory

    def cnn(self, num_requests: int) -> None:
        n = min(num_requests, 500)
        prompts = cnn_requests(n, self.vocab)
        llm = self.llm()
        self.record("cnn_shaped" + self.sfx, "cnn",
                    {"num_requests": n, "max_batch": MAX_BATCH, "input": "800-1000",
                     "output": 100, **self.timed(llm, prompts, 100)})
        del llm
        free_memory(self.device)

    def mixed(self, prompts: list, outs: list) -> None:
        """Inflight batching against our padded static batches of the same batch limit."""
        llm = self.llm(MIXED_LIMIT)
        inflight = self.timed(llm, prompts, outs)
        del llm
        free_memory(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        for i in range(0, len(prompts), MIXED_LIMIT):
            self.eng.generate(prompts[i:i + MIXED_LIMIT], max(outs[i:i + MIXED_LIMIT]))
        sync(self.device)
        static_s = time.perf_counter() - t0
        useful = sum(outs)
        self.record("mixed" + self.sfx, "mixed",
                    {"num_requests": len(prompts), "max_batch": MIXED_LIMIT,
                     "inflight": inflight, "static_tok_s": useful / static_s,
                     "static_wall_s": static_s,
                     "inflight_vs_static": inflight["tokens_per_s"] / (useful / static_s)})

    def hf(self, prompts: list, outs: list, reps: int) -> None:
        """HF padded batch 32 on the uniform shape and on the first 32 mixed requests."""
        del self.eng  # HF needs the memory
        free_memory(self.device)
        model = self.weights.hf_model()
        r = time_hf(model, 32, 128, 128, compile_=False, reps=reps)
        self.out["hf_batch32_128_128"] = r
        uniform = self.out.get("uniform_128_128")
        if uniform:
            self.out["uniform_vs_hf"] = uniform["tokens_per_s"] / r["e2e_tok_s"]
        self.record("hf_batch32_128_128", "hf", r)
        if len(prompts) >= 32:
            row = self.hf_mixed(model, prompts[:32], outs[:32])
            self.record("hf_batch32_mixed", "hf_mixed", row)

    def hf_mixed(self, model, batch: list, want: list) -> dict:
        """The batch runs to its longest output; useful tokens are what each request asked."""
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for j, pr in enumerate(batch):  # left padding, as HF decoder-only generation needs
            ids[j, width - len(pr):] = torch.tensor(pr)
            mask[j, width - len(pr):] = 1
        gen = hf_generation_config(max(want))
        with torch.inference_mode():
            sync(self.device)
            t0 = time.perf_counter()
            model.generate(ids, generation_config=gen, attention_mask=mask)
            sync(self.device)
        hf_s = time.perf_counter() - t0
        return {"num_requests": len(batch), "wall_s": hf_s, "useful_tok_s": sum(want) / hf_s,
                "peak_mem_gib": peak_gib(self.device)}


def run_serving(weights: Weights, num_requests: int, mixed_n: int,
                parts: Optional[set] = None, hf_batches: int = 2, mode: str = "fp16",
                policy: str = "max_utilization", save=None, prefix_caching: bool = False) -> dict:
    """The scenarios in ``parts`` (of PARTS) on one ``mode`` engine. ``uniform``:
    ``num_requests`` x 128/128; ``cnn``: up to 500 cnn-shaped requests (800-1000 in, 100
    out); ``mixed``: ``mixed_n`` requests, inflight vs our static batching; ``hf``: HF's padded
    batch 32 (one GPU, fp16 only). ``save(out)`` is called after each part."""
    parts = parts or {"uniform", "mixed", "hf"}
    run = ServingRun(weights, mode, policy, save or (lambda _: None), prefix_caching)
    if "uniform" in parts:
        run.uniform(num_requests)
    if "cnn" in parts:
        run.cnn(num_requests)
    mixed, outs = mixed_requests(mixed_n, run.vocab)
    if "mixed" in parts and mixed_n:
        run.mixed(mixed, outs)
    if "hf" in parts and parallel.get_world_size() == 1 and mode == "fp16":
        run.hf(mixed, outs, hf_batches)
    return run.out


def run_poisson(llm: LLMEngine, prompts: list, out_len: int, rate: float, seed: int = 0) -> dict:
    """Requests arriving as a Poisson process of ``rate`` per second; -> latency_stats."""
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


def run_serving_poisson(weights: Weights, rates: list, num_requests: int,
                        prefix_caching: bool = False) -> dict:
    """Poisson arrivals at several rates (input 128, output 128, fp16)."""
    eng = weights.engine("fp16", MAX_BATCH, 1024, 512)
    llm = LLMEngine(eng, max_batch_size=MAX_BATCH, max_num_tokens=8192,
                    enable_prefix_caching=prefix_caching)
    prompts = random_prompts(num_requests, 128, weights.args.vocab_size, seed=2)
    llm.generate(prompts[:32], 8)  # warm-up
    out = {}
    for r in rates:
        out[f"{r:g}/s"] = run_poisson(llm, prompts, 128, r)
        print("poisson", json.dumps(out[f"{r:g}/s"]), flush=True)
    return out
