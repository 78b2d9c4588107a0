"""The FP8 (E4M3) linear op and its activation quantizer: which path runs, launch configs,
references.

Arithmetic (TensorRT-LLM's FP8 W8A8, docs/fp8.md): weight codes wq float8_e4m3fn [N, K] with
a float32 scale per tensor ([1]) or per output channel ([N]); activations quantized as
xq = e4m3(clamp(x / xs, +-448)) with xs static (calibrated, [1]) or per token
(amax(row) / 448, [M, 1]); y = (xq @ wq.T) * xs * ws in fp32, rounded to the input dtype.
The CPU path computes exactly that with torch's float8 dtypes (fp64 math for fp64 inputs).

Paths on CUDA (``impl="auto"``; ``impl`` as every linear op, ``common.py``):

* activation quantizer: one Triton kernel per call (row amax, scale, cast) when
  ``fused_quant`` (default); otherwise torch ops (amax, divide, clamp, cast: 4-5 launches).
  tools/gpu_fp8_check.py times both (our fused int8 quantizer once lost, perf-notes.md).
* small M: the FP8-weight GEMV (``fp8_kernels.py``), with the activation quantizer inside it
  when ``fused_quant`` (static scales always; per-token scales up to ``INLINE_DYNAMIC_MAX_M``
  rows). Its launch per (M bucket, N, K) comes from the GPU's tuning file (kind ``fp8``,
  written by ``tools/gpu_fp8_check.py --sweep --write``; up to M = 64, a bucket the sweep
  fills only where the GEMV beat ``_scaled_mm``), else per M bucket from ``GEMV_CONFIGS`` up
  to ``GEMV_MAX_M`` (16).
* otherwise: ``torch._scaled_mm`` (cuBLASLt FP8 tensor cores) when K and N are multiples of 16;
  per-channel or per-token scales go through its row-wise scaling. Otherwise dequantize and
  multiply (correct, not fast).

``impl="triton"`` on CPU tensors runs the kernels in Triton's interpreter (float8 loads work
there: tests/test_fp8.py). FP8 tensor cores need compute capability >= 8.9 (``fp8_supported``).

Imports: ``common``, ``reference``, ``tuning`` (SkinnyCfg), ``fp8_kernels``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import ConfigError
from .common import HAS_TRITON, triton
from .common import use_triton as wants_triton
from .reference import FLOAT_DTYPES, check_weight, flat
from .tuning import F8, SkinnyCfg, m_bucket, pick_skinny, table_for

if HAS_TRITON:
    from .fp8_kernels import _fp8_gemv_kernel, _fp8_quant_rows_kernel

__all__ = ["E4M3_MAX", "FP8_DTYPE", "GEMV_MAX_M", "GEMV_CONFIGS", "fp8_supported",
           "quantize_fp8_act", "quantize_fp8_act_ref", "linear_fp8", "linear_fp8_ref"]

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0           # largest finite float8_e4m3fn
AMAX_EPS = 1e-12           # an all-zero row gets a tiny positive scale (and codes 0)
GEMV_MAX_M = 16            # the Triton GEMV up to this many rows; _scaled_mm above
# per-token scales computed inside the GEMV up to this many rows (each program re-reads its
# rows from L2 for the amax); above, the row quantizer runs first
INLINE_DYNAMIC_MAX_M = 4
# H100 (tools/gpu_fp8_check.py, 2026-12-07), LLaMA-7B linears summed: the "fma" form at M = 1
# read 919 GB/s (363 us) where the "dot" form at M = 16, whose rows pad to 16 anyway, read
# 1,708 GB/s (195 us; fp16 cuBLAS 262 us): M = 1 takes the dot form too.
GEMV_CONFIGS: dict[int, SkinnyCfg] = {
    1: SkinnyCfg("dot", block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
    4: SkinnyCfg("dot", block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
    16: SkinnyCfg("dot", block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
}
_ROWWISE_OUT: dict = {}    # dtype -> whether _scaled_mm's row-wise scaling takes that output


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` has FP8 tensor cores (CUDA compute capability >= 8.9; the CPU
    emulates FP8 exactly and always counts as supported)."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale_shape(scale: torch.Tensor, n: int, what: str) -> torch.Tensor:
    s = scale.reshape(-1)
    if s.numel() not in (1, n):
        raise ConfigError(f"{what}: scale has {s.numel()} values; expected 1 or {n}")
    return s


# ---------------------------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------------------------
def quantize_fp8_act_ref(x2: torch.Tensor, scale: Optional[torch.Tensor] = None):
    """x[M, K] float -> (xq e4m3 [M, K], xs float32 [M, 1] per token, or ``scale`` as [1, 1])."""
    acc = _acc(x2)
    xa = x2.to(acc)
    if scale is None:
        amax = xa.abs().amax(dim=1, keepdim=True) if x2.shape[1] else \
            torch.zeros(x2.shape[0], 1, dtype=acc, device=x2.device)
        xs = (amax.clamp_min(AMAX_EPS) / E4M3_MAX).float()
    else:
        xs = scale.float().reshape(1, 1)
    q = (xa / xs.to(acc)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, xs


def quantize_fp8_act(x2: torch.Tensor, scale: Optional[torch.Tensor] = None, *,
                     impl: str = "auto", fused: bool = True):
    """The activation quantizer (see the module docstring); ``fused``: one Triton kernel."""
    if not (fused and wants_triton(impl, x2) and x2.dtype != torch.float64):
        return quantize_fp8_act_ref(x2, scale)
    M, K = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x2.device)
    if scale is None:
        xs = torch.empty((M, 1), dtype=torch.float32, device=x2.device)
    else:
        xs = scale.float().reshape(1, 1).contiguous()
    bk = min(1024, triton.next_power_of_2(max(K, 16)))
    if M:
        _fp8_quant_rows_kernel[(M,)](x2, q, xs, K, x2.stride(0), q.stride(0), E4M3_MAX,
                                     AMAX_EPS, STATIC=scale is not None, BLOCK_K=bk,
                                     ITERS_C=0 if x2.is_cuda else -(-K // bk))
    return q, xs


# ---------------------------------------------------------------------------------------------
# The linear
# ---------------------------------------------------------------------------------------------
def linear_fp8_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                   out_dtype: torch.dtype, w_widened: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """(xq @ wq.T) * xs * ws: e4m3 codes widened to fp32 (fp64 when out_dtype is fp64);
    ``w_widened``: wq already widened to that dtype (a caller's cached copy)."""
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    w = w_widened if w_widened is not None and w_widened.dtype == acc else wq.to(acc)
    y = xq.to(acc) @ w.t()
    return (y * xs.to(acc).reshape(-1, 1) * ws.to(acc).reshape(1, -1)).to(out_dtype)


def _pick(M: int, N: int, K: int, device: torch.device) -> Optional[SkinnyCfg]:
    """The GEMV launch for (M, N, K), or None for ``_scaled_mm``: the GPU's tuning file where
    it has ``fp8`` rows for M's bucket (up to GEMV_MAX_M the nearest shape's; above, up to
    M = 64, only this shape's row, which the sweep writes where the GEMV beat ``_scaled_mm``),
    else ``GEMV_CONFIGS`` up to ``GEMV_MAX_M``."""
    key = (device.index if device.type == "cuda" else None, M if M <= 64 else 128, N, K)
    if key in _PICKED:
        return _PICKED[key]
    cfg = None
    if M <= 64:
        table = table_for(device)
        b = m_bucket(M)
        if M > GEMV_MAX_M:
            # only a row for this very shape: the sweep writes one where the GEMV beat
            # _scaled_mm, and a neighbour's win says nothing (H100, M = 64: lm_head's GEMV
            # won, and its launch on the other linears cost 24% of batch-64 decode)
            cfg = table.skinny.get((F8, b, N, K))
        elif any(k[0] == F8 and k[1] == b for k in table.skinny):
            cfg = pick_skinny(table, F8, M, N, K)
        cfg = cfg if isinstance(cfg, SkinnyCfg) else None
    if cfg is None and M <= GEMV_MAX_M:
        cfg = next(GEMV_CONFIGS[b] for b in sorted(GEMV_CONFIGS) if M <= b)
    _PICKED[key] = cfg
    return cfg


_PICKED: dict = {}


def _launch_gemv(x: torch.Tensor, xs: Optional[torch.Tensor], wq: torch.Tensor,
                 ws: torch.Tensor, out_dtype: torch.dtype, cfg: Optional[SkinnyCfg],
                 quant_x: int = 0) -> torch.Tensor:
    """quant_x 0: ``x`` holds e4m3 codes and ``xs`` their scales; 1: ``x`` is float and ``xs``
    the static scale, quantized inside the kernel; 2: ``x`` is float, per-row scales computed
    inside the kernel (``xs`` unused)."""
    M, K = x.shape
    N = wq.shape[0]
    cfg = cfg or _pick(M, N, K, x.device) or GEMV_CONFIGS[max(GEMV_CONFIGS)]
    dot = cfg.kernel in ("dot", "dot8")
    bk = cfg.block_k
    k_blocks = -(-K // bk)
    split = max(1, min(cfg.split_k, k_blocks))
    k_per_split = -(-k_blocks // split) * bk
    split = -(-K // k_per_split)
    block_m = max(16, triton.next_power_of_2(M)) if dot else triton.next_power_of_2(M)
    dst = torch.empty((M, N) if split == 1 else (split, M, N), device=x.device,
                      dtype=out_dtype if split == 1 else torch.float32)
    if xs is None:
        xs = ws  # not read (QUANT_X 2)
    grid = (triton.cdiv(N, cfg.block_n), split)
    _fp8_gemv_kernel[grid](
        x, wq, xs, ws, dst, M, N, K, x.stride(0), wq.stride(0), N, M * N, k_per_split,
        E4M3_MAX, AMAX_EPS, 1.0,
        XS_ROWS=xs.numel() > 1, WS_ROWS=ws.numel() > 1, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=bk, USE_DOT={"fma": 0, "dot": 1, "dot8": 2}[cfg.kernel],
        ITERS_C=0 if x.is_cuda else k_per_split // bk, QUANT_X=quant_x, ITERS_ALL_C=0 if x.is_cuda else k_blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dst if split == 1 else dst.sum(0).to(out_dtype)


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt FP8 GEMM. Per-tensor scales as scalars; otherwise row-wise ([M, 1] x [1, N]),
    whose output dtype support differs between releases: where it refuses ours, fp32 output
    with unit scales and the scales applied after (remembered per dtype)."""
    M, N = xq.shape[0], wq.shape[0]
    if xs.numel() == 1 and ws.numel() == 1:
        return torch._scaled_mm(xq, wq.t(), scale_a=xs.reshape(()), scale_b=ws.reshape(()),
                                out_dtype=out_dtype)
    sa = xs.float().reshape(-1, 1).expand(M, 1).contiguous()
    sb = ws.float().reshape(1, -1).expand(1, N).contiguous()
    if _ROWWISE_OUT.get(out_dtype, True):
        try:
            return torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
        except RuntimeError:
            _ROWWISE_OUT[out_dtype] = False
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    y = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * sa * sb).to(out_dtype)


def linear_fp8(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
               act_scale: Optional[torch.Tensor] = None, *, impl: str = "auto",
               fused_quant: bool = True, _cfg: Optional[SkinnyCfg] = None,
               w_widened: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 W8A8: x[..., K] float -> [..., N] in x's dtype. ``wq`` float8_e4m3fn [N, K], ``ws``
    float32 [1] or [N]; ``act_scale`` float32 [1] (static) or None (dynamic per token).
    ``w_widened``: the reference path's widened weight, cached by the caller (CPU)."""
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ConfigError(f"linear_fp8: activations must be a float dtype, got {x.dtype}")
    check_weight(wq, "linear_fp8", FP8_DTYPE)
    N, K = wq.shape
    ws = _scale_shape(ws, N, "linear_fp8 weight")
    if act_scale is not None and act_scale.numel() != 1:
        raise ConfigError(f"linear_fp8: a static activation scale is one value, got "
                          f"{tuple(act_scale.shape)}")
    x2, lead = flat(x, K, "linear_fp8")
    M = math.prod(lead)
    triton_path = wants_triton(impl, x, wq) and x.dtype != torch.float64
    cfg = _cfg if _cfg is not None or not triton_path or M == 0 else _pick(M, N, K, x.device)
    gemv = triton_path and M > 0 and cfg is not None
    if gemv and fused_quant and (act_scale is not None or M <= INLINE_DYNAMIC_MAX_M):
        # the quantizer inside the GEMV: no launch of its own (one per linear per step)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = _launch_gemv(x2, None if act_scale is None else
                         act_scale.float().reshape(1).contiguous(), wq.contiguous(),
                         ws.float().contiguous(), x.dtype, cfg,
                         quant_x=2 if act_scale is None else 1)
        return y.reshape(*lead, N)
    xq, xs = quantize_fp8_act(x2, act_scale, impl=impl if triton_path else "torch",
                              fused=fused_quant)
    if gemv:
        y = _launch_gemv(xq, xs.contiguous(), wq.contiguous(), ws.float().contiguous(),
                         x.dtype, cfg)
    elif x.is_cuda and impl != "triton" and M > 0 and K % 16 == 0 and N % 16 == 0:
        y = _scaled_mm(xq, xs, wq, ws, x.dtype)
    else:
        y = linear_fp8_ref(xq, xs, wq, ws, x.dtype, w_widened)
    return y.reshape(*lead, N)
