"""Build an engine: HF / Meta / GGUF / TensorRT-LLM checkpoint / nothing (random) -> engine dir.

Mirrors TensorRT-LLM's examples/llama/build.py flags. Every source goes through the same
checkpoint representation (llama_engine/checkpoint.py): HF-named float tensors -> unified
checkpoint tensors -> quantized as asked -> our engine directory, or, with
``--backend tensorrt_llm``, a TensorRT-LLM unified checkpoint and (where TensorRT-LLM is
installed) a TensorRT engine.

    python build.py --model_dir ./llama-7b-hf --dtype float16 --output_dir ./engines/fp16
    python build.py --model_config llama-7b --use_weight_only --weight_only_precision int4 \
        --output_dir ./engines/int4          # random weights, for speed measurements
    python build.py --model_config llama-13b --world_size 2 --tp_size 2 --output_dir ./engines/tp2
    torchrun --nproc_per_node 2 run.py --engine_dir ./engines/tp2 --max_output_len 50
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from llama_engine.config import DTYPES, BuildConfig, ConfigError, QuantConfig
from llama_engine import outdir
from llama_engine import cli, cli_compat
from llama_engine.cli import run_main


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_flags(p, args)
    return args


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=cli.DefaultsHelpFormatter)
    src = p.add_argument_group("source (at most one; none = random weights)")
    src.add_argument("--model_dir", help="Hugging Face LLaMA directory")
    src.add_argument("--meta_ckpt_dir", help="Meta checkpoint dir (params.json + consolidated.*.pth)")
    src.add_argument("--gguf_file", help="GGUF file (llama.cpp), read through transformers")
    src.add_argument("--ckpt_dir", "--checkpoint_dir", dest="ckpt_dir",
                     help="TensorRT-LLM unified checkpoint (e.g. from convert_checkpoint.py "
                     "or hf_llama_convert.py, with SmoothQuant / INT8 KV scales)")
    src.add_argument("--model_config", default="llama-7b",
                     help="preset (llama-7b, llama-13b, tiny) or config.json for random weights")
    src.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: the checkpoint's dtype with --ckpt_dir, else float16 where "
                        "a CUDA GPU is present (and for --backend tensorrt_llm), float32 on a "
                        "CPU-only machine; float64 is for exactness tests on the CPU")
    p.add_argument("--output_dir", default="engine_outputs",
                   help="a new directory, or one holding an engine/checkpoint this project "
                        "wrote (replaced atomically once the build is complete)")
    p.add_argument("--force", action="store_true",
                   help="replace --output_dir even when it holds something else (never a "
                        "source of the build or the current directory)")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--max_input_len", type=int, default=2048)
    p.add_argument("--max_output_len", type=int, default=512)
    p.add_argument("--max_seq_len", "--max_decoder_seq_len", dest="max_seq_len", type=int,
                   default=None, help="trtllm-build's limit: sets --max_output_len to "
                   "max_seq_len - max_input_len")
    p.add_argument("--dry_run", action="store_true",
                   help="check the flags and the output directory, build nothing")
    cli_compat.add_log_level(p)
    q = p.add_argument_group("quantization")
    q.add_argument("--use_weight_only", action="store_true")
    q.add_argument("--weight_only_precision", default="int8",
                   choices=("int8", "int4", "int4_awq", "int4_gptq"),
                   help="int4_awq / int4_gptq: TensorRT-LLM's W4A16_AWQ / W4A16_GPTQ layouts; "
                        "from random weights speed-only (AWQ calibration: hf_llama_convert.py)")
    q.add_argument("--group_size", type=int, default=None,
                   help="int4 group size (128 default; 64, 32; 0 = per channel); int8: 32, 64 "
                        "or 128 for group-wise scales and zeros (W8A16_GPTQ)")
    # -- int4 formats (issue 18): one block --
    q.add_argument("--has_zero_point", action="store_true",
                   help="int4 / int4_awq with zero points (asymmetric; TensorRT-LLM's "
                        "QuantConfig.has_zero_point); --group_size 0 = per channel")
    q.add_argument("--keep_gguf_quantization", action="store_true",
                   help="with --gguf_file: keep its Q4_0 / Q4_1 linears as they are (int4 "
                        "group 32 with zeros) instead of dequantizing them")
    # -- end int4 formats --
    q.add_argument("--use_smooth_quant", action="store_true",
                   help="W8A8 SmoothQuant; needs --ckpt_dir from hf_llama_convert.py -sq "
                        "(random weights: synthetic calibration, speed-only)")
    q.add_argument("--per_token", action="store_true", help="SmoothQuant: dynamic per-token "
                   "activation scales")
    q.add_argument("--per_channel", action="store_true", help="SmoothQuant: per-channel "
                   "weight scales")
    q.add_argument("--int8_kv_cache", action="store_true",
                   help="INT8 KV cache; needs calibrated scales (--ckpt_dir from "
                        "hf_llama_convert.py --calibrate-kv-cache; random weights: synthetic)")
    q.add_argument("--fp8_kv_cache", action="store_true",
                   help="FP8 (E4M3) KV cache, TensorRT-LLM v0.5's name; calibrated scales as "
                        "--int8_kv_cache (a checkpoint's INT8 scales are rescaled, max/448); "
                        "needs compute capability >= 8.9 on CUDA")
    q.add_argument("--enable_fp8", action="store_true",
                   help="FP8 E4M3 weights and activations (TensorRT-LLM's FP8; Ada/Hopper GPUs; "
                        "static activation scales from a calibrated --ckpt_dir, random "
                        "weights: synthetic calibration, speed-only)")
    q.add_argument("--fp8_per_channel", action="store_true",
                   help="FP8: one weight scale per output channel (default: per tensor)")
    q.add_argument("--fp8_dynamic_act", action="store_true",
                   help="FP8: activation scales per token at run time (default: static, "
                        "calibrated per tensor)")
    k = p.add_argument_group("kernels and batching (TensorRT-LLM flag names)")
    k.add_argument("--use_gpt_attention_plugin", "--gpt_attention_plugin",
                   dest="use_gpt_attention_plugin", nargs="?", const="auto", default="auto",
                   help="--backend tensorrt_llm only: TensorRT-LLM's attention plugin "
                        "(auto|triton|torch|disable; a dtype means auto)")
    k.add_argument("--use_gemm_plugin", "--gemm_plugin", dest="use_gemm_plugin", nargs="?",
                   const="auto", default="auto",
                   help="--backend tensorrt_llm only: TensorRT-LLM's GEMM plugin "
                        "(auto|triton|torch|disable; a dtype means auto)")
    k.add_argument("--use_inflight_batching", action="store_true")
    k.add_argument("--paged_kv_cache", nargs="?", const="enable", default=None,
                   choices=("enable", "disable"), help="paged KV cache (trtllm-build also "
                   "takes enable|disable)")
    k.add_argument("--kv_cache_type", default=None, choices=("continuous", "paged"),
                   help="trtllm-build's name: paged = --paged_kv_cache")
    k.add_argument("--tokens_per_block", type=int, default=64)
    k.add_argument("--max_num_tokens", type=int, default=None)
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="pytorch", choices=("pytorch", "tensorrt_llm"))
    b.add_argument("--checkpoint_only", action="store_true",
                   help="tensorrt_llm backend: write the unified checkpoint only")
    b.add_argument("--world_size", type=int, default=None,
                   help="ranks (= --tp_size; default 1); run with torchrun --nproc_per_node N")
    b.add_argument("--use_parallel_embedding", action="store_true",
                   help="with --tp_size > 1: keep the embedding split by vocabulary (an "
                        "all-reduce per step) instead of a whole table on every rank")
    b.add_argument("--tp_size", type=int, default=None, help="tensor-parallel ranks (default "
                   "--world_size): one rank{r}.safetensors each")
    p.add_argument("--device", default=None, help="device for quantization/calibration work")
    add_trtllm_build_flags(p)
    return p


def add_trtllm_build_flags(p) -> None:
    """Flags of TensorRT-LLM's v0.5 build.py and of trtllm-build that tune TensorRT itself
    (accepted, no effect) or ask for what we lack (refused); docs/flags.md lists them."""
    g = p.add_argument_group("other TensorRT-LLM build flags")
    trt_only = "tunes TensorRT's engine builder; our engine has no TensorRT build step"
    for name in ("--timing_cache", "--input_timing_cache", "--output_timing_cache",
                 "--builder_opt", "--strongly_typed", "--profiling_verbosity", "--strip_plan",
                 "--fast_build", "--opt_num_tokens", "--monitor_memory", "--workers",
                 "--parallel_build", "--gpus_per_node"):
        cli_compat.no_effect(g, name, why=trt_only)
    fixed = "our kernels are fixed (Triton/PyTorch): no plugin choice"
    for name in ("--use_rmsnorm_plugin", "--bert_attention_plugin", "--gemm_swiglu_plugin",
                 "--fp8_rowwise_gemm_plugin", "--nccl_plugin", "--moe_plugin",
                 "--mamba_conv1d_plugin", "--low_latency_gemm_plugin",
                 "--low_latency_gemm_swiglu_plugin", "--gemm_allreduce_plugin",
                 "--context_fmha", "--enable_context_fmha", "--enable_context_fmha_fp32_acc",
                 "--bert_context_fmha_fp32_acc", "--remove_input_padding",
                 "--norm_quant_fusion", "--reduce_fusion", "--user_buffer",
                 "--use_paged_context_fmha", "--use_fp8_context_fmha", "--fuse_fp4_quant",
                 "--multiple_profiles", "--paged_state", "--use_fused_mlp",
                 "--pp_reduce_scatter", "--use_custom_all_reduce", "--manage_weights"):
        cli_compat.no_effect(g, name, why=fixed)
    logits = "logits are float32 and available whole (Engine.forward_logits)"
    for name in ("--logits_dtype", "--gather_context_logits", "--gather_generation_logits",
                 "--gather_all_token_logits"):
        cli_compat.no_effect(g, name, why=logits)
    cli_compat.no_effect(g, "--speculative_decoding_mode", why="chosen at run time here "
                         "(run.py --speculative_decoding_mode)")
    cli_compat.no_effect(g, "--max_draft_len", why="chosen at run time here (run.py)")
    g.add_argument("--pp_size", type=int, default=1, action=cli_compat.OnlyValues,
                   allowed=(1,), why="no pipeline parallelism (use --tp_size)",
                   help="1 (no pipeline parallelism)")
    g.add_argument("--max_beam_width", type=cli.positive_int, default=1,
                   help="accepted: beams are rows of the batch here, so size "
                        "--max_batch_size for prompts x beams")
    g.add_argument("--embedding_sharding_dim", type=int, default=0,
                   action=cli_compat.OnlyValues, allowed=(0,), why="the parallel embedding "
                   "is split by vocabulary (dimension 0)", help="0 (by vocabulary)")
    for name, why in (("--ft_model_dir", "no FasterTransformer binaries; use --model_dir"),
                      ("--quant_ckpt_path", "no AWQ/GPTQ checkpoints; quantize here with "
                       "--use_weight_only"),
                      ("--per_group", "no AWQ/GPTQ group-wise weights; --group_size sets "
                       "our int4 groups"),
                      ("--quantized_fp8_model_path", "no FP8"),
                      ("--rotary_scaling", "no RoPE scaling"),
                      ("--visualize", "no network export"),
                      ("--visualize_network", "no network export"),
                      ("--enable_debug_output", "no debug tensors"),
                      ("--build_config", "give the limits as flags"),
                      ("--model_cls_file", "LLaMA only"), ("--model_cls_name", "LLaMA only"),
                      ("--max_encoder_input_len", "decoder-only models"),
                      ("--max_prompt_embedding_table_size", "no prompt tuning"),
                      ("--max_multimodal_len", "no multimodal input"),
                      ("--weight_sparsity", "no sparse weights"),
                      ("--weight_streaming", "all weights stay on the device"),
                      ("--lora_dir", "no LoRA"), ("--lora_ckpt_source", "no LoRA"),
                      ("--lora_target_modules", "no LoRA"), ("--max_lora_rank", "no LoRA"),
                      ("--lora_plugin", "no LoRA"), ("--dora_plugin", "no LoRA"),
                      ("--streamingllm", "no attention sinks")):
        cli_compat.refuse(g, name, why=why)
    preset = ("random-weight model sizes are presets or a config.json here: "
              "--model_config llama-7b|llama-13b|tiny|config.json")
    for name in ("--vocab_size", "--n_layer", "--n_positions", "--n_embd", "--n_head",
                 "--n_kv_head", "--multiple_of", "--ffn_dim_multiplier", "--inter_size",
                 "--hidden_act", "--rms_norm_eps", "--rotary_base"):
        cli_compat.refuse(g, name, why=preset)


def check_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Flag combinations that make no sense, rejected in one place."""
    a.paged_kv_cache = a.paged_kv_cache == "enable" or a.kv_cache_type == "paged"
    if a.max_seq_len is not None:
        if a.max_seq_len <= a.max_input_len:
            p.error(f"--max_seq_len {a.max_seq_len} must exceed --max_input_len "
                    f"{a.max_input_len}")
        a.max_output_len = a.max_seq_len - a.max_input_len
    sources = [x for x in ("model_dir", "meta_ckpt_dir", "gguf_file", "ckpt_dir") if getattr(a, x)]
    if len(sources) > 1:
        p.error("give at most one of --" + ", --".join(sources))
    # Either flag alone sets both (world_size = tp_size: no pipeline parallelism).
    a.tp_size = a.tp_size or a.world_size or 1
    a.world_size = a.world_size or a.tp_size
    if a.tp_size < 1 or a.world_size < 1:
        p.error("--world_size and --tp_size must be at least 1")
    if a.world_size != a.tp_size:
        p.error(f"--world_size {a.world_size} must equal --tp_size {a.tp_size} (tensor "
                "parallelism only; no pipeline parallelism)")
    if a.checkpoint_only and a.backend != "tensorrt_llm":
        p.error("--checkpoint_only applies to --backend tensorrt_llm")
    if a.use_inflight_batching and not a.paged_kv_cache:
        a.paged_kv_cache = True  # as TensorRT-LLM: inflight batching implies the paged cache
    for name in ("use_gpt_attention_plugin", "use_gemm_plugin"):
        v = getattr(a, name)
        if v in ("float16", "bfloat16", "float32"):
            setattr(a, name, "auto")
        elif v not in ("auto", "triton", "torch", "disable"):
            p.error(f"--{name} takes auto|triton|torch or a dtype, got {v!r}")
    if a.dtype is None and not a.ckpt_dir:
        a.dtype = default_build_dtype(a.backend)


