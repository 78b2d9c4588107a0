"""What the sampling controls cost per generated token, static batch and inflight batching.

Random weights of a preset (LLaMA-7B shapes, fp16 on CUDA by default), CUDA graphs on. For
each batch size, generates ``--output_len`` tokens after ``--input_len``-token prompts with
no control (the plain greedy path, which must cost what it cost before the controls existed),
then with each control alone and all of them together, and prints ms per decode step and the
ratio to the plain path. Every control runs on the device (no host read per token beyond the
stop check the plain path already has).

    python3 tools/gpu_sampling_bench.py [--model_config llama-7b] [--batch_sizes 1,8]
        [--input_len 128] [--output_len 128] [--runs 3] [--json OUT.json]

``--model_config tiny --device cpu`` runs it on a CPU (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONTROLS = {
    "none": {},
    "logprobs": dict(logprobs=0),
    "repetition_penalty": dict(repetition_penalty=1.2),
    "presence+frequency": dict(presence_penalty=0.5, frequency_penalty=0.5),
    "no_repeat_ngram_size=3": dict(no_repeat_ngram_size=3),
    "bad+stop words": dict(bad_words=[[3, 4], [5]], stop_words=[[6, 7, 8]]),
    "min_length": dict(min_length=10_000),
    "all": dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5,
                no_repeat_ngram_size=3, bad_words=[[3, 4], [5]], stop_words=[[6, 7, 8]],
                logprobs=0),
}


def make_engine(preset: str, dtype: str, device: str, max_batch: int, max_in: int,
                max_out: int):
    import weight
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, PRESETS, QuantConfig
    from llama_engine.runner import Engine
    args = ModelArgs(**PRESETS[preset])
    sd = weight.random_weights(args, dtype, seed=0)
    build = BuildConfig(max_batch_size=max_batch, max_input_len=max_in, max_output_len=max_out,
                        use_inflight_batching=True, paged_kv_cache=True)
    cfg = EngineConfig(model=args, quant=QuantConfig(), build=build, dtype=dtype)
    engine = Engine.from_tensors(cfg, ckpt.hf_to_unified(sd, args), device)
    engine.enable_cuda_graphs()
    return engine


def timed(fn, device: str, runs: int) -> float:
    fn()  # warm-up: graphs, autotuning
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_config", default="llama-7b")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from llama_engine.sampling import SamplingConfig
    from llama_engine.serving import LLMEngine

    dtype = a.dtype or ("float16" if a.device.startswith("cuda") else "float32")
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    engine = make_engine(a.model_config, dtype, a.device, max(sizes), a.input_len,
                         a.output_len)
    vocab = engine.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{a.model_config} {dtype} on {a.device}: input {a.input_len}, output "
          f"{a.output_len}; ms per generated token step (best of {a.runs})", flush=True)
    for mode in ("static", "inflight"):
        llm = None
        for bs in sizes:
            prompts = torch.randint(10, vocab, (bs, a.input_len), generator=g).tolist()
            base = None
            for name, kw in CONTROLS.items():
                cfg = SamplingConfig(**kw)
                if mode == "static":
                    def fn():
                        engine.generate(prompts, a.output_len, cfg)  # no end id: all steps run
                else:
                    if llm is None:
                        llm = LLMEngine(engine, max_batch_size=max(sizes))

                    def fn():
                        llm.generate(prompts, a.output_len, cfg)
                ms = 1e3 * timed(fn, a.device, a.runs) / a.output_len
                base = base if base is not None else ms
                rows.append(dict(mode=mode, batch=bs, control=name, ms_per_step=ms,
                                 vs_none=ms / base))
                print(f"{mode:8s} batch {bs:3d}  {name:24s} {ms:8.3f} ms  x{ms / base:5.2f}",
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
