"""Convert a LLaMA checkpoint into TensorRT-LLM's unified checkpoint, calibrated when asked.

The command line of TensorRT-LLM's ``examples/llama/hf_llama_convert.py`` (``-i``, ``-o``,
``-sq ALPHA``, ``--calibrate-kv-cache``), writing the unified checkpoint format of its later
``convert_checkpoint.py`` (``config.json`` with ``quantization.quant_algo`` /
``kv_cache_quant_algo``, ``rank0.safetensors``; docs/design.md lists every tensor), so the
directory feeds both ``build.py --ckpt_dir`` and, on a machine that has it, ``trtllm-build``.

    python hf_llama_convert.py -i HF_DIR -o CKPT_DIR -sq 0.5 --per_token --per_channel
    python hf_llama_convert.py -i HF_DIR -o CKPT_DIR -sq auto --per_token --per_channel
    python hf_llama_convert.py -i HF_DIR -o CKPT_DIR --use_weight_only \
        --weight_only_precision int8_awq --group_size 64     # W8A16_GPTQ, AWQ scales folded
    python hf_llama_convert.py -i HF_DIR -o CKPT_DIR --use_weight_only \
        --weight_only_precision int4_gptq --group_size 128   # GPTQ -> W4A16_GPTQ
    python hf_llama_convert.py -i HF_DIR -o CKPT_DIR --use_weight_only \
        --weight_only_precision int4_awq --group_size 128 --has_zero_point --gptq
    python hf_llama_convert.py -i HF_DIR -o CKPT_DIR --calibrate-kv-cache
    python hf_llama_convert.py -i model.gguf -o CKPT_DIR -sq 0.5
    python hf_llama_convert.py -i llama-7b -o CKPT_DIR -sq 0.5      # random weights, speed-only

SmoothQuant variants: the checkpoint records one ``quant_algo``. As in TensorRT-LLM, the
default (neither ``--per_token`` nor ``--per_channel``) is per-tensor weights with a static
per-tensor activation scale (``W8A8_SQ_PER_TENSOR_PLUGIN``); ``--per_channel`` gives a scale
per output channel, ``--per_token`` a dynamic scale per token (the most accurate pair is both).
Build the engine with the same flags (``build.py --ckpt_dir CKPT_DIR --use_smooth_quant
[--per_token] [--per_channel]``); a mismatch is rejected there.

Calibration uses the summarize prompt builder on cnn_dailymail train articles
(``--calib_dataset``, ``--calib_size``, ``--max_input_length``); random-weight presets
calibrate on synthetic prompts and are labelled speed-only in ``quantization.calibration``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from llama_engine import cli, cli_compat
from llama_engine.config import DTYPES, ConfigError

# The calibration articles' default, relative to the repository (its sibling ``shared``
# folder), used when present; shown this way in --help, never as this machine's path.
DEFAULT_DATASET = "../shared/data/cnn_dailymail/train_calib.jsonl"
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def default_calib_dataset() -> Optional[str]:
    """The repository-relative calibration file when it exists, else None (the hub)."""
    path = os.path.normpath(os.path.join(REPO_DIR, DEFAULT_DATASET))
    return path if os.path.isfile(path) else None


def _sq_alpha(text: str):
    """-sq's value: 'auto' (per-layer alpha search) or a number in [0, 1]."""
    return "auto" if text == "auto" else cli.unit_interval(text)


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--in-file", "--in_file", dest="in_file", required=True,
                   help="HF model directory, Meta checkpoint directory, .gguf file, or a preset "
                        "name (llama-7b, tiny, ...) for random weights")
    p.add_argument("-o", "--out-dir", "--out_dir", dest="out_dir", required=True,
                   help="checkpoint directory to write: new, or one this project wrote "
                        "(replaced atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace -o even when it holds something else (never the source "
                        "or the current directory)")
    p.add_argument("-sq", "--smoothquant", type=_sq_alpha, default=None, metavar="ALPHA",
                   help="SmoothQuant with migration strength ALPHA in [0, 1], or 'auto': per "
                        "layer and smoothed group the alpha (0.10..0.95) minimising the "
                        "quantized layer's output error on the calibration prompts; writes "
                        "W8A8 int8 weights")
    p.add_argument("-kv", "--calibrate-kv-cache", "--calibrate_kv_cache",
                   dest="calibrate_kv_cache", action="store_true",
                   help="calibrate INT8 KV cache scales (kv_cache_quant_algo INT8)")
    p.add_argument("--kv_cache_dtype", choices=("int8", "fp8"), default=None,
                   help="calibrated KV cache scales for this cache (TensorRT-LLM quantize.py's "
                        "name): int8 = --calibrate-kv-cache, fp8 = FP8 E4M3 "
                        "(kv_cache_quant_algo FP8, scales max/448)")
    p.add_argument("--per_token", action="store_true",
                   help="SmoothQuant: dynamic per-token activation scales (default: static "
                        "per-tensor)")
    p.add_argument("--per_channel", action="store_true",
                   help="SmoothQuant: per-output-channel weight scales (default: per-tensor)")
    p.add_argument("--use_weight_only", action="store_true",
                   help="write int8/int4 weight-only weights (no calibration needed)")
    p.add_argument("--weight_only_precision", default="int8",
                   choices=["int8", "int8_awq", "int4", "int4_awq", "int4_gptq"],
                   help="int4_awq: AWQ calibration (Lin et al. 2023) into TensorRT-LLM's "
                        "W4A16_AWQ; int8_awq: AWQ's scale search for int8, folded into the "
                        "weights (a plain W8A16 / W8A16_GPTQ checkpoint); int4_gptq: GPTQ "
                        "(Frantar et al. 2022) into W4A16_GPTQ, or a GPTQ checkpoint given as -i "
                        "converted as it is")
    p.add_argument("--group_size", type=int, default=None,
                   help="int4 group size: 128 (default), 64, 32, or 0 for per-channel; int8: "
                        "32, 64 or 128 for group-wise scales and zeros (W8A16_GPTQ)")
    # -- int4 formats (issue 18): one block --
    p.add_argument("--has_zero_point", action="store_true",
                   help="int4 / int4_awq with zero points (asymmetric scales and zeros)")
    p.add_argument("--awq_tokens_per_prompt", type=int, default=64,
                   help="AWQ: calibration tokens kept per prompt for the scale search")
    p.add_argument("--no_awq_clip", action="store_true",
                   help="AWQ: skip the clipping search (zero-point formats)")
    p.add_argument("--gptq", action="store_true",
                   help="round with GPTQ (Frantar et al. 2022) instead of to nearest: int4 "
                        "with --has_zero_point (= int4_gptq), int4_awq with --has_zero_point "
                        "(AWQ's scales and clipping, then GPTQ), int8 / int8_awq with "
                        "--group_size (W8A16_GPTQ)")
    p.add_argument("--no_gptq_act_order", action="store_true",
                   help="GPTQ: round the columns left to right instead of in decreasing order "
                        "of the inputs' energy (activation order with static groups: the "
                        "default, it needs no g_idx in the checkpoint)")
    p.add_argument("--gptq_damp", type=float, default=0.01,
                   help="GPTQ: dampening added to the Hessian's diagonal, as a fraction of "
                        "its mean (the paper's 1%%)")
    p.add_argument("--no_gptq_fit_scales", action="store_true",
                   help="GPTQ: keep round to nearest's min/max grid per group instead of "
                        "fitting each group's scale and zero by least squares on the "
                        "calibration inputs' output error (before GPTQ's pass, and again to "
                        "its codes after it; the default)")
    # -- end int4 formats --
    p.add_argument("--qformat", default=None, choices=["fp8"],
                   help="fp8: FP8 E4M3 weights and activations (TensorRT-LLM quantize.py's name; "
                        "static activation scales calibrated on --calib_dataset)")
    p.add_argument("--fp8_per_channel", action="store_true",
                   help="FP8: one weight scale per output channel (default: per tensor)")
    p.add_argument("--fp8_dynamic_act", action="store_true",
                   help="FP8: per-token activation scales at run time (no calibration)")
    p.add_argument("--calib_dataset", default=None,
                   help=f"cnn_dailymail train data: a .jsonl/.json/.parquet file or dataset "
                        f"folder; 'hub' for the HF hub's train split; 'synthetic' for random "
                        f"token ids (speed-only). Default: {DEFAULT_DATASET} (relative to "
                        f"the repository) when present, "
                        "else the hub")
    p.add_argument("--calib_size", type=int, default=512,
                   help="number of calibration articles (default 512, or all there are)")
    p.add_argument("--max_input_length", type=int, default=512,
                   help="calibration prompt length in tokens (default 512)")
    p.add_argument("--use_chat_template", action="store_true",
                   help="build calibration prompts with the tokenizer's chat template (as "
                        "summarize.py --use_chat_template does for instruct models)")
    p.add_argument("--dtype", default="float16", choices=[d for d in DTYPES if d != "float64"],
                   help="dtype of the checkpoint's float tensors (default float16)")
    p.add_argument("--device", default=None,
                   help="device for calibration (default: cuda when available, else cpu)")
    p.add_argument("--calib_dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the calibration forward (default: float32 on cpu, float16 "
                        "on cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights / prompts")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("-tp", "--tensor-parallelism", "--tensor_parallelism", dest="tp_size",
                   type=cli.positive_int, default=1,
                   help="write one rank{r}.safetensors per tensor-parallel rank")
    p.add_argument("-t", "--storage-type", "--storage_type", dest="dtype",
                   choices=[d for d in DTYPES if d != "float64"] + ["fp32", "fp16", "bf16"],
                   help="TensorRT-LLM v0.5's name of --dtype")
    g = p.add_argument_group("other flags of TensorRT-LLM v0.5's hf_llama_convert.py")
    cli_compat.no_effect(g, "-p", "--processes", why="conversion runs in one process")
    cli_compat.no_effect(g, "--model", why="LLaMA only")
    cli_compat.no_effect(g, "--multi-query-mode", "--multi_query_mode", nargs=0,
                         why="the KV head count is read from the model's config")
    cli_compat.no_effect(g, "--dataset-cache-dir", "--dataset_cache_dir",
                         why="datasets' own cache is used")
    cli_compat.add_log_level(p)
    return p


