"""The linear layers' ops: which kernel runs for which shape and device, and its launch.
Float, weight-only int8 / int4 (TensorRT-LLM's W8A16, W4A16, W4A16_AWQ) and SmoothQuant W8A8
(Xiao et al. 2022); layouts in ``reference.py``, kernels in ``linear_kernels.py``, tuned
launch configs in ``tuning.py`` (JSON per GPU).

Every public op takes ``impl="auto" | "triton" | "torch"`` (``common.py``): auto = Triton on
CUDA when the shapes fit, else the best plain-torch path (cuBLAS, ``_int_mm``); on the CPU,
auto and torch give the reference. ``impl="triton"`` on CPU tensors runs the kernels in
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check them.

Which path on CUDA (``impl="auto"``; H100 measurements):

* M <= 64 (decode): the skinny GEMV (``linear_kernels.py``), config from the device's table;
  with ``partials=True`` a launch that split K returns its unsummed ``PartialSum`` for the next
  kernel (``add_rms_norm``, ``silu_mul``) to sum while it loads, saving the reduction launch.
* float: Triton for M <= 16 (2.7-2.8 TB/s summed over LLaMA-7B vs 2.4-2.5 for cuBLAS);
  cuBLAS above (similar at M = 64, much faster once compute bound).
* int8 / int4 weight-only: Triton at every M. Dequantize + cuBLAS re-reads a full fp16 copy
  of the weight (0.17 TB/s at small M) and only ties the tiled GEMM at M = 2048.
* W8A8: skinny Triton for M <= 64 (2.2 TB/s at M = 64 vs 1.7 for _int_mm), ``torch._int_mm``
  (cuBLAS int8, needs M > 16 and K, N multiples of 8) with the scales applied by one epilogue
  kernel up to M = 256, the tiled Triton GEMM above (20-30% faster than _int_mm at M = 2048).
  SmoothQuant's activation quantizer runs as its own kernel first (fusing it into the GEMV
  measured 61.7 vs 254.7 tok/s, docs/perf-notes.md).

Imports: ``common``, ``partial``, ``pdl``, ``reference``, ``tuning``, ``linear_kernels``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import ConfigError
from . import tuning
from .common import HAS_TRITON, check_impl, triton
from .common import use_triton as wants_triton
from .dequant import prefill_linear, wants_dequant
from .linear_kernels import (A8 as _A8, FP as _FP, I4 as _I4, I4G as _I4G, I8 as _I8)
from .partial import PartialSum
from .pdl import launch_kw
from .reference import (AMAX_EPS, FLOAT_DTYPES, check_float as _check_float,
                        check_weight as _check_weight, flat as _flat, linear_fp_ref,
                        linear_w4a16_ref, linear_w8a8_ref, linear_w8a16_ref, pack_int4_ref,
                        quantize_per_tensor_ref, quantize_per_token_ref, unpack_int4_ref,
                        w4_geometry as _w4_geometry, w8a8_check as _w8a8_check)
from .tuning import GemmCfg, SkinnyCfg

if HAS_TRITON:
    from .linear_kernels import (_gemm_kernel, _int32_scale_kernel, _quant_per_tensor_kernel,
                                 _quant_per_token_kernel, _skinny_dot_kernel,
                                 _skinny_fma_kernel, _splitk_reduce_kernel)

__all__ = [
    "linear_fp", "linear_w8a16", "linear_w4a16", "linear_w8a8", "linear_w8a8_dynamic",
    "quantize_per_token", "quantize_per_tensor", "pack_int4", "unpack_int4", "SkinnyCfg",
    "GemmCfg",
]

SKINNY_MAX_M = 64          # skinny kernels up to this many rows; tiled GEMM / cuBLAS above
_AUTO_MAX_M_FP = 16        # impl="auto": float layers on Triton up to this M, cuBLAS above
_AUTO_INT_MM_M = (SKINNY_MAX_M, 256)   # W8A8 on torch._int_mm for lo < M <= hi


def _with_lead(out, lead: tuple):
    """A launcher's result for rows [M] -> leading shape ``lead`` (tensor or PartialSum)."""
    if isinstance(out, PartialSum):
        return PartialSum(out.parts, tuple(lead), out.dtype)
    return out.reshape(*lead, out.shape[-1])


