"""Weight dequantization for long prefills: one pass from the stored int4 / int8 codes (with
their scales and zeros) to a float weight, then cuBLAS.

Above a few hundred rows a weight-only GEMM is compute-bound: its time is the tensor cores',
and a kernel that dequantizes inside its main loop runs slower than cuBLAS on the float weight
(int4 g128 prefill of 64 x 128 tokens: 312 ms against fp16's 185 on the H100, run 12). Writing
the float weight once costs its bytes (LLaMA-7B's linears: ~3.5 GB read + 13 GB written for
int4, ~6 ms at 3 TB/s for the whole model), so from ``DEQUANT_MIN_M`` rows on the quantized
linears dequantize here and call ``torch.nn.functional.linear``. The weight lives only for
that call (the caching allocator reuses its memory: at most the largest linear, lm_head).

Formats, as the linear ops store them (``reference.py``, ``int4_zp.py``, ``int8_group.py``):
``bits`` 4: int8 [N, K/2], two signed nibbles per byte, even k in the low nibble; ``bits`` 8:
int8 [N, K]. ``scales`` [ceil(K/G), N] (per channel: [1, N] with G = K), ``zeros`` the same
shape or None; w[n, k] = q[n, k] * scales[k // G, n] (+ zeros[k // G, n]), computed in fp32
and rounded once to the output dtype.

Imports: ``common`` (Triton when present), ``reference`` (the unpacking rule, for the CPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ConfigError
from .common import HAS_TRITON, triton
from .reference import unpack_int4_ref

if HAS_TRITON:
    import triton.language as tl

# Rows (tokens) from which the quantized linears dequantize + cuBLAS instead of their fused
# GEMM. The crossover measured on the H100 (tools/gpu_dequant_bench.py) sits well below this.
DEQUANT_MIN_M = 1024
BLOCK_N, BLOCK_Q = 32, 128


if HAS_TRITON:
    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, QK, G,
                        BITS: tl.constexpr, HAS_Z: tl.constexpr,
                        BN: tl.constexpr, BQ: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rj = tl.program_id(1) * BQ + tl.arange(0, BQ)        # stored (packed) columns
        mask = (rn[:, None] < N) & (rj[None, :] < QK)
        p = tl.load(q_ptr + rn[:, None] * QK + rj[None, :], mask=mask, other=0).to(tl.int32)
        if BITS == 4:
            k0 = 2 * rj
        else:
            k0 = rj
        g = k0 // G                                           # both nibbles share a group (G even)
        soff = g[None, :] * N + rn[:, None]
        s = tl.load(s_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        base = out_ptr + rn[:, None] * K + k0[None, :]
        if BITS == 4:
            lo = ((p & 0xF) ^ 8) - 8                          # sign-extended low nibble
            hi = p >> 4                                       # arithmetic: the signed high nibble
            wlo = lo.to(tl.float32) * s
            whi = hi.to(tl.float32) * s
            if HAS_Z:
                wlo += z
                whi += z
            tl.store(base, wlo.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(base + 1, whi.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            w = p.to(tl.float32) * s
            if HAS_Z:
                w += z
            tl.store(base, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, bits: int, dtype: torch.dtype, *,
               impl: str = "auto") -> torch.Tensor:
    """Stored codes -> float weight [N, K] in ``dtype`` (see the module docstring).
    ``impl``: "triton" (also on CPU tensors, under the interpreter), "torch" (the reference),
    "auto" (Triton on CUDA)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or bits not in (4, 8):
        raise ConfigError(f"dequantize: need int8 [N, K/2] (bits 4) or [N, K] (bits 8), got "
                          f"{qweight.dtype} {tuple(qweight.shape)} with bits {bits}")
    N, QK = qweight.shape
    K = 2 * QK if bits == 4 else QK
    G = int(group_size) if group_size else K
    ng = -(-K // G)
    if scales.numel() != ng * N or (zeros is not None and zeros.numel() != ng * N):
        raise ConfigError(f"dequantize: scales / zeros must hold [ceil(K/G), N] = [{ng}, {N}], "
                          f"got {tuple(scales.shape)}"
                          f"{'' if zeros is None else ' / ' + str(tuple(zeros.shape))}")
    if bits == 4 and G % 2:
        raise ConfigError(f"dequantize: an int4 group size must be even, got {G}")
    s = scales.reshape(ng, N)
    z = None if zeros is None else zeros.reshape(ng, N)
    triton_ok = HAS_TRITON and (impl == "triton" or (impl == "auto" and qweight.is_cuda))
    if not triton_ok:
        q = (unpack_int4_ref(qweight) if bits == 4 else qweight).float()
        w = q * s.float().repeat_interleave(G, dim=0)[:K].t()
        if z is not None:
            w = w + z.float().repeat_interleave(G, dim=0)[:K].t()
        return w.to(dtype)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    s = s.contiguous()
    z = s if z is None else z.contiguous()
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(QK, BLOCK_Q))
    _dequant_kernel[grid](qweight.contiguous(), s, z, out, N, K, QK, G, BITS=bits,
                          HAS_Z=zeros is not None, BN=BLOCK_N, BQ=BLOCK_Q, num_warps=4)
    return out


def prefill_linear(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
    """x2 [M, K] @ dequantized weight.T: the long-prefill path of the quantized linears."""
    w = dequantize(qweight, scales, zeros, group_size, bits, x2.dtype)
    return torch.nn.functional.linear(x2, w)


def wants_dequant(x: torch.Tensor, M: int) -> bool:
    """The long-prefill path: CUDA, float activations, at least DEQUANT_MIN_M rows."""
    return HAS_TRITON and x.is_cuda and M >= DEQUANT_MIN_M and x.dtype != torch.float64
