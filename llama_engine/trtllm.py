"""TensorRT-LLM backend: checkpoint exchange, engine build and run through TensorRT-LLM itself.

Follows TensorRT-LLM 1.2.x's unified checkpoint for LLaMA (``config.json`` +
``rank{N}.safetensors``; docs/trtllm-format.md lists the sources read and every tensor). Our
canonical tensors (docs/design.md) already use TensorRT-LLM's names; this module converts only
where the two differ:

* tied embeddings: TensorRT-LLM's converter writes ``lm_head.weight`` (a copy); we do not;
* W8A16 / W4A16: TensorRT-LLM stores GPU-architecture-specific preprocessed int8, so there is
  no portable quantized layout. We write ``weight`` = q·s in the model dtype (its builder
  quantizes non-int8 weights itself) plus our ``per_channel_scale`` [N], from which
  ``from_trtllm`` and the build hook recover our exact codes q = round(w / s);
* W4A16_AWQ (with or without ``zero``) and W4A16_GPTQ: ``trtllm_int4.py`` (weight packed
  along N, scales and zeros [N, K/G], ``prequant_scaling_factor`` only when
  ``pre_quant_scale`` is set);
* SmoothQuant ``_PLUGIN`` modes: qkv ``per_channel_scale`` is always [1, N]; the norm/attention/
  MLP input quantizers (``*.scale_to_int``, ``*.quantization_scaling_factor``: multipliers
  127/amax) are derived from our ``act_scale`` (= amax/127);
* ``exclude_modules``: TensorRT-LLM matches fnmatch patterns on full module names, and its
  default list (used when the field is null) also excludes ``*vocab_embedding``;
* INT8 KV: TensorRT-LLM has one ``kv_cache_scaling_factor`` [1] per layer. Our per-channel
  K/V scales (``attention.k_cache_scale`` / ``v_cache_scale``) are an extension: an export
  drops them (``extensions=False``, the default); our own checkpoints keep them
  (``extensions=True``), and ``from_trtllm`` passes them through when present.

TensorRT-LLM itself (building, running) is used only when ``tensorrt_llm`` imports; otherwise
``build_trtllm_engine`` raises ``TrtllmUnavailable`` naming the checkpoint and the exact
``trtllm-build`` command. TensorRT-LLM is never faked: the stand-in in the tests is named as one.
"""
from __future__ import annotations

import copy
import fnmatch
import glob
import importlib.util
import json
import os
import shlex
import time
from typing import Any, Callable, Optional

import torch

from .config import (W4A16, W4A16_GROUPWISE, W8A16, ConfigError,
                     ModelArgs, QuantConfig)
from .names import is_kv_channel_scale
from .quant_int8 import GROUPWISE_ALGOS, group_from_trtllm, group_to_trtllm
from .sampling import GenerationOutput, SamplingConfig, cut_at_stop, trtllm_generate_kwargs
from .trtllm_fp8 import fp8_from_trtllm, fp8_to_trtllm

TRTLLM_RELEASE = "1.2"  # the release line whose format this module follows
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
# quantize_layers' default exclusions in tensorrt_llm/quantization/quantize.py (used when
# quantization.exclude_modules is null).
TRTLLM_DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding",
                           "*block_embedding", "*shared_expert_gate")
AWQ_GROUP_SIZES = (64, 128)  # CUTLASS fine-grained W4A16 kernels
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32, "float64": torch.float64}
# Which input quantizer (a 127/amax multiplier) feeds each SmoothQuant linear.
_SQ_INPUT_QUANTIZER = {
    "attention.qkv": "input_layernorm.scale_to_int",
    "mlp.fc": "post_layernorm.scale_to_int",
    "mlp.gate": "post_layernorm.scale_to_int",
    "attention.dense": "attention.quantization_scaling_factor",
    "mlp.proj": "mlp.quantization_scaling_factor",
}


class TrtllmUnavailable(ConfigError):
    """``tensorrt_llm`` does not import here; the checkpoint was written, the engine was not."""

    def __init__(self, ckpt_dir: str, command: str, reason: str = "tensorrt_llm is not installed"):
        self.ckpt_dir, self.command, self.reason = ckpt_dir, command, reason
        super().__init__(f"{reason}: wrote the TensorRT-LLM checkpoint to {ckpt_dir}; build the "
                         f"engine on a machine with TensorRT-LLM {TRTLLM_RELEASE}.x: {command}")


