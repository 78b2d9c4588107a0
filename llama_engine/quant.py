"""Quantization: round-to-nearest quantizers, drop-in quantized linears, checkpoint quantization.

Formats are TensorRT-LLM's (its unified checkpoint names them; docs/design.md gives the exact
tensors and layouts of each mode):

* ``W8A16``      - int8 weight-only, symmetric, one scale per output channel.
* ``W4A16``      - int4 weight-only, one scale per output channel.
* ``W4A16_AWQ``  - int4 weight-only with group-wise scales. We fill AWQ's layout with plain
  round-to-nearest (``prequant_scaling_factor`` = 1), the way TensorRT-LLM's
  ``--per_group`` weight-only path does.
* ``W8A8_SQ_*``  - SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): int8 weights (per channel
  or per tensor) times int8 activations (dynamic per token or static per tensor), after the
  smoothing done by ``llama_engine/smoothquant.py``.
* INT8 KV cache  - one scale per layer for K and V, from calibrated max |k|, |v|.
* ``FP8`` / ``FP8_PER_CHANNEL_PER_TOKEN`` - E4M3 weights and activations (``quant_fp8.py``).

Every quantizer returns its own error (max |w - dequant(q)|) so exports can report it; the
rounding bound is scale/2 per element (no clipping: the scale is taken from the max |w|).

int4 range: we use scale = amax/7 and clamp to [-8, 7] (the storable range). With amax/7 the
largest weight maps to exactly +-7, so nothing is ever clipped and the error stays <= scale/2;
the -8 code is simply unused. amax/8 would use the code but clip +amax to 7*scale (an error of
a whole step on the largest, most important weights). TensorRT-LLM's symmetric quantizer also
divides by 7.

The modules (``FloatLinear``, ``WeightOnlyInt8Linear``, ``WeightOnlyInt4Linear``,
``SmoothQuantLinear``) all take x[..., K] and return [..., N] (``forward(x, partials=True)``:
possibly the unsummed split-K ``PartialSum`` of kernels/partial.py, for a caller whose next
op sums it); their tensors are buffers kept in
their checkpoint dtypes (do not ``.to(float16)`` a model holding SmoothQuant layers: their
scales are float32 by format). ``make_linear`` is the one place that picks a module.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

import torch
from torch import nn

from .config import (KV_FP8, KV_INT8, SQ_ALGOS, W4A16, W4A16_GPTQ, W4A16_GROUPWISE, W8A16,
                     W8A16_GPTQ, ConfigError, ModelArgs, QuantConfig)
from .kernels import linear as K
from .names import linear_prefixes, linear_shape
from .quant_fp8 import Fp8Linear, fp8_from_flags, quantize_fp8_linear
from .quant_int4 import WeightOnlyInt4ZeroLinear, quantize_int4_zp
from .quant_int8 import INT8_GROUP_SIZES, WeightOnlyInt8GroupLinear, quantize_int8_group
from .quant_kv import _kv_scales, kv_cache_scale, kv_channel_scales, quantize_kv  # noqa: F401
from .smoothquant import smooth_unified

INT8_MAX = 127
INT4_MAX, INT4_MIN = 7, -8
GROUP_SIZES = (32, 64, 128)
DEFAULT_SQ_ALPHA = 0.5   # SmoothQuant's migration strength when none is given (paper's default)


# ---------------------------------------------------------------------------------------------
# Quantizers (symmetric round-to-nearest). Computed in float32; the scale is first rounded to
# its storage dtype so that the stored (q, scale) pair is what the error is measured on.
# ---------------------------------------------------------------------------------------------
def _safe_scale(amax: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """amax/qmax in ``dtype``; all-zero rows/groups get scale 1 (they quantize to 0 exactly)."""
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(dtype)
    # A tiny amax can underflow to 0 in float16: fall back to 1 there as well.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"{what}: expected a float [N, K] weight, got {w.dtype} "
                          f"{tuple(w.shape)}")


def quantize_int8_per_channel(w: torch.Tensor, scale_dtype: Optional[torch.dtype] = None):
    """w[N, K] float -> (q int8[N, K], scale[N], max_abs_err); scale in ``scale_dtype``
    (default w.dtype)."""
    _check_2d(w, "quantize_int8_per_channel")
    w32 = w.float()
    scale = _safe_scale(w32.abs().amax(dim=1), INT8_MAX, scale_dtype or w.dtype)  # [N]
    s32 = scale.float()[:, None]
    q = torch.round(w32 / s32).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    err = (q.float() * s32 - w32).abs().max().item() if w.numel() else 0.0
    return q, scale, err


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8[N, K], scale [N] (or [1, N] / [1, 1]) -> w[N, K]."""
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


