"""Hugging Face FP8 checkpoints as people download them, imported into our unified tensors; and
the packer that writes that layout from float weights (for tests and for handing models on).

Two published layouts, the same tensors per linear module (``model.layers.{i}.self_attn.q_proj``
...): ``weight`` float8_e4m3fn [N, K], ``weight_scale`` (per tensor: [1] or a scalar; per
channel: [N, 1]), ``input_scale`` [1] when activations are static. w = weight * weight_scale.

* ``quant_method: compressed-tensors`` (llm-compressor's "FP8" / "FP8-dynamic" schemes; format
  ``float-quantized`` or ``naive-quantized``): one config group targeting ``Linear`` with
  ``weights`` {num_bits 8, type float, symmetric, strategy tensor | channel} and
  ``input_activations`` {strategy tensor, dynamic false} (static) or {strategy token, dynamic
  true}; ``ignore`` lists modules left in float (we take ``lm_head`` only).
* ``quant_method: fp8`` (vLLM's / transformers' FP8 method): per-tensor ``weight_scale``,
  ``activation_scheme`` static (``input_scale``) or dynamic. Block-wise scales
  (``weight_block_size``, ``weight_scale_inv``) are refused.

Import: q, k, v (and gate, up) stack along N. Their per-tensor weight scales generally differ,
so a per-tensor checkpoint becomes per-channel here (each row keeps its module's scale: exact,
no re-quantization; ``fp8_per_channel``). Static input scales of modules sharing one input
(q/k/v; gate/up) become their maximum (vLLM does the same): nothing clips that did not before.

Imports: ``config``, ``kernels.fp8`` (dtype, bound), ``names``, ``formats.common``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import FP8, FP8_PCPT, ConfigError, ModelArgs, QuantConfig
from ..kernels.fp8 import E4M3_MAX, FP8_DTYPE
from ..names import layer_prefix
from .common import HF_FLOATS_GLOBAL, HF_FLOATS_LAYER, HF_MODULES, read_hf_dir

FP8_SCALE_NAMES = ("weights_scaling_factor", "per_channel_scale", "activation_scaling_factor")
_SHARED_INPUT = {"mlp.fc": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.gate": ("mlp.gate_proj", "mlp.up_proj")}


def fp8_hf_scheme(qc: dict) -> tuple[bool, bool]:
    """``quantization_config`` -> (per_channel weights, dynamic activations); one-line
    ``ConfigError`` for any layout we do not read."""
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ConfigError(f"FP8 checkpoint with block-wise weight scales "
                              f"(weight_block_size {qc['weight_block_size']}) is not supported; "
                              "per-tensor and per-channel scales are")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("static", "dynamic"):
            raise ConfigError(f"FP8 activation_scheme {scheme!r} is not supported (static, "
                              "dynamic)")
        _check_ignored(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or [])
        return False, scheme == "dynamic"
    if method != "compressed-tensors":
        raise ConfigError(f"quant_method {method!r} is not an FP8 checkpoint")
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(f"compressed-tensors format {fmt!r} is not supported for FP8 "
                          "(float-quantized, naive-quantized)")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups or any(g != groups[0] for g in groups):
        raise ConfigError("compressed-tensors: expected one FP8 config group (or identical ones)")
    g = groups[0]
    w, a = g.get("weights") or {}, g.get("input_activations")
    if (w.get("type"), w.get("num_bits"), w.get("symmetric", True)) != ("float", 8, True):
        raise ConfigError(f"compressed-tensors weights {w.get('type')}{w.get('num_bits')} are not "
                          "FP8 E4M3 (type float, 8 bits, symmetric)")
    if w.get("strategy") not in ("tensor", "channel"):
        raise ConfigError(f"compressed-tensors FP8 weight strategy {w.get('strategy')!r} is not "
                          "supported (tensor, channel)")
    if not a:
        raise ConfigError("compressed-tensors FP8 weight-only (no input_activations) is not "
                          "supported; FP8 W8A8 is")
    if (a.get("type"), a.get("num_bits")) != ("float", 8):
        raise ConfigError("compressed-tensors input activations are not FP8")
    dyn = bool(a.get("dynamic"))
    if (a.get("strategy"), dyn) not in (("tensor", False), ("token", True)):
        raise ConfigError(f"compressed-tensors FP8 activations strategy {a.get('strategy')!r} "
                          f"dynamic={dyn} are not supported (static per tensor, dynamic per "
                          "token)")
    _check_ignored(qc.get("ignore") or [])
    return w["strategy"] == "channel", dyn


def _check_ignored(names: list) -> None:
    other = [n for n in names if not n.endswith("lm_head")]
    if other:
        raise ConfigError(f"FP8 checkpoint leaves {other[:3]} in float; only lm_head may be "
                          "excluded here")


def _module(tensors: dict, mod: str, per_channel: bool, dynamic: bool):
    """-> (codes [N, K], scale float32 [N], input scale float32 [1] or None) of one HF module."""
    w = tensors.get(mod + ".weight")
    s = tensors.get(mod + ".weight_scale")
    if w is None or s is None:
        raise ConfigError(f"FP8 checkpoint is missing {mod}.weight / {mod}.weight_scale")
    if w.dtype != FP8_DTYPE:
        raise ConfigError(f"{mod}.weight is {w.dtype}, expected float8_e4m3fn")
    n = w.shape[0]
    if s.numel() == 1:
        s = s.float().reshape(1).expand(n)
    elif per_channel and tuple(s.shape) in ((n, 1), (n,)):
        s = s.float().reshape(n)
    else:
        raise ConfigError(f"{mod}.weight_scale has shape {tuple(s.shape)}; expected [1] (per "
                          f"tensor) or [{n}, 1] (per channel)")
    x = None
    if not dynamic:
        x = tensors.get(mod + ".input_scale")
        if x is None or x.numel() != 1:
            raise ConfigError(f"static FP8 needs a one-value {mod}.input_scale")
        x = x.float().reshape(1)
    return w, s, x


def fp8_hf_to_unified(args: ModelArgs, qc: dict, tensors: dict,
                      dtype: Optional[torch.dtype] = None) -> tuple[QuantConfig, dict]:
    """HF FP8 tensors + their ``quantization_config`` -> (QuantConfig, unified tensors)."""
    per_channel_src, dynamic = fp8_hf_scheme(qc)
    floats_dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    out = {}
    for uni, hf in HF_FLOATS_GLOBAL.items():
        if uni == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if hf not in tensors:
            raise ConfigError(f"checkpoint is missing tensor {hf}")
        out[uni] = tensors[hf].to(floats_dtype)
    for i in range(args.num_hidden_layers):
        src, dst = f"model.layers.{i}.", layer_prefix(i)
        for uni, hf in HF_FLOATS_LAYER.items():
            if src + hf not in tensors:
                raise ConfigError(f"checkpoint is missing tensor {src + hf}")
            out[dst + uni] = tensors[src + hf].to(floats_dtype)
        for uni, mods in HF_MODULES.items():
            parts = [_module(tensors, src + m, per_channel_src, dynamic) for m in mods]
            out[dst + uni + ".weight"] = torch.cat([p[0] for p in parts], dim=0).contiguous()
            out[dst + uni + ".per_channel_scale"] = torch.cat([p[1] for p in parts]).contiguous()
            if not dynamic:
                shared = [_module(tensors, src + m, per_channel_src, dynamic)[2]
                          for m in _SHARED_INPUT.get(uni, mods)]
                out[dst + uni + ".activation_scaling_factor"] = torch.stack(shared).amax(0)
    algo = FP8_PCPT if dynamic else FP8
    return QuantConfig(quant_algo=algo, fp8_per_channel=True, fp8_dynamic_act=dynamic), out


def load_fp8_hf_dir(path: str) -> tuple[ModelArgs, QuantConfig, dict]:
    """A HF FP8 directory (config.json + *.safetensors) -> (ModelArgs, QuantConfig, tensors)."""
    cfg, tensors = read_hf_dir(path)
    args = ModelArgs.from_hf_config(cfg)
    quant, out = fp8_hf_to_unified(args, cfg.get("quantization_config") or {}, tensors)
    return args, quant, out


# ---------------------------------------------------------------------------------------------
# The packer: float HF state dict -> the published layout
# ---------------------------------------------------------------------------------------------
def pack_fp8_hf(hf_sd: dict, per_channel: bool = False, input_amax: Optional[dict] = None,
                method: str = "compressed-tensors", scale_dtype: torch.dtype = torch.float32
                ) -> tuple[dict, dict]:
    """Quantize every linear of a float HF LLaMA state dict (not lm_head) the way the published
    FP8 checkpoints store it -> (``quantization_config``, tensors). ``input_amax``: {HF module:
    max |x|} makes static activations (``input_scale`` = amax / 448); None: dynamic."""
    if method == "fp8" and per_channel:
        raise ConfigError("quant_method fp8 stores per-tensor weight scales only")
    out = {}
    for name, t in hf_sd.items():
        mod = name[:-len(".weight")]
        if not (name.endswith(".weight") and t.dim() == 2 and ".layers." in name):
            out[name] = t
            continue
        w = t.float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
        s = (amax.clamp_min(1e-12) / E4M3_MAX).to(scale_dtype)
        out[name] = (w / s.float()).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
        out[mod + ".weight_scale"] = s
        if input_amax is not None:
            out[mod + ".input_scale"] = torch.tensor(
                [max(float(input_amax[mod]), 1e-12) / E4M3_MAX], dtype=scale_dtype)
    static = input_amax is not None
    if method == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
              "ignored_layers": ["lm_head"]}
        return qc, out
    args8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
             "block_structure": None, "actorder": None, "observer": "minmax",
             "observer_kwargs": {}}
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "quantization_status": "compressed", "ignore": ["lm_head"],
          "config_groups": {"group_0": {
              "targets": ["Linear"], "output_activations": None,
              "weights": {**args8, "strategy": "channel" if per_channel else "tensor",
                          "dynamic": False},
              "input_activations": {**args8, "strategy": "tensor" if static else "token",
                                    "dynamic": not static,
                                    "observer": "minmax" if static else None}}}}
    return qc, out