def _load(in_file: str, seed: int, device: str):
    """-> (ModelArgs, HF state dict, info) for any supported source."""
    from weight import load_source
    if os.path.isfile(in_file) and in_file.endswith(".gguf"):
        return load_source(gguf_file=in_file)
    if os.path.isdir(in_file):
        if os.path.isfile(os.path.join(in_file, "params.json")):
            return load_source(meta_ckpt_dir=in_file)
        return load_source(model_dir=in_file)
    if os.path.exists(in_file) and not in_file.endswith(".json"):
        raise ConfigError(f"-i {in_file}: not a model directory, .gguf file or preset")
    if not os.path.exists(in_file) and (os.sep in in_file or in_file.endswith((".gguf", ".json"))):
        raise ConfigError(f"model source {in_file} does not exist (a model directory, .gguf file, "
                          "config.json or preset name)")
    # A preset name or config.json: random weights (fp32 on CPU; fp16 on GPU to fit 7B).
    dtype = "float32" if device == "cpu" else "float16"
    return load_source(model_config=in_file, dtype=dtype, seed=seed, device=device)


def convert(ns: argparse.Namespace) -> str:
    import torch

    from llama_engine.checkpoint import hf_to_unified, write_checkpoint
    from llama_engine.outdir import check_output_dir
    from llama_engine.quant import format_report, quantize_checkpoint, validate_quant_flags
    import smoothquant as sq
    from llama_engine import smoothquant as esq

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sources = [ns.in_file] if os.path.exists(ns.in_file) else []
    check_output_dir(ns.out_dir, sources, ns.force, "-o")  # before loading and calibrating
    prequantized = _prequantized_method(ns.in_file)
    if prequantized:
        return _convert_prequantized(ns, prequantized, sources)
    gptq_run = ns.use_weight_only and (ns.weight_only_precision == "int4_gptq" or ns.gptq)
    if ns.gptq_damp < 0:
        raise ConfigError(f"--gptq_damp must be >= 0, got {ns.gptq_damp}")
    if ns.gptq and not gptq_run:
        raise ConfigError("--gptq is a weight-only rounding: add --use_weight_only")
    stray = [f for f, on in (("--no_gptq_act_order", ns.no_gptq_act_order),
                             ("--no_gptq_fit_scales", ns.no_gptq_fit_scales)) if on]
    if stray and not gptq_run:
        raise ConfigError(f"{' and '.join(stray)} only change GPTQ's rounding: add --gptq "
                          "(or --weight_only_precision int4_gptq) with --use_weight_only")
    args, hf_sd, info = _load(ns.in_file, ns.seed, device)
    if ns.dtype == "auto":  # the source's float dtype; float32 becomes float16 (TensorRT-LLM)
        src = next((str(t.dtype).replace("torch.", "") for t in hf_sd.values()
                    if t.is_floating_point()), "float16")
        ns.dtype = "float16" if src in ("float32", "float64") else src
    if ns.kv_cache_dtype == "int8":
        ns.calibrate_kv_cache = True
    elif ns.kv_cache_dtype == "fp8" and ns.calibrate_kv_cache:
        raise ConfigError("--calibrate-kv-cache is the INT8 KV cache; --kv_cache_dtype fp8 "
                          "asks for FP8: choose one")
    quant = validate_quant_flags(
        args, use_weight_only=ns.use_weight_only,
        weight_only_precision=ns.weight_only_precision.replace("int8_awq", "int8"),
        group_size=ns.group_size, use_smooth_quant=ns.smoothquant is not None, per_token=ns.per_token,
        per_channel=ns.per_channel, int8_kv_cache=ns.calibrate_kv_cache,
        fp8_kv_cache=ns.kv_cache_dtype == "fp8",
        has_act_stats=True, has_kv_stats=True,
        smoothquant_alpha=None if ns.smoothquant == "auto" else ns.smoothquant,
        has_zero_point=ns.has_zero_point, fp8=_fp8_flags(ns))
    if gptq_run and not (quant.int4_zero_point or quant.quant_algo == "W8A16_GPTQ"):
        raise ConfigError("--gptq rounds onto a zero-point grid: int4 / int4_awq with "
                          "--has_zero_point (or int4_gptq), or int8 / int8_awq with --group_size")
    print(f"loaded {info['kind']} weights from {info['path']}: {args.num_hidden_layers} layers, "
          f"hidden {args.hidden_size}; target {quant.describe()}, {ns.dtype}", file=sys.stderr)

    act_stats = kv_stats = None
    calib_info = None
    if quant.is_smooth_quant or quant.kv_cache_dtype or (quant.is_fp8
                                                         and not quant.fp8_dynamic_act):
        tokenizer, dataset = _calibration_source(ns, info)
        calib_dtype = getattr(torch, ns.calib_dtype) if ns.calib_dtype else None
        act_stats, kv_stats, calib_info = sq.calibrate_source(
            args, hf_sd, tokenizer, dataset, ns.calib_size, ns.max_input_length,
            ns.use_chat_template, device=device, dtype=calib_dtype,
            kv=bool(quant.kv_cache_dtype),
            progress=not ns.no_progress, seed=ns.seed)
        print(f"calibrated on {calib_info['num_prompts']} prompts "
              f"({calib_info['num_tokens']} tokens) from {calib_info['source']}", file=sys.stderr)

    awq_kw = {}
    if quant.pre_quant_scale or (ns.use_weight_only and ns.weight_only_precision == "int8_awq"):
        awq_kw, awq_info = _awq(ns, args, hf_sd, info, device)
        calib_info = {**(calib_info or {}), **awq_info}
    elif gptq_run:
        gptq_rows, gptq_info = _capture_rows(ns, args, hf_sd, info, device, "gptq")
        calib_info = {**(calib_info or {}), **gptq_info}
    sq_rows, sq_kw = None, {}
    if ns.smoothquant == "auto":  # calibration rows for the per-layer alpha search
        sq_rows, sq_info = _capture_rows(ns, args, hf_sd, info, device, "sq_alpha_search",
                                         max_rows=esq.SQ_SEARCH_ROWS)
        calib_info = {**(calib_info or {}), **sq_info}
    tensors = hf_to_unified(hf_sd, args)
    del hf_sd
    if sq_rows is not None:
        alphas, _ = esq.search_alphas(tensors, args, act_stats, sq_rows[1],
                                     quant.sq_per_token, quant.sq_per_channel,
                                     progress=not ns.no_progress)
        vals = sorted(alphas.values())
        quant.smoothquant_val = vals[len(vals) // 2]  # TensorRT-LLM's field holds one float
        sq_kw["sq_alphas"] = alphas
        print(f"SmoothQuant alpha search: {len(vals)} groups, alpha {vals[0]:.2f}..{vals[-1]:.2f}"
              f" (median {quant.smoothquant_val:.2f})", file=sys.stderr)
    if gptq_run and not awq_kw:
        from llama_engine.awq import input_grams
        awq_kw = {"int4_hessians": input_grams(args, gptq_rows[1]), "gptq_damp": ns.gptq_damp,
                  "gptq_act_order": not ns.no_gptq_act_order,
                  "gptq_fit": not ns.no_gptq_fit_scales}
        calib_info["gptq"].update(damp=ns.gptq_damp, act_order=not ns.no_gptq_act_order,
                                  fit_scales=not ns.no_gptq_fit_scales)
    elif awq_kw:
        from llama_engine.awq import apply_awq
        hess = {} if gptq_run else None
        tensors, pqs, clips, rep = apply_awq(tensors, args, quant, *awq_kw["inputs"],
                                             clip=not ns.no_awq_clip,
                                             progress=not ns.no_progress, hessians=hess)
        awq_kw = {"pre_quant_scales": pqs, "int4_clips": clips}
        if gptq_run:
            awq_kw.update(int4_hessians=hess, gptq_damp=ns.gptq_damp,
                          gptq_act_order=not ns.no_gptq_act_order,
                          gptq_fit=not ns.no_gptq_fit_scales)
            calib_info["awq"]["gptq_rounding"] = {"damp": ns.gptq_damp,
                                                  "act_order": not ns.no_gptq_act_order,
                                                  "fit_scales": not ns.no_gptq_fit_scales}
        gain = [r["rtn_err"] / max(r["awq_err"], 1e-30) for r in rep.values()]
        print(f"AWQ: layer output error {sum(gain) / len(gain):.2f}x lower than round to "
              f"nearest on the calibration tokens (mean over {len(gain)} linears)",
              file=sys.stderr)
    tensors, report = quantize_checkpoint(tensors, args, quant, act_stats, kv_stats,
                                          progress=not ns.no_progress, dtype=ns.dtype,
                                          **awq_kw, **sq_kw)
    qdict = quant.to_checkpoint_dict()
    if calib_info is not None:
        qdict["calibration"] = calib_info
    if sq_kw:  # per smoothed group, for the record (baked into the weights)
        qdict["smoothquant_alphas"] = {k: float(v) for k, v in sq_kw["sq_alphas"].items()}
    tok_src = info.get("tokenizer_dir")
    write_checkpoint(ns.out_dir, args, ns.dtype, quant, tensors, world_size=ns.tp_size,
                     extra_config={"quantization": qdict}, tokenizer_src=tok_src,
                     sources=sources, force=ns.force, flag="-o")
    print(format_report(report), file=sys.stderr)
    return ns.out_dir


def _awq(ns: argparse.Namespace, args, hf_sd: dict, info: dict, device: str):
    """Capture AWQ's calibration inputs from the float model -> ({"inputs": (means, rows)},
    calibration info)."""
    inputs, info_out = _capture_rows(ns, args, hf_sd, info, device, "awq")
    info_out["awq"]["clip_search"] = not ns.no_awq_clip
    return {"inputs": inputs}, info_out


def _capture_rows(ns: argparse.Namespace, args, hf_sd: dict, info: dict, device: str,
                  what: str, max_rows: Optional[int] = None):
    """Linear inputs of the float model on the calibration prompts (``awq.capture_inputs``)
    -> ((means, rows), {what: calibration info}); ``max_rows``: at most that many rows per
    linear (fewer prompts)."""
    import torch

    from llama_engine import awq, smoothquant as esq
    tokenizer, dataset = _calibration_source(ns, info)
    if tokenizer is None:
        prompts = esq.synthetic_calibration_prompts(args.vocab_size, min(ns.calib_size, 16),
                                                    min(ns.max_input_length, 256), ns.seed)
        where = "synthetic (speed-only)"
    else:
        prompts = esq.calibration_prompts(tokenizer, dataset, ns.calib_size,
                                          ns.max_input_length, ns.use_chat_template)
        where = os.fspath(dataset or "cnn_dailymail 3.0.0 train (hub)")
    dtype = getattr(torch, ns.calib_dtype) if ns.calib_dtype else (
        torch.float32 if device == "cpu" else torch.float16)
    if max_rows:
        prompts = prompts[:max(1, max_rows // ns.awq_tokens_per_prompt)]
    model = esq.hf_model_from_state_dict(args, hf_sd, device, dtype)
    inputs = awq.capture_inputs(model, prompts, ns.awq_tokens_per_prompt,
                                progress=not ns.no_progress, seed=ns.seed)
    del model
    info_out = {what: {"source": where, "num_prompts": len(prompts),
                       "tokens_per_prompt": ns.awq_tokens_per_prompt,
                       "speed_only": tokenizer is None}}
    return inputs, info_out


def _fp8_flags(ns: argparse.Namespace):
    """(per_channel, dynamic_act) for --qformat fp8, else None."""
    if getattr(ns, "qformat", None) != "fp8":
        if getattr(ns, "fp8_per_channel", False) or getattr(ns, "fp8_dynamic_act", False):
            raise ConfigError("--fp8_per_channel / --fp8_dynamic_act need --qformat fp8")
        return None
    return (ns.fp8_per_channel, ns.fp8_dynamic_act)


def _prequantized_method(in_file: str) -> Optional[str]:
    """'awq' / 'gptq' when -i is a HF directory holding such a pre-quantized checkpoint."""
    import json
    cfg = os.path.join(in_file, "config.json")
    if not (os.path.isdir(in_file) and os.path.isfile(cfg)):
        return None
    with open(cfg) as f:
        qc = (json.load(f).get("quantization_config") or {})
    method = qc.get("quant_method")
    if method is None:
        return None
    if method not in ("awq", "gptq", "fp8", "compressed-tensors"):
        raise ConfigError(f"{in_file}: quant_method {method!r} is not supported (awq, gptq, "
                          "fp8, compressed-tensors FP8)")
    return method


def _convert_prequantized(ns: argparse.Namespace, method: str, sources: list) -> str:
    """An AutoAWQ / GPTQ directory, taken as it is (no calibration, no re-quantization)."""
    import torch

    from llama_engine.formats import awq as fawq, gptq as fgptq
    if method in ("fp8", "compressed-tensors"):
        return _convert_fp8_hf(ns, method, sources)
    want = {"awq": "int4_awq", "gptq": "int4_gptq"}[method]
    if ns.smoothquant is not None or ns.calibrate_kv_cache:
        raise ConfigError(f"-i is a pre-quantized {method.upper()} checkpoint: it converts as "
                          "it is (no SmoothQuant or KV calibration)")
    if ns.use_weight_only and ns.weight_only_precision != want:
        raise ConfigError(f"-i is a {method.upper()} checkpoint; --weight_only_precision "
                          f"{ns.weight_only_precision} does not match it ({want})")
    load = fawq.load_awq_dir if method == "awq" else fgptq.load_gptq_dir
    args, quant, tensors, _ = load(ns.in_file)
    dt = getattr(torch, ns.dtype)
    tensors = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}
    return _write_as_is(ns, args, quant, tensors, method, f"{method.upper()} checkpoint",
                        sources)


def _convert_fp8_hf(ns: argparse.Namespace, method: str, sources: list) -> str:
    """A Hugging Face FP8 checkpoint (compressed-tensors / quant_method fp8), as it is."""
    import torch

    from llama_engine.formats.fp8_hf import FP8_SCALE_NAMES, load_fp8_hf_dir
    if ns.smoothquant is not None or ns.calibrate_kv_cache or ns.use_weight_only:
        raise ConfigError(f"-i is an FP8 checkpoint ({method}): it converts as it is (no "
                          "SmoothQuant, weight-only or INT8 KV calibration)")
    args, quant, tensors = load_fp8_hf_dir(ns.in_file)
    dt = getattr(torch, ns.dtype)
    tensors = {k: (v.to(dt) if v.is_floating_point() and v.dtype != torch.float8_e4m3fn
                   and not k.endswith(FP8_SCALE_NAMES) else v) for k, v in tensors.items()}
    return _write_as_is(ns, args, quant, tensors, method, f"FP8 checkpoint ({method})",
                        sources)


def _write_as_is(ns: argparse.Namespace, args, quant, tensors: dict, method: str, what: str,
                 sources: list) -> str:
    """Write a pre-quantized checkpoint taken as it is, its source format recorded."""
    from llama_engine.checkpoint import write_checkpoint
    from llama_engine.tokenizer import find_tokenizer_source
    qdict = quant.to_checkpoint_dict()
    qdict["source_format"] = method
    write_checkpoint(ns.out_dir, args, ns.dtype, quant, tensors,
                     extra_config={"quantization": qdict},
                     tokenizer_src=find_tokenizer_source(ns.in_file),
                     sources=sources, force=ns.force, flag="-o")
    print(f"converted {what} {ns.in_file} as it is: {quant.describe()}", file=sys.stderr)
    return ns.out_dir


def _calibration_source(ns: argparse.Namespace, info: dict):
    """-> (tokenizer or None, dataset) for calibration; random weights get synthetic prompts."""
    from llama_engine.tokenizer import load_tokenizer
    dataset = ns.calib_dataset
    if info["kind"] == "random" or dataset == "synthetic":
        if dataset not in (None, "synthetic"):
            raise ConfigError("random weights calibrate on synthetic prompts only; drop "
                              "--calib_dataset or pass --calib_dataset synthetic")
        return None, "synthetic"
    if dataset is None:
        dataset = default_calib_dataset()
    elif dataset == "hub":
        dataset = None
    if not info.get("tokenizer_dir"):
        raise ConfigError(f"no tokenizer beside {info['path']}; calibration needs one (or pass "
                          "--calib_dataset synthetic for a speed-only checkpoint)")
    return load_tokenizer(info["tokenizer_dir"]), dataset


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)   # before torch is imported: --help is instant
    ns.dtype = cli.parse_dtype(ns.dtype)
    return run(ns)


def run(ns: argparse.Namespace) -> int:
    """Convert as ``ns`` says (this script's flags, or convert_checkpoint.py's mapped onto
    them); ``error: …`` and 2 on a bad input."""
    cli_compat.apply_log_level(ns.log_level)
    from llama_engine.outdir import signals_raise
    t0 = time.time()
    try:
        with signals_raise():  # SIGTERM/SIGINT: the staging directory is removed
            out = convert(ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote unified checkpoint {out} in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
