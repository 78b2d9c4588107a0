"""Where the time of one inflight-batching *mixed* step goes (prompt chunks + decodes), on a GPU.

Runs the mixed-length load of ``benchmark.py --serving`` (inputs 32-1024, outputs 16-512, batch
limit 64, 8,192-token steps, LLaMA-7B shapes, random fp16 weights), and profiles a few of its
eager (mixed) steps with ``torch.profiler``: host time of the input preparation and of the
forward, GPU time per kernel category (benchmark.py's categories), GPU busy vs wall, the
top kernels and host ops, and a Perfetto trace of one step. For comparison it times a pure
prefill of as many tokens in one prompt.

    python3 tools/gpu_step_profile.py --out DIR [--requests 300] [--profile_steps 3]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--skip_steps", type=int, default=4, help="mixed steps before profiling")
    p.add_argument("--model_config", default="llama-7b")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU")
        return 2
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import device, profiling, serving
    from benchmarks.weights import Weights
    from llama_engine.serving.llm_engine import LLMEngine
    os.makedirs(a.out, exist_ok=True)
    w = Weights(a.model_config)
    eng = w.engine("fp16", 64, 1024, 512)
    vocab = w.args.vocab_size
    prompts, outs = serving.mixed_requests(a.requests, vocab)  # benchmark.py's mixed load
    llm = LLMEngine(eng, max_batch_size=64, max_num_tokens=8192)
    runner = llm.runner
    orig_forward, orig_model = runner._forward, runner.model
    rows: list = []
    state = {"mixed": 0}

    def timed_model(*args, **kw):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = orig_model(*args, **kw)
        t_launch = time.perf_counter() - t0
        torch.cuda.synchronize()
        state["fwd"] = (t_launch, time.perf_counter() - t0)
        return r

    def forward(out, sample_rows):
        state["mixed"] += 1
        n = state["mixed"]
        prof_it = a.skip_steps < n <= a.skip_steps + a.profile_steps
        nd = sum(1 for q, s in zip(out.num_new_tokens, out.seqs)
                 if q == 1 and s.num_computed_tokens > 0)
        qlens = [q for q in out.num_new_tokens if q > 1]
        prefixes = sum(1 for q, s in zip(out.num_new_tokens, out.seqs)
                       if q > 1 and s.num_computed_tokens > 0)
        info = {"step": n, "seqs": len(out.seqs), "decode_rows": nd, "prompts": len(qlens),
                "prompt_tokens": sum(qlens), "prompts_with_cached_prefix": prefixes,
                "tokens": sum(out.num_new_tokens)}
        runner.model = timed_model
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if prof_it:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                r = orig_forward(out, sample_rows)
                torch.cuda.synchronize()
        else:
            r = orig_forward(out, sample_rows)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        runner.model = orig_model
        info.update(wall_ms=wall * 1e3, forward_host_launch_ms=state["fwd"][0] * 1e3,
                    forward_ms=state["fwd"][1] * 1e3,
                    prepare_ms=(wall - state["fwd"][1]) * 1e3)
        if prof_it:
            path = os.path.join(a.out, f"trace_mixed_step{n}.json")
            prof.export_chrome_trace(path)
            cats = profiling.categorize_trace(path)
            info["gpu_busy_ms"] = sum(cats.values())
            info["gpu_by_category_ms"] = cats
            ka = prof.key_averages()
            info["top_gpu"] = [(e.key[:70], round(e.self_device_time_total / 1e3, 2), e.count)
                               for e in sorted(ka, key=lambda e: -e.self_device_time_total)[:15]]
            info["top_host"] = [(e.key[:70], round(e.self_cpu_time_total / 1e3, 2), e.count)
                                for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:15]]
            if n == a.skip_steps + 1:
                with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as gz:
                    shutil.copyfileobj(f, gz)
            os.remove(path)
        rows.append(info)
        print(json.dumps(info), flush=True)
        return r

    runner._forward = forward
    llm.generate(prompts[:8], 4)  # warm-up (kernels, graphs)
    state["mixed"] = 0
    rows.clear()
    t0 = time.perf_counter()
    llm.reset_step_stats()
    ids = [llm.add_request(pr, None, m) for pr, m in zip(prompts, outs)]
    done = 0
    while done < len(ids) and state["mixed"] < a.skip_steps + a.profile_steps + 6:
        done += sum(o.finished for o in llm.step())
    summary = llm.step_summary()
    del llm, runner, orig_forward, orig_model
    device.free_memory("cuda")  # the serving KV cache held most of the GPU
    # a pure prefill of as many tokens as the profiled steps, in one prompt, for comparison
    pref = []
    for info in rows[a.skip_steps:a.skip_steps + a.profile_steps]:
        n = min(info["tokens"], 1024)
        pr = torch.randint(3, vocab, (1, n)).tolist()
        eng.generate(pr, 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = eng.generate(pr, 1)
        torch.cuda.synchronize()
        pref.append({"tokens": n, "prefill_ms": r.prefill_s * 1e3,
                     "wall_ms": (time.perf_counter() - t0) * 1e3})
    res = {"steps": rows, "step_summary": summary, "pure_prefill": pref,
           "device": torch.cuda.get_device_name()}
    with open(os.path.join(a.out, "step_profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("pure prefill", json.dumps(pref))
    print("step summary", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
