"""FP8 (E4M3) weights and activations: the quantizer, the ``Fp8Linear`` module that
``quant.make_linear`` builds for ``quant_algo`` FP8 / FP8_PER_CHANNEL_PER_TOKEN, the flag checks.

Checkpoint tensors of one linear (TensorRT-LLM's names, docs/fp8.md has the spec table):

* ``weight``                    float8_e4m3fn [N, K], codes wq = e4m3(clamp(w / ws, +-448));
* ``weights_scaling_factor``    float32 [1]   per-tensor weight scale (``fp8_per_channel`` off);
* ``per_channel_scale``         float32 [N]   per-channel weight scales (``fp8_per_channel``);
* ``activation_scaling_factor`` float32 [1]   static input scale = calibrated amax / 448
  (absent with ``fp8_dynamic_act``: per-token scales amax(row) / 448 at run time).

The weight scale is amax / 448 (E4M3's largest finite value), so no weight is clipped; E4M3 has
3 mantissa bits, so the rounding error of a weight is at most half a step: |w - dq(q)| <=
2^-4 |w| for normal values, and half of the smallest subnormal step (2^-10 ws) below 2^-6 ws.

Arithmetic and kernels: ``kernels/fp8.py`` (CPU: the same arithmetic with torch's float8
dtypes). FP8 needs a GPU with FP8 tensor cores (compute capability >= 8.9): building the
module on another CUDA device is a one-line ``ConfigError`` at engine load.

Imports: ``config``, ``kernels.fp8`` (through ``kernels.ops``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import FP8, FP8_PCPT, ConfigError, QuantConfig
from .kernels.fp8 import E4M3_MAX, FP8_DTYPE, fp8_supported
from .kernels.ops import linear_fp8
from .kernels.reference import cpu_weight

__all__ = ["E4M3_MAX", "FP8_DTYPE", "Fp8Linear", "quantize_fp8", "dequantize_fp8",
           "fp8_quant_config", "quantize_fp8_linear", "fp8_from_flags", "act_scale_from_amax"]

AMAX_EPS = 1e-12


def quantize_fp8(w: torch.Tensor, per_channel: bool = False):
    """w[N, K] float -> (codes float8_e4m3fn [N, K], scale float32 [1] or [N], max_abs_err)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"quantize_fp8: expected a float [N, K] weight, got {w.dtype} "
                          f"{tuple(w.shape)}")
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    wa = w.to(acc)
    amax = wa.abs().amax(dim=1) if per_channel else wa.abs().amax().reshape(1)
    scale = (amax.clamp_min(AMAX_EPS) / E4M3_MAX).float()
    s = scale.to(acc).reshape(-1, 1)
    q = (wa / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    err = (q.to(acc) * s - wa).abs().max().item() if w.numel() else 0.0
    return q, scale, err


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [N, K] e4m3 + scale [1] / [N] -> w [N, K] in ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(acc) * scale.to(acc).reshape(-1, 1)).to(dtype)


def act_scale_from_amax(amax) -> torch.Tensor:
    """Static activation scale [1] float32 from a calibrated max |x| (a scalar or per-channel)."""
    a = float(torch.as_tensor(amax).float().max())
    return torch.tensor([max(a, AMAX_EPS) / E4M3_MAX], dtype=torch.float32)


