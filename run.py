"""Generate with an engine built by build.py (ours, or a TensorRT-LLM engine where installed).

    python run.py --engine_dir ./engines/fp16 --max_output_len 50 [--tokenizer_dir DIR] \
        [--input_text "..."]... [--input_file F] [--num_runs 5] [--streaming]

Greedy by default (TensorRT-LLM's top_k=1); ``--temperature/--top_k/--top_p`` sample.
Prints ``Input: "…"`` / ``Output: "…"`` per prompt, then ``llama-run (mean latency: X sec)``
and tokens per second. The timed runs follow one untimed warm-up run when ``--num_runs`` > 1.
TensorRT-LLM's run.py flags work too (docs/flags.md): ``--input_text`` takes several prompts,
``--input_file`` also reads token ids (.csv/.npy), ``--output_csv/--output_npy/
--output_log_probs_npy/--output_cum_log_probs_npy`` write its files (then the Input/Output
lines are not printed, as there), and flags for features we lack are refused in one line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llama_engine import cli, cli_compat
from llama_engine.cli import (DTYPE_CHOICES, add_prompt_args, parse_dtype, print_io,
                              print_timing, read_prompts, resolve_device, run_main)
from llama_engine import options as runtime_options
from llama_engine.config import ConfigError
from llama_engine.text_stream import TextStream

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
    p.add_argument("--run_profiling", action="store_true",
                   help="time 10 runs (at least) after a warm-up, as --num_runs 10")
    p.add_argument("--streaming", action="store_true",
                   help="print the text as it is generated (first run)")
    p.add_argument("--use_inflight_batching", action="store_true",
                   help="run the prompts through the inflight-batching scheduler")
    p.add_argument("--scheduler_policy", default="max_utilization",
                   choices=("max_utilization", "guaranteed_no_evict"),
                   help="with --use_inflight_batching: preempt when the KV cache runs out "
                        "(max_utilization) or admit only requests that fit whole "
                        "(guaranteed_no_evict; TensorRT-LLM's CapacitySchedulerPolicy)")
    cli.add_prefix_caching_arg(p)
    p.add_argument("--no_cuda_graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="override the engine's float dtype (e.g. fp32 for an fp16 engine on CPU)")
    runtime_options.add_arguments(p)
    add_trtllm_run_flags(p)
    cli.add_speculative_args(p)
    return p


def add_trtllm_run_flags(p) -> None:
    """TensorRT-LLM run.py's flags beyond ours (docs/flags.md)."""
    p.add_argument("--max_input_length", type=cli.positive_int, default=923,
                   help="prompt tokens kept: the first N of a text prompt, the last N of a "
                        "token-id prompt (default 923)")
    p.add_argument("--hf_model_dir", "--model_dir", dest="hf_model_dir", default=None,
                   help="where the tokenizer is when neither --tokenizer_dir nor the engine "
                        "dir has one")
    p.add_argument("--no_add_special_tokens", dest="add_special_tokens", action="store_false",
                   help="do not put BOS before the prompts")
    cli_compat.add_log_level(p, default="error")
    o = p.add_argument_group("output files (TensorRT-LLM's layout)")
    o.add_argument("--output_csv", default=None,
                   help="prompt + output ids per row, padded with the pad id")
    o.add_argument("--output_npy", default=None, help="the same ids as int32 [batch, width]")
    o.add_argument("--output_log_probs_npy", default=None,
                   help="log probs of the generated tokens, float32 [batch, 1, max_output_len]")
    o.add_argument("--output_cum_log_probs_npy", default=None,
                   help="their sums, float32 [batch, 1]")
    for name in ("--output_generation_logits", "--output_logits_npy"):
        cli_compat.refuse(o, name, why="logits are not gathered; --output_log_probs_npy "
                                       "writes the generated tokens' log probs")
    cli_compat.refuse(p, "--multimodal_input_file", why="text models only")
    for name in ("--input_token_extra_ids", "--input_token_extra_ids_file"):
        cli_compat.refuse(p, name, why="no prompt tuning or KV-cache reuse")
    cli_compat.add_beam_flags(p)
    cli_compat.add_common_runtime_flags(p)


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
    if (str(getattr(engine, "device", "")) == "cpu"
            and getattr(engine, "dtype", None) in (torch.float16, torch.bfloat16)):
        print(f"note: {engine_dir} is a {str(engine.dtype).replace('torch.', '')} engine on "
              "the CPU, where half precision runs ~5x slower than float32: pass --dtype fp32 "
              "(or build with --dtype float32)", file=sys.stderr)
    return engine, "PyTorch engine (ours)"