def default_build_dtype(backend: str) -> str:
    """float16 for GPUs; float32 on a machine without one, where float16 runs ~5x slower
    than float32 in PyTorch's CPU kernels (and rounds differently from HF's fp32 baseline)."""
    import torch

    if backend == "tensorrt_llm" or torch.cuda.is_available():
        return "float16"
    print("build: no CUDA GPU here, so the engine is float32 (a float16 engine runs ~5x "
          "slower on a CPU); pass --dtype float16 to build one for a GPU anyway")
    return "float32"


def load_float_tensors(a: argparse.Namespace):
    """-> (ModelArgs, unified float tensors, source info)."""
    import weight
    from llama_engine.builder import cast_float
    from llama_engine.checkpoint import hf_to_unified
    model_args, sd, info = weight.load_source(
        model_dir=a.model_dir, meta_ckpt_dir=a.meta_ckpt_dir, gguf_file=a.gguf_file,
        model_config=None if (a.model_dir or a.meta_ckpt_dir or a.gguf_file) else a.model_config,
        dtype=a.dtype, seed=a.seed)
    return model_args, hf_to_unified(cast_float(sd, a.dtype), model_args), info


def load_gguf_kept(a: argparse.Namespace):
    """--gguf_file F --keep_gguf_quantization -> (ModelArgs, QuantConfig, unified tensors with
    the file's Q4_0 / Q4_1 linears as int4 with zeros, source info)."""
    import torch
    import weight
    from llama_engine.builder import cast_float
    from llama_engine.formats.gguf_quant import load_gguf_linears
    if not a.gguf_file:
        raise ConfigError("--keep_gguf_quantization applies to --gguf_file")
    model_args, sd, info = weight.load_source(gguf_file=a.gguf_file)
    quant, tensors = load_gguf_linears(a.gguf_file, model_args, cast_float(sd, a.dtype),
                                       getattr(torch, a.dtype))
    info["quantization"] = "GGUF Q4 blocks kept (int4 group 32 with zeros)"
    return model_args, quant, tensors, info