# ---------------------------------------------------------------------------------------------
# int4 nibble packing (two signed values per int8 byte, element 2j in the low nibble)
# ---------------------------------------------------------------------------------------------
def _pack_int4_last(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., M] -> int8 [..., M/2]; q[..., 2j] in the low nibble."""
    if q.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even width, got {tuple(q.shape)}")
    q16 = q.to(torch.int16)
    byte = (q16[..., 0::2] & 0xF) | ((q16[..., 1::2] & 0xF) << 4)  # [..., M/2] in 0..255
    return byte.to(torch.uint8).view(torch.int8)


def _unpack_int4_last(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_pack_int4_last``: int8 [..., M/2] -> int8 [..., M] in [-8, 7]."""
    p16 = p.view(torch.uint8).to(torch.int16)
    lo = ((p16 & 0xF) ^ 8) - 8   # sign-extend a nibble
    hi = (((p16 >> 4) & 0xF) ^ 8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# Canonical -> TensorRT-LLM
# ---------------------------------------------------------------------------------------------
def _linear_prefixes(args: ModelArgs) -> list[str]:
    return [f"transformer.layers.{i}.{name}" for i in range(args.num_hidden_layers)
            for name in LINEARS]


def _need(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ConfigError(f"checkpoint tensor {name} is missing")
    return tensors[name]


def _exclude_to_trtllm(exclude: list) -> Optional[list]:
    """Ours (module names or patterns) -> TensorRT-LLM fnmatch patterns on full names."""
    if not exclude or list(exclude) == ["lm_head"]:
        return None  # TensorRT-LLM's defaults: *lm_head, *vocab_embedding, ...
    pats = [p if any(c in p for c in "*?[") else "*" + p for p in exclude]
    for must in ("*lm_head", "*vocab_embedding"):
        if must not in pats:
            pats.append(must)
    return pats


def _exclude_from_trtllm(pats: Optional[list]) -> list:
    if not pats:
        return ["lm_head"]
    out = []
    for p in pats:
        if p in TRTLLM_DEFAULT_EXCLUDES and p != "*lm_head":
            continue
        out.append(p[1:] if p.startswith("*") and not any(c in p[1:] for c in "*?[") else p)
    return out or ["lm_head"]


def trtllm_quant_dict(quant: QuantConfig) -> dict:
    """Our QuantConfig -> TensorRT-LLM's ``quantization`` dict (only fields its QuantConfig has)."""
    d = quant.to_checkpoint_dict()
    d["exclude_modules"] = _exclude_to_trtllm(quant.exclude_modules) if quant.quant_algo else None
    if d.get("smoothquant_val") is None:
        d.pop("smoothquant_val", None)  # a float field in TensorRT-LLM: never write null
    return d


def to_trtllm(tensors: dict, args: ModelArgs, quant: QuantConfig, dtype: Optional[str] = None,
              world_size: int = 1, extensions: bool = False) -> tuple[dict, dict]:
    """Canonical tensors -> (TensorRT-LLM ``config.json`` dict, TensorRT-LLM tensors).

    ``dtype``: the model dtype name (default: that of ``transformer.vocab_embedding.weight``).
    The input dict is not modified; tensors that need no change are passed through, except
    our extension tensors (per-channel INT8 KV scales), which are kept only with
    ``extensions`` (our own checkpoints; TensorRT-LLM's loader would only warn about them)."""
    emb = _need(tensors, "transformer.vocab_embedding.weight")
    if dtype is None:
        dtype = {v: k for k, v in _FLOAT_DTYPES.items()}.get(emb.dtype)
        if dtype is None:
            raise ConfigError(f"vocab_embedding has non-float dtype {emb.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"unknown model dtype {dtype!r}")
    fdt = _FLOAT_DTYPES[dtype]
    config = args.to_checkpoint_config(dtype, quant, world_size, world_size)
    qdict = trtllm_quant_dict(quant)
    out = dict(tensors)

    if args.tie_word_embeddings:
        # TensorRT-LLM's LLaMA converter writes the tied head explicitly; a copy, because
        # safetensors refuses tensors that share storage.
        out["lm_head.weight"] = emb.clone()
    elif "lm_head.weight" in out and not out["lm_head.weight"].is_floating_point():
        raise ConfigError("TensorRT-LLM keeps lm_head unquantized (exclude_modules); "
                          "re-quantize with lm_head excluded")

    algo = quant.quant_algo
    if algo in (W8A16, W4A16):
        for p in _linear_prefixes(args):
            w = _need(out, p + ".weight")
            if w.is_floating_point():
                continue  # excluded from quantization: stays float
            s = _need(out, p + ".per_channel_scale").reshape(-1)
            q = w if algo == W8A16 else _unpack_int4_last(w)  # [N, K] int8
            # The portable form: the dequantized weight (TensorRT-LLM's builder quantizes a
            # non-int8 weight itself); the scale lets us recover q exactly on the way back.
            out[p + ".weight"] = (q.float() * s.float()[:, None]).to(fdt)
            out[p + ".per_channel_scale"] = s.to(fdt)
    elif algo in GROUPWISE_ALGOS:
        group_to_trtllm(out, _linear_prefixes(args), quant, fdt, _need)
    elif quant.is_smooth_quant:
        _sq_to_trtllm(out, args, quant)
    fp8_to_trtllm(out, _linear_prefixes(args), quant, qdict, _need, extensions)  # FP8 only

    for name in [k for k in out if k.endswith(".kv_cache_rcp_scaling_factor")]:
        del out[name]  # TensorRT-LLM derives it (preprocess_weights)
    for name in [k for k in out if is_kv_channel_scale(k)]:
        if extensions and quant.kv_cache_dtype:
            out[name] = out[name].float().reshape(-1)
        else:
            del out[name]  # ours, not TensorRT-LLM's: never in an export
    if quant.kv_cache_dtype:  # INT8 or FP8: one float32 [1] dequant scale a layer
        for i in range(args.num_hidden_layers):
            n = f"transformer.layers.{i}.attention.kv_cache_scaling_factor"
            out[n] = _need(out, n).float().reshape(1)

    config["quantization"] = qdict
    return config, out


def _sq_to_trtllm(out: dict, args: ModelArgs, quant: QuantConfig) -> None:
    static = not quant.sq_per_token
    for i in range(args.num_hidden_layers):
        lp = f"transformer.layers.{i}."
        x_scale = {}
        for name in LINEARS:
            p = lp + name
            w = _need(out, p + ".weight")
            if w.dtype != torch.int8:
                raise ConfigError(f"{p}.weight is {w.dtype}: TensorRT-LLM's SmoothQuant plugin "
                                  "path quantizes every layer linear (no exclusions)")
            s = _need(out, p + ".per_channel_scale").float()
            if name == "attention.qkv" and s.numel() == 1:
                # SmoothQuantAttention always builds QKV per-channel: broadcast.
                s = s.reshape(1, 1).expand(1, w.shape[0])
            out[p + ".per_channel_scale"] = s.reshape(1, -1).contiguous()
            if name in ("attention.dense", "mlp.proj"):
                out[p + ".smoother"] = _need(out, p + ".smoother").float().reshape(1, -1)
            if static:
                a = _need(out, p + ".act_scale").float().reshape(1, 1)
                out[p + ".act_scale"] = a
                x_scale[name] = a
        if static:
            fc, gate = x_scale["mlp.fc"], x_scale["mlp.gate"]
            if not torch.allclose(fc, gate, rtol=1e-6, atol=0.0):
                raise ConfigError(
                    f"{lp}mlp.fc.act_scale ({fc.item():.6g}) != mlp.gate.act_scale "
                    f"({gate.item():.6g}): TensorRT-LLM quantizes their shared input once")
        for name, q_name in _SQ_INPUT_QUANTIZER.items():
            if static:
                val = (1.0 / x_scale[name].reshape(1)).float()  # multiplier 127/amax
            elif q_name.endswith("scale_to_int"):
                val = torch.ones(1, dtype=torch.float32)  # unused per token, still required
            else:
                continue  # quantization_scaling_factor exists only for static activations
            out[lp + q_name] = val


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM -> canonical
# ---------------------------------------------------------------------------------------------
_LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def from_trtllm(config: dict, tensors: dict) -> tuple[ModelArgs, QuantConfig, dict]:
    """TensorRT-LLM ``config.json`` dict + tensors -> (ModelArgs, QuantConfig, canonical tensors).

    Reads checkpoints written by ``to_trtllm`` bit-exactly, and TensorRT-LLM's own LLaMA
    checkpoints (fp16/bf16/fp32, W8A8 SmoothQuant ``_PLUGIN`` modes, INT8 / FP8 KV, ModelOpt
    W4A16_AWQ). TensorRT-LLM-written W8A16/W4A16 (GPU-specific preprocessed int8) are refused."""
    cfg = dict(config)
    scaling = cfg.get("rotary_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "llama3":
        cfg["rotary_scaling"] = {**_LLAMA3_DEFAULTS, **scaling}
    args = ModelArgs.from_checkpoint_config(cfg)
    dtype = cfg.get("dtype", "float16")
    if dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"checkpoint dtype {dtype!r} is not one of {sorted(_FLOAT_DTYPES)}")
    fdt = _FLOAT_DTYPES[dtype]
    qd = dict(cfg.get("quantization") or {})
    if qd.get("has_zero_point") and qd.get("quant_algo") not in GROUPWISE_ALGOS:
        raise ConfigError(f"quantization with zero points ({qd.get('quant_algo')}) is not "
                          "supported")
    trt_excludes = list(qd.get("exclude_modules") or TRTLLM_DEFAULT_EXCLUDES)
    exclude = _exclude_from_trtllm(qd.get("exclude_modules"))
    qd["exclude_modules"] = exclude
    quant = QuantConfig.from_checkpoint_dict(qd)
    quant.exclude_modules = exclude

    out = dict(tensors)
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for name in [k for k in out if k.endswith(".kv_cache_rcp_scaling_factor")]:
        del out[name]

    algo = quant.quant_algo
    if algo in (W8A16, W4A16):
        _weight_only_from_trtllm(out, args, algo, fdt, trt_excludes)
    elif algo in GROUPWISE_ALGOS:
        group_from_trtllm(out, _linear_prefixes(args), quant, fdt, _need, args)
    elif quant.is_smooth_quant:
        _sq_from_trtllm(out, args, quant)
    fp8_from_trtllm(out, _linear_prefixes(args), quant, _need)  # FP8 only
    if quant.kv_cache_dtype:  # INT8 or FP8: one float32 [1] dequant scale a layer
        for i in range(args.num_hidden_layers):
            n = f"transformer.layers.{i}.attention.kv_cache_scaling_factor"
            out[n] = _need(out, n).float().reshape(1)
        for n in [k for k in out if is_kv_channel_scale(k)]:  # ours, when present
            out[n] = out[n].float().reshape(-1)
    return args, quant, out


def trtllm_rtn(w: torch.Tensor, bits: int, scale_dtype: torch.dtype):
    """TensorRT-LLM's weight-only quantizer (``symmetric_quantize`` in cutlass_preprocessors.cpp):
    w[N, K] -> (q int8 [N, K], scale [N]) with scale = amax over K / 2**(bits-1), codes from
    the float32 scale, clamped to [-128, 127] / [-8, 7]."""
    amax = w.float().abs().amax(dim=1)                     # [N]
    s32 = amax / float(1 << (bits - 1))
    q = torch.where(s32[:, None] > 0, torch.round(w.float() / s32[:, None].clamp_min(1e-30)),
                    torch.zeros_like(w, dtype=torch.float32))
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    return q.clamp_(lo, hi).to(torch.int8), s32.to(scale_dtype)


def _weight_only_from_trtllm(out: dict, args: ModelArgs, algo: str, fdt: torch.dtype,
                             trt_excludes: list) -> None:
    bits = 8 if algo == W8A16 else 4
    for p in _linear_prefixes(args):
        w = _need(out, p + ".weight")
        if any(fnmatch.fnmatchcase(p, pat) for pat in trt_excludes) and w.is_floating_point():
            continue  # excluded from quantization: stays float
        if w.dtype == torch.int8:
            raise ConfigError(
                f"{p}.weight is int8: a TensorRT-LLM-written {algo} checkpoint holds weights "
                "preprocessed for the GPU that converted it (symmetric_quantize_last_axis_of_"
                "batched_matrix); convert the HF model with this project instead, or give "
                "TensorRT-LLM's fp16 checkpoint and quantize here")
        s = out.get(p + ".per_channel_scale")
        if s is None:
            q, s = trtllm_rtn(w, bits, fdt)  # what TensorRT-LLM's builder would do
        else:
            s = s.reshape(-1).to(fdt)
            if s.numel() != w.shape[0]:
                raise ConfigError(f"{p}.per_channel_scale has {s.numel()} values for "
                                  f"{w.shape[0]} output channels")
            lo, hi = (-128, 127) if bits == 8 else (-8, 7)
            q = torch.round(w.float() / s.float()[:, None]).clamp_(lo, hi).to(torch.int8)
        out[p + ".weight"] = q if bits == 8 else _pack_int4_last(q)
        out[p + ".per_channel_scale"] = s


def _sq_from_trtllm(out: dict, args: ModelArgs, quant: QuantConfig) -> None:
    static = not quant.sq_per_token
    for i in range(args.num_hidden_layers):
        lp = f"transformer.layers.{i}."
        for name in LINEARS:
            p = lp + name
            w = _need(out, p + ".weight")
            if w.dtype != torch.int8:
                raise ConfigError(f"{p}.weight must be int8 for {quant.quant_algo}, got {w.dtype}")
            s = _need(out, p + ".per_channel_scale").float().reshape(1, -1)
            if static:
                a = _need(out, p + ".act_scale").float().reshape(1, 1)
                mult = _need(out, lp + _SQ_INPUT_QUANTIZER[name]).float().reshape(1, 1)
                if abs(float(a * mult) - 1.0) > 1e-6:
                    # TensorRT-LLM's converter splits the output scale as amax_y/127 times
                    # scale_y_accum_quant; only the product s_x*s_w matters.
                    x_scale = 1.0 / mult
                    s = (s * a / x_scale).float()
                    a = x_scale
                out[p + ".act_scale"] = a.contiguous()
            if not quant.sq_per_channel and s.numel() > 1 and bool(torch.all(s == s[0, 0])):
                s = s[:, :1]  # per-tensor qkv broadcast by to_trtllm: back to [1, 1]
            out[p + ".per_channel_scale"] = s.contiguous()
            if name in ("attention.dense", "mlp.proj"):
                out[p + ".smoother"] = _need(out, p + ".smoother").float().reshape(1, -1)
        for q_name in set(_SQ_INPUT_QUANTIZER.values()):
            out.pop(lp + q_name, None)


# ---------------------------------------------------------------------------------------------
# Engine directories, availability
# ---------------------------------------------------------------------------------------------
def is_trtllm_engine_dir(path: str) -> bool:
    """A directory written by ``trtllm-build``: config.json with "pretrained_config" and
    "build_config", and rank*.engine files (our own engines have neither .engine files nor a
    non-pytorch backend)."""
    cfg_path = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg_path)):
        return False
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or cfg.get("backend") == "pytorch":
        return False
    return ("pretrained_config" in cfg and "build_config" in cfg
            and bool(glob.glob(os.path.join(path, "rank*.engine"))))


_AVAILABLE: Optional[bool] = None


def tensorrt_llm_available() -> bool:
    """Whether ``import tensorrt_llm`` works here (guarded: a missing or broken install is False)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if importlib.util.find_spec("tensorrt_llm") is None:
            _AVAILABLE = False
        else:
            try:
                import tensorrt_llm  # noqa: F401
                _AVAILABLE = True
            except Exception:  # a stub or a build without its CUDA libraries
                _AVAILABLE = False
    return _AVAILABLE


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def _plugin_value(v: Any, dtype: str) -> str:
    """Our flag value -> trtllm-build's: a dtype name or 'disable'."""
    if v is None or v is True or v == "auto" or v == "enable":
        return dtype
    if v is False or v == "disable":
        return "disable"
    if v in _FLOAT_DTYPES:
        return v
    raise ConfigError(f"plugin setting {v!r} must be auto, disable or a dtype name")


def resolve_build_flags(flags: dict, dtype: str) -> dict:
    """Our build flags (BuildConfig field names, or build.py's use_* spellings) -> the
    TensorRT-LLM build settings, explicit for every knob we control."""
    f = dict(flags)
    gemm = f.get("gemm_plugin", f.get("use_gemm_plugin"))
    attn = f.get("gpt_attention_plugin", f.get("use_gpt_attention_plugin"))
    ifb = bool(f.get("use_inflight_batching", False))
    r = {
        "gemm_plugin": _plugin_value(gemm, dtype),
        "gpt_attention_plugin": _plugin_value(attn, dtype),
        "remove_input_padding": bool(f.get("remove_input_padding", True)) or ifb,
        "kv_cache_type": "paged" if (ifb or f.get("paged_kv_cache")) else "continuous",
        "tokens_per_block": int(f.get("tokens_per_block", 64)),
        "max_batch_size": int(f.get("max_batch_size", 8)),
        "max_input_len": int(f.get("max_input_len", 1024)),
        "max_beam_width": int(f.get("max_beam_width", 1)),
        "max_num_tokens": f.get("max_num_tokens"),
    }
    r["max_seq_len"] = int(f["max_seq_len"]) if f.get("max_seq_len") else \
        r["max_input_len"] + int(f.get("max_output_len", 1024))
    if ifb and r["gpt_attention_plugin"] == "disable":
        raise ConfigError("inflight batching needs the GPT attention plugin "
                          "(--use_gpt_attention_plugin)")
    if r["kv_cache_type"] == "paged" and r["gpt_attention_plugin"] == "disable":
        raise ConfigError("a paged KV cache needs the GPT attention plugin")
    for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width",
              "tokens_per_block"):
        if r[k] <= 0:
            raise ConfigError(f"--{k} must be positive, got {r[k]}")
    if r["max_seq_len"] < r["max_input_len"]:
        raise ConfigError(f"max_seq_len {r['max_seq_len']} < max_input_len {r['max_input_len']}")
    if r["max_num_tokens"] is not None:
        r["max_num_tokens"] = int(r["max_num_tokens"])
    return r


