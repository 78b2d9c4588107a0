"""Serve an engine over HTTP with the OpenAI API (TensorRT-LLM's ``trtllm-serve`` in spirit).

    python serve.py --engine_dir ./engines/fp16 [--tokenizer_dir DIR] [--host 127.0.0.1]
        [--port 8000] [--max_batch_size N] [--max_num_tokens N]
        [--kv_cache_free_gpu_memory_fraction 0.9] [--max_kv_cache_tokens N]
        [--enable_prefix_caching] [--max_queue 4096] [--served_model_name NAME]
        [--stream_interval 1] [--single_process]

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. Requests run through the inflight-batching scheduler (``LLMEngine``) on one
engine thread; tokens stream back as server-sent events. The HTTP server runs in a process of
its own (llama_engine/server/remote.py) unless ``--single_process``. On a machine without a
GPU it runs on the CPU, e.g. with the quickstart's engine:

    python serve.py --engine_dir engines/smollm2_float32 --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2_float32", "messages": [{"role": "user", "content": "Hi"}]}'
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

from llama_engine import cli
from llama_engine import options as runtime_options
from llama_engine.cli import DTYPE_CHOICES, parse_dtype, positive_int, resolve_device, run_main


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine_dir", required=True)
    p.add_argument("--tokenizer_dir", default=None, help="default: the engine dir's copy")
    p.add_argument("--served_model_name", default=None,
                   help="the model name clients send (default: the engine dir's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=positive_int, default=None,
                   help="default: the engine's")
    p.add_argument("--max_num_tokens", type=positive_int, default=None,
                   help="token budget per step (default: the engine's, else 8192)")
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=cli.unit_interval, default=0.9)
    p.add_argument("--max_kv_cache_tokens", type=positive_int, default=None,
                   help="KV cache size cap (the size on the CPU; default: batch x max_seq_len)")
    p.add_argument("--scheduler_policy", default="max_utilization",
                   choices=("max_utilization", "guaranteed_no_evict"))
    cli.add_prefix_caching_arg(p)
    p.add_argument("--max_queue", type=positive_int, default=4096,
                   help="requests outstanding beyond this are answered 503")
    p.add_argument("--stream_interval", type=positive_int, default=1,
                   help="stream a request's tokens every N engine steps (its first token and "
                        "its end at once): less HTTP work per token at large batches")
    p.add_argument("--single_process", action="store_true",
                   help="run the HTTP server in the engine's process (default: a process of "
                        "its own, so that HTTP work never holds the engine's interpreter lock)")
    p.add_argument("--no_cuda_graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="override the engine's float dtype")
    p.add_argument("--log_level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    runtime_options.add_arguments(p)
    return p


def _main(args) -> int:
    try:
        import uvicorn

        from llama_engine.server import build_server, start_http_process
    except ImportError as e:
        raise cli.ConfigError(f"serve.py needs {e.name}: pip install -r requirements.txt")
    from llama_engine.serving import LLMEngine
    from llama_engine.tokenizer import load_tokenizer

    if not 0 < args.port < 65536:
        raise cli.ConfigError(f"--port must be in 1..65535, got {args.port}")
    cli.check_engine_dir(args.engine_dir)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    tokenizer = load_tokenizer(args.tokenizer_dir or args.engine_dir)
    options = runtime_options.from_args(args, cuda_graphs=not args.no_cuda_graphs)
    llm = LLMEngine(args.engine_dir, max_batch_size=args.max_batch_size,
                    max_num_tokens=args.max_num_tokens,
                    kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction,
                    max_kv_cache_tokens=args.max_kv_cache_tokens, device=device, dtype=dtype,
                    scheduler_policy=args.scheduler_policy, options=options,
                    enable_prefix_caching=args.enable_prefix_caching)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.engine_dir))
    logging.basicConfig(level=args.log_level.upper())
    if args.single_process:
        app, loop = build_server(llm, tokenizer, name, max_queue=args.max_queue,
                                 stream_interval=args.stream_interval)
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({device})", flush=True)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        finally:
            loop.stop()
        return 0
    tokenizer_source = (load_tokenizer, (args.tokenizer_dir or args.engine_dir,))
    http, loop = start_http_process(llm, tokenizer_source, name, host=args.host,
                                    port=args.port, max_queue=args.max_queue,
                                    stream_interval=args.stream_interval,
                                    log_level=args.log_level)
    print(f"serving {name!r} on {http.url}/v1 ({device}; HTTP in process {http.proc.pid})",
          flush=True)
    try:
        while http.alive and loop.alive:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C: still a clean stop
        http.close()
        loop.stop()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