def generate_inflight(engine, batch_ids: list, max_output_len: int, sampling=None,
                      stop_ids=(), scheduler_policy: str = "max_utilization", streamer=None,
                      enable_prefix_caching: bool = False, speculative=None, beam=None):
    """The prompts through the inflight-batching scheduler; -> a runner.GenerationOutput.
    ``speculative``: a speculative.SpeculativeConfig (None: plain decoding); ``beam``: a
    beam.BeamConfig (rows: num_return_sequences per prompt, with their beam scores)."""
    import time

    from llama_engine.runner import GenerationOutput
    from llama_engine.serving import LLMEngine
    llm = getattr(engine, "_llm_engine", None)
    if llm is None:  # one per engine: it owns the paged KV cache and the CUDA graphs
        llm = engine._llm_engine = LLMEngine(engine, scheduler_policy=scheduler_policy,
                                             enable_prefix_caching=enable_prefix_caching,
                                             speculative=speculative)
    t0 = time.perf_counter()
    seqs = llm.generate(batch_ids, max_output_len, sampling, stop_ids=stop_ids,
                        streamer=streamer, beam=beam)
    for s in seqs:
        if s.error:
            raise ConfigError(s.error)
    if beam is not None and beam.enabled:
        outs = [list(r) for s in seqs for r in s.beam_output_ids]
        return GenerationOutput(outs, sum(map(len, outs)), time.perf_counter() - t0,
                                beam_scores=[x for s in seqs for x in s.beam_scores],
                                num_return_sequences=beam.num_return_sequences)
    outs = [list(s.output_ids) for s in seqs]
    res = GenerationOutput(outs, sum(map(len, outs)), time.perf_counter() - t0)
    if sampling is not None and sampling.logprobs is not None:
        res.log_probs = [list(s.logprobs) for s in seqs]
    return res