def trtllm_build_command(ckpt_dir: str, out_dir: str, flags: dict,
                         dtype: Optional[str] = None) -> str:
    """The exact ``trtllm-build`` command for ``flags`` (dtype default: the checkpoint's)."""
    dtype = dtype or _checkpoint_config(ckpt_dir, must_exist=False).get("dtype", "float16")
    r = resolve_build_flags(flags, dtype)
    parts = ["trtllm-build", "--checkpoint_dir", ckpt_dir, "--output_dir", out_dir,
             "--gemm_plugin", r["gemm_plugin"],
             "--gpt_attention_plugin", r["gpt_attention_plugin"],
             "--remove_input_padding", "enable" if r["remove_input_padding"] else "disable",
             "--kv_cache_type", r["kv_cache_type"]]
    if r["kv_cache_type"] == "paged":
        parts += ["--tokens_per_block", str(r["tokens_per_block"])]
    parts += ["--max_batch_size", str(r["max_batch_size"]),
              "--max_input_len", str(r["max_input_len"]),
              "--max_seq_len", str(r["max_seq_len"]),
              "--max_beam_width", str(r["max_beam_width"])]
    if r["max_num_tokens"] is not None:
        parts += ["--max_num_tokens", str(r["max_num_tokens"])]
    return " ".join(shlex.quote(str(p)) for p in parts)