def quantize_int8_per_tensor(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """w[N, K] -> (q int8[N, K], scale [1, 1], max_abs_err): one scale for the whole matrix."""
    _check_2d(w, "quantize_int8_per_tensor")
    w32 = w.float()
    scale = _safe_scale(w32.abs().amax().reshape(1, 1), INT8_MAX, scale_dtype)
    q = torch.round(w32 / scale.float()).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    err = (q.float() * scale.float() - w32).abs().max().item() if w.numel() else 0.0
    return q, scale, err


def quantize_int4(w: torch.Tensor, group_size: Optional[int] = None,
                  scale_dtype: Optional[torch.dtype] = None):
    """w[N, K] float -> (packed int8[N, K/2], scales, max_abs_err).

    ``group_size`` None (or 0) is per output channel: scales [N]. Otherwise scales are
    [K/G, N] (TensorRT-LLM's group-wise layout: row g holds the scales of input group g).
    Values are in [-8, 7] with scale = amax/7 (see the module docstring)."""
    _check_2d(w, "quantize_int4")
    n, k = w.shape
    if k % 2:
        raise ConfigError(f"int4 packing needs an even input width, got K={k}")
    dtype = scale_dtype or w.dtype
    w32 = w.float()
    if not group_size:
        scale = _safe_scale(w32.abs().amax(dim=1), INT4_MAX, dtype)  # [N]
        s_full = scale.float()[:, None].expand(n, k)
    else:
        if k % group_size:
            raise ConfigError(f"group size {group_size} does not divide K={k}")
        g = k // group_size
        amax = w32.reshape(n, g, group_size).abs().amax(dim=2)  # [N, K/G]
        scale = _safe_scale(amax, INT4_MAX, dtype).t().contiguous()  # [K/G, N]
        s_full = scale.float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    q = torch.round(w32 / s_full).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)
    err = (q.float() * s_full - w32).abs().max().item() if w.numel() else 0.0
    return K.pack_int4(q), scale, err


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed int8[N, K/2] + scales ([N] / [1, N] per channel, [K/G, N] group-wise) -> w[N, K]."""
    q = K.unpack_int4(packed).float()  # [N, K]
    n, k = q.shape
    if not group_size:
        s_full = scales.float().reshape(n, 1)
    else:
        s_full = scales.float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    return (q * s_full).to(dtype)


# ---------------------------------------------------------------------------------------------
# Drop-in linear modules: forward(x[M, K]) -> [M, N]
# ---------------------------------------------------------------------------------------------
def _require(tensors: dict, names: tuple, cls: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ConfigError(f"{cls} needs tensors {list(names)}; missing {missing}")


class FloatLinear(nn.Module):
    """Unquantized linear: weight [N, K] in the model dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: Optional[QuantConfig] = None) -> "FloatLinear":
        _require(tensors, ("weight",), cls.__name__)
        w = tensors["weight"]
        if not w.is_floating_point():
            raise ConfigError(f"FloatLinear: weight is {w.dtype}, expected a float dtype")
        return cls(w)

    def checkpoint_tensors(self) -> dict:
        return {"weight": self.weight}

    def forward(self, x, partials: bool = False):
        return K.linear_fp(x, self.weight, partials=partials)