def _check_int4_source(a: argparse.Namespace, random_source: bool) -> None:
    """AWQ needs calibration and GPTQ its own checkpoint: from real float weights, say where."""
    if not a.use_weight_only or random_source:
        return
    if a.weight_only_precision == "int4_awq":
        raise ConfigError("--weight_only_precision int4_awq needs AWQ calibration: run "
                          "hf_llama_convert.py -i MODEL -o CKPT_DIR --use_weight_only "
                          "--weight_only_precision int4_awq, then build --ckpt_dir CKPT_DIR")
    if a.weight_only_precision == "int4_gptq":
        raise ConfigError("--weight_only_precision int4_gptq: GPTQ itself is not run here; "
                          "convert a GPTQ checkpoint (hf_llama_convert.py -i GPTQ_DIR -o "
                          "CKPT_DIR) and build --ckpt_dir CKPT_DIR")


def resolve_quant(a: argparse.Namespace, model_args, ckpt_quant: QuantConfig,
                  has_act_stats: bool, has_kv_stats: bool) -> QuantConfig:
    """The engine's QuantConfig from the flags and what the checkpoint already holds.

    A quantized checkpoint keeps its weights (flags, if given, must agree with them); its
    KV scales are used when the checkpoint says so or ``--int8_kv_cache`` / ``--fp8_kv_cache``
    asks (the flag picks the format; without one the checkpoint's stays)."""
    from llama_engine import quant as q
    quantized = bool(ckpt_quant.quant_algo or ckpt_quant.kv_cache_dtype)
    wanted = q.validate_quant_flags(
        model_args, use_weight_only=a.use_weight_only,
        weight_only_precision=a.weight_only_precision, group_size=a.group_size,
        use_smooth_quant=a.use_smooth_quant, per_token=a.per_token, per_channel=a.per_channel,
        int8_kv_cache=a.int8_kv_cache, has_act_stats=has_act_stats, has_kv_stats=has_kv_stats,
        ckpt_quant=ckpt_quant if quantized else None, has_zero_point=a.has_zero_point,
        fp8_kv_cache=a.fp8_kv_cache, fp8=fp8_flags(a))
    if ckpt_quant.kv_cache_dtype and not wanted.kv_cache_dtype:
        wanted.kv_cache_quant_algo = ckpt_quant.kv_cache_quant_algo
    return wanted