def _checkpoint_config(ckpt_dir: str, must_exist: bool = True) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        if must_exist:
            raise ConfigError(f"{ckpt_dir}: no config.json; not a TensorRT-LLM checkpoint")
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None


def check_buildable(config: dict) -> None:
    """Limits of TensorRT-LLM's kernels that our own engine does not have (one-line errors)."""
    q = config.get("quantization") or {}
    algo = q.get("quant_algo")
    if algo == W4A16_GROUPWISE and int(q.get("group_size") or 128) not in AWQ_GROUP_SIZES:
        raise ConfigError(f"TensorRT-LLM's W4A16 group-wise kernels take group size 64 or 128, "
                          f"this checkpoint has {q.get('group_size')}")
    if algo in (W8A16, W4A16, W4A16_GROUPWISE):
        tp = int((config.get("mapping") or {}).get("tp_size", 1))
        mult = 64 * tp if algo != W4A16_GROUPWISE else max(64, int(q.get("group_size") or 128)) * tp
        for key in ("hidden_size", "intermediate_size"):
            if int(config.get(key, 0)) % mult:
                raise ConfigError(f"TensorRT-LLM pads weight-only linears to multiples of {mult}; "
                                  f"{key}={config.get(key)} would not load from a checkpoint")


def weight_only_exact_hook(quant_algo: Optional[str], preprocess: Callable) -> Optional[Callable]:
    """A ``preprocess_weights_hook`` for ``from_checkpoint`` that turns our W8A16/W4A16 tensors
    (weight = q·s float [N, K], per_channel_scale [N]) into our exact codes in TensorRT-LLM's
    preprocessed layout, so its builder does not re-quantize them. ``preprocess`` is
    ``tensorrt_llm.quantization.functional.preprocess_weights_for_mixed_gemm``."""
    if quant_algo not in (W8A16, W4A16):
        return None
    bits = 8 if quant_algo == W8A16 else 4

    def hook(weights: dict) -> dict:
        for name in list(weights):
            if not name.endswith(".weight") or not any(f".{l}." in name + "." for l in LINEARS):
                continue
            sname = name[: -len("weight")] + "per_channel_scale"
            w = weights[name]
            if sname not in weights or not w.is_floating_point():
                continue
            s = weights[sname].reshape(-1)
            lo, hi = (-128, 127) if bits == 8 else (-8, 7)
            q = torch.round(w.float() / s.float()[:, None]).clamp_(lo, hi).to(torch.int8)
            kn = q.t().contiguous()                        # [K, N], TensorRT-LLM's GEMM layout
            if bits == 4:
                kn = _pack_int4_last(kn)                   # [K, N/2], packed along N
            weights[name] = preprocess(kn, torch.int8 if bits == 8 else torch.quint4x2,
                                       torch.float16)
        return weights
    return hook


