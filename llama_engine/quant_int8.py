"""Group-wise int8 weight-only (TensorRT-LLM's ``W8A16_GPTQ``): the quantizer and the linear.

Per-channel int8 round-to-nearest (``W8A16``, ``quant.py``) keeps one scale per output row, so
one large weight in a row coarsens the grid of the whole row; on SmolLM2 that costs 2.3% top-1
agreement with the float engine. Groups of G input channels (32, 64 or 128) each get their own
range, which TensorRT-LLM names ``W8A16_GPTQ`` in its QuantAlgo (int8 weights with group-wise
scales and zeros, the GPTQ layout). We fill it by round to nearest (no GPTQ error feedback).

Format (ours; docs/trtllm-format.md gives TensorRT-LLM's transposes): ``weight`` int8 [N, K]
signed codes q in [-128, 127], ``weights_scaling_factor`` s and ``zero`` z [ceil(K/G), N] in
the model dtype, and

    w[n, k] = q[n, k] * s[k // G, n] + z[k // G, n]

(the additive zero of the zero-point int4 format, ``quant_int4.py``). A G that does not divide
K gives a narrower last group (TensorRT-LLM's zero padding of K computes the same). Round to
nearest with zeros: per group the range [min, max] (always including 0) maps onto the 256
codes, s = (max - min) / 255, z = min + 128 s, both rounded to their storage dtype first, then
q = clamp(round((w - z) / s), -128, 127) on the stored pair: max error s/2 per weight.

The op is ``kernels/int8_group.py`` (Triton skinny kernel for decode, dequantize + matmul
elsewhere).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import W4A16_GPTQ, W4A16_GROUPWISE, W8A16_GPTQ, ConfigError, ModelArgs, QuantConfig
from .kernels.int8_group import dequantize_w8_group, linear_w8a16_group
from .kernels.reference import cpu_weight
from .names import linear_shape
from .trtllm_int4 import int4_group_from_trtllm, int4_group_to_trtllm

INT8_GROUP_SIZES = (32, 64, 128)


def quantize_int8_group(w: torch.Tensor, group_size: int = 128,
                        scale_dtype: Optional[torch.dtype] = None):
    """w[N, K] float -> (q int8 [N, K], scales [K/G, N], zeros [K/G, N], max_abs_err)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"quantize_int8_group: expected a float [N, K] weight, got {w.dtype} "
                          f"{tuple(w.shape)}")
    n, k = w.shape
    g = int(group_size) or k
    if g <= 0:
        raise ConfigError(f"quantize_int8_group: group size {group_size} must be positive")
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
    s = (hi - lo) / 255
    s = torch.where(s > 0, s, torch.ones_like(s)).to(dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))          # fp16 underflow -> 1
    z = (lo + 128 * s.to(lo.dtype)).to(dtype)
    q = torch.round((wg - z.to(wg.dtype)[..., None]) / s.to(wg.dtype)[..., None])
    q = q.clamp_(-128, 127).to(torch.int8).reshape(n, ng * g)[:, :k].contiguous()
    s_t, z_t = s.t().contiguous(), z.t().contiguous()
    err = ((dequantize_w8_group(q, s_t, z_t, g, w32.dtype) - w32).abs().max().item()
           if w.numel() else 0.0)
    return q, s_t, z_t, err