class WeightOnlyInt8Linear(nn.Module):
    """W8A16: int8 weight [N, K], per-output-channel scale [N] in the model dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", qweight)
        self.register_buffer("scale", scale.reshape(-1))
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "WeightOnlyInt8Linear":
        q, s, _ = quantize_int8_per_channel(w)
        return cls(q, s)

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: Optional[QuantConfig] = None):
        _require(tensors, ("weight", "per_channel_scale"), cls.__name__)
        w, s = tensors["weight"], tensors["per_channel_scale"]
        if w.dtype != torch.int8 or s.numel() != w.shape[0]:
            raise ConfigError(f"W8A16 expects int8 weight [N, K] and per_channel_scale [N]; "
                              f"got {w.dtype} {tuple(w.shape)} and {tuple(s.shape)}")
        return cls(w, s)

    def checkpoint_tensors(self) -> dict:
        return {"weight": self.weight, "per_channel_scale": self.scale}

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8_per_channel(self.weight, self.scale, self.scale.dtype)

    def forward(self, x, partials: bool = False):
        return K.linear_w8a16(x, self.weight, self.scale, partials=partials)


class WeightOnlyInt4Linear(nn.Module):
    """W4A16: packed int4 weight int8[N, K/2]; scales [K/G, N] (per channel: G = K, [1, N]).

    ``pre_quant_scale`` [K] (AWQ's, ones for plain RTN) multiplies the input when not all ones."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: Optional[int],
                 pre_quant_scale: Optional[torch.Tensor] = None):
        super().__init__()
        n, half_k = packed.shape
        k = 2 * half_k
        self.out_features, self.in_features = n, k
        self.per_channel = not group_size
        self.group_size = k if self.per_channel else int(group_size)
        scales = scales.reshape(1, n) if self.per_channel else scales
        if k % self.group_size or tuple(scales.shape) != (k // self.group_size, n):
            raise ConfigError(f"W4A16: scales {tuple(scales.shape)} do not fit weight [N={n}, "
                              f"K={k}] with group size {self.group_size}")
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales)  # [K/G, N]
        if pre_quant_scale is not None and bool((pre_quant_scale != 1).any()):
            self.register_buffer("pre_quant_scale", pre_quant_scale.reshape(1, k))
        else:
            self.pre_quant_scale = None

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: Optional[int] = None):
        packed, s, _ = quantize_int4(w, group_size)
        return cls(packed, s, group_size)

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: QuantConfig):
        if quant.quant_algo == W4A16_GROUPWISE:
            _require(tensors, ("weight", "weights_scaling_factor"), cls.__name__)
            return cls(tensors["weight"], tensors["weights_scaling_factor"], quant.group_size,
                       tensors.get("prequant_scaling_factor"))
        _require(tensors, ("weight", "per_channel_scale"), cls.__name__)
        return cls(tensors["weight"], tensors["per_channel_scale"], None)

    def checkpoint_tensors(self) -> dict:
        if self.per_channel:
            return {"weight": self.weight, "per_channel_scale": self.scales.reshape(-1)}
        pqs = (self.pre_quant_scale.reshape(-1) if self.pre_quant_scale is not None else
               torch.ones(self.in_features, dtype=self.scales.dtype, device=self.scales.device))
        return {"weight": self.weight, "weights_scaling_factor": self.scales,
                "prequant_scaling_factor": pqs}

    def dequantized(self) -> torch.Tensor:
        g = None if self.per_channel else self.group_size
        return dequantize_int4(self.weight, self.scales, g, self.scales.dtype)

    def forward(self, x, partials: bool = False):
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        return K.linear_w4a16(x, self.weight, self.scales, self.group_size, partials=partials)


