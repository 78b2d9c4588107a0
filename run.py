"""Generate with an engine built by build.py (ours, or a TensorRT-LLM engine where installed).

    python run.py --engine_dir ./engines/fp16 --max_output_len 50 [--tokenizer_dir DIR] \
        [--input_text "..."]... [--input_file F] [--num_runs 5] [--streaming]

Greedy by default (TensorRT-LLM's top_k=1); ``--temperature/--top_k/--top_p`` sample.
Prints ``Input: "…"`` / ``Output: "…"`` per prompt, then ``llama-run (mean latency: X sec)``
and tokens per second. The timed runs follow one untimed warm-up run when ``--num_runs`` > 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llama_engine import cli
from llama_engine.cli import (DTYPE_CHOICES, add_prompt_args, parse_dtype, print_io,
                              print_timing, read_prompts, resolve_device, run_main)
from llama_engine import options as runtime_options
from llama_engine.config import ConfigError

RUN_NAME = "llama-run"


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine_dir", required=True)
    p.add_argument("--tokenizer_dir", default=None, help="default: the engine dir's copy")
    p.add_argument("--max_output_len", type=int, required=True)
    add_prompt_args(p)
    cli.add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--num_runs", type=int, default=1)
    p.add_argument("--streaming", action="store_true", help="print tokens as they come")
    p.add_argument("--use_inflight_batching", action="store_true",
                   help="run the prompts through the inflight-batching scheduler")
    p.add_argument("--scheduler_policy", default="max_utilization",
                   choices=("max_utilization", "guaranteed_no_evict"),
                   help="with --use_inflight_batching: preempt when the KV cache runs out "
                        "(max_utilization) or admit only requests that fit whole "
                        "(guaranteed_no_evict; TensorRT-LLM's CapacitySchedulerPolicy)")
    p.add_argument("--no_cuda_graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="override the engine's float dtype (e.g. fp32 for an fp16 engine on CPU)")
    runtime_options.add_arguments(p)
    cli.add_speculative_args(p)
    return p


def load_runner(engine_dir: str, device: str, dtype: Optional[str], cuda_graphs: bool = True,
                options=None):
    """Our Engine, or TensorRT-LLM's runner for a TensorRT-LLM engine directory.
    ``options``: llama_engine.options.RuntimeOptions (default: its defaults with
    ``cuda_graphs``)."""
    try:
        from llama_engine import trtllm
        if trtllm.is_trtllm_engine_dir(engine_dir):
            return trtllm.TrtllmRunner.from_dir(engine_dir), "TensorRT-LLM"
    except ImportError:
        pass
    import torch

    from llama_engine.options import RuntimeOptions
    from llama_engine.runner import Engine
    options = options or RuntimeOptions(cuda_graphs=cuda_graphs)
    engine = Engine.from_dir(engine_dir, device=device, dtype=dtype, options=options)
    if engine.device.type == "cpu" and engine.dtype in (torch.float16, torch.bfloat16):
        print(f"note: {engine_dir} is a {str(engine.dtype).replace('torch.', '')} engine on "
              "the CPU, where half precision runs ~5x slower than float32: pass --dtype fp32 "
              "(or build with --dtype float32)", file=sys.stderr)
    return engine, "PyTorch engine (ours)"


def generate_inflight(engine, batch_ids: list, max_output_len: int, sampling=None,
                      stop_ids=(), scheduler_policy: str = "max_utilization",
                      speculative=None):
    """The prompts through the inflight-batching scheduler; -> a runner.GenerationOutput.
    ``speculative``: a speculative.SpeculativeConfig (None: plain decoding)."""
    import time

    from llama_engine.runner import GenerationOutput
    from llama_engine.serving import LLMEngine
    llm = getattr(engine, "_llm_engine", None)
    if llm is None:  # one per engine: it owns the paged KV cache and the CUDA graphs
        llm = engine._llm_engine = LLMEngine(engine, scheduler_policy=scheduler_policy,
                                             speculative=speculative)
    t0 = time.perf_counter()
    seqs = llm.generate(batch_ids, max_output_len, sampling, stop_ids=stop_ids)
    for s in seqs:
        if s.error:
            raise ConfigError(s.error)
    outs = [list(s.output_ids) for s in seqs]
    return GenerationOutput(outs, sum(map(len, outs)), time.perf_counter() - t0)


def _main(args) -> int:
    import time

    import torch

    from llama_engine.runner import SamplingConfig
    from llama_engine.tokenizer import load_tokenizer

    if args.num_runs <= 0:
        raise ConfigError(f"--num_runs must be positive, got {args.num_runs}")
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    cli.check_engine_dir(args.engine_dir)
    prompts = read_prompts(args.input_text, args.input_file)
    tokenizer = load_tokenizer(args.tokenizer_dir or args.engine_dir)
    batch_ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    options = runtime_options.from_args(args, cuda_graphs=not args.no_cuda_graphs)
    engine, _ = load_runner(args.engine_dir, device, dtype, options=options)
    from llama_engine import speculative
    spec = speculative.config_from_args(args, engine)
    spec_kw = {"speculative": spec} if spec is not None else {}
    from llama_engine import parallel
    parallel.quiet_non_main_ranks()  # torchrun: every rank computes the same tokens; rank 0 prints
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
    end_id = tokenizer.eos_id

    def once(streamer=None):
        if args.use_inflight_batching:
            return generate_inflight(engine, batch_ids, args.max_output_len, sampling,
                                     stop_ids=tokenizer.end_ids,
                                     scheduler_policy=args.scheduler_policy, **spec_kw)
        return engine.generate(batch_ids, args.max_output_len, sampling, end_id=end_id,
                               streamer=streamer, **spec_kw)

    streamer = None
    if args.streaming:
        def streamer(step, toks):  # noqa: F811 - a named callback reads better here
            print(f"[step {step}] " + " | ".join(repr(tokenizer.decode([t])) for t in toks),
                  flush=True)
    if args.num_runs > 1:
        once()  # warm-up: CUDA graphs, Triton autotuning
    latencies = []
    for i in range(args.num_runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = once(streamer if i == 0 else None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
    for prompt, ids in zip(prompts, out.output_ids):
        print_io(prompt, tokenizer.decode(ids))
    print_timing(RUN_NAME, sum(latencies) / len(latencies), out.num_generated_tokens)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