class WeightOnlyInt8GroupLinear(nn.Module):
    """Group-wise int8 (module docstring): int8 [N, K], ``scales`` and ``zeros`` [K/G, N].

    Checkpoint tensors: ``weight``, ``weights_scaling_factor``, ``zero``."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ConfigError(f"group-wise int8: weight must be int8 [N, K], got "
                              f"{qweight.dtype} {tuple(qweight.shape)}")
        n, k = qweight.shape
        self.out_features, self.in_features = n, k
        self.group_size = int(group_size) or k
        shape = (-(-k // self.group_size), n)
        for what, t in (("scales", scales), ("zeros", zeros)):
            if t.numel() != shape[0] * shape[1]:
                raise ConfigError(f"group-wise int8: {what} {tuple(t.shape)} do not fit weight "
                                  f"[N={n}, K={k}] with group size {group_size}")
        self.register_buffer("weight", qweight)
        self.register_buffer("scales", scales.reshape(shape))
        self.register_buffer("zeros", zeros.reshape(shape).to(scales.dtype))
        self._cpu_w: Optional[torch.Tensor] = None   # CPU only: the dequantized weight

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 128) -> "WeightOnlyInt8GroupLinear":
        q, s, z, _ = quantize_int8_group(w, group_size)
        return cls(q, s, z, group_size)

    @classmethod
    def from_checkpoint(cls, tensors: dict, quant: QuantConfig) -> "WeightOnlyInt8GroupLinear":
        need = ("weight", "weights_scaling_factor", "zero")
        missing = [x for x in need if x not in tensors]
        if missing:
            raise ConfigError(f"{quant.quant_algo} needs tensors {list(need)}; missing {missing}")
        return cls(tensors["weight"], tensors["weights_scaling_factor"], tensors["zero"],
                   quant.group_size)

    def checkpoint_tensors(self) -> dict:
        return {"weight": self.weight, "weights_scaling_factor": self.scales, "zero": self.zeros}

    def dequantized(self) -> torch.Tensor:
        return dequantize_w8_group(self.weight, self.scales, self.zeros, self.group_size,
                                   self.scales.dtype)

    def forward(self, x, partials: bool = False):
        if not x.is_cuda:
            # The CPU reference dequantizes on every call; keep its dequantized weight (the
            # same numbers: fp32, or fp64 for fp64 inputs) so CPU evaluation is not bound by it.
            w = cpu_weight(self, x, lambda acc: dequantize_w8_group(
                self.weight, self.scales, self.zeros, self.group_size, acc))
            return (x.to(w.dtype) @ w.t()).to(x.dtype)
        return linear_w8a16_group(x, self.weight, self.scales, self.zeros, self.group_size,
                                  partials=partials)


# ---------------------------------------------------------------------------------------------
# TensorRT-LLM's W8A16_GPTQ checkpoint tensors <-> ours (trtllm.py calls group_*_trtllm for
# every group-wise algo; int4's are trtllm_int4.py's)
# ---------------------------------------------------------------------------------------------
GROUPWISE_ALGOS = (W4A16_GROUPWISE, W4A16_GPTQ, W8A16_GPTQ)


def group_to_trtllm(out: dict, prefixes: list, quant: QuantConfig, fdt: torch.dtype,
                    need) -> None:
    """Ours -> TensorRT-LLM for any of ``GROUPWISE_ALGOS``, in place on ``out``."""
    if quant.quant_algo == W8A16_GPTQ:
        return int8_group_to_trtllm(out, prefixes, quant, fdt, need)
    return int4_group_to_trtllm(out, prefixes, quant, fdt, need)


def group_from_trtllm(out: dict, prefixes: list, quant: QuantConfig, fdt: torch.dtype,
                      need, args: ModelArgs) -> None:
    """TensorRT-LLM -> ours for any of ``GROUPWISE_ALGOS``, in place on ``out``."""
    if quant.quant_algo == W8A16_GPTQ:
        return int8_group_from_trtllm(out, prefixes, quant, fdt, need,
                                      {p: linear_shape(args, p)[1] for p in prefixes})
    return int4_group_from_trtllm(out, prefixes, quant, fdt, need, args)


# TensorRT-LLM's group-wise layout is its W4A16_GPTQ one (``trtllm_int4.py``) with one code per
# byte: ``weight`` int8 [N, K_pad], ``weights_scaling_factor`` and ``zero`` [N, K_pad/G], K
# zero-padded to a multiple of G. Written from that layout, not checked against a TensorRT-LLM
# install (none here); ours -> TensorRT-LLM -> ours is bit-identical (pure re-layout).
def int8_group_to_trtllm(out: dict, prefixes: list, quant: QuantConfig, fdt: torch.dtype,
                         need) -> None:
    """Ours -> TensorRT-LLM, in place on ``out`` (float, excluded linears stay)."""
    g = quant.group_size
    for p in prefixes:
        w = need(out, p + ".weight")
        if w.is_floating_point():
            continue
        if w.shape[1] % g:
            w = torch.nn.functional.pad(w, (0, -w.shape[1] % g))
        out[p + ".weight"] = w.contiguous()
        for name in ("weights_scaling_factor", "zero"):
            out[f"{p}.{name}"] = need(out, f"{p}.{name}").t().contiguous().to(fdt)


def int8_group_from_trtllm(out: dict, prefixes: list, quant: QuantConfig, fdt: torch.dtype,
                           need, widths: dict) -> None:
    """TensorRT-LLM -> ours, in place; ``widths`` {prefix: K of the architecture} (a K padded
    to a multiple of G is cut back: our narrower last group)."""
    g = quant.group_size
    for p in prefixes:
        w = need(out, p + ".weight")
        if w.is_floating_point():
            continue
        k = widths[p]
        n, k_stored = w.shape
        if w.dtype != torch.int8 or k_stored not in (k, -(-k // g) * g):
            raise ConfigError(f"{p}.weight: {quant.quant_algo} expects int8 [N, K] with K={k} "
                              f"(or padded to {-(-k // g) * g}), got {w.dtype} "
                              f"{tuple(w.shape)}")
        out[p + ".weight"] = w[:, :k].contiguous()
        for name in ("weights_scaling_factor", "zero"):
            t = need(out, f"{p}.{name}")
            if tuple(t.shape) != (n, -(-k // g)):
                raise ConfigError(f"{p}.{name} has shape {tuple(t.shape)}, expected "
                                  f"{(n, -(-k // g))} (group size {g})")
            out[f"{p}.{name}"] = t.t().contiguous().to(fdt)