# =============================================================================================
# Launchers
# =============================================================================================
def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _block_k_for(kind: int, bk: int, K: int, G: int, kernel: str) -> int:
    """Fit block_k to the layout: grouped int4 wants one group per tile, or whole groups."""
    lo = 32 if kernel in ("dot", "gemm") else 2    # tl.dot: K >= 16 per half (int4), 32 (int8)
    bk = max(lo, min(bk, max(lo, triton.next_power_of_2(K))))
    if kind == _I4G:
        if kernel == "dot" and G & (G - 1) == 0 and bk > G:
            while bk > G and K % bk:
                bk //= 2
        else:
            bk = _pow2_divisor(G, min(bk, G))
    return bk


def _iters_c(n: int, t: torch.Tensor) -> int:
    """Loop trip count as a compile-time constant, only under the interpreter (its loops need
    Python ints); 0 = read it at run time (one compiled kernel for every K)."""
    return n if not t.is_cuda else 0


def _cvt_mode(kind: int, dtype: torch.dtype, cuda: bool) -> int:
    """Which weight conversion the kernels use for activations of ``dtype``: 0 plain
    (interpreter, fp32), 1 fp16 bit tricks, 2 bf16 bit tricks (int4 only; int8 has no
    8-bit-mantissa trick for bf16)."""
    if not cuda:
        return 0
    if dtype == torch.float16 and kind in (_I8, _I4, _I4G):
        return 1
    if dtype == torch.bfloat16 and kind in (_I4, _I4G):
        return 2
    return 0


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _triton_ok(kind: int, K: int, G: int) -> bool:
    """Whether the Triton kernels support this layout (else the torch path runs)."""
    if kind == _I4G:
        return _pow2_divisor(G, 1 << 20) >= 32
    return True


# Shared memory a pipelined tile loop may take (H100/H200: 227 KB a block, less some scratch).
# Tuned launches assume 2-byte activations; fp32 models (tests, checks) double the bytes.
SMEM_BUDGET = 220 * 1024


def _fit_stages(stages: int, bm: int, bn: int, bk: int, x: torch.Tensor, w: torch.Tensor,
                kind: int) -> int:
    """``stages`` lowered until (x tile + weight tile) x stages fits SMEM_BUDGET."""
    if not x.is_cuda:
        return stages
    wbytes = {_I4: 0.5, _I4G: 0.5}.get(kind, w.element_size())
    per_stage = bm * bk * x.element_size() + bn * bk * wbytes
    while stages > 1 and stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return stages


