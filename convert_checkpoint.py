"""Convert a LLaMA checkpoint to TensorRT-LLM's unified checkpoint with today's converter flags.

The command line of TensorRT-LLM's LLaMA ``convert_checkpoint.py``; the work is
``hf_llama_convert.convert`` (one loader, calibration and writer for both scripts), so the
directory is the same and feeds ``build.py --checkpoint_dir`` (or ``trtllm-build``):

    python convert_checkpoint.py --model_dir ./llama-7b-hf --output_dir ./tllm_ckpt --dtype float16
    python convert_checkpoint.py --model_dir ./llama-7b-hf --output_dir ./ckpt_sq \
        --smoothquant 0.5 --per_token --per_channel
    python convert_checkpoint.py --model_dir ./llama-7b-hf --output_dir ./ckpt_wo \
        --use_weight_only --weight_only_precision int4
    python convert_checkpoint.py --model_dir model.gguf --output_dir ./ckpt   # a GGUF file too

Flags for features we lack (FP8, NVFP4, GPTQ/AWQ, QServe, MoE, pipeline parallelism) are
refused in one line; docs/flags.md lists every flag.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from llama_engine import cli, cli_compat

import hf_llama_convert


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None, help="Hugging Face folder or a .gguf file")
    p.add_argument("--meta_ckpt_dir", default=None,
                   help="Meta checkpoint folder (params.json + consolidated.*.pth)")
    p.add_argument("--output_dir", default="tllm_checkpoint",
                   help="checkpoint folder to write (default tllm_checkpoint)")
    p.add_argument("--force", action="store_true",
                   help="replace --output_dir even when it holds something else")
    p.add_argument("--tp_size", type=cli.positive_int, default=1,
                   help="tensor-parallel ranks: one rank{r}.safetensors each")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="auto: the source's dtype, float32 sources become float16 (as "
                        "TensorRT-LLM does)")
    p.add_argument("--use_weight_only", action="store_true")
    p.add_argument("--weight_only_precision", default="int8", nargs="?", const="int8",
                   action=cli_compat.OnlyValues, allowed=("int8", "int4"),
                   why="int8 and int4 only (no GPTQ/AWQ)", help="int8 | int4")
    p.add_argument("--group_size", type=int, default=None,
                   help="int4 group size (default 128; 0 = per channel)")
    p.add_argument("--smoothquant", "-sq", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant migration strength in [0, 1]")
    p.add_argument("--per_channel", action="store_true")
    p.add_argument("--per_token", action="store_true")
    p.add_argument("--int8_kv_cache", action="store_true", help="calibrated INT8 KV cache")
    p.add_argument("--calib_dataset", default=None,
                   help="calibration articles: a file or dataset folder, 'hub' (also "
                        "TensorRT-LLM's default name ccdv/cnn_dailymail) or 'synthetic'; "
                        f"default: {hf_llama_convert.DEFAULT_DATASET} (relative to the "
                        "repository) when present, else the hub")
    p.add_argument("--calib_size", type=cli.positive_int, default=512)
    p.add_argument("--calib_max_seq_length", type=cli.positive_int, default=512,
                   help="calibration prompt length in tokens")
    p.add_argument("--load_model_on_cpu", action="store_true",
                   help="load and calibrate on the CPU")
    p.add_argument("--device", default=None, help="calibration device (default: cuda if present)")
    cli_compat.add_log_level(p)
    g = p.add_argument_group("other flags of TensorRT-LLM's convert_checkpoint.py")
    cli_compat.no_effect(g, "--disable_weight_only_quant_plugin", nargs=0,
                         why="no plugins: our int8/int4 kernels are Triton")
    cli_compat.no_effect(g, "--load_by_shard", nargs=0, why="safetensors are read lazily")
    cli_compat.no_effect(g, "--workers", why="conversion runs in one process")
    cli_compat.no_effect(g, "--use_parallel_embedding", nargs=0,
                         why="an engine choice here: build.py --use_parallel_embedding")
    cli_compat.no_effect(g, "--remove_duplicated_kv_heads", nargs=0,
                         why="LLaMA-3.1-405B only")
    from_config = "the model's sizes are read from its config"
    for name in ("--vocab_size", "--n_positions", "--n_layer", "--n_head", "--n_kv_head",
                 "--n_embd", "--inter_size", "--multiple_of", "--ffn_dim_multiplier",
                 "--rms_norm_eps", "--hidden_act", "--rotary_base"):
        cli_compat.no_effect(g, name, why=from_config)
    for name, allowed, why in (("--pp_size", (1,), "no pipeline parallelism"),
                               ("--cp_size", (1,), "no context parallelism"),
                               ("--moe_tp_size", (-1, 1), "no MoE"),
                               ("--moe_ep_size", (-1, 1), "no MoE"),
                               ("--moe_num_experts", (0,), "no MoE"),
                               ("--moe_top_k", (0,), "no MoE"),
                               ("--embedding_sharding_dim", (0,), "split by vocabulary")):
        g.add_argument(name, type=int, default=allowed[0], action=cli_compat.OnlyValues,
                       allowed=allowed, why=why, help=f"{allowed[0]} only ({why})")
    p.add_argument("--use_fp8", action="store_true",
                   help="FP8 E4M3 weights (per tensor) and static activation scales calibrated "
                        "on --calib_dataset (quant_algo FP8)")
    p.add_argument("--use_fp8_rowwise", action="store_true",
                   help="FP8 with per-channel weight and per-token activation scales "
                        "(FP8_PER_CHANNEL_PER_TOKEN)")
    for name, why in (("--use_qserve", "no QServe W4A8"), ("--fp8_kv_cache", "no FP8"),
                      ("--use_nvfp4", "no NVFP4"),
                      ("--use_meta_fp8_rowwise_recipe", "no FP8"),
                      ("--quant_ckpt_path", "no GPTQ/AWQ checkpoints"),
                      ("--per_group", "no GPTQ/AWQ group-wise weights (--group_size sets "
                                      "our int4 groups)"),
                      ("--moe_renorm_mode", "no MoE"),
                      ("--save_config_only", "the config is written with the weights")):
        cli_compat.refuse(g, name, why=why)
    return p


def to_convert_namespace(a: argparse.Namespace) -> argparse.Namespace:
    """These flags in hf_llama_convert's terms."""
    if bool(a.model_dir) == bool(a.meta_ckpt_dir):
        cli.die("give one of --model_dir and --meta_ckpt_dir")
    calib = a.calib_dataset
    if calib in ("ccdv/cnn_dailymail", "cnn_dailymail"):
        calib = "hub"
    return argparse.Namespace(
        in_file=a.model_dir or a.meta_ckpt_dir, out_dir=a.output_dir, force=a.force,
        smoothquant=a.smoothquant, calibrate_kv_cache=a.int8_kv_cache, kv_cache_dtype=None,
        per_token=a.per_token, per_channel=a.per_channel, use_weight_only=a.use_weight_only,
        weight_only_precision=a.weight_only_precision, group_size=a.group_size,
        calib_dataset=calib, calib_size=a.calib_size, max_input_length=a.calib_max_seq_length,
        use_chat_template=False, dtype=a.dtype,
        device="cpu" if a.load_model_on_cpu else a.device, calib_dtype=None, seed=0,
        no_progress=False, tp_size=a.tp_size, log_level=a.log_level,
        has_zero_point=False, awq_tokens_per_prompt=64, no_awq_clip=False, gptq=False,
        gptq_damp=0.01, no_gptq_act_order=False, no_gptq_fit_scales=False,
        qformat="fp8" if (a.use_fp8 or a.use_fp8_rowwise) else None,
        fp8_per_channel=a.use_fp8_rowwise, fp8_dynamic_act=a.use_fp8_rowwise)


def main(argv: Optional[list] = None) -> int:
    a = build_parser().parse_args(argv)
    return hf_llama_convert.run(to_convert_namespace(a))


if __name__ == "__main__":
    sys.exit(main())