class Fp8Linear(nn.Module):
    """FP8 W8A8: weight e4m3 [N, K], weight scale float32 [1] or [N], static activation scale
    float32 [1] or None (per token at run time). forward(x[..., K]) -> [..., N] in x's dtype."""

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor,
                 act_scale: Optional[torch.Tensor] = None):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ConfigError(f"Fp8Linear: weight must be float8_e4m3fn [N, K], got "
                              f"{weight.dtype} {tuple(weight.shape)}")
        if weight.is_cuda and not fp8_supported(weight.device):
            cap = torch.cuda.get_device_capability(weight.device)
            raise ConfigError(f"FP8 needs a GPU with FP8 tensor cores (compute capability >= "
                              f"8.9: Ada, Hopper); {torch.cuda.get_device_name(weight.device)} "
                              f"is {cap[0]}.{cap[1]}; use int8 (W8A16 / SmoothQuant) there")
        n, k = weight.shape
        self.out_features, self.in_features = n, k
        s = w_scale.float().reshape(-1)
        if s.numel() not in (1, n):
            if s.numel() > 1 and n % s.numel() == 0:
                # Linears stacked along N (gate+up fused by model.fuse_gate_up), each with its
                # own per-tensor scale: one scale per output channel.
                s = s.repeat_interleave(n // s.numel())
            else:
                raise ConfigError(f"FP8 weight scale has {s.numel()} values; expected 1 (per "
                                  f"tensor) or {n} (per channel)")
        if act_scale is not None and act_scale.numel() != 1:
            raise ConfigError(f"FP8 activation_scaling_factor must be one value (per tensor), "
                              f"got shape {tuple(act_scale.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("w_scale", s.contiguous())
        self.register_buffer("act_scale",
                             None if act_scale is None else act_scale.float().reshape(1))
        self._cpu_w: Optional[torch.Tensor] = None   # CPU only: the widened weight

    @property
    def per_channel(self) -> bool:
        return self.w_scale.numel() > 1

    @classmethod
    def from_float(cls, w: torch.Tensor, per_channel: bool = False,
                   act_amax: Optional[float] = None) -> "Fp8Linear":
        q, s, _ = quantize_fp8(w, per_channel)
        return cls(q, s, None if act_amax is None else act_scale_from_amax(act_amax))

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: QuantConfig) -> "Fp8Linear":
        if "weight" not in tensors:
            raise ConfigError("Fp8Linear needs tensor 'weight'")
        w = tensors["weight"]
        if w.dtype != FP8_DTYPE:
            raise ConfigError(f"{quant.quant_algo}: weight must be float8_e4m3fn, got {w.dtype}")
        name = "per_channel_scale" if quant.fp8_per_channel else "weights_scaling_factor"
        if name not in tensors:
            have = sorted(k for k in tensors if k != "weight")
            raise ConfigError(f"{quant.describe()} needs '{name}' (has {have})")
        act = tensors.get("activation_scaling_factor")
        if not quant.fp8_dynamic_act and act is None:
            raise ConfigError(f"{quant.describe()} needs a calibrated "
                              "'activation_scaling_factor'")
        return cls(w, tensors[name], None if quant.fp8_dynamic_act else act)

    def checkpoint_tensors(self) -> dict:
        out = {"weight": self.weight}
        if self.per_channel:
            out["per_channel_scale"] = self.w_scale
        else:
            out["weights_scaling_factor"] = self.w_scale.reshape(1)
        if self.act_scale is not None:
            out["activation_scaling_factor"] = self.act_scale
        return out

    def dequantized(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.w_scale)

    def forward(self, x, partials: bool = False):
        if not x.is_cuda:
            # The CPU emulation widens every e4m3 weight on every call; keep the widened copy
            # (the same numbers), as the other quantized linears' CPU paths do.
            return linear_fp8(x, self.weight, self.w_scale, self.act_scale,
                              w_widened=cpu_weight(self, x, self.weight.to))
        return linear_fp8(x, self.weight, self.w_scale, self.act_scale)


# ---------------------------------------------------------------------------------------------
# Flags -> QuantConfig, and the checkpoint quantizer of one linear
# ---------------------------------------------------------------------------------------------
def fp8_quant_config(per_channel: bool = False, dynamic_act: bool = False) -> QuantConfig:
    """TensorRT-LLM's FP8 (per tensor, static) or FP8_PER_CHANNEL_PER_TOKEN; the two mixed
    forms are ours (quant_algo FP8 with the fields set)."""
    algo = FP8_PCPT if per_channel and dynamic_act else FP8
    return QuantConfig(quant_algo=algo, fp8_per_channel=per_channel, fp8_dynamic_act=dynamic_act)


def fp8_from_flags(fp8: tuple, calibrated: bool, use_weight_only: bool = False,
                   use_smooth_quant: bool = False, per_token: bool = False,
                   per_channel: bool = False, has_zero_point: bool = False,
                   group_size=None) -> QuantConfig:
    """``fp8`` = (per_channel, dynamic_act) -> QuantConfig. FP8 quantizes weights and
    activations itself: every other weight mode is refused; static activation scales need
    ``calibrated`` statistics (or an already-quantized checkpoint)."""
    if use_smooth_quant:
        raise ConfigError("FP8 cannot be combined with SmoothQuant: FP8 already quantizes "
                          "weights and activations (drop --use_smooth_quant / -sq)")
    if use_weight_only or has_zero_point or group_size is not None:
        raise ConfigError("FP8 cannot be combined with weight-only quantization "
                          "(--use_weight_only, --group_size, --has_zero_point): pick one")
    if per_token or per_channel:
        raise ConfigError("--per_token / --per_channel are SmoothQuant's; for FP8 use "
                          "--fp8_per_channel / --fp8_dynamic_act")
    if not fp8[1] and not calibrated:
        raise ConfigError("FP8 with static activation scales needs calibration: run "
                          "hf_llama_convert.py --qformat fp8 (or add --fp8_dynamic_act)")
    return fp8_quant_config(*fp8)


def quantize_fp8_linear(w: torch.Tensor, quant: QuantConfig, x_max: Optional[torch.Tensor],
                        prefix: str):
    """-> ({suffix: tensor}, dequantized float32 weight) for ``quant.quantize_checkpoint``."""
    q, s, _ = quantize_fp8(w, quant.fp8_per_channel)
    new = {"weight": q}
    new["per_channel_scale" if quant.fp8_per_channel else "weights_scaling_factor"] = s
    if not quant.fp8_dynamic_act:
        if x_max is None:
            raise ConfigError(f"no calibrated activation maximum for {prefix} (FP8 static "
                              "activations need calibration: --calib_dataset)")
        new["activation_scaling_factor"] = act_scale_from_amax(x_max)
    return new, dequantize_fp8(q, s)