def _launch_skinny(kind: int, x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                   xs: Optional[torch.Tensor], out_dtype: torch.dtype, G: int = 0,
                   cfg: Optional[SkinnyCfg] = None, partials: bool = False):
    """out [M, N]; with partials=True and a split K, the unsummed PartialSum instead."""
    (M, K), xdt = x2.shape, x2.dtype
    N = w.shape[0]
    if cfg is None:
        cfg = tuning.pick_skinny(tuning.table_for(x2.device), kind, M, N, K)
    bk = _block_k_for(kind, cfg.block_k, K, G, cfg.kernel)
    k_blocks = -(-K // bk)
    split = max(1, min(cfg.split_k, k_blocks))
    k_per_split = -(-k_blocks // split) * bk
    split = -(-K // k_per_split)
    if cfg.kernel == "dot":
        block_m = max(16 if kind == _A8 else 8, triton.next_power_of_2(M))
    else:
        block_m = triton.next_power_of_2(M)
    dst = torch.empty((M, N) if split == 1 else (split, M, N), device=x2.device,
                      dtype=out_dtype if split == 1 else torch.float32)
    xs_row = xs is not None and xs.numel() > 1
    ws_col = kind == _A8 and s.numel() > 1
    sg_stride = s.stride(0) if (kind == _I4G and s.dim() == 2) else 0
    common = dict(WKIND=kind, GROUP=max(G, 1), XS_ROW=xs_row, WS_COL=ws_col, BLOCK_M=block_m,
                  BLOCK_N=cfg.block_n, BLOCK_K=bk, EVEN_K=(K % k_per_split == 0),
                  ITERS_C=_iters_c(k_per_split // bk, x2), CVT=_cvt_mode(kind, xdt, x2.is_cuda),
                  num_warps=cfg.num_warps,
                  num_stages=_fit_stages(cfg.num_stages, block_m, cfg.block_n, bk, x2, w, kind))
    args = (x2, w, s, xs if xs is not None else s, dst,
            M, N, K, x2.stride(0), w.stride(0), sg_stride, N, M * N, k_per_split)
    grid = (triton.cdiv(N, cfg.block_n), split)
    pkw = launch_kw(x2)
    if cfg.kernel == "dot":
        _skinny_dot_kernel[grid](*args, DOT_PREC=_dot_prec(xdt), **common, **pkw)
    else:
        _skinny_fma_kernel[grid](*args, **common, **pkw)
    if split == 1:
        return dst
    if partials:
        return PartialSum(dst, (M,), out_dtype)
    out = torch.empty((M, N), device=x2.device, dtype=out_dtype)
    BLOCK = 1024
    _splitk_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](dst, out, M * N, S=split, BLOCK=BLOCK,
                                                        num_warps=4, **pkw)
    return out


def _launch_gemm(kind: int, x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                 xs: Optional[torch.Tensor], out_dtype: torch.dtype, G: int = 0,
                 cfg: Optional[GemmCfg] = None) -> torch.Tensor:
    M, K = x2.shape
    N = w.shape[0]
    if cfg is None:
        cfg = tuning.pick_gemm(kind, M, N, K)
    bk = _block_k_for(kind, cfg.block_k, K, G, "gemm")
    out = torch.empty((M, N), device=x2.device, dtype=out_dtype)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _gemm_kernel[grid](
        x2, w, s, xs if xs is not None else s, out, M, N, K, x2.stride(0), w.stride(0),
        s.stride(0) if (kind == _I4G and s.dim() == 2) else 0, N,
        WKIND=kind, GROUP=max(G, 1), XS_ROW=xs is not None and xs.numel() > 1,
        WS_COL=kind == _A8 and s.numel() > 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=bk, GROUP_M=cfg.group_m, EVEN_K=(K % bk == 0), DOT_PREC=_dot_prec(x2.dtype),
        ITERS_C=_iters_c(triton.cdiv(K, bk), x2), CVT=_cvt_mode(kind, x2.dtype, x2.is_cuda),
        num_warps=cfg.num_warps,
        num_stages=_fit_stages(cfg.num_stages, cfg.block_m, cfg.block_n, bk, x2, w, kind))
    return out


def _resolve_cfg(kind: int, M: int, N: int, K: int, device: torch.device, cfg=None):
    """The launch a Triton op makes: cfg when forced, else the skinny kernel's tuned config for
    M <= SKINNY_MAX_M (which may name the tiled GEMM) and the GEMM's above."""
    if cfg is not None:
        return cfg
    if M <= SKINNY_MAX_M:
        return tuning.pick_skinny(tuning.table_for(device), kind, M, N, K)
    return tuning.pick_gemm(kind, M, N, K)


def _run_triton(kind, x2, w, s, xs, out_dtype, G=0, cfg=None, partials=False):
    """Skinny kernel for M <= SKINNY_MAX_M, tiled GEMM above (cfg may force either).
    partials: see _launch_skinny (the tiled GEMM never splits K)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    s = s.contiguous()
    M, K = x2.shape
    cfg = _resolve_cfg(kind, M, w.shape[0], K, x2.device, cfg)
    if isinstance(cfg, GemmCfg):
        return _launch_gemm(kind, x2, w, s, xs, out_dtype, G, cfg)
    return _launch_skinny(kind, x2, w, s, xs, out_dtype, G, cfg, partials=partials)


# =============================================================================================
# Public ops
# =============================================================================================
# Every linear op takes partials=True from a caller whose next kernel accepts a PartialSum
# (add_rms_norm, silu_mul): then a skinny Triton launch that split K returns its unsummed
# partials instead of launching the reduction. Every other path returns the tensor.
def linear_fp(x, weight: torch.Tensor, *, impl: str = "auto", partials: bool = False,
              _cfg=None):
    """x[..., K] @ weight[N, K].T -> [..., N] in x.dtype (fp32 accumulation)."""
    _check_weight(weight, "linear_fp")
    N, K = weight.shape
    M = math.prod(x.shape[:-1])
    # float64 (exactness runs) has no Triton kernel here: cuBLAS on CUDA under impl="auto".
    use_triton = wants_triton(impl, x) and M > 0 and (
        impl == "triton" or (M <= _AUTO_MAX_M_FP and x.dtype != torch.float64))
    x2, lead = _flat(x, K, "linear_fp")
    if use_triton:
        if weight.dtype != x.dtype:
            raise ConfigError(f"linear_fp: weight dtype {weight.dtype} != input {x.dtype}")
        _check_float(x, "linear_fp")
        out = _run_triton(_FP, x2, weight, weight, None, x.dtype, 0, _cfg, partials)
    elif x.is_cuda:
        out = torch.nn.functional.linear(x2, weight.to(x.dtype))
    else:
        return linear_fp_ref(x, weight)
    return _with_lead(out, lead)


def linear_w8a16(x, qweight: torch.Tensor, scale: torch.Tensor, *, impl: str = "auto",
                 partials: bool = False, _cfg=None):
    """Weight-only int8: x @ (qweight * scale[:, None]).T, qweight int8 [N, K], scale [N]."""
    _check_weight(qweight, "linear_w8a16", torch.int8)
    _check_float(x, "linear_w8a16")
    N, K = qweight.shape
    if scale.numel() != N:
        raise ConfigError(f"linear_w8a16: scale shape {tuple(scale.shape)} is not [N={N}]")
    use_triton = wants_triton(impl, x) and math.prod(x.shape[:-1]) > 0
    x2, lead = _flat(x, K, "linear_w8a16")
    if use_triton and _cfg is None and wants_dequant(x2, x2.shape[0]):   # long prefill
        return _with_lead(prefill_linear(x2, qweight, scale.reshape(1, N), None, K, 8), lead)
    if use_triton:
        out = _run_triton(_I8, x2, qweight, scale.reshape(N), None, x.dtype, 0, _cfg, partials)
    elif x.is_cuda:
        w = qweight.to(x.dtype) * scale.reshape(N, 1).to(x.dtype)
        out = torch.nn.functional.linear(x2, w)
    else:
        return linear_w8a16_ref(x, qweight, scale)
    return _with_lead(out, lead)


def linear_w4a16(x, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, *,
                 impl: str = "auto", partials: bool = False, _cfg=None):
    """Weight-only int4: qweight int8 [N, K/2] (two nibbles, even k low), scales [K/G, N]
    (per channel: G = K, scales [1, N])."""
    _check_float(x, "linear_w4a16")
    _check_weight(qweight, "linear_w4a16", torch.int8)
    N, K, G, s = _w4_geometry(x.shape[-1], qweight, scales, group_size)
    kind = _I4 if G == K else _I4G
    use_triton = (wants_triton(impl, x) and _triton_ok(kind, K, G)
                  and math.prod(x.shape[:-1]) > 0)
    x2, lead = _flat(x, K, "linear_w4a16")
    if use_triton and _cfg is None and wants_dequant(x2, x2.shape[0]):   # long prefill
        return _with_lead(prefill_linear(x2, qweight, s, None, G, 4), lead)
    if use_triton:
        out = _run_triton(kind, x2, qweight, s.reshape(N) if kind == _I4 else s, None,
                          x.dtype, G, _cfg, partials)
    elif x.is_cuda:
        w = unpack_int4_ref(qweight).to(x.dtype)
        w = w * s.to(x.dtype).repeat_interleave(G, dim=0).t()
        out = torch.nn.functional.linear(x2, w)
    else:
        return linear_w4a16_ref(x, qweight, scales, group_size)
    return _with_lead(out, lead)


def quantize_per_token(x: torch.Tensor, *, impl: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x[..., K] -> (int8 [..., K], fp32 scale [..., 1]); scale = max(amax, 1e-8) / 127."""
    _check_float(x, "quantize_per_token")
    if not wants_triton(impl, x) or x.numel() == 0:
        return quantize_per_token_ref(x)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    one_pass = K <= 8192
    block = triton.next_power_of_2(K) if one_pass else 4096
    _quant_per_token_kernel[(M,)](x2, q, scale, K, x2.stride(0), K, AMAX_EPS, BLOCK_K=block,
                                  ONE_PASS=one_pass, USE_RINT=x.is_cuda,
                                  ITERS_C=_iters_c(triton.cdiv(K, block), x),
                                  num_warps=8 if block >= 4096 else 4)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, *,
                        impl: str = "auto") -> torch.Tensor:
    """q = clamp(round(x / scale), -127, 127) as int8, scale fp32 [1, 1]."""
    _check_float(x, "quantize_per_tensor")
    if scale.numel() != 1:
        raise ConfigError(f"quantize_per_tensor: scale must hold one value, got "
                          f"{tuple(scale.shape)}")
    if not wants_triton(impl, x) or x.numel() == 0:
        return quantize_per_tensor_ref(x, scale)
    xc = x.contiguous()
    q = torch.empty(x.shape, device=x.device, dtype=torch.int8)
    BLOCK = 2048
    _quant_per_tensor_kernel[(triton.cdiv(xc.numel(), BLOCK),)](
        xc, q, scale.reshape(1).to(torch.float32), xc.numel(), BLOCK=BLOCK,
        USE_RINT=x.is_cuda, num_warps=4)
    return q


def linear_w8a8(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                w_scale: torch.Tensor, out_dtype: torch.dtype = torch.float16, *,
                impl: str = "auto", partials: bool = False, _cfg=None):
    """SmoothQuant GEMM: (xq int8 @ qweight int8 .T) * x_scale [M,1]|[1,1] * w_scale [1,N]|[1,1]."""
    x2, lead, M, N, K = _w8a8_check(xq, x_scale, qweight, w_scale, out_dtype)
    xs = x_scale.reshape(-1).to(torch.float32)
    ws = w_scale.reshape(-1).to(torch.float32)
    int_mm_ok = xq.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0
    use_triton = wants_triton(impl, xq)
    if M == 0:
        return linear_w8a8_ref(xq, x_scale, qweight, w_scale, out_dtype)
    lo, hi = _AUTO_INT_MM_M
    if use_triton and (impl == "triton" or not int_mm_ok or not lo < M <= hi):
        out = _run_triton(_A8, x2, qweight, ws, xs, out_dtype, 0, _cfg, partials)
    elif int_mm_ok:
        acc = torch._int_mm(x2.contiguous(), qweight.t())          # int32 [M, N] (cuBLAS)
        if HAS_TRITON:
            out = torch.empty((M, N), device=xq.device, dtype=out_dtype)
            grid = (triton.cdiv(M, 32), triton.cdiv(N, 128))
            _int32_scale_kernel[grid](acc, xs, ws, out, M, N, XS_ROW=xs.numel() > 1,
                                      WS_COL=ws.numel() > 1, BLOCK_M=32, BLOCK_N=128,
                                      num_warps=4)
        else:
            out = (acc.float() * xs.reshape(-1, 1) * ws.reshape(1, -1)).to(out_dtype)
    elif xq.is_cuda:
        acc = x2.float() @ qweight.float().t()
        out = (acc * xs.reshape(-1, 1) * ws.reshape(1, -1)).to(out_dtype)
    else:
        return linear_w8a8_ref(xq, x_scale, qweight, w_scale, out_dtype)
    return _with_lead(out, lead)


def linear_w8a8_dynamic(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: Optional[torch.dtype] = None, *,
                        smoother: Optional[torch.Tensor] = None,
                        act_scale: Optional[torch.Tensor] = None, impl: str = "auto",
                        partials: bool = False, _cfg=None):
    """SmoothQuant linear from FLOAT activations x[..., K] -> [..., N] in out_dtype (x.dtype):
    xs = (x / smoother) rounded to x.dtype when a smoother [1, K] is given, quantized per
    token (dynamic) or, with act_scale [1, 1], per tensor; then linear_w8a8."""
    _check_float(x, "linear_w8a8_dynamic")
    _check_weight(qweight, "linear_w8a8", torch.int8)
    N, K = qweight.shape
    x2, lead = _flat(x, K, "linear_w8a8_dynamic")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"linear_w8a8: out_dtype must be a float dtype, got {out_dtype}")
    if w_scale.numel() not in (1, N):
        raise ConfigError(f"linear_w8a8: w_scale shape {tuple(w_scale.shape)} is neither "
                          f"[1, N={N}] nor [1, 1]")
    if smoother is not None and smoother.numel() != K:
        raise ConfigError(f"linear_w8a8_dynamic: smoother shape {tuple(smoother.shape)} is "
                          f"not [1, K={K}]")
    if act_scale is not None and act_scale.numel() != 1:
        raise ConfigError(f"linear_w8a8_dynamic: act_scale must hold one value, got "
                          f"{tuple(act_scale.shape)}")
    if smoother is not None:
        x2 = (x2.float() / smoother.reshape(1, K).float()).to(x2.dtype)
    if act_scale is None:
        xq, xs = quantize_per_token(x2, impl=impl)                  # int8 [M, K], fp32 [M, 1]
    else:
        xq, xs = quantize_per_tensor(x2, act_scale, impl=impl), act_scale
    out = linear_w8a8(xq, xs, qweight, w_scale, out_dtype, impl=impl, partials=partials,
                      _cfg=_cfg)
    return _with_lead(out, lead)


def pack_int4(q: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """int8 [N, K] in -8..7 -> int8 [N, K/2] (conversion-time op: torch on every device)."""
    check_impl(impl)
    return pack_int4_ref(q)


def unpack_int4(packed: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """int8 [N, K/2] -> int8 [N, K] in -8..7 (torch on every device)."""
    check_impl(impl)
    return unpack_int4_ref(packed)