class _TrtllmBuildAPI:
    """The real TensorRT-LLM build calls (constructed only when ``tensorrt_llm`` imports)."""

    def __init__(self):
        from tensorrt_llm.builder import BuildConfig, build
        from tensorrt_llm.models import MODEL_MAP, PretrainedConfig
        from tensorrt_llm.quantization.functional import preprocess_weights_for_mixed_gemm
        self._BuildConfig, self._build = BuildConfig, build
        self._MODEL_MAP, self._PretrainedConfig = MODEL_MAP, PretrainedConfig
        self.preprocess_weights_for_mixed_gemm = preprocess_weights_for_mixed_gemm

    def make_build_config(self, r: dict):
        from tensorrt_llm.bindings import KVCacheType
        kw = dict(max_batch_size=r["max_batch_size"], max_input_len=r["max_input_len"],
                  max_seq_len=r["max_seq_len"], max_beam_width=r["max_beam_width"],
                  kv_cache_type=KVCacheType.PAGED if r["kv_cache_type"] == "paged"
                  else KVCacheType.CONTINUOUS)
        if r["max_num_tokens"] is not None:
            kw["max_num_tokens"] = r["max_num_tokens"]
        bc = self._BuildConfig(**kw)
        pc = bc.plugin_config
        pc.gemm_plugin = None if r["gemm_plugin"] == "disable" else r["gemm_plugin"]
        pc.gpt_attention_plugin = (None if r["gpt_attention_plugin"] == "disable"
                                   else r["gpt_attention_plugin"])
        pc.remove_input_padding = r["remove_input_padding"]
        pc.tokens_per_block = r["tokens_per_block"]
        return bc

    def load_model(self, ckpt_dir: str, rank: int, hook: Optional[Callable]):
        cfg = self._PretrainedConfig.from_json_file(os.path.join(ckpt_dir, "config.json"))
        cls = self._MODEL_MAP[cfg.architecture]
        rank_cfg = copy.deepcopy(cfg)
        rank_cfg.set_rank(rank)
        return cls.from_checkpoint(ckpt_dir, config=rank_cfg, preprocess_weights_hook=hook)

    def build(self, model, build_config):
        return self._build(model, build_config)