class SmoothQuantLinear(nn.Module):
    """W8A8 (SmoothQuant): int8 weight [N, K] with float32 scale [1, N] or [1, 1].

    Activations: divided by ``smoother`` [1, K] first when present (inputs of attention.dense
    and mlp.proj, whose smoothing cannot be folded into a norm), then quantized per token
    (dynamic) or with the static calibrated ``act_scale`` [1, 1] (per tensor)."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, per_token: bool,
                 act_scale: Optional[torch.Tensor] = None, smoother: Optional[torch.Tensor] = None):
        super().__init__()
        n, k = qweight.shape
        self.out_features, self.in_features = n, k
        self.per_token = bool(per_token)
        if not self.per_token and act_scale is None:
            raise ConfigError("SmoothQuant per-tensor activations need a calibrated act_scale")
        if tuple(w_scale.shape) not in ((1, n), (1, 1)):
            raise ConfigError(f"SmoothQuant per_channel_scale must be [1, {n}] or [1, 1], got "
                              f"{tuple(w_scale.shape)}")
        self.register_buffer("weight", qweight)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("act_scale",
                             None if self.per_token else act_scale.float().reshape(1, 1))
        self.register_buffer("smoother",
                             None if smoother is None else smoother.float().reshape(1, k))

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: QuantConfig):
        _require(tensors, ("weight", "per_channel_scale"), cls.__name__)
        if tensors["weight"].dtype != torch.int8:
            raise ConfigError(f"SmoothQuant weight must be int8, got {tensors['weight'].dtype}")
        if not quant.sq_per_token and "act_scale" not in tensors:
            raise ConfigError(f"{quant.quant_algo} needs a static act_scale tensor")
        return cls(tensors["weight"], tensors["per_channel_scale"], quant.sq_per_token,
                   tensors.get("act_scale"), tensors.get("smoother"))

    def checkpoint_tensors(self) -> dict:
        out = {"weight": self.weight, "per_channel_scale": self.w_scale}
        if self.act_scale is not None:
            out["act_scale"] = self.act_scale
        if self.smoother is not None:
            out["smoother"] = self.smoother
        return out

    def dequantized(self) -> torch.Tensor:
        """The effective float weight acting on the *unsmoothed* input (smoother folded back)."""
        w = self.weight.float() * self.w_scale.reshape(-1, 1) if self.w_scale.numel() > 1 \
            else self.weight.float() * self.w_scale
        if self.smoother is not None:
            w = w / self.smoother
        return w

    def forward(self, x, partials: bool = False):
        # smoother, activation quantization, int8 GEMM
        return K.linear_w8a8_dynamic(x, self.weight, self.w_scale, x.dtype,
                                     smoother=self.smoother,
                                     act_scale=None if self.per_token else self.act_scale,
                                     partials=partials)


# ---------------------------------------------------------------------------------------------
# The one factory
# ---------------------------------------------------------------------------------------------
def is_excluded(prefix: str, quant: QuantConfig) -> bool:
    """Whether ``prefix`` (e.g. 'lm_head') stays unquantized per ``quant.exclude_modules``."""
    for pat in quant.exclude_modules or ():
        if prefix == pat or prefix.endswith("." + pat) or fnmatch.fnmatch(prefix, pat):
            return True
    return False


def linear_class(prefix: str, quant: QuantConfig) -> type:
    """The module class a linear ``prefix`` gets under ``quant``."""
    if not quant.quant_algo or is_excluded(prefix, quant):
        return FloatLinear
    if quant.quant_algo == W8A16:
        return WeightOnlyInt8Linear
    if quant.quant_algo == W8A16_GPTQ:
        return WeightOnlyInt8GroupLinear
    if quant.int4_zero_point:
        return WeightOnlyInt4ZeroLinear
    if quant.quant_algo in (W4A16, W4A16_GROUPWISE):
        return WeightOnlyInt4Linear
    if quant.is_smooth_quant:
        return SmoothQuantLinear
    if quant.is_fp8:
        return Fp8Linear
    raise ConfigError(f"unsupported quant_algo {quant.quant_algo!r}")


def make_linear(prefix: str, tensors: dict, quant: QuantConfig) -> nn.Module:
    """Build the linear module for ``prefix`` from its tensors {suffix: Tensor}."""
    cls = linear_class(prefix, quant)
    try:
        return cls.from_checkpoint(tensors, quant)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Flag validation: every invalid combination is rejected here, with a one-line message.
# ---------------------------------------------------------------------------------------------
def validate_quant_flags(args: ModelArgs, use_weight_only: bool = False,
                         weight_only_precision: str = "int8", group_size: Optional[int] = None,
                         use_smooth_quant: bool = False, per_token: bool = False,
                         per_channel: bool = False, int8_kv_cache: bool = False,
                         fp8_kv_cache: bool = False, has_act_stats: bool = False, has_kv_stats: bool = False,
                         ckpt_quant: Optional[QuantConfig] = None,
                         smoothquant_alpha: Optional[float] = None,
                         has_zero_point: bool = False, fp8=None) -> QuantConfig:
    """Check build/convert quantization flags; return the QuantConfig they ask for.

    ``group_size`` None means the default (int4: 128, int8: per channel); 0 means per channel.
    ``weight_only_precision``: int8, int4 (round to nearest), int4_awq (AWQ's layout:
    pre-quant scales from calibration, hf_llama_convert.py) or int4_gptq (TensorRT-LLM's
    W4A16_GPTQ, always with zeros). ``has_zero_point``: int4 / int4_awq with zero points
    (asymmetric). ``smoothquant_alpha`` None means 0.5. ``has_act_stats`` / ``has_kv_stats``: calibrated SmoothQuant statistics / KV scales are
    available (from calibration or a calibrated checkpoint). ``ckpt_quant``: the quantization
    of an already-quantized checkpoint being built; the flags must agree with it. ``fp8``:
    (per_channel, dynamic_act) for FP8 W8A8 (quant_fp8.py), None for no FP8."""
    fp8q = fp8 and fp8_from_flags(fp8, has_act_stats or ckpt_quant is not None, use_weight_only,
                                  use_smooth_quant, per_token, per_channel, has_zero_point,
                                  group_size)
    if use_smooth_quant and use_weight_only:
        raise ConfigError("--use_smooth_quant cannot be combined with --use_weight_only: "
                          "SmoothQuant already quantizes the weights to int8 (TensorRT-LLM "
                          "rejects this combination too)")
    if (per_token or per_channel) and not use_smooth_quant:
        flag = "--per_token" if per_token else "--per_channel"
        raise ConfigError(f"{flag} only applies to SmoothQuant; add --use_smooth_quant "
                          "(or -sq ALPHA for hf_llama_convert.py)")
    if smoothquant_alpha is not None and not 0.0 <= smoothquant_alpha <= 1.0:
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {smoothquant_alpha}")
    if group_size is not None and not use_weight_only:
        raise ConfigError("--group_size applies to int4 weight-only; add --use_weight_only "
                          "--weight_only_precision int4")
    if has_zero_point and not (use_weight_only and weight_only_precision.startswith("int4")):
        raise ConfigError("--has_zero_point applies to int4 weight-only; add --use_weight_only "
                          "--weight_only_precision int4 (or int4_awq)")

    quant = fp8q or QuantConfig()
    if use_weight_only:
        if weight_only_precision not in WEIGHT_ONLY_PRECISIONS:
            raise ConfigError(f"--weight_only_precision must be int8 or int4 (or int4_awq, "
                              f"int4_gptq), got {weight_only_precision!r}")
        if weight_only_precision in ("int4_awq", "int4_gptq") or has_zero_point:
            quant = _int4_zero_or_awq(args, weight_only_precision, group_size, has_zero_point)
        elif weight_only_precision == "int8":
            if group_size and group_size not in INT8_GROUP_SIZES:
                raise ConfigError(f"--group_size {group_size} is not supported for int8; choose "
                                  "32, 64, 128 (W8A16_GPTQ), or 0 for per channel (W8A16)")
            if group_size:
                quant.quant_algo, quant.group_size = W8A16_GPTQ, int(group_size)
                quant.has_zero_point = True
            else:
                quant.quant_algo = W8A16
        else:
            g = 128 if group_size is None else int(group_size)
            if g and g not in GROUP_SIZES:
                raise ConfigError(f"--group_size {g} is not supported; choose 32, 64, 128, or 0 "
                                  "for per-channel int4")
            _check_int4_widths(args, g)
            if g:
                quant.quant_algo, quant.group_size = W4A16_GROUPWISE, g
            else:
                quant.quant_algo = W4A16
    elif use_smooth_quant:
        if not has_act_stats and ckpt_quant is None:
            raise ConfigError("--use_smooth_quant needs calibrated activation statistics: run "
                              "hf_llama_convert.py -i HF_DIR -o CKPT_DIR -sq 0.5 and build with "
                              "--ckpt_dir CKPT_DIR")
        quant.quant_algo = SQ_ALGOS[(bool(per_channel), bool(per_token))]
        quant.smoothquant_val = (DEFAULT_SQ_ALPHA if smoothquant_alpha is None
                                 else float(smoothquant_alpha))
    if int8_kv_cache and fp8_kv_cache:
        raise ConfigError("--int8_kv_cache and --fp8_kv_cache are two KV cache formats; "
                          "choose one")
    if int8_kv_cache or fp8_kv_cache:
        flag = "--int8_kv_cache" if int8_kv_cache else "--fp8_kv_cache"
        if not has_kv_stats:
            raise ConfigError(f"{flag} needs calibrated scales: run hf_llama_convert.py "
                              "--calibrate-kv-cache -i HF_DIR -o CKPT_DIR and build with "
                              "--ckpt_dir CKPT_DIR")
        quant.kv_cache_quant_algo = KV_INT8 if int8_kv_cache else KV_FP8

    if ckpt_quant is not None and ckpt_quant.quant_algo:
        def form(c):
            return c.quant_algo, c.int4_group_size, c.int4_zero_point, c.fp8_per_channel, \
                c.fp8_dynamic_act
        if quant.quant_algo and form(quant) != form(ckpt_quant):
            raise ConfigError(f"the checkpoint is already quantized as {ckpt_quant.describe()}; "
                              f"the flags ask for {quant.describe()} (drop the quantization "
                              "flags or convert again)")
        # An already-quantized checkpoint keeps its weights; the KV cache mode comes from the
        # flags (as TensorRT-LLM's build.py --int8_kv_cache: calibrated scales only allow it).
        quant = dataclasses.replace(ckpt_quant, exclude_modules=list(ckpt_quant.exclude_modules),
                                    kv_cache_quant_algo=quant.kv_cache_quant_algo)
    elif ckpt_quant is not None and use_smooth_quant:
        raise ConfigError("--use_smooth_quant: the checkpoint has no SmoothQuant weights; run "
                          "hf_llama_convert.py -sq ALPHA to make one")
    return quant


WEIGHT_ONLY_PRECISIONS = ("int8", "int4", "int4_awq", "int4_gptq")


def _int4_zero_or_awq(args: ModelArgs, precision: str, group_size: Optional[int],
                      has_zero_point: bool) -> QuantConfig:
    """QuantConfig of int4_awq / int4_gptq / int4 with zeros (group 0 = per channel)."""
    g = 128 if group_size is None else int(group_size)
    if g not in (0,) + GROUP_SIZES:
        raise ConfigError(f"--group_size {g} is not supported; choose 32, 64, 128, or 0 "
                          "for per-channel int4")
    if g == 0 and precision == "int4_awq" and not has_zero_point:
        raise ConfigError("int4_awq is group-wise; give --group_size 32, 64 or 128 (or add "
                          "--has_zero_point for per-channel scales and zeros)")
    _check_int4_widths(args, g, partial_last_group=True)
    if precision == "int4_gptq":
        return QuantConfig(quant_algo=W4A16_GPTQ, group_size=g, has_zero_point=True)
    return QuantConfig(quant_algo=W4A16_GROUPWISE, group_size=g, has_zero_point=has_zero_point,
                       pre_quant_scale=precision == "int4_awq")


def _check_int4_widths(args: ModelArgs, group_size: int, partial_last_group: bool = False
                       ) -> None:
    """Every int4 linear's input width must be even, and a multiple of the group size (the
    zero-point format allows a narrower last group: ``partial_last_group``)."""
    quant = QuantConfig()  # default exclusions (lm_head)
    for prefix in linear_prefixes(args):
        if is_excluded(prefix, quant):
            continue
        n, k = linear_shape(args, prefix)
        if group_size and k % group_size and not partial_last_group:
            ok = [g for g in GROUP_SIZES if k % g == 0]
            hint = f"use --group_size {ok[-1]}" if ok else "use --group_size 0 (per channel)"
            raise ConfigError(f"--group_size {group_size} does not divide the input width of "
                              f"{prefix}.weight [N={n}, K={k}]; {hint}")
        if k % 2:
            raise ConfigError(f"int4 needs an even input width; {prefix}.weight has K={k}")


# ---------------------------------------------------------------------------------------------
# Checkpoint quantization
# ---------------------------------------------------------------------------------------------
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32, "float64": torch.float64}


def quantize_checkpoint(tensors: dict, args: ModelArgs, quant: QuantConfig,
                        act_stats: Optional[dict] = None, kv_stats: Optional[dict] = None,
                        progress: bool = True, dtype: Optional[str | torch.dtype] = None,
                        pre_quant_scales: Optional[dict] = None,
                        int4_clips: Optional[dict] = None, sq_alphas: Optional[dict] = None,
                        int4_hessians: Optional[dict] = None, gptq_damp: float = 0.01,
                        gptq_act_order: bool = True, gptq_fit: bool = True):
    """Quantize unified float tensors as ``quant`` says -> (tensors, report).

    ``act_stats``: {linear prefix: max|x| per input channel [K]} from ``smoothquant.py``
    (required for SmoothQuant). ``kv_stats``: {'transformer.layers.{i}.attention': tensor
    [2, Hkv*D]} per-channel K maxima (the RoPE pair's norm, smoothquant.calibrate) and max |v|
    -> ``attention.k_cache_scale``,
    ``attention.v_cache_scale`` and ``attention.kv_cache_scaling_factor``; or the older
    tensor([max|k|, max|v|]) -> ``kv_cache_scaling_factor`` only. Required for an INT8 KV
    cache unless the tensors already carry the scales (passed through). ``dtype``: the model
    dtype for float tensors and weight-only scales (default: that of the input weights).
    ``pre_quant_scales``: {linear prefix: p [K]} (AWQ, ``awq.py``): the weights are already
    scaled by 1/p, the input is multiplied by p (``prequant_scaling_factor``). ``int4_clips``:
    {linear prefix: [N, K/G] range factors} (AWQ's clipping search; zero-point int4 only).
    ``int4_hessians``: {linear prefix: [K, K]} gram of its calibration inputs: zero-point int4
    and group-wise int8 round those linears with GPTQ (``gptq.py``, dampening ``gptq_damp``)
    instead of to nearest; ``gptq_fit``: GPTQ's grids fitted by least squares on the output
    error before its pass (``gptq.fit_grid``) and refitted to its codes after it
    (``gptq.refit_scales``).
    ``sq_alphas``: SmoothQuant's alpha per smoothed group (``smoothquant.search_alphas``)
    instead of ``quant.smoothquant_val`` for every layer.
    The input dict is not modified.

    ``report`` = {"tensors": {prefix: {"algo", "max_abs_err", "rel_err"}}, "worst_rel_err",
    "mean_rel_err", "kv_scales": {...}} (rel_err: ||W - dequant||_F / ||W||_F)."""
    if isinstance(dtype, str):
        dtype = _FLOAT_DTYPES[dtype]
    out = dict(tensors)
    if dtype is not None:
        # Only the model's float weights take the model dtype: float32-by-format tensors
        # (KV / SmoothQuant scales) already present keep theirs.
        out = {k: (v.to(dtype) if v.is_floating_point() and k.endswith(".weight") else v)
               for k, v in out.items()}
    report: dict = {"quant": quant.describe(), "tensors": {},
                    "kv_algo": quant.kv_cache_quant_algo}

    if quant.is_smooth_quant:
        if act_stats is None:
            raise ConfigError("SmoothQuant needs calibrated activation statistics: run "
                              "hf_llama_convert.py -sq ALPHA (it calibrates)")
        if quant.smoothquant_val is None:
            raise ConfigError("SmoothQuant needs its alpha (QuantConfig.smoothquant_val)")
        # Smoothing in float32 (on the original precision weights), then back to model dtype.
        float_dtype = dtype or tensors["transformer.ln_f.weight"].dtype
        f32 = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        f32, smoothed_stats, smoothers = smooth_unified(f32, args, act_stats,
                                                        sq_alphas or quant.smoothquant_val)
        out = {k: v.to(float_dtype) if v.is_floating_point() and k.endswith(".weight") else v
               for k, v in f32.items()}
        for prefix, s in smoothers.items():
            out[prefix + ".smoother"] = s.float().reshape(1, -1)
        act_stats = smoothed_stats
        # The smoothed float32 weights are quantized directly (no detour through fp16).
        src = f32
    else:
        src = out

    prefixes = [p for p in _linear_prefixes(args) if not is_excluded(p, quant)]
    if quant.quant_algo:
        it = prefixes
        if progress:
            from tqdm import tqdm
            it = tqdm(prefixes, desc=f"quantizing ({quant.describe()})", unit="linear")
        for prefix in it:
            w = src[prefix + ".weight"]
            if not w.is_floating_point():
                raise ConfigError(f"{prefix}.weight is already {w.dtype}; the checkpoint is "
                                  "already quantized")
            scale_dtype = dtype or w.dtype
            new, deq = _quantize_linear(w, quant, scale_dtype,
                                        None if act_stats is None else act_stats.get(prefix),
                                        prefix, (int4_clips or {}).get(prefix),
                                        (int4_hessians or {}).get(prefix),
                                        (gptq_damp, gptq_act_order, gptq_fit))
            if pre_quant_scales and prefix in pre_quant_scales:
                new["prequant_scaling_factor"] = pre_quant_scales[prefix].to(scale_dtype)
            for suffix, t in new.items():
                out[f"{prefix}.{suffix}"] = t
            w32 = w.float()
            report["tensors"][prefix] = {
                "algo": quant.quant_algo,
                "max_abs_err": (deq - w32).abs().max().item(),
                "rel_err": ((deq - w32).norm() / w32.norm().clamp_min(1e-30)).item(),
            }
        rels = [r["rel_err"] for r in report["tensors"].values()]
        if rels:
            report["worst_rel_err"] = max(rels)
            report["mean_rel_err"] = sum(rels) / len(rels)

    if quant.kv_cache_dtype:
        out.update(_kv_scales(tensors, args, kv_stats, quant.kv_cache_quant_algo))
        report["kv_scales"] = {k: v.item() for k, v in out.items()
                               if k.endswith("kv_cache_scaling_factor")}
        chan = {k: v for k, v in out.items() if k.endswith(".k_cache_scale")
                or k.endswith(".v_cache_scale")}
        if chan:
            # how much finer the per-channel grid is than the per-layer one (median channel)
            ratio = {kind: [] for kind in ("k", "v")}
            for k, v in chan.items():
                layer = out[k.rpartition(".")[0] + ".kv_cache_scaling_factor"].item()
                ratio[k.rpartition(".")[2][0]].append(layer / v.float().median().item())
            report["kv_channel_scales"] = {
                "layers": len(chan) // 2,
                "k_median_gain": sorted(ratio["k"])[len(ratio["k"]) // 2],
                "v_median_gain": sorted(ratio["v"])[len(ratio["v"]) // 2]}
    return out, report


def format_report(report: dict) -> str:
    """A few lines summarizing ``quantize_checkpoint``'s report (for build logs)."""
    lines = [f"quantization: {report.get('quant', '?')}"]
    t = report.get("tensors") or {}
    if t:
        worst = max(t, key=lambda p: t[p]["rel_err"])
        lines.append(f"  {len(t)} linears quantized; relative weight error mean "
                     f"{report['mean_rel_err']:.4f}, worst {t[worst]['rel_err']:.4f} ({worst})")
    kv = report.get("kv_scales") or {}
    if kv:
        vals = list(kv.values())
        lines.append(f"  {report.get('kv_algo') or 'INT8'} KV scales for {len(vals)} layers: {min(vals):.4g} .. "
                     f"{max(vals):.4g}")
    ch = report.get("kv_channel_scales")
    if ch:
        lines.append(f"  per-(KV head, channel) K/V scales in {ch['layers']} layers; the median "
                     f"channel's step is {ch['k_median_gain']:.1f}x (K) / "
                     f"{ch['v_median_gain']:.1f}x (V) finer than the per-layer scale's "
                     "(median layer)")
    return "\n".join(lines)


def _linear_prefixes(args: ModelArgs) -> list[str]:
    return linear_prefixes(args)


def _quantize_linear(w: torch.Tensor, quant: QuantConfig, scale_dtype: torch.dtype,
                     x_max: Optional[torch.Tensor], prefix: str,
                     clip: Optional[torch.Tensor] = None, hess: Optional[torch.Tensor] = None,
                     gptq: tuple = (0.01, True, True)):
    """-> ({suffix: tensor} of the linear, dequantized float32 weight for the report).
    ``gptq`` = (damp, act order, fit grids) when ``hess`` is given."""
    algo = quant.quant_algo
    if quant.int4_zero_point:
        g = quant.group_size
        p, s, z, _ = quantize_int4_zp(w, g, scale_dtype, clip)
        if hess is not None:
            from .gptq import gptq_rounding
            q, s, z = gptq_rounding(w, hess, g, scale_dtype, (s, z), clip, *gptq)
            p = K.pack_int4(q.to(w.device))
        new = {"weight": p, "weights_scaling_factor": s, "zero": z}
        if algo != W4A16_GPTQ:
            new["prequant_scaling_factor"] = torch.ones(w.shape[1], dtype=scale_dtype,
                                                        device=w.device)
        return new, WeightOnlyInt4ZeroLinear(p, s, z, g).dequantized().float()
    if algo == W8A16_GPTQ:
        qsz = quantize_int8_group(w, quant.group_size, scale_dtype)[:3]
        if hess is not None:
            from .gptq import gptq_rounding
            qsz = gptq_rounding(w, hess, quant.group_size, scale_dtype, qsz[1:], None, *gptq,
                                bits=8)
        mod = WeightOnlyInt8GroupLinear(*qsz, quant.group_size)
        return mod.checkpoint_tensors(), mod.dequantized().float()
    if algo == W8A16:
        q, s, _ = quantize_int8_per_channel(w, scale_dtype)
        return {"weight": q, "per_channel_scale": s}, dequantize_int8_per_channel(q, s)
    if algo == W4A16:
        p, s, _ = quantize_int4(w, None, scale_dtype)
        return {"weight": p, "per_channel_scale": s}, dequantize_int4(p, s, None)
    if algo == W4A16_GROUPWISE:
        g = quant.group_size
        if w.shape[1] % g:
            raise ConfigError(f"group size {g} does not divide the input width of "
                              f"{prefix}.weight {list(w.shape)}")
        p, s, _ = quantize_int4(w, g, scale_dtype)
        ones = torch.ones(w.shape[1], dtype=scale_dtype, device=w.device)
        return ({"weight": p, "weights_scaling_factor": s, "prequant_scaling_factor": ones},
                dequantize_int4(p, s, g))
    if quant.is_fp8:
        return quantize_fp8_linear(w, quant, x_max, prefix)
    if quant.is_smooth_quant:
        if quant.sq_per_channel:
            q, s, _ = quantize_int8_per_channel(w, torch.float32)
            s = s.reshape(1, -1)
        else:
            q, s, _ = quantize_int8_per_tensor(w, torch.float32)
        new = {"weight": q, "per_channel_scale": s}
        if not quant.sq_per_token:
            if x_max is None:
                raise ConfigError(f"no calibrated activation maximum for {prefix}")
            amax = float(x_max.float().max())
            new["act_scale"] = torch.tensor([[amax / INT8_MAX if amax > 0 else 1.0]],
                                            dtype=torch.float32)
        return new, dequantize_int8_per_channel(q, s) if s.numel() > 1 else q.float() * s.float()
    raise ConfigError(f"unsupported quant_algo {algo!r}")
