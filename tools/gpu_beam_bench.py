"""Beam search speed: our engine against Hugging Face's beam search, in the same process.

Random LLaMA-7B-shaped fp16 weights on CUDA (``benchmarks.weights.Weights``; HF's
``LlamaForCausalLM`` is built on the very same tensors). For each batch size (default 1 and
8) and ``--num_beams`` (default 4): random prompts of ``--input_len`` tokens, ``--output_len``
new tokens with no end id (every step runs on both sides), timed as best of ``--runs`` after
a warm-up: our static batch (CUDA graphs on), our inflight batching (``LLMEngine``), and
HF ``generate(num_beams=K, do_sample=False)``. Prints ms per step, generated tokens per
second (prompts x output_len), the speed-up over HF and how many of the best beams are
identical to HF's (fp16: near-ties may flip a token; exactness is tested in float64 on the
CPU by tests/test_beam.py).

    python3 tools/gpu_beam_bench.py [--model_config llama-7b] [--batch_sizes 1,8]
        [--num_beams 4] [--input_len 128] [--output_len 128] [--runs 3] [--json OUT.json]

``--model_config tiny --device cpu --dtype float32`` is a smoke test, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, device: str, runs: int):
    out = fn()  # warm-up: graphs, autotuning
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_config", default="llama-7b")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no_hf", action="store_true", help="skip the HF baseline")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from benchmarks.weights import Weights
    from llama_engine.beam import BeamConfig
    from llama_engine.serving import LLMEngine

    dtype = a.dtype or ("float16" if a.device.startswith("cuda") else "float32")
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    k = a.num_beams
    w = Weights(a.model_config, a.device, dtype)
    engine = w.engine("fp16", max(sizes) * k, a.input_len, a.output_len)
    engine.enable_cuda_graphs()
    hf = None if a.no_hf else w.hf_model()
    cfg = BeamConfig(num_beams=k, num_return_sequences=1, early_stopping=True)
    vocab = engine.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{a.model_config} {dtype} on {a.device} "
          f"({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'CPU'}): "
          f"{k} beams, input {a.input_len}, output {a.output_len}, no end id; "
          f"best of {a.runs}", flush=True)
    llm = None
    for bs in sizes:
        prompts = torch.randint(10, vocab, (bs, a.input_len), generator=g).tolist()
        results = {}
        t, out = timed(lambda: engine.generate(prompts, a.output_len, beam=cfg), a.device,
                       a.runs)
        results["ours static"] = (t, out.output_ids)
        if llm is None:
            llm = LLMEngine(engine, max_batch_size=max(sizes) * k)
        t, seqs = timed(lambda: llm.generate(prompts, a.output_len, beam=cfg), a.device,
                        a.runs)
        results["ours inflight"] = (t, [s.output_ids for s in seqs])
        if hf is not None:
            ids = torch.tensor(prompts, device=a.device)

            def run_hf():
                with torch.inference_mode():
                    o = hf.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=a.output_len, min_new_tokens=a.output_len,
                                    do_sample=False, num_beams=k, early_stopping=True,
                                    eos_token_id=None, pad_token_id=0)
                return o[:, a.input_len:].tolist()
            t, hf_out = timed(run_hf, a.device, a.runs)
            results["HF generate"] = (t, hf_out)
        hf_t = results.get("HF generate", (None,))[0]
        hf_ids = results.get("HF generate", (None, None))[1]
        for name, (t, ids_) in results.items():
            ms = 1e3 * t / a.output_len
            tps = bs * a.output_len / t
            same = (sum(x == y for x, y in zip(ids_, hf_ids)) if hf_ids is not None else None)
            row = dict(side=name, batch=bs, num_beams=k, ms_per_step=ms, tokens_per_s=tps,
                       speedup_vs_hf=(hf_t / t if hf_t else None),
                       same_best_beam_as_hf=same)
            rows.append(row)
            sp = f"x{hf_t / t:5.2f} vs HF" if hf_t else ""
            agree = f"{same}/{bs} best beams = HF" if same is not None else ""
            print(f"batch {bs:2d}  {name:14s} {ms:8.2f} ms/step {tps:9.1f} tok/s  {sp}  {agree}",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