def build_trtllm_engine(ckpt_dir: str, out_dir: str, build_flags: dict, api: Any = None) -> None:
    """Build a TensorRT engine from a unified checkpoint with TensorRT-LLM's Python API.

    Raises ``TrtllmUnavailable`` (checkpoint location + exact ``trtllm-build`` command) when
    ``tensorrt_llm`` does not import. ``api`` replaces the TensorRT-LLM calls (tests pass a
    stand-in; it proves nothing about TensorRT-LLM)."""
    config = _checkpoint_config(ckpt_dir)
    check_buildable(config)
    dtype = config.get("dtype", "float16")
    r = resolve_build_flags(build_flags, dtype)  # flag errors before availability
    if api is None:
        if not tensorrt_llm_available():
            raise TrtllmUnavailable(ckpt_dir, trtllm_build_command(ckpt_dir, out_dir,
                                                                   build_flags, dtype))
        api = _TrtllmBuildAPI()
    build_config = api.make_build_config(r)
    hook = weight_only_exact_hook((config.get("quantization") or {}).get("quant_algo"),
                                  api.preprocess_weights_for_mixed_gemm)
    world = int((config.get("mapping") or {}).get("world_size", 1))
    os.makedirs(out_dir, exist_ok=True)
    for rank in range(world):
        if torch.cuda.is_available() and world > 1:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        model = api.load_model(ckpt_dir, rank, hook)
        engine = api.build(model, copy.deepcopy(build_config))
        engine.save(out_dir)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