def _main(args) -> int:
    import time

    import torch

    from llama_engine.tokenizer import load_tokenizer

    from llama_engine import outputs as out_files
    from llama_engine.tokenizer import find_tokenizer_source

    cli_compat.apply_log_level(args.log_level)
    if args.num_runs <= 0:
        raise ConfigError(f"--num_runs must be positive, got {args.num_runs}")
    if args.run_profiling:
        args.num_runs = max(args.num_runs, 10)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    cli.check_engine_dir(args.engine_dir)
    token_file = bool(args.input_file and args.input_file.endswith((".csv", ".npy")))
    prompts = None if token_file else read_prompts(args.input_text, args.input_file)
    tok_src = args.tokenizer_dir or (args.engine_dir if find_tokenizer_source(args.engine_dir)
                                     or not args.hf_model_dir else args.hf_model_dir)
    tokenizer = load_tokenizer(tok_src)
    if token_file:
        batch_ids = out_files.read_token_file(args.input_file, tokenizer.pad_id,
                                              args.max_input_length)
        prompts = [tokenizer.decode(ids) for ids in batch_ids]
    else:
        batch_ids = [tokenizer.encode(p, add_bos=args.add_special_tokens)[:args.max_input_length]
                     for p in prompts]
    options = runtime_options.from_args(args, cuda_graphs=not args.no_cuda_graphs)
    engine, _ = load_runner(args.engine_dir, device, dtype, options=options)
    from llama_engine import speculative
    spec = speculative.config_from_args(args, engine)
    spec_kw = {"speculative": spec} if spec is not None else {}
    from llama_engine import parallel
    parallel.quiet_non_main_ranks()  # torchrun: every rank computes the same tokens; rank 0 prints
    # The one stopping rule (static, inflight, TensorRT-LLM): the model's end ids
    # (Tokenizer.end_ids), replaced by --end_id; --stop_words end a prompt too.
    sampling = cli.sampling_from_args(args, tokenizer)
    end_ids = tokenizer.end_ids
    from llama_engine.beam import BeamConfig
    beam = BeamConfig(**cli_compat.beam_settings(args))
    if beam.enabled:
        if spec is not None:
            raise ConfigError("--num_beams > 1 does not combine with speculative decoding")
        if args.output_log_probs_npy:
            raise ConfigError("--output_log_probs_npy: per-token log probs are not kept under "
                              "beam search; --output_cum_log_probs_npy writes the beam scores")
        if args.streaming:
            raise ConfigError("--streaming: beams change until the end; drop --streaming "
                              "with --num_beams > 1")
        beam.check_sampling(sampling, "--num_beams")
        spec_kw = {"beam": beam}

    def once(stream=None):
        if args.use_inflight_batching:
            return generate_inflight(engine, batch_ids, args.max_output_len, sampling,
                                     stop_ids=end_ids, scheduler_policy=args.scheduler_policy,
                                     streamer=stream.request_output if stream else None,
                                     enable_prefix_caching=args.enable_prefix_caching, **spec_kw)
        if args.enable_prefix_caching:
            raise ConfigError("--enable_prefix_caching needs --use_inflight_batching")
        return engine.generate(batch_ids, args.max_output_len, sampling, end_id=end_ids,
                               streamer=stream.step if stream else None, **spec_kw)

    if args.num_runs > 1:
        once()  # warm-up: CUDA graphs, Triton autotuning
    latencies = []
    for i in range(args.num_runs):
        stream = TextStream(tokenizer, batch_ids, sampling.end_ids(end_ids),
                            stop_words=sampling.stop_words) if (
            args.streaming and i == 0) else None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = once(stream)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
        if stream:
            stream.close()
    gen_ids = [cli.strip_at_end(ids, tokenizer.end_ids) for ids in out.output_ids]
    per_prompt = len(gen_ids) // len(batch_ids)        # num_return_sequences under beams
    if per_prompt > 1:
        prompts = [p for p in prompts for _ in range(per_prompt)]
        batch_ids = [p for p in batch_ids for _ in range(per_prompt)]
    files = dict(output_csv=args.output_csv, output_npy=args.output_npy,
                 output_log_probs_npy=args.output_log_probs_npy,
                 output_cum_log_probs_npy=args.output_cum_log_probs_npy)
    if not (args.output_csv or args.output_npy):
        for prompt, ids in zip(prompts, gen_ids):
            print_io(prompt, tokenizer.decode(ids))
    if any(files.values()):
        log_probs = None
        if out.beam_scores is not None:   # the cumulative file holds each beam's score
            log_probs = [[x] for x in out.beam_scores]
        elif args.output_log_probs_npy or args.output_cum_log_probs_npy:
            log_probs = generated_log_probs(engine, batch_ids, gen_ids, out)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else end_ids[0]
        for path in out_files.write_outputs(batch_ids, gen_ids, args.max_output_len, pad,
                                            log_probs=log_probs, **files):
            print(f"wrote {path}", file=sys.stderr)
    print_timing(RUN_NAME, sum(latencies) / len(latencies), out.num_generated_tokens)
    return 0


def generated_log_probs(engine, batch_ids, gen_ids, out) -> list:
    """Per-token log probs of the generated ids: the runner's when it reports them
    (``out.log_probs``), else teacher-forced from the engine's logits of prompt + output."""
    given = getattr(out, "log_probs", None)
    if given is not None:
        return [list(x)[:len(g)] for x, g in zip(given, gen_ids)]
    if not hasattr(engine, "forward_logits"):
        raise ConfigError("--output_log_probs_npy: this engine gives no logits")
    from llama_engine.perplexity import engine_log_probs
    return [engine_log_probs(engine, p, g).tolist() if g else [] for p, g in
            zip(batch_ids, gen_ids)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
