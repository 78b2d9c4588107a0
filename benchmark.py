"""Speed of our engine against Hugging Face on one GPU: latency grid, ablation, profile.

    python benchmark.py --model_config llama-7b --ablation            # the ablation table
    python benchmark.py --model_config llama-7b --ablation --only hf_eager,fp16
    python benchmark.py --engine_dir ./engines/fp16 --batch 1,16 --input_len 8 --output_len 50
    python benchmark.py --model_config llama-7b --profile --modes fp16,int4
    python benchmark.py --serving [--poisson_rates 8,16]             # inflight batching
    python benchmark.py --serving --http [--poisson_rates 8,16]      # the same over HTTP
    python benchmark.py --model_config llama-7b --speculative --modes fp16,int4  # verify steps
    python benchmark.py --gptfast                       # gpt-fast's design, same weights, 8/50
    python benchmark.py --prefill --modes fp16,int8,int4,int4_zp,sq,int8kv  # prefill graphs
    torchrun --nproc_per_node 2 benchmark.py --model_config llama-13b --section tp

Random weights with LLaMA-7B shapes are built in GPU memory (as TensorRT-LLM's builder does
without a checkpoint); every mode is quantized from the same fp16 weights. Decode tokens/s
exclude the prefill; end-to-end latency includes it. "% of floor" divides the bytes each mode
reads per decode step (weights, scales, lm_head, KV cache) by a read-bandwidth measurement made
in the same run. Results merge into ``--out_json`` so the table can be built in several GPU
calls (``--only``); ``--report`` writes the markdown table and the plot into ``assets/``.

This file parses and checks the flags and dispatches; the measurements live in benchmarks/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

from benchmarks import gptfast, http_load, latency, options, report, serving
from benchmarks import speculative as spec_bench
from benchmarks.modes import ABLATION, MODES
from benchmarks.weights import Weights
from llama_engine import parallel
from llama_engine import cli
from llama_engine.cli import add_prefix_caching_arg, run_main


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__)
    p.add_argument("--model_config", default="llama-7b")
    p.add_argument("--engine_dir", default=None)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--only", default=None, help="comma list of ablation rows to run")
    p.add_argument("--modes", default="fp16", help="modes for the grid/profile")
    p.add_argument("--batch", default="1")
    p.add_argument("--max_input_len", type=int, default=2048)
    p.add_argument("--input_len", default="8")
    p.add_argument("--output_len", default="50")
    p.add_argument("--profile", action="store_true")
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
    p.add_argument("--http", action="store_true",
                   help="with --serving: through serve.py's HTTP server with streaming clients "
                        "(benchmarks/http_load.py), against LLMEngine directly")
    p.add_argument("--http_parts", default="uniform,prefix,poisson",
                   help="with --serving --http: uniform (1000x128/128 HTTP vs direct), prefix "
                        "(500 requests sharing a 1024-token prefix, caching off vs on), poisson "
                        "(Poisson arrivals at 8,16,32,64/s unless --poisson_rates; the plot)")
    p.add_argument("--stream_interval", default="1",
                   help="with --http: serve.py's --stream_interval; a list (1,4) measures the "
                        "uniform part once per value against the one direct run")
    add_prefix_caching_arg(p)
    p.add_argument("--speculative", action="store_true",
                   help="batch 1: a decode step against verify steps of k+1 = 2..9 tokens "
                        "(CUDA graphs), with tokens/s projected from --spec_acceptance")
    p.add_argument("--spec_context", type=int, default=512,
                   help="with --speculative: tokens cached before the timed steps")
    p.add_argument("--spec_acceptance",
                   default="assets/spec_acceptance.json,assets/spec_acceptance_draft.json",
                   help="with --speculative: tools/spec_acceptance.py's JSON files (tokens/step)")
    p.add_argument("--spec_draft", default=spec_bench.DEFAULT_DRAFT,
                   help="with --speculative: MODE:ACCEPTANCE, the draft engine's cost (a mode "
                        "of --modes) and its acceptance entry in --spec_acceptance")
    p.add_argument("--spec_batch", type=cli.non_negative_int, default=32,
                   help="with --speculative: requests at once under inflight batching, "
                        "speculation off vs on (0: skip)")
    p.add_argument("--spec_output_len", type=cli.positive_int, default=128,
                   help="with --speculative: mean output tokens of those requests")
    p.add_argument("--gptfast", nargs="?", const=",".join(gptfast.MODES), default=None,
                   metavar="MODES",
                   help="gpt-fast's design (benchmarks/gptfast.py: static cache, compiled "
                        "decode) and our engine, each mode back to back on the same weights "
                        "and prompts, over --batch/--input_len/--output_len (default modes: "
                        "fp16,int8,int4)")
    p.add_argument("--gptfast_group", type=int, default=128, choices=gptfast.INT4_GROUPS,
                   help="with --gptfast: gpt-fast's int4 group size")
    p.add_argument("--gptfast_compile_prefill", action="store_true",
                   help="with --gptfast: compile gpt-fast's prefill too (its optional "
                        "--compile_prefill; off by default there)")
    p.add_argument("--prefill", action="store_true",
                   help="prefill latency per --modes at batch 1 x 8 and 64 x 128 tokens, CUDA "
                        "graphs on and off (and batch-1 end to end, 50 new tokens)")
    p.add_argument("--tp_allreduce", default=None, choices=options.TP_ALLREDUCE_CHOICES,
                   help="under torchrun: the all-reduce (default: the engine's, auto)")
    p.add_argument("--pdl", default=None, choices=tuple(options.PDL_CHOICES),
                   help="programmatic dependent launch (default: the engine's, auto)")
    return p


def csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",")]


def _bad_list(name: str, text: str, kind, allowed=None) -> Optional[str]:
    """Why ``text`` is not a comma list of ``kind`` (positive numbers, or among ``allowed``)."""
    try:
        values = csv(text, kind)
    except ValueError:
        return f"{name} takes a comma list of {kind.__name__}s, got {text!r}"
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        return f"{name}: unknown {', '.join(bad)} (one of {', '.join(allowed)})" if bad else None
    return f"{name} takes positive numbers, got {text!r}" if min(values) <= 0 else None


def validate(a, world: int) -> Optional[str]:
    """The first thing wrong with the flags, as a one-line message; None when they are fine."""
    if a.report:
        return None
    if a.device == "cuda" and not torch.cuda.is_available():
        return ("benchmark.py needs a CUDA GPU (--device cpu only dry-runs the flow on a tiny "
                "model)")
    if world > 1 and (a.ablation or a.memory or a.engine_dir or a.poisson_rates):
        return ("under torchrun benchmark.py runs the latency grid, --profile (rank 0 traced) "
                "and --serving (random weights); not --ablation, --memory, --engine_dir or "
                "--poisson_rates (arrivals by each rank's clock would diverge)")
    if a.speculative and (world > 1 or a.serving or a.ablation or a.engine_dir):
        return "--speculative runs alone, on one GPU, on random weights (--model_config)"
    if a.speculative and a.spec_draft.partition(":")[0] not in MODES:
        return (f"--spec_draft {a.spec_draft!r}: MODE:ACCEPTANCE with MODE one of "
                f"{', '.join(MODES)}")
    if a.gptfast and (world > 1 or a.serving or a.speculative or a.ablation or a.engine_dir
                      or a.profile or a.memory):
        return "--gptfast runs alone, on one GPU, on random weights (--model_config)"
    if (a.gptfast_compile_prefill or a.gptfast_group != 128) and not a.gptfast:
        return "--gptfast_group and --gptfast_compile_prefill go with --gptfast"
    if a.prefill and (world > 1 or a.serving or a.ablation or a.engine_dir or a.speculative):
        return "--prefill runs alone, on one GPU, on random weights (--model_config)"
    if a.serving and "," in a.modes:
        return "--serving runs one mode (--modes fp16|int8|int4|int8kv|...)"
    if (a.http or a.enable_prefix_caching) and not a.serving:
        return "--http and --enable_prefix_caching go with --serving"
    if a.http and world > 1:
        return "--http runs on one GPU"
    if a.only and not a.ablation:
        return "--only picks rows of --ablation"
    if a.memory and a.memory not in MODES:
        return f"--memory: unknown mode {a.memory} (one of {', '.join(MODES)})"
    checks = [("--batch", a.batch, int, None),
              ("--input_len", a.input_len, int, None), ("--output_len", a.output_len, int, None),
              ("--serving_parts", a.serving_parts, str, serving.PARTS),
              ("--http_parts", a.http_parts, str, http_load.PARTS),
              ("--stream_interval", a.stream_interval, int, None)]
    if not a.engine_dir:  # with an engine dir, --modes only names the rows
        checks.append(("--modes", a.modes, str, tuple(MODES)))
    if a.only:
        checks.append(("--only", a.only, str, tuple(ABLATION)))
    if a.gptfast:
        checks.append(("--gptfast", a.gptfast, str, gptfast.MODES))
    if a.poisson_rates:
        checks.append(("--poisson_rates", a.poisson_rates, float, None))
    for check in checks:
        err = _bad_list(*check)
        if err:
            return err
    return None


def save(a, new: dict) -> dict:
    """Merge ``new`` into --out_json; under tensor parallelism rank 0 alone reads and writes."""
    return report.merge_json(a.out_json, new) if parallel.get_rank() == 0 else new


def write_report(a, res: dict) -> None:
    if parallel.get_rank() == 0:
        report.write_report(res, a.assets)


def run_serving(a, meta: dict, engine_kw: dict) -> int:
    w = Weights(a.model_config, a.device, engine_kw=engine_kw)
    if a.http:
        r = http_load.run_http(w, set(csv(a.http_parts)), a.num_requests,
                               csv(a.poisson_rates, float) if a.poisson_rates else None,
                               save=lambda part: save(a, {"serving": part}),
                               stream_intervals=csv(a.stream_interval, int))
    elif a.poisson_rates:
        r = {"poisson": serving.run_serving_poisson(w, csv(a.poisson_rates, float),
                                                    a.num_requests, a.enable_prefix_caching)}
    else:
        r = serving.run_serving(w, a.num_requests, a.mixed_requests,
                                parts=set(csv(a.serving_parts)), mode=a.modes,
                                policy=a.scheduler_policy,
                                prefix_caching=a.enable_prefix_caching,
                                save=lambda part: save(a, {"serving": part}))
    write_report(a, save(a, {"meta": meta, "serving": r}))
    return 0


def run_memory(a, results: dict, engine_kw: dict) -> int:
    r = latency.measure_memory(a.model_config, a.memory, a.device, engine_kw)
    print(json.dumps(r), flush=True)
    results["memory"] = {a.memory: r}
    save(a, results)
    return 0


def run_gptfast(a, results: dict, engine_kw: dict) -> int:
    """gpt-fast's harness against our engine, mode by mode, into the "gptfast" section."""
    weights = Weights(a.model_config, a.device, engine_kw=engine_kw)
    results["meta"]["gptfast"] = {"int4_group": a.gptfast_group,
                                  "compile_prefill": a.gptfast_compile_prefill,
                                  "compiled": a.device == "cuda", "model": a.model_config}
    results["gptfast"] = gptfast.run_section(
        weights, csv(a.gptfast), csv(a.batch, int), csv(a.input_len, int),
        csv(a.output_len, int), a.gptfast_group, a.gptfast_compile_prefill,
        save=lambda rows: save(a, {"meta": results["meta"], "gptfast": rows}))
    write_report(a, save(a, results))
    return 0