class TrtllmRunner:
    """A TensorRT-LLM engine directory behind our ``Engine.generate`` API (design.md).

    Uses ``tensorrt_llm.runtime.ModelRunnerCpp`` (inflight batching, paged KV) and falls back
    to the Python ``ModelRunner``. Constructed only when ``tensorrt_llm`` imports."""

    def __init__(self, engine_dir: str, runner: Any, config: dict, kind: str):
        self.engine_dir, self.runner, self.config, self.kind = engine_dir, runner, config, kind
        bc = config.get("build_config", {})
        self.max_batch_size = int(bc.get("max_batch_size", 1))
        self.max_input_len = int(bc.get("max_input_len", 0))
        self.max_seq_len = int(bc.get("max_seq_len", 0))

    @classmethod
    def from_dir(cls, engine_dir: str, rank: int = 0, use_py_session: bool = False,
                 kv_cache_free_gpu_memory_fraction: float = 0.9) -> "TrtllmRunner":
        if not is_trtllm_engine_dir(engine_dir):
            raise ConfigError(f"{engine_dir} is not a TensorRT-LLM engine directory "
                              "(config.json + rank*.engine)")
        if not tensorrt_llm_available():
            raise ConfigError(f"{engine_dir} is a TensorRT-LLM engine but tensorrt_llm is not "
                              "installed here")
        from tensorrt_llm.runtime import ModelRunner
        with open(os.path.join(engine_dir, "config.json")) as f:
            config = json.load(f)
        kind, runner = "ModelRunner", None
        if not use_py_session:
            try:
                from tensorrt_llm.runtime import ModelRunnerCpp
                runner = ModelRunnerCpp.from_dir(
                    engine_dir=engine_dir, rank=rank,
                    kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction)
                kind = "ModelRunnerCpp"
            except ImportError:
                runner = None
        if runner is None:
            runner = ModelRunner.from_dir(engine_dir=engine_dir, rank=rank)
        return cls(engine_dir, runner, config, kind)

    def generate(self, batch_input_ids: list, max_new_tokens: int, sampling=None,
                 end_id=None, streamer=None):
        """Same contract as ``Engine.generate``: generated tokens only, cut by the one
        stopping rule (``sampling.cut_at_stop``: the end ids — ``end_id``, one or several,
        replaced by ``sampling.end_id`` — and ``sampling.stop_words``)."""
        sampling = sampling or SamplingConfig()
        if len(batch_input_ids) > self.max_batch_size:
            raise ConfigError(f"batch of {len(batch_input_ids)} exceeds the engine's "
                              f"max_batch_size {self.max_batch_size}")
        default = [] if end_id is None else ([end_id] if isinstance(end_id, int) else end_id)
        end_ids = sampling.end_ids(default)
        eos = end_ids[0] if end_ids else -1  # -1: never stops early
        inputs = [torch.tensor(p, dtype=torch.int32) for p in batch_input_ids]
        kw = trtllm_generate_kwargs(sampling, end_ids, len(inputs))
        kw.update(max_new_tokens=max_new_tokens, output_sequence_lengths=True, return_dict=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            res = self.runner.generate(inputs, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        latency = time.perf_counter() - t0
        ids, lens = res["output_ids"], res["sequence_lengths"]  # [B, beams, T], [B, beams]
        out, total = [], 0
        for b, prompt in enumerate(batch_input_ids):
            row, _ = cut_at_stop(ids[b, 0, len(prompt):int(lens[b, 0])].tolist(), end_ids,
                                 sampling.stop_words)
            out.append(row)
            total += len(row)
        if streamer:
            for step in range(max((len(r) for r in out), default=0)):
                streamer(step, [r[step] if step < len(r) else eos for r in out])
        return GenerationOutput(out, total, latency)
