"""The zero-point (asymmetric) int4 linear op: which path runs, its launch configs, its reference.

Format (``quant_int4.py`` makes it, docs/design.md): packed int8 [N, K/2] signed codes q in
[-8, 7] (the symmetric format's packing: element 2j in the low nibble), ``scales`` and ``zeros``
[K/G, N] in the model dtype; w[n, k] = q[n, k] * scales[k // G, n] + zeros[k // G, n]
(TensorRT-LLM's W4A16_GPTQ / zero-point W4A16_AWQ arithmetic). Per channel: G = K. A G not
dividing K has ceil(K/G) groups, the last one narrower (TensorRT-LLM's zero padding of K).

Paths (``impl`` as every linear op, ``common.py``): on CUDA, Triton's skinny kernel
(``int4_zp_kernels.py``) for M <= SKINNY_MAX_M, dequantize + cuBLAS above (prefill); on the
CPU the reference; ``impl="triton"`` on CPU tensors runs the kernel in the interpreter.
Launch configs are data (``SKINNY_CONFIGS``: per M bucket, the largest bucket >= M), not code;
they are starting points, not tuned on a GPU yet (tools/gpu_linear_sweep.py measures them).

Toward the floor (not measured yet; ``tools/gpu_int4_zp_bench.py`` measures it): the zero
point adds 2 bytes per group and output (g128: +1.6% of the weight bytes) and one FMA per
group, so this kernel should read like the symmetric one. The weight stays in the layout the
checkpoint holds ([N, K/2], packed along K), which the symmetric kernels already stream at
0.9-2.0 TB/s; the next step measured against it would be a build-time re-arrangement for the
kernel (scales and zeros interleaved [K/G, N, 2] so one load fetches both, and 16-byte
K-major tiles per thread for M = 1), kept only if it beats this layout on the GPU.

Imports: ``common``, ``partial``, ``reference``, ``tuning`` (SkinnyCfg), ``int4_zp_kernels``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import ConfigError
from .common import HAS_TRITON, triton
from .common import use_triton as wants_triton
from .dequant import prefill_linear
from .partial import PartialSum
from .reference import FLOAT_DTYPES, check_weight, flat, unpack_int4_ref
from .tuning import SkinnyCfg

if HAS_TRITON:
    from .int4_zp_kernels import _w4zp_skinny_kernel

__all__ = ["linear_w4a16_zp", "linear_w4a16_zp_ref", "dequantize_w4_zp", "SKINNY_CONFIGS"]

SKINNY_MAX_M = 64
# M bucket -> launch. block_k is capped to the group size (one group per tile) at launch.
SKINNY_CONFIGS: dict[int, SkinnyCfg] = {
    1: SkinnyCfg("fma", block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
    4: SkinnyCfg("dot", block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
    16: SkinnyCfg("dot", block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3),
    64: SkinnyCfg("dot", block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=3),
}


def _geometry(k_in: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int):
    check_weight(qweight, "linear_w4a16_zp", torch.int8)
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if k_in != K:
        raise ConfigError(f"linear_w4a16_zp: input K={k_in} but packed weight holds K={K}")
    G = int(group_size) if group_size else K
    if G <= 0:
        raise ConfigError(f"linear_w4a16_zp: group_size {group_size} must be positive")
    ng = -(-K // G)               # a G not dividing K: the last group is narrower
    for what, t in (("scales", scales), ("zeros", zeros)):
        if t.numel() != ng * N:
            raise ConfigError(f"linear_w4a16_zp: {what} shape {tuple(t.shape)} is not "
                              f"[ceil(K/G), N] = [{ng}, {N}]")
    return N, K, G, scales.reshape(ng, N), zeros.reshape(ng, N)


def dequantize_w4_zp(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [N, K/2] + scales, zeros [K/G, N] -> w [N, K] in ``dtype`` (computed in fp32,
    or fp64 when asked)."""
    N, K, G, s, z = _geometry(2 * qweight.shape[1], qweight, scales, zeros, group_size)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_int4_ref(qweight).to(acc)
    s_full = s.to(acc).repeat_interleave(G, dim=0)[:K].t()
    z_full = z.to(acc).repeat_interleave(G, dim=0)[:K].t()
    return (q * s_full + z_full).to(dtype)