def run_latency(a, results: dict, engine_kw: dict) -> int:
    """--ablation and/or the grid (timed, or --profile'd) into ``results``."""
    weights = None
    if a.ablation or not a.engine_dir:
        weights = Weights(a.model_config, a.device, engine_kw=engine_kw)
    if a.ablation:
        r = latency.run_ablation(weights, set(csv(a.only)) if a.only else None,
                                 a.max_input_len, lambda new: save(a, new))
        results["ablation"] = r["ablation"]
        results["meta"].update(r["meta"])
    if not a.ablation or a.profile:
        grid = latency.run_grid(weights, a.engine_dir, a.model_config, csv(a.modes),
                                csv(a.batch, int), csv(a.input_len, int),
                                csv(a.output_len, int), a.assets if a.profile else None,
                                a.device, engine_kw)
        results["profile" if a.profile else a.section] = grid
    write_report(a, save(a, results))
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    err = validate(a, world)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.report:
        with open(a.out_json) as f:
            report.write_report(json.load(f), a.assets)
        return 0
    engine_kw = options.engine_kwargs(a.tp_allreduce, a.pdl)
    if world > 1:
        # torchrun --nproc_per_node N benchmark.py ...: tensor parallelism over N GPUs (NCCL);
        # rank 0 prints and writes the results.
        parallel.init_from_env(a.device)
        parallel.quiet_non_main_ranks()
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (dry run)"
    results: dict = {"meta": {"gpu": gpu, "date": time.strftime("%Y-%m-%d"),
                              "torch": torch.__version__}}
    if a.serving:
        return run_serving(a, results["meta"], engine_kw)
    if a.speculative:
        results["speculative"] = spec_bench.run_speculative(
            a.model_config, csv(a.modes), a.device, engine_kw, a.spec_context,
            a.spec_acceptance, draft=a.spec_draft, batch=a.spec_batch,
            output_len=a.spec_output_len)
        save(a, results)
        return 0
    if a.memory:
        return run_memory(a, results, engine_kw)
    if a.gptfast:
        return run_gptfast(a, results, engine_kw)
    if a.prefill:
        w = Weights(a.model_config, a.device, engine_kw=engine_kw)
        results["prefill"] = latency.run_prefill(w, csv(a.modes),
                                                 lambda new: save(a, new))
        save(a, results)
        return 0
    return run_latency(a, results, engine_kw)


if __name__ == "__main__":
    sys.exit(run_main(main))  # a ConfigError is one line (error: ...), exit 2