def fp8_flags(a: argparse.Namespace):
    """(per_channel, dynamic_act) when --enable_fp8, else None (the FP8 options need it)."""
    if not a.enable_fp8:
        if a.fp8_per_channel or a.fp8_dynamic_act:
            raise ConfigError("--fp8_per_channel / --fp8_dynamic_act need --enable_fp8")
        return None
    return (a.fp8_per_channel, a.fp8_dynamic_act)


def sources_of(a: argparse.Namespace) -> list:
    """What the build reads: no output may replace these or a folder holding them."""
    return [a.model_dir, a.meta_ckpt_dir, a.gguf_file, a.ckpt_dir]


def output_dirs(a: argparse.Namespace) -> list:
    """(path, flag) of every directory the build writes, checked before any work."""
    if a.backend != "tensorrt_llm" or a.checkpoint_only:
        return [(a.output_dir, "--output_dir")]
    return [(trtllm_ckpt_dir(a), "--output_dir (its _ckpt sibling)"),
            (a.output_dir, "--output_dir")]


def trtllm_ckpt_dir(a: argparse.Namespace) -> str:
    return a.output_dir if a.checkpoint_only else a.output_dir.rstrip("/\\") + "_ckpt"


def build(a: argparse.Namespace) -> int:
    from llama_engine import builder, checkpoint as ckpt, quant as q
    cli_compat.apply_log_level(a.log_level)
    elapsed = builder.timed()
    for path, flag in output_dirs(a):  # fail before the slow part
        outdir.check_output_dir(path, sources_of(a), a.force, flag)
    if a.dry_run:
        print("build: --dry_run: flags and output directory checked; nothing built")
        return 0
    random_source = not (a.ckpt_dir or a.model_dir or a.meta_ckpt_dir or a.gguf_file)
    if a.ckpt_dir:
        model_args, ckpt_quant, ckpt_dtype, tensors = ckpt.read_checkpoint(a.ckpt_dir)
        a.dtype = a.dtype or ckpt_dtype
        if ckpt_dtype != a.dtype:
            raise ConfigError(f"checkpoint {a.ckpt_dir} is {ckpt_dtype}; build it with "
                              f"--dtype {ckpt_dtype}")
        from llama_engine.tokenizer import find_tokenizer_source
        info = {"kind": "checkpoint", "path": os.path.abspath(a.ckpt_dir),
                "tokenizer_dir": find_tokenizer_source(a.ckpt_dir)}
    elif a.keep_gguf_quantization:
        model_args, ckpt_quant, tensors, info = load_gguf_kept(a)
    else:
        model_args, tensors, info = load_float_tensors(a)
        ckpt_quant = QuantConfig()
        _check_int4_source(a, random_source)

    # Scales that calibration must supply: from the checkpoint, or (random weights only)
    # from synthetic prompts, labelled speed-only. Never made up.
    has_kv = bool(ckpt_quant.kv_cache_dtype)
    quant = resolve_quant(a, model_args, ckpt_quant, has_act_stats=random_source,
                          has_kv_stats=has_kv or random_source)
    if has_kv and quant.kv_cache_dtype and quant.kv_cache_quant_algo != \
            ckpt_quant.kv_cache_quant_algo:  # INT8 scales -> FP8 (or back): max/qmax again
        from llama_engine.quant_kv import rescale_kv_scales
        tensors = rescale_kv_scales(tensors, ckpt_quant.kv_cache_quant_algo,
                                    quant.kv_cache_quant_algo)
    if a.tp_size > 1:
        from llama_engine import parallel
        parallel.check_tp(model_args, quant, a.tp_size)  # before any quantization work
    if quant.quant_algo != ckpt_quant.quant_algo or (quant.kv_cache_dtype and not has_kv):
        calib = {}
        if random_source and (quant.is_smooth_quant or (quant.kv_cache_dtype and not has_kv)
                              or (quant.is_fp8 and not quant.fp8_dynamic_act)):
            import smoothquant
            print("calibrating on synthetic prompts (random weights: speed-only engine)")
            calib = smoothquant.synthetic_calibration(model_args, tensors, device=a.device)
            info["calibration"] = "synthetic (speed-only)"
        if random_source and quant.is_fp8 and quant.fp8_dynamic_act:
            info["calibration"] = "none: per-token activation scales (speed-only)"
        if random_source and quant.weight_only == "int4" and quant.quant_algo != "W4A16":
            info["calibration"] = "none: round to nearest in the int4 layout (speed-only)"
        tensors, report = q.quantize_checkpoint(tensors, model_args, quant, **calib)
        if report:
            print(q.format_report(report))

    build_cfg = BuildConfig(
        max_batch_size=a.max_batch_size, max_input_len=a.max_input_len,
        max_output_len=a.max_output_len, use_parallel_embedding=a.use_parallel_embedding,
        use_inflight_batching=a.use_inflight_batching, paged_kv_cache=a.paged_kv_cache,
        tokens_per_block=a.tokens_per_block, max_num_tokens=a.max_num_tokens)
    tok_dir = info.get("tokenizer_dir")

    if a.backend == "tensorrt_llm":
        return build_trtllm(a, model_args, quant, tensors, build_cfg, tok_dir)

    config = builder.engine_from_tensors(model_args, quant, a.dtype, tensors, build_cfg,
                                         source={k: v for k, v in info.items() if v is not None},
                                         world_size=a.tp_size)
    builder.write_engine(a.output_dir, config, tensors, tok_dir, sources_of(a), a.force)
    print(builder.describe(config, tensors, elapsed()))
    print(f"engine written to {os.path.abspath(a.output_dir)}"
          + ("" if tok_dir else " (no tokenizer found beside the checkpoint)"))
    return 0