def linear_w4a16_zp_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reference: dequantize in fp32 (fp64 for fp64 inputs), one matmul."""
    N, K, G, _, _ = _geometry(x.shape[-1], qweight, scales, zeros, group_size)
    x2, lead = flat(x, K, "linear_w4a16_zp")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_w4_zp(qweight, scales, zeros, G, acc)
    return (x2.to(acc) @ w.t()).to(x.dtype).reshape(*lead, N)


TARGET_PROGRAMS = 264   # about two programs per SM on an H100 (132 SMs)


def _pick(M: int, N: int = 0, K: int = 0, G: int = 0) -> SkinnyCfg:
    """The M bucket's launch; up to M = 16 its split-K raised (powers of two up to 8, while
    each slice keeps at least two K tiles) until the grid has TARGET_PROGRAMS programs: run 11
    timed the unsplit launches at 277 GB/s summed over LLaMA-7B's linears at M = 1, a
    4096-row linear getting 64 programs on 132 SMs. The raise itself is not measured yet."""
    cfg = next((SKINNY_CONFIGS[b] for b in sorted(SKINNY_CONFIGS) if M <= b),
               SKINNY_CONFIGS[max(SKINNY_CONFIGS)])
    if not (N and K and G) or M > 16:      # partials cost M x N x split fp32 writes
        return cfg
    k_blocks = -(-K // _block_k(cfg.block_k, G, K, cfg.kernel == "dot"))
    split = cfg.split_k
    while (-(-N // cfg.block_n) * split < TARGET_PROGRAMS and split * 4 <= k_blocks
           and split < 8):
        split *= 2
    return cfg if split == cfg.split_k else SkinnyCfg(cfg.kernel, cfg.block_n, cfg.block_k,
                                                      split, cfg.num_warps, cfg.num_stages)


def _block_k(bk: int, G: int, K: int, dot: bool) -> int:
    """Largest power of two <= bk dividing G (one group per tile); dot needs >= 32."""
    b = 1
    while b * 2 <= min(bk, G) and G % (b * 2) == 0:
        b *= 2
    return b


def _triton_ok(K: int, G: int) -> bool:
    return _block_k(128, G, K, True) >= 32


def _launch(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int,
            out_dtype: torch.dtype, cfg: Optional[SkinnyCfg], partials: bool):
    M, K = x2.shape
    N = w.shape[0]
    cfg = cfg or _pick(M, N, K, G)
    dot = cfg.kernel == "dot"
    bk = _block_k(cfg.block_k, G, K, dot)
    k_blocks = -(-K // bk)
    split = max(1, min(cfg.split_k, k_blocks))
    k_per_split = -(-k_blocks // split) * bk
    split = -(-K // k_per_split)
    block_m = max(16, triton.next_power_of_2(M)) if dot else triton.next_power_of_2(M)
    dst = torch.empty((M, N) if split == 1 else (split, M, N), device=x2.device,
                      dtype=out_dtype if split == 1 else torch.float32)
    cvt = 0
    if x2.is_cuda:
        cvt = {torch.float16: 1, torch.bfloat16: 2}.get(x2.dtype, 0)
    iters = (k_per_split // bk) if not x2.is_cuda else 0
    grid = (triton.cdiv(N, cfg.block_n), split)
    _w4zp_skinny_kernel[grid](
        x2, w, s, z, dst, M, N, K, x2.stride(0), w.stride(0), s.stride(0), N, M * N,
        k_per_split, GROUP=G, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        EVEN_K=(K % k_per_split == 0), ITERS_C=iters, CVT=cvt, USE_DOT=dot,
        DOT_PREC="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        return dst
    if partials:
        return PartialSum(dst, (M,), out_dtype)
    return dst.sum(0).to(out_dtype)


def linear_w4a16_zp(x, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, *, impl: str = "auto", partials: bool = False,
                    _cfg: Optional[SkinnyCfg] = None):
    """Zero-point int4: x[..., K] -> [..., N]; see the module docstring for the format.
    ``group_size`` 0 (or K) is per channel. ``partials``: a split-K launch may return its
    unsummed ``PartialSum`` (kernels/partial.py)."""
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ConfigError(f"linear_w4a16_zp: activations must be a float dtype, got {x.dtype}")
    N, K, G, s, z = _geometry(x.shape[-1], qweight, scales, zeros, group_size)
    M = math.prod(x.shape[:-1])
    use_triton = (wants_triton(impl, x) and x.dtype != torch.float64 and _triton_ok(K, G) and M > 0
                  and (M <= SKINNY_MAX_M or _cfg is not None))
    x2, lead = flat(x, K, "linear_w4a16_zp")
    if use_triton:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = _launch(x2, qweight.contiguous(), s.contiguous(), z.contiguous(), G, x.dtype,
                      _cfg, partials)
        if isinstance(out, PartialSum):
            return PartialSum(out.parts, tuple(lead), out.dtype)
        return out.reshape(*lead, N)
    if x.is_cuda:  # prefill: one dequantized copy (dequant.py), then cuBLAS
        if x.dtype == torch.float64:
            w = dequantize_w4_zp(qweight, s, z, G, x.dtype)
            return torch.nn.functional.linear(x2, w).reshape(*lead, N)
        return prefill_linear(x2, qweight, s, z, G, 4).reshape(*lead, N)
    return linear_w4a16_zp_ref(x, qweight, s, z, G)
