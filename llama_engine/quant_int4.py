"""Zero-point (asymmetric) int4: the round-to-nearest quantizer and the quantized linear module.

The format (TensorRT-LLM's W4A16_GPTQ, and W4A16_AWQ with ``has_zero_point``): signed codes
q in [-8, 7] packed two per byte as the symmetric int4 format ([N, K/2], element 2j in the low
nibble), ``weights_scaling_factor`` s and ``zero`` z [K/G, N] in the model dtype, and

    w[n, k] = q[n, k] * s[k // G, n] + z[k // G, n]

G is 32, 64 or 128, or K (per output channel; QuantConfig.group_size 0). When G does not
divide K (SmolLM2's 576 with G = 128) the last group is narrower: ceil(K/G) groups, exactly
what TensorRT-LLM's rule of zero-padding K to a multiple of G computes (the padded inputs are
zero); the tensors are [ceil(K/G), N]. The additive zero
(not an integer zero point) holds every asymmetric family exactly or to one rounding of the
model dtype: AutoAWQ / GPTQ's integer zero zp on unsigned codes u = q + 8 gives
z = (8 - zp) * s; GGUF Q4_1's block minimum m gives z = m + 8 d. The symmetric format
(``quant.py``) stays: a zero of 0 everywhere would cost bytes for nothing.

Round to nearest with zeros: per group the range [min, max] (always including 0 so that an
all-positive group keeps small weights near zero representable) maps onto the 16 codes,
s = (max - min) / 15, z = min + 8 s, both rounded to their storage dtype first; then
q = clamp(round((w - z) / s), -8, 7) on the stored pair, so the reported error is the stored
format's. Max error: s/2 per weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import W4A16_GPTQ, ConfigError, QuantConfig
from .kernels import linear as K
from .kernels.int4_zp import dequantize_w4_zp, linear_w4a16_zp
from .kernels.reference import cpu_weight

ZP_GROUP_SIZES = (0, 32, 64, 128)


def quantize_int4_zp(w: torch.Tensor, group_size: int = 128,
                     scale_dtype: Optional[torch.dtype] = None,
                     clip: Optional[torch.Tensor] = None):
    """w[N, K] float -> (packed int8 [N, K/2], scales [K/G, N], zeros [K/G, N], max_abs_err).

    ``group_size`` 0 is per output channel (G = K); a G not dividing K gives a narrower last
    group. ``clip`` [N, ceil(K/G)] (optional, in (0, 1]):
    shrink each group's range by that factor before rounding (AWQ's clipping search)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"quantize_int4_zp: expected a float [N, K] weight, got {w.dtype} "
                          f"{tuple(w.shape)}")
    n, k = w.shape
    if k % 2:
        raise ConfigError(f"int4 packing needs an even input width, got K={k}")
    g = int(group_size) or k
    ng = -(-k // g)
    dtype = scale_dtype or w.dtype
    w32 = w.float() if w.dtype != torch.float64 else w
    wp = w32
    if k % g:  # pad the last group with its own first column: its min and max stay
        pad = w32[:, (ng - 1) * g:(ng - 1) * g + 1].expand(n, ng * g - k)
        wp = torch.cat([w32, pad], dim=1)
    wg = wp.reshape(n, ng, g)
    hi = wg.amax(dim=2).clamp_min(0)
    lo = wg.amin(dim=2).clamp_max(0)
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s)).to(dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))          # fp16 underflow -> 1
    z = (lo + 8 * s.to(lo.dtype)).to(dtype)
    q = torch.round((wg - z.to(wg.dtype)[..., None]) / s.to(wg.dtype)[..., None])
    q = q.clamp_(-8, 7).to(torch.int8).reshape(n, ng * g)[:, :k].contiguous()
    packed = K.pack_int4(q)
    s_t, z_t = s.t().contiguous(), z.t().contiguous()
    err = ((dequantize_w4_zp(packed, s_t, z_t, g, w32.dtype) - w32).abs().max().item()
           if w.numel() else 0.0)
    return packed, s_t, z_t, err


class WeightOnlyInt4ZeroLinear(nn.Module):
    """Zero-point int4 (see the module docstring): packed int8 [N, K/2], ``scales`` and
    ``zeros`` [K/G, N]; ``pre_quant_scale`` [K] (AWQ's, when not all ones) multiplies the input.

    Checkpoint tensors: ``weight``, ``weights_scaling_factor``, ``zero`` and, for W4A16_AWQ,
    ``prequant_scaling_factor``."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, pre_quant_scale: Optional[torch.Tensor] = None,
                 algo: Optional[str] = None):
        super().__init__()
        n, half_k = packed.shape
        k = 2 * half_k
        self.out_features, self.in_features = n, k
        self.group_size = int(group_size) or k
        self.per_channel = self.group_size == k
        self.algo = algo
        shape = (-(-k // self.group_size), n)
        for what, t in (("scales", scales), ("zeros", zeros)):
            if t.numel() != shape[0] * shape[1]:
                raise ConfigError(f"int4 with zeros: {what} {tuple(t.shape)} do not fit weight "
                                  f"[N={n}, K={k}] with group size {group_size}")
        if packed.dtype != torch.int8:
            raise ConfigError(f"int4 with zeros: weight must be packed int8, got {packed.dtype}")
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales.reshape(shape))
        self.register_buffer("zeros", zeros.reshape(shape).to(scales.dtype))
        if pre_quant_scale is not None and bool((pre_quant_scale != 1).any()):
            self.register_buffer("pre_quant_scale", pre_quant_scale.reshape(1, k))
        else:
            self.pre_quant_scale = None
        self._cpu_w: Optional[torch.Tensor] = None   # CPU only: the dequantized weight

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 128) -> "WeightOnlyInt4ZeroLinear":
        p, s, z, _ = quantize_int4_zp(w, group_size)
        return cls(p, s, z, group_size)

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: QuantConfig) -> "WeightOnlyInt4ZeroLinear":
        need = ("weight", "weights_scaling_factor", "zero")
        missing = [x for x in need if x not in tensors]
        if missing:
            raise ConfigError(f"{quant.quant_algo} with zeros needs tensors {list(need)}; "
                              f"missing {missing}")
        return cls(tensors["weight"], tensors["weights_scaling_factor"], tensors["zero"],
                   quant.group_size, tensors.get("prequant_scaling_factor"), quant.quant_algo)

    def checkpoint_tensors(self) -> dict:
        out = {"weight": self.weight, "weights_scaling_factor": self.scales, "zero": self.zeros}
        if self.algo != W4A16_GPTQ:
            out["prequant_scaling_factor"] = (
                self.pre_quant_scale.reshape(-1) if self.pre_quant_scale is not None else
                torch.ones(self.in_features, dtype=self.scales.dtype, device=self.scales.device))
        return out

    def dequantized(self) -> torch.Tensor:
        return dequantize_w4_zp(self.weight, self.scales, self.zeros, self.group_size,
                                self.scales.dtype)

    def forward(self, x, partials: bool = False):
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if not x.is_cuda:
            # The CPU reference dequantizes on every call; keep its dequantized weight (the
            # same numbers: fp32, or fp64 for fp64 inputs), as the group-wise int8 linear does.
            w = cpu_weight(self, x, lambda acc: dequantize_w4_zp(
                self.weight, self.scales, self.zeros, self.group_size, acc))
            return (x.to(w.dtype) @ w.t()).to(x.dtype)
        return linear_w4a16_zp(x, self.weight, self.scales, self.zeros, self.group_size,
                               partials=partials)