def build_trtllm(a, model_args, quant, tensors, build_cfg, tok_dir) -> int:
    from llama_engine import checkpoint as ckpt, trtllm
    ckpt_dir = trtllm_ckpt_dir(a)
    flag, ckpt_flag = output_dirs(a)[-1][1], output_dirs(a)[0][1]
    # A TensorRT-LLM export: only TensorRT-LLM's tensors (no per-channel KV scale extension).
    ckpt.write_checkpoint(ckpt_dir, model_args, a.dtype, quant, tensors, tokenizer_src=tok_dir,
                          world_size=a.tp_size, extensions=False, sources=sources_of(a),
                          force=a.force, flag=ckpt_flag)
    print(f"TensorRT-LLM unified checkpoint written to {os.path.abspath(ckpt_dir)}")
    if a.checkpoint_only:
        return 0
    flags = {"max_batch_size": build_cfg.max_batch_size, "max_input_len": build_cfg.max_input_len,
             "max_seq_len": build_cfg.max_seq_len, "gemm_plugin": a.use_gemm_plugin,
             "gpt_attention_plugin": a.use_gpt_attention_plugin, "dtype": a.dtype,
             "paged_kv_cache": build_cfg.paged_kv_cache,
             "use_inflight_batching": build_cfg.use_inflight_batching,
             "tokens_per_block": build_cfg.tokens_per_block,
             "max_num_tokens": build_cfg.max_num_tokens}
    outdir.check_output_dir(a.output_dir, sources_of(a) + [ckpt_dir], a.force, flag)
    try:
        trtllm.build_trtllm_engine(ckpt_dir, a.output_dir, flags)
    except trtllm.TrtllmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"TensorRT engine written to {os.path.abspath(a.output_dir)}")
    return 0


def main(argv: Optional[list] = None) -> int:
    a = parse_args(argv)
    with outdir.signals_raise():  # SIGTERM/SIGINT: the staging directory is removed
        return run_main(lambda: build(a))


if __name__ == "__main__":
    sys.exit(main())
