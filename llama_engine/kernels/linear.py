"""Weight GEMMs of the LLaMA linears: float, weight-only int8 / int4 (TensorRT-LLM's W8A16,
W4A16, W4A16_AWQ) and SmoothQuant W8A8 (Xiao et al. 2022), as Triton kernels for CUDA with a
plain-PyTorch reference (``*_ref``) of every op, which is also the CPU path and the test oracle.

Layouts are the canonical ones of docs/design.md (TensorRT-LLM unified checkpoint): weights are
``[N, K]`` (out, in); int4 packs two signed nibbles per byte along K, even k in the low nibble;
group-wise int4 scales are ``[K/G, N]``; W8A8 computes ``(xq @ qw.T) * x_scale * w_scale``.

Why the kernels look the way they do:

* Decode (small M) is bound by weight bandwidth: each weight byte is read once per step and the
  arithmetic is ~M FMAs per weight. So for M <= 64 a *skinny* kernel streams weight tiles at
  full width along K, dequantizes them in registers and accumulates in fp32 (int32 for W8A8).
  Two variants, picked per (M bucket, N, K) from a table measured on an H100:
    - ``fma``: no tensor cores; ``acc[BM, BN, BK] += w * x`` elementwise, one reduction over
      K at the end (the classic GEMV). Wins for some M = 1 shapes.
    - ``dot``: swap-AB tensor-core tile ``acc[BN, BM] += w[BN, BK] @ x[BM, BK].T``: the weight
      is the large operand, the few tokens are the narrow MMA side (padded to 8/16). Wins
      almost everywhere else.
  Both can split K over a second grid axis so that the narrow layers (o_proj, down_proj:
  N = 4096) still fill 132 SMs. The fp32 partials [S, M, N] are summed by one small reduction
  kernel, or, with ``partials=True``, returned unsummed as a ``SplitKPartials`` for the next
  kernel (``add_rms_norm``, ``silu_mul``) to sum while it loads
  its input: at batch 1 a launch costs as much as the reduction itself, and this saves up to 4
  of them per layer.
* Dequantization is ALU-bound before it is memory-bound: int -> float conversion (I2F) runs
  at a quarter of the FMA rate, which held int4 to ~1.4 TB/s. On CUDA the int8 / int4 -> fp16
  (and int4 -> bf16) conversion instead builds the half-precision bit pattern with
  ``prmt`` / ``lop3`` and one packed subtract (inline PTX, 4 weights per instance; the
  1024 + u magic-number trick). The interpreter and fp32 use plain casts.
* Large M is compute bound: float goes to cuBLAS; int8/int4 weights go to a tiled Triton GEMM
  that dequantizes each tile in registers (never a full fp16 copy of the weight); W8A8 goes to
  ``torch._int_mm`` (cuBLAS int8, needs M > 16 and K, N multiples of 8) with the scales applied
  by one epilogue kernel for 64 < M <= 256, and to the tiled Triton GEMM above that.
* int4 nibbles are split, not interleaved: ``w[n, 2j]`` is the low nibble and pairs with
  ``x[:, 2j]``, so the kernel splits the (small) activation tile into even / odd columns and
  runs two half-width products instead of shuffling the weight tile.
* Group-wise int4 scales multiply the per-tile product (BK <= G: one group per tile), or the
  weight tile in registers (BK > G).
Every public op takes ``impl="auto" | "triton" | "torch"``: auto = Triton on CUDA when the shapes
fit, else the best plain-torch path (cuBLAS, ``_int_mm``); on the CPU, auto and torch give the
reference. ``impl="triton"`` on CPU tensors runs the kernels in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ConfigError
from . import pdl

try:  # Triton is optional: without it every op runs its torch path.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = tl = libdevice = None
    HAS_TRITON = False

__all__ = [
    "linear_fp", "linear_w8a16", "linear_w4a16", "linear_w8a8", "linear_w8a8_dynamic",
    "quantize_per_token", "quantize_per_tensor", "pack_int4", "unpack_int4",
    "linear_fp_ref", "linear_w8a16_ref", "linear_w4a16_ref", "linear_w8a8_ref",
    "quantize_per_token_ref", "quantize_per_tensor_ref", "pack_int4_ref", "unpack_int4_ref",
    "gpu_selfcheck", "SkinnyCfg", "GemmCfg", "SplitKPartials", "partial_slices", "summed",
]

# Smallest amax used for a per-token scale: an all-zero row gets a tiny positive scale (and
# q = 0), so the scale can be divided by as well as multiplied by.
AMAX_EPS = 1e-8

# Weight kinds, shared by host code and kernels (constexpr WKIND).
_FP, _I8, _I4, _I4G, _A8 = 0, 1, 2, 3, 4
_KIND_NAMES = {_FP: "fp", _I8: "w8a16", _I4: "w4a16", _I4G: "w4a16g", _A8: "w8a8"}

SKINNY_MAX_M = 64          # skinny kernels up to this many rows; tiled GEMM / cuBLAS above
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# =============================================================================================
# Split-K partials handed to the next kernel
# =============================================================================================
@dataclass(frozen=True, eq=False)
class SplitKPartials:
    """A linear's output before its split-K reduction: fp32 partial products ``parts[S, M, N]``
    whose sum over S, rounded to ``dtype``, is the output ``[*lead, N]`` (M = prod(lead)).

    Returned only when the caller asks (``partials=True``) and the skinny kernel did split K.
    Consumers that take it (``add_rms_norm``, ``silu_mul``)
    sum the S slices as they load them, in the order and with the final rounding of the
    reduction kernel, so their results are the same as on the summed tensor; anything else
    calls ``.sum()``."""
    parts: torch.Tensor
    lead: tuple
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.lead, self.parts.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def is_cuda(self) -> bool:
        return self.parts.is_cuda

    def sum(self) -> torch.Tensor:
        """The output tensor ``[*lead, N]`` in ``dtype`` (sum over S in fp32, then the cast)."""
        return self.parts.sum(0).to(self.dtype).reshape(self.shape)

    def index_rows(self, idx: torch.Tensor) -> "SplitKPartials":
        """The partials of ``out[idx]`` for a 2-D output ``[M, N]`` (e.g. the rows that get
        logits), without summing: one gather, as indexing the tensor would be."""
        if len(self.lead) != 1:
            raise ConfigError(f"SplitKPartials.index_rows needs a 2-D output, got {self.shape}")
        p = self.parts[:, idx]                                   # [S, *idx.shape, N]
        return SplitKPartials(p.reshape(p.shape[0], -1, p.shape[-1]), tuple(p.shape[1:-1]),
                              self.dtype)


def summed(x) -> torch.Tensor:
    """A tensor, or the reduced tensor of SplitKPartials (torch paths of the consumers)."""
    return x.sum() if isinstance(x, SplitKPartials) else x


def partial_slices(x) -> torch.Tensor:
    """Input of a consumer kernel: ``[S, M, N]`` with unit stride along N; the partials, or a
    tensor ``[..., N]`` as one slice (S = 1). Kernels sum the slices with ``_load_summed``."""
    if isinstance(x, SplitKPartials):
        return x.parts
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()).unsqueeze(0)


def _with_lead(out, lead: tuple):
    """A launcher's result for rows [M] -> leading shape ``lead`` (tensor or partials)."""
    if isinstance(out, SplitKPartials):
        return SplitKPartials(out.parts, tuple(lead), out.dtype)
    return out.reshape(*lead, out.shape[-1])


# =============================================================================================
# Input checks (one-line ConfigError, as the rest of the engine)
# =============================================================================================
def _flat(x, K: int, what: str) -> tuple[torch.Tensor, tuple]:
    """x[..., K] -> (x2d[M, K], leading shape)."""
    if x.dim() < 1 or x.shape[-1] != K:
        raise ConfigError(f"{what}: input last dim {tuple(x.shape)} does not match K={K}")
    return x.reshape(-1, K), tuple(x.shape[:-1])


def _check_weight(w: torch.Tensor, what: str, dtype=None) -> None:
    if w.dim() != 2:
        raise ConfigError(f"{what}: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if dtype is not None and w.dtype != dtype:
        raise ConfigError(f"{what}: weight must be {dtype}, got {w.dtype}")


def _check_float(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"{what}: activations must be float16/bfloat16/float32, got {x.dtype}")


def _w4_geometry(k_in: int, qweight: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> tuple[int, int, int, torch.Tensor]:
    """Validate a W4A16 call with input width k_in; returns (N, K, G, scales as [K/G, N])."""
    _check_weight(qweight, "linear_w4a16", torch.int8)
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if k_in != K:
        raise ConfigError(f"linear_w4a16: input K={k_in} but packed weight holds K={K}")
    G = int(group_size)
    if G <= 0 or K % G:
        raise ConfigError(f"linear_w4a16: group_size {group_size} must divide K={K}")
    if scales.numel() != (K // G) * N:
        raise ConfigError(f"linear_w4a16: scales shape {tuple(scales.shape)} is not "
                          f"[K/G, N] = [{K // G}, {N}]")
    return N, K, G, scales.reshape(K // G, N)


def _check_impl(impl: str) -> None:
    if impl not in ("auto", "triton", "torch"):
        raise ConfigError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _want_triton(impl: str, t: torch.Tensor) -> bool:
    """Whether to run a Triton kernel for tensor t's device."""
    _check_impl(impl)
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise ConfigError("impl='triton' but Triton is not installed")
        if not t.is_cuda and not _interpreting():
            raise ConfigError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return True
    return HAS_TRITON and t.is_cuda


# =============================================================================================
# References (fp32 math, fp64 for fp64 inputs; result in x.dtype): CPU path and test oracle
# =============================================================================================
def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the references: fp64 engines stay fp64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_fp_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check_weight(weight, "linear_fp")
    x2, lead = _flat(x, weight.shape[1], "linear_fp")
    acc = _acc(x)
    out = x2.to(acc) @ weight.to(acc).t()
    return out.to(x.dtype).reshape(*lead, weight.shape[0])


def linear_w8a16_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_weight(qweight, "linear_w8a16", torch.int8)
    N, K = qweight.shape
    if scale.numel() != N:
        raise ConfigError(f"linear_w8a16: scale shape {tuple(scale.shape)} is not [N={N}]")
    x2, lead = _flat(x, K, "linear_w8a16")
    acc = _acc(x)
    w = qweight.to(acc) * scale.reshape(N, 1).to(acc)
    return (x2.to(acc) @ w.t()).to(x.dtype).reshape(*lead, N)


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in -8..7 -> int8 [N, K/2]; byte j = q[2j] (low) | q[2j+1] << 4."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % 2:
        raise ConfigError(f"pack_int4: need int8 [N, K] with K even, got {q.dtype} "
                          f"{tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ConfigError("pack_int4: values must lie in -8..7")
    q16 = q.to(torch.int16)
    lo, hi = q16[:, 0::2] & 0xF, q16[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] -> int8 [N, K] in -8..7 (inverse of pack_int4)."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise ConfigError(f"unpack_int4: need int8 [N, K/2], got {packed.dtype} "
                          f"{tuple(packed.shape)}")
    p = packed.to(torch.int16)              # sign-extended byte
    hi = p >> 4                             # arithmetic shift: the signed high nibble
    lo = ((p & 0xF) ^ 8) - 8                # sign-extend the low nibble
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1).to(torch.int8)


def linear_w4a16_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    N, K, G, s = _w4_geometry(x.shape[-1], qweight, scales, group_size)
    x2, lead = _flat(x, K, "linear_w4a16")
    acc = _acc(x)
    w = unpack_int4_ref(qweight).to(acc)                         # [N, K]
    w = w * s.to(acc).repeat_interleave(G, dim=0).t()            # scale of (n, k) = s[k // G, n]
    return (x2.to(acc) @ w.t()).to(x.dtype).reshape(*lead, N)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float(x, "quantize_per_token")
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp_min(AMAX_EPS) / 127.0
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_tensor_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_float(x, "quantize_per_tensor")
    if scale.numel() != 1:
        raise ConfigError(f"quantize_per_tensor: scale must hold one value, got "
                          f"{tuple(scale.shape)}")
    return torch.round(x.float() / scale.float().reshape(())).clamp_(-127, 127).to(torch.int8)


def _w8a8_check(xq, x_scale, qweight, w_scale, out_dtype):
    _check_weight(qweight, "linear_w8a8", torch.int8)
    N, K = qweight.shape
    if xq.dtype != torch.int8:
        raise ConfigError(f"linear_w8a8: activations must be int8, got {xq.dtype}")
    x2, lead = _flat(xq, K, "linear_w8a8")
    M = x2.shape[0]
    if x_scale.numel() not in (1, M):
        raise ConfigError(f"linear_w8a8: x_scale shape {tuple(x_scale.shape)} is neither "
                          f"[M={M}, 1] nor [1, 1]")
    if w_scale.numel() not in (1, N):
        raise ConfigError(f"linear_w8a8: w_scale shape {tuple(w_scale.shape)} is neither "
                          f"[1, N={N}] nor [1, 1]")
    if out_dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"linear_w8a8: out_dtype must be a float dtype, got {out_dtype}")
    return x2, lead, M, N, K


def linear_w8a8_ref(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                    w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    x2, lead, M, N, K = _w8a8_check(xq, x_scale, qweight, w_scale, out_dtype)
    acc = x2.float() @ qweight.float().t()       # exact while |acc| < 2**24
    out = acc * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    return out.to(out_dtype).reshape(*lead, N)


# =============================================================================================
# Triton kernels
# =============================================================================================
if HAS_TRITON:
    from .pdl import wait_then_release

    @triton.jit
    def _int4_halves(wp):
        """Packed bytes [R, C] int8 -> (low, high) nibbles as int32 in -8..7."""
        w32 = wp.to(tl.int32)                   # sign-extends the byte
        return (w32 << 28) >> 28, w32 >> 4      # arithmetic shifts sign-extend each nibble

    # Fast integer -> half conversions (CUDA only; CVT constexpr 1 = fp16, 2 = bf16). The plain
    # int -> float conversion (I2F) issues at a quarter of the FMA rate and caps int4 near
    # 1.3 TB/s on an H100; building the half's bits directly costs ~1 instruction per weight.
    # Each asm instance takes 4 packed bytes (pack=4, byte i = element i).
    @triton.jit
    def _int4_to_f16_fast(wp):
        """4 bytes -> (4 low-nibble, 4 high-nibble) fp16. Bits 0x6400 | u read as 1024 + u, so
        0x6400 | (nib ^ 8) - 1032 is the signed nibble; for the high nibble 0x5400 | (u << 4)
        reads as 64 + u."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, z, k0, k1;
            mov.b32 z, 0;
            prmt.b32 t0, $4, z, 0x4140;
            prmt.b32 t1, $4, z, 0x4342;
            lop3.b32 $0, t0, 0x000F000F, 0x64086408, 0x6a;
            lop3.b32 $1, t1, 0x000F000F, 0x64086408, 0x6a;
            lop3.b32 $2, t0, 0x00F000F0, 0x54805480, 0x6a;
            lop3.b32 $3, t1, 0x00F000F0, 0x54805480, 0x6a;
            mov.b32 k0, 0x64086408;
            mov.b32 k1, 0x54805480;
            sub.f16x2 $0, $0, k0;
            sub.f16x2 $1, $1, k0;
            sub.f16x2 $2, $2, k1;
            sub.f16x2 $3, $3, k1;
            }""",
            constraints="=r,=r,=r,=r,r", args=[wp], dtype=(tl.float16, tl.float16),
            is_pure=True, pack=4)

    @triton.jit
    def _int4_to_bf16_fast(wp):
        """As _int4_to_f16_fast for bf16: 0x4300 | u reads as 128 + u (7 mantissa bits)."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, s0, s1, z, one, k;
            mov.b32 z, 0;
            prmt.b32 t0, $4, z, 0x4140;
            prmt.b32 t1, $4, z, 0x4342;
            shr.b32 s0, t0, 4;
            shr.b32 s1, t1, 4;
            lop3.b32 $0, t0, 0x000F000F, 0x43084308, 0x6a;
            lop3.b32 $1, t1, 0x000F000F, 0x43084308, 0x6a;
            lop3.b32 $2, s0, 0x000F000F, 0x43084308, 0x6a;
            lop3.b32 $3, s1, 0x000F000F, 0x43084308, 0x6a;
            mov.b32 one, 0x3F803F80;
            mov.b32 k, 0xC308C308;
            fma.rn.bf16x2 $0, $0, one, k;
            fma.rn.bf16x2 $1, $1, one, k;
            fma.rn.bf16x2 $2, $2, one, k;
            fma.rn.bf16x2 $3, $3, one, k;
            }""",
            constraints="=r,=r,=r,=r,r", args=[wp], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=4)

    @triton.jit
    def _int8_to_f16_fast(w):
        """4 int8 -> 4 fp16: 0x64 << 8 | (b ^ 0x80) reads as 1024 + b + 128."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, m, k;
            xor.b32 t, $2, 0x80808080;
            mov.b32 m, 0x64646464;
            prmt.b32 $0, t, m, 0x5140;
            prmt.b32 $1, t, m, 0x7362;
            mov.b32 k, 0x64806480;
            sub.f16x2 $0, $0, k;
            sub.f16x2 $1, $1, k;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _int4_unpack(wp, dtype: tl.constexpr, CVT: tl.constexpr):
        """Packed bytes [R, C] -> (even-k, odd-k) weights [R, C] in dtype."""
        if CVT == 1:
            lo, hi = _int4_to_f16_fast(wp)
        elif CVT == 2:
            lo, hi = _int4_to_bf16_fast(wp)
        else:
            lo, hi = _int4_halves(wp)
        return lo.to(dtype), hi.to(dtype)

    @triton.jit
    def _int8_convert(w, dtype: tl.constexpr, CVT: tl.constexpr):
        if CVT == 1:
            return _int8_to_f16_fast(w).to(dtype)
        else:
            return w.to(dtype)

    @triton.jit
    def _round_half_even(y, USE_RINT: tl.constexpr):
        """Round to nearest even, as torch.round. y is already clamped to |y| <= 127."""
        if USE_RINT:
            return libdevice.rint(y)
        else:
            # Triton's interpreter has no libdevice. Adding 1.5 * 2**23 leaves no fraction bits
            # in an fp32 mantissa, so the add itself rounds (half to even) for |y| < 2**22.
            return (y + 12582912.0) - 12582912.0

    @triton.jit
    def _x_tile(x_ptr, offs_m, offs_k, m_ok, K, stride_xm, EVEN_K: tl.constexpr):
        """Activation tile x[BM, BK] (zeros outside)."""
        ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        if EVEN_K:
            mask = m_ok[:, None]
        else:
            mask = m_ok[:, None] & (offs_k[None, :] < K)
        return tl.load(ptrs, mask=mask, other=0)

    @triton.jit(do_not_specialize=["M"])
    def _skinny_dot_kernel(
            x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr,
            M, N, K, stride_xm, stride_wn, stride_sg, stride_om, stride_os,
            k_per_split, WKIND: tl.constexpr, GROUP: tl.constexpr, XS_ROW: tl.constexpr,
            WS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
            ITERS_C: tl.constexpr, CVT: tl.constexpr, PDL: tl.constexpr):
        """out[m, n] (or split partial) = sum_k x[m, k] w[n, k]; tile acc[BN, BM] = W @ X^T."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        wait_then_release(PDL)  # kernels/pdl.py: nothing above reads memory
        if WKIND == 4:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        # ITERS_C: trip count fixed at compile time under the interpreter (its loops need ints)
        for i in range(0, ITERS_C if ITERS_C > 0 else k_per_split // BLOCK_K):
            k0 = k_lo + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _x_tile(x_ptr, offs_m, offs_k, m_ok, K, stride_xm, EVEN_K)
            if WKIND == 2 or WKIND == 3:
                offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :]
                if EVEN_K:
                    wp = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                else:
                    wp = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_p[None, :] < K // 2),
                                 other=0)
                lo, hi = _int4_unpack(wp, x.dtype, CVT)                    # [BN, BK/2]
                x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
                if WKIND == 3 and BLOCK_K > GROUP:
                    # several groups per tile: scale the weights in registers. s: [BN, BK/G]
                    offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                    s = tl.load(s_ptr + offs_g[None, :] * stride_sg + offs_n[:, None],
                                mask=n_ok[:, None] & (offs_g[None, :] < K // GROUP),
                                other=0).to(tl.float32)
                    lo = tl.reshape(tl.reshape(lo.to(tl.float32),
                                               [BLOCK_N, BLOCK_K // GROUP, GROUP // 2])
                                    * s[:, :, None], [BLOCK_N, BLOCK_K // 2])
                    hi = tl.reshape(tl.reshape(hi.to(tl.float32),
                                               [BLOCK_N, BLOCK_K // GROUP, GROUP // 2])
                                    * s[:, :, None], [BLOCK_N, BLOCK_K // 2])
                    acc = tl.dot(lo.to(x.dtype), tl.trans(x_even), acc, input_precision=DOT_PREC)
                    acc = tl.dot(hi.to(x.dtype), tl.trans(x_odd), acc, input_precision=DOT_PREC)
                elif WKIND == 3:
                    # the tile lies inside one group: scale its product (exact, cheap)
                    part = tl.dot(lo.to(x.dtype), tl.trans(x_even), input_precision=DOT_PREC)
                    part = tl.dot(hi.to(x.dtype), tl.trans(x_odd), part, input_precision=DOT_PREC)
                    s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n,
                                mask=n_ok & (k0 < K), other=0).to(tl.float32)
                    acc += part * s[:, None]
                else:
                    acc = tl.dot(lo.to(x.dtype), tl.trans(x_even), acc, input_precision=DOT_PREC)
                    acc = tl.dot(hi.to(x.dtype), tl.trans(x_odd), acc, input_precision=DOT_PREC)
            else:
                w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
                if EVEN_K:
                    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                else:
                    w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k[None, :] < K), other=0)
                if WKIND == 4:
                    acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(_int8_convert(w, x.dtype, CVT), tl.trans(x), acc,
                                 input_precision=DOT_PREC)
        # epilogue: per-channel / per-token scales (linear, so also right for split partials)
        if WKIND == 4:
            out = acc.to(tl.float32)
            if WS_COL:
                out = out * tl.load(s_ptr + offs_n, mask=n_ok, other=0)[:, None]
            else:
                out = out * tl.load(s_ptr)
            if XS_ROW:
                out = out * tl.load(xs_ptr + offs_m, mask=m_ok, other=0)[None, :]
            else:
                out = out * tl.load(xs_ptr)
        elif WKIND == 1 or WKIND == 2:
            out = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
        else:
            out = acc
        o_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _skinny_fma_kernel(
            x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr,
            M, N, K, stride_xm, stride_wn, stride_sg, stride_om, stride_os,
            k_per_split, WKIND: tl.constexpr, GROUP: tl.constexpr, XS_ROW: tl.constexpr,
            WS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ITERS_C: tl.constexpr,
            CVT: tl.constexpr, PDL: tl.constexpr):
        """GEMV without tensor cores: acc[BM, BN, BK] += x * w elementwise, reduce K at the end.
        Grouped int4 needs BLOCK_K <= GROUP (one group per tile)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        wait_then_release(PDL)  # kernels/pdl.py: nothing above reads memory
        if WKIND == 2 or WKIND == 3:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        elif WKIND == 4:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        # ITERS_C: trip count fixed at compile time under the interpreter (its loops need ints)
        for i in range(0, ITERS_C if ITERS_C > 0 else k_per_split // BLOCK_K):
            k0 = k_lo + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _x_tile(x_ptr, offs_m, offs_k, m_ok, K, stride_xm, EVEN_K)
            if WKIND == 2 or WKIND == 3:
                offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :]
                if EVEN_K:
                    wp = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                else:
                    wp = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_p[None, :] < K // 2),
                                 other=0)
                lo, hi = _int4_unpack(wp, tl.float32, CVT)
                if WKIND == 3:
                    s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n,
                                mask=n_ok & (k0 < K), other=0).to(tl.float32)
                    lo = lo * s[:, None]
                    hi = hi * s[:, None]
                x_even, x_odd = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_M, BLOCK_K // 2, 2]))
                acc += lo[None, :, :] * x_even[:, None, :] + hi[None, :, :] * x_odd[:, None, :]
            else:
                w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
                if EVEN_K:
                    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                else:
                    w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k[None, :] < K), other=0)
                if WKIND == 4:
                    acc += w.to(tl.int32)[None, :, :] * x.to(tl.int32)[:, None, :]
                else:
                    acc += (_int8_convert(w, tl.float32, CVT)[None, :, :]
                            * x.to(tl.float32)[:, None, :])
        out = tl.sum(acc, axis=2)                                            # [BM, BN]
        if WKIND == 4:
            out = out.to(tl.float32)
            if WS_COL:
                out = out * tl.load(s_ptr + offs_n, mask=n_ok, other=0)[None, :]
            else:
                out = out * tl.load(s_ptr)
            if XS_ROW:
                out = out * tl.load(xs_ptr + offs_m, mask=m_ok, other=0)[:, None]
            else:
                out = out * tl.load(xs_ptr)
        elif WKIND == 1 or WKIND == 2:
            out = out * tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _gemm_kernel(
            x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr,
            M, N, K, stride_xm, stride_wn, stride_sg, stride_om,
            WKIND: tl.constexpr, GROUP: tl.constexpr, XS_ROW: tl.constexpr,
            WS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
            DOT_PREC: tl.constexpr, ITERS_C: tl.constexpr, CVT: tl.constexpr):
        """Tiled GEMM out[BM, BN] = X @ dequant(W)^T for large M. Grouped int4: BLOCK_K <= GROUP."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M rows of tiles share weight columns while they are in L2
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gsz = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsz
        pid_n = (pid % width) // gsz
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        if WKIND == 4:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # ITERS_C: trip count fixed at compile time under the interpreter (its loops need ints)
        for i in range(0, ITERS_C if ITERS_C > 0 else tl.cdiv(K, BLOCK_K)):
            k0 = i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _x_tile(x_ptr, offs_m, offs_k, m_ok, K, stride_xm, EVEN_K)
            if WKIND == 2 or WKIND == 3:
                offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :]
                if EVEN_K:
                    wp = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                else:
                    wp = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_p[None, :] < K // 2), other=0)
                lo, hi = _int4_unpack(wp, x.dtype, CVT)
                # interleave back to [BN, BK]: element (n, 2j + t) = (lo, hi)[t][n, j]
                w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
                if WKIND == 3:
                    part = tl.dot(x, tl.trans(w), input_precision=DOT_PREC)
                    s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n,
                                mask=n_ok & (k0 < K), other=0).to(tl.float32)
                    acc += part * s[None, :]
                else:
                    acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
            else:
                w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
                if EVEN_K:
                    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                else:
                    w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k[None, :] < K), other=0)
                if WKIND == 4:
                    acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(x, tl.trans(_int8_convert(w, x.dtype, CVT)), acc,
                                 input_precision=DOT_PREC)
        if WKIND == 4:
            out = acc.to(tl.float32)
            if WS_COL:
                out = out * tl.load(s_ptr + offs_n, mask=n_ok, other=0)[None, :]
            else:
                out = out * tl.load(s_ptr)
            if XS_ROW:
                out = out * tl.load(xs_ptr + offs_m, mask=m_ok, other=0)[:, None]
            else:
                out = out * tl.load(xs_ptr)
        elif WKIND == 1 or WKIND == 2:
            out = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
        else:
            out = acc
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _load_summed(ptrs, mask, stride_s, S: tl.constexpr, dtype: tl.constexpr):
        """sum_s x[s] at ptrs + s * stride_s (fp32 split-K partials, added in order), rounded to
        dtype: the linear's output. S = 1 is a plain load of the tensor itself."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        for s in tl.static_range(1, S):
            x += tl.load(ptrs + s * stride_s, mask=mask, other=0.0)
        return x.to(dtype)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, out_ptr, MN, S: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
        """out[i] = sum_s partial[s, i] (fp32 partials [S, M*N] -> out dtype)."""
        wait_then_release(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        tl.store(out_ptr + offs, _load_summed(p_ptr + offs, ok, MN, S, out_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _int32_scale_kernel(acc_ptr, xs_ptr, ws_ptr, out_ptr, M, N,
                            XS_ROW: tl.constexpr, WS_COL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """W8A8 epilogue after torch._int_mm: out = acc * x_scale[m] * w_scale[n]."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        ok = m_ok[:, None] & n_ok[None, :]
        idx = offs_m[:, None] * N + offs_n[None, :]
        out = tl.load(acc_ptr + idx, mask=ok, other=0).to(tl.float32)
        if XS_ROW:
            out = out * tl.load(xs_ptr + offs_m, mask=m_ok, other=0)[:, None]
        else:
            out = out * tl.load(xs_ptr)
        if WS_COL:
            out = out * tl.load(ws_ptr + offs_n, mask=n_ok, other=0)[None, :]
        else:
            out = out * tl.load(ws_ptr)
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, AMAX_MIN,
                                BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                                USE_RINT: tl.constexpr, ITERS_C: tl.constexpr):
        """One program per row: scale = max(amax, eps) / 127, q = round(x / scale)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        offs = tl.arange(0, BLOCK_K)
        if ONE_PASS:                      # the whole row in registers: read x once
            x = tl.load(x_row + offs, mask=offs < K, other=0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
            scale = tl.math.div_rn(tl.maximum(amax, AMAX_MIN), 127.0)
            y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -127.0), 127.0)
            tl.store(q_row + offs, _round_half_even(y, USE_RINT).to(tl.int8), mask=offs < K)
        else:                             # long rows: amax pass, then quantize (re-read from L2)
            m = tl.zeros([BLOCK_K], dtype=tl.float32)
            # ITERS_C: trip count fixed at compile time under the interpreter (its loops need ints)
            for i in range(0, ITERS_C if ITERS_C > 0 else tl.cdiv(K, BLOCK_K)):
                k0 = i * BLOCK_K
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0).to(tl.float32)
                m = tl.maximum(m, tl.abs(x))
            amax = tl.max(m, axis=0)
            scale = tl.math.div_rn(tl.maximum(amax, AMAX_MIN), 127.0)
            for i in range(0, ITERS_C if ITERS_C > 0 else tl.cdiv(K, BLOCK_K)):
                k0 = i * BLOCK_K
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0).to(tl.float32)
                y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -127.0), 127.0)
                tl.store(q_row + k0 + offs, _round_half_even(y, USE_RINT).to(tl.int8),
                         mask=k0 + offs < K)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _quant_per_tensor_kernel(x_ptr, q_ptr, s_ptr, numel, BLOCK: tl.constexpr,
                                 USE_RINT: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        scale = tl.load(s_ptr).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -127.0), 127.0)
        tl.store(q_ptr + offs, _round_half_even(y, USE_RINT).to(tl.int8), mask=ok)


# =============================================================================================
# Kernel configurations
# =============================================================================================
@dataclass(frozen=True)
class SkinnyCfg:
    """One launch of a skinny (M <= 64) kernel. block_k counts unpacked K elements."""
    kernel: str            # "dot" (tensor cores, swap-AB) or "fma" (elementwise GEMV)
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class GemmCfg:
    """One launch of the tiled GEMM (large M)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def _m_bucket(M: int) -> int:
    """Rows are tuned at M = 1, 4, 16, 64; other M use the next bucket up."""
    for b in (1, 4, 16, 64):
        if M <= b:
            return b
    return 128


_S, _G = SkinnyCfg, GemmCfg
# Measured on an H100 80GB HBM3 (Triton 3.6, torch 2.11, fp16 activations, weights rotated
# through copies larger than L2, CUDA-graph timing) for the LLaMA-7B linears:
# (kind, M bucket, N, K) -> config, with the weight bandwidth it reached. Other shapes take the
# entry nearest in (log N, log K) for their kind and M bucket.
_TUNED: dict[tuple, object] = {
    # @@TUNED_TABLE_BEGIN
    (_FP, 1, 4096, 4096): _S("dot", 32, 256, 1, 4, 5),  # 2212 GB/s
    (_FP, 1, 4096, 11008): _S("dot", 64, 128, 2, 4, 5),  # 2521 GB/s
    (_FP, 1, 12288, 4096): _S("fma", 4, 1024, 1, 4, 3),  # 2671 GB/s
    (_FP, 1, 22016, 4096): _S("fma", 4, 1024, 1, 4, 1),  # 2926 GB/s
    (_FP, 1, 32000, 4096): _S("fma", 4, 1024, 1, 4, 3),  # 2992 GB/s
    (_FP, 4, 4096, 4096): _S("dot", 32, 256, 1, 4, 5),  # 2268 GB/s
    (_FP, 4, 4096, 11008): _S("dot", 32, 128, 2, 4, 5),  # 2517 GB/s
    (_FP, 4, 12288, 4096): _S("dot", 32, 128, 1, 4, 5),  # 2576 GB/s
    (_FP, 4, 22016, 4096): _S("dot", 32, 256, 1, 4, 5),  # 2788 GB/s
    (_FP, 4, 32000, 4096): _S("dot", 128, 256, 1, 4, 3),  # 2873 GB/s
    (_FP, 16, 4096, 4096): _S("dot", 64, 256, 1, 4, 5),  # 2259 GB/s
    (_FP, 16, 4096, 11008): _S("dot", 64, 256, 2, 4, 3),  # 2480 GB/s
    (_FP, 16, 12288, 4096): _S("dot", 64, 128, 1, 4, 3),  # 2535 GB/s
    (_FP, 16, 22016, 4096): _S("dot", 64, 256, 1, 4, 5),  # 2774 GB/s
    (_FP, 16, 32000, 4096): _S("dot", 64, 256, 1, 4, 5),  # 2828 GB/s
    (_FP, 64, 4096, 4096): _S("dot", 64, 128, 1, 4, 5),  # 2029 GB/s
    (_FP, 64, 4096, 11008): _S("dot", 64, 128, 2, 4, 5),  # 2276 GB/s
    (_FP, 64, 12288, 4096): _S("dot", 64, 128, 1, 4, 3),  # 2421 GB/s
    (_FP, 64, 22016, 4096): _S("dot", 64, 128, 1, 4, 5),  # 2611 GB/s
    (_FP, 64, 32000, 4096): _S("dot", 128, 128, 1, 4, 3),  # 2752 GB/s
    (_A8, 1, 4096, 4096): _S("dot", 64, 256, 1, 4, 5),  # 1729 GB/s
    (_A8, 1, 4096, 11008): _S("fma", 8, 1024, 1, 4, 1),  # 2239 GB/s
    (_A8, 1, 12288, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2346 GB/s
    (_A8, 1, 22016, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2527 GB/s
    (_A8, 1, 32000, 4096): _S("dot", 128, 256, 1, 4, 3),  # 2681 GB/s
    (_A8, 4, 4096, 4096): _S("dot", 64, 256, 1, 4, 5),  # 1764 GB/s
    (_A8, 4, 4096, 11008): _S("dot", 64, 512, 1, 4, 5),  # 2293 GB/s
    (_A8, 4, 12288, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2315 GB/s
    (_A8, 4, 22016, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2482 GB/s
    (_A8, 4, 32000, 4096): _S("dot", 128, 256, 1, 4, 3),  # 2664 GB/s
    (_A8, 16, 4096, 4096): _S("dot", 64, 256, 1, 4, 5),  # 1716 GB/s
    (_A8, 16, 4096, 11008): _S("dot", 32, 512, 1, 4, 5),  # 2227 GB/s
    (_A8, 16, 12288, 4096): _S("dot", 32, 256, 1, 4, 3),  # 2292 GB/s
    (_A8, 16, 22016, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2445 GB/s
    (_A8, 16, 32000, 4096): _S("dot", 128, 256, 1, 4, 3),  # 2624 GB/s
    (_A8, 64, 4096, 4096): _S("dot", 64, 256, 1, 4, 5),  # 1500 GB/s
    (_A8, 64, 4096, 11008): _S("dot", 64, 256, 1, 4, 5),  # 1939 GB/s
    (_A8, 64, 12288, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2127 GB/s
    (_A8, 64, 22016, 4096): _G(64, 64, 128, 8, 4, 4),  # 2172 GB/s
    (_A8, 64, 32000, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2457 GB/s
    (_I8, 1, 4096, 4096): _S("fma", 8, 1024, 1, 4, 1),  # 1698 GB/s
    (_I8, 1, 4096, 11008): _S("dot", 32, 256, 4, 4, 3),  # 2152 GB/s
    (_I8, 1, 12288, 4096): _S("dot", 32, 256, 1, 4, 3),  # 2365 GB/s
    (_I8, 1, 22016, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2600 GB/s
    (_I8, 1, 32000, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2698 GB/s
    (_I8, 4, 4096, 4096): _S("dot", 32, 256, 1, 4, 5),  # 1681 GB/s
    (_I8, 4, 4096, 11008): _S("dot", 32, 256, 4, 4, 3),  # 2125 GB/s
    (_I8, 4, 12288, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2335 GB/s
    (_I8, 4, 22016, 4096): _S("dot", 64, 256, 1, 4, 3),  # 2584 GB/s
    (_I8, 4, 32000, 4096): _S("dot", 128, 256, 1, 4, 3),  # 2691 GB/s
    (_I8, 16, 4096, 4096): _S("dot", 32, 256, 1, 4, 5),  # 1631 GB/s
    (_I8, 16, 4096, 11008): _S("dot", 32, 256, 4, 4, 3),  # 2034 GB/s
    (_I8, 16, 12288, 4096): _S("dot", 32, 256, 1, 4, 5),  # 2191 GB/s
    (_I8, 16, 22016, 4096): _S("dot", 32, 256, 1, 4, 5),  # 2328 GB/s
    (_I8, 16, 32000, 4096): _S("dot", 32, 256, 1, 4, 5),  # 2413 GB/s
    (_I8, 64, 4096, 4096): _S("dot", 64, 256, 2, 4, 3),  # 1063 GB/s
    (_I8, 64, 4096, 11008): _S("dot", 64, 256, 2, 4, 3),  # 1366 GB/s
    (_I8, 64, 12288, 4096): _G(32, 64, 128, 8, 4, 4),  # 1387 GB/s
    (_I8, 64, 22016, 4096): _G(64, 128, 64, 8, 4, 4),  # 1643 GB/s
    (_I8, 64, 32000, 4096): _G(64, 64, 128, 8, 4, 3),  # 1776 GB/s
    (_I4, 1, 4096, 4096): _S("fma", 4, 1024, 1, 4, 1),  # 1051 GB/s
    (_I4, 1, 4096, 11008): _S("dot", 64, 512, 4, 4, 3),  # 1597 GB/s
    (_I4, 1, 12288, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1742 GB/s
    (_I4, 1, 22016, 4096): _S("dot", 64, 512, 2, 4, 3),  # 1836 GB/s
    (_I4, 1, 32000, 4096): _S("dot", 64, 512, 1, 4, 3),  # 2239 GB/s
    (_I4, 4, 4096, 4096): _S("dot", 64, 512, 2, 4, 3),  # 987 GB/s
    (_I4, 4, 4096, 11008): _S("dot", 64, 512, 4, 4, 3),  # 1554 GB/s
    (_I4, 4, 12288, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1785 GB/s
    (_I4, 4, 22016, 4096): _S("dot", 64, 512, 2, 4, 3),  # 1805 GB/s
    (_I4, 4, 32000, 4096): _S("dot", 64, 512, 1, 4, 3),  # 2223 GB/s
    (_I4, 16, 4096, 4096): _S("dot", 64, 512, 2, 4, 3),  # 839 GB/s
    (_I4, 16, 4096, 11008): _S("dot", 64, 512, 2, 4, 3),  # 1227 GB/s
    (_I4, 16, 12288, 4096): _S("dot", 64, 512, 2, 4, 3),  # 1231 GB/s
    (_I4, 16, 22016, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1421 GB/s
    (_I4, 16, 32000, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1585 GB/s
    (_I4, 64, 4096, 4096): _G(32, 64, 128, 8, 4, 4),  # 509 GB/s
    (_I4, 64, 4096, 11008): _G(32, 64, 128, 8, 4, 4),  # 563 GB/s
    (_I4, 64, 12288, 4096): _G(64, 64, 128, 8, 4, 4),  # 773 GB/s
    (_I4, 64, 22016, 4096): _G(64, 128, 64, 8, 4, 4),  # 910 GB/s
    (_I4, 64, 32000, 4096): _G(64, 128, 64, 8, 4, 4),  # 1288 GB/s
    (_I4G, 1, 4096, 4096): _S("dot", 64, 512, 2, 4, 3),  # 901 GB/s
    (_I4G, 1, 4096, 11008): _S("dot", 128, 512, 8, 4, 3),  # 1518 GB/s
    (_I4G, 1, 12288, 4096): _S("dot", 64, 128, 4, 4, 3),  # 1575 GB/s
    (_I4G, 1, 22016, 4096): _S("dot", 64, 128, 2, 4, 3),  # 1603 GB/s
    (_I4G, 1, 32000, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1957 GB/s
    (_I4G, 4, 4096, 4096): _S("dot", 64, 512, 2, 4, 3),  # 914 GB/s
    (_I4G, 4, 4096, 11008): _S("dot", 128, 512, 8, 4, 3),  # 1532 GB/s
    (_I4G, 4, 12288, 4096): _S("dot", 64, 128, 4, 4, 3),  # 1574 GB/s
    (_I4G, 4, 22016, 4096): _S("dot", 64, 128, 2, 4, 3),  # 1580 GB/s
    (_I4G, 4, 32000, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1931 GB/s
    (_I4G, 16, 4096, 4096): _S("dot", 64, 512, 2, 4, 3),  # 808 GB/s
    (_I4G, 16, 4096, 11008): _S("dot", 128, 128, 8, 4, 3),  # 1162 GB/s
    (_I4G, 16, 12288, 4096): _S("dot", 128, 128, 4, 4, 3),  # 1302 GB/s
    (_I4G, 16, 22016, 4096): _S("dot", 128, 128, 2, 4, 3),  # 1415 GB/s
    (_I4G, 16, 32000, 4096): _S("dot", 64, 512, 1, 4, 3),  # 1546 GB/s
    (_I4G, 64, 4096, 4096): _S("dot", 128, 128, 8, 4, 3),  # 559 GB/s
    (_I4G, 64, 4096, 11008): _S("dot", 128, 128, 8, 4, 3),  # 765 GB/s
    (_I4G, 64, 12288, 4096): _S("dot", 64, 128, 2, 4, 3),  # 741 GB/s
    (_I4G, 64, 22016, 4096): _G(64, 64, 256, 8, 4, 3),  # 935 GB/s
    (_I4G, 64, 32000, 4096): _S("dot", 128, 128, 1, 4, 3),  # 1095 GB/s
    (_FP, 1, 5120, 13824): _S("dot", 64, 128, 4, 4, 3),  # 3628 GB/s (H200)
    (_FP, 1, 7680, 5120): _S("dot", 32, 128, 1, 4, 5),  # 3433 GB/s (H200)
    (_FP, 1, 15360, 5120): _S("dot", 32, 128, 1, 4, 3),  # 3876 GB/s (H200, PDL)
    (_FP, 1, 5120, 5120): _S("fma", 2, 1024, 1, 4, 1),  # 3348 GB/s (H200, PDL)
    (_FP, 1, 5120, 2560): _S("dot", 64, 128, 1, 4, 5),  # 2859 GB/s (H200, PDL)
    (_FP, 1, 5120, 6912): _S("dot", 64, 128, 4, 4, 3),  # 3451 GB/s (H200, PDL)
    # @@TUNED_TABLE_END
}


def _heuristic_skinny(kind: int, M: int, N: int, K: int) -> SkinnyCfg:
    """Fallback when the table has nothing for this kind: ~16 KB weight tiles, split-K until
    there are about two programs per SM."""
    wbytes = {_FP: 2, _I8: 1, _A8: 1, _I4: 0.5, _I4G: 0.5}[kind]
    bn, bk = 64, int(256 / wbytes)
    n_blocks, k_blocks = -(-N // bn), -(-K // bk)
    split = 1
    while n_blocks * split < 264 and split * 2 <= k_blocks // 2:
        split *= 2
    return SkinnyCfg("dot", bn, bk, split, 4, 3)


def _pick_skinny(kind: int, M: int, N: int, K: int):
    """The tuned config for (kind, M bucket, N, K), else the nearest tuned shape."""
    b = _m_bucket(M)
    cfg = _TUNED.get((kind, b, N, K))
    if cfg is not None:
        return cfg
    near = [(abs(math.log(N / n)) + abs(math.log(K / k)), c)
            for (kd, mb, n, k), c in _TUNED.items() if kd == kind and mb == b]
    if near:
        return min(near, key=lambda t: t[0])[1]
    return _heuristic_skinny(kind, M, N, K)


def _pick_gemm(kind: int, M: int, N: int, K: int) -> GemmCfg:
    """Large-M tiles, from the same H100 measurements at M = 128, 512, 2048."""
    if kind == _I4G:
        return GemmCfg(128, 128, 128, 8, 8, 4)
    if kind in (_I8, _I4):
        return GemmCfg(64, 128, 64, 8, 4, 4) if M <= 512 else GemmCfg(128, 128, 64, 8, 8, 3)
    if kind == _A8:
        return GemmCfg(128, 128, 64, 8, 8, 4)
    return GemmCfg(128, 128, 64, 8, 8, 3)


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


def _launch_skinny(kind: int, x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                   xs: Optional[torch.Tensor], out_dtype: torch.dtype, G: int = 0,
                   cfg: Optional[SkinnyCfg] = None, partials: bool = False):
    """out [M, N]; with partials=True and a split K, the unsummed SplitKPartials instead."""
    (M, K), xdt = x2.shape, x2.dtype
    N = w.shape[0]
    if cfg is None:
        cfg = _pick_skinny(kind, M, N, K)
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
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x2, w, s, xs if xs is not None else s, dst,
            M, N, K, x2.stride(0), w.stride(0), sg_stride, N, M * N, k_per_split)
    grid = (triton.cdiv(N, cfg.block_n), split)
    pkw = pdl.launch_kw(x2)
    if cfg.kernel == "dot":
        _skinny_dot_kernel[grid](*args, DOT_PREC=_dot_prec(xdt), **common, **pkw)
    else:
        _skinny_fma_kernel[grid](*args, **common, **pkw)
    if split == 1:
        return dst
    if partials:
        return SplitKPartials(dst, (M,), out_dtype)
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
        cfg = _pick_gemm(kind, M, N, K)
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
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _resolve_cfg(kind: int, M: int, N: int, K: int, cfg=None):
    """The launch a Triton op makes: cfg when forced, else the skinny kernel's tuned config for
    M <= SKINNY_MAX_M (which may name the tiled GEMM) and the GEMM's above."""
    if cfg is not None:
        return cfg
    return _pick_skinny(kind, M, N, K) if M <= SKINNY_MAX_M else _pick_gemm(kind, M, N, K)


def _run_triton(kind, x2, w, s, xs, out_dtype, G=0, cfg=None, partials=False):
    """Skinny kernel for M <= SKINNY_MAX_M, tiled GEMM above (cfg may force either).
    partials: see _launch_skinny (the tiled GEMM never splits K)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    s = s.contiguous()
    M, K = x2.shape
    cfg = _resolve_cfg(kind, M, w.shape[0], K, cfg)
    if isinstance(cfg, GemmCfg):
        return _launch_gemm(kind, x2, w, s, xs, out_dtype, G, cfg)
    return _launch_skinny(kind, x2, w, s, xs, out_dtype, G, cfg, partials=partials)


# impl="auto" on CUDA (H100 measurements):
# * float: Triton for M <= 16 (2.7-2.8 TB/s summed over LLaMA-7B vs 2.4-2.5 for cuBLAS);
#   cuBLAS above (similar at M = 64, much faster once compute bound).
# * int8 / int4 weight-only: Triton at every M. Dequantize + cuBLAS re-reads a full fp16 copy
#   of the weight (0.17 TB/s at small M) and only ties the tiled GEMM at M = 2048.
# * W8A8: skinny Triton for M <= 64 (2.2 TB/s at M = 64 vs 1.7 for _int_mm), _int_mm up to
#   M = 256, the tiled Triton GEMM above (20-30% faster than _int_mm at M = 2048).
_AUTO_MAX_M_FP = 16
_AUTO_INT_MM_M = (SKINNY_MAX_M, 256)
# =============================================================================================
# Public ops
# =============================================================================================
# Every linear op takes partials=True from a caller whose next kernel accepts SplitKPartials
# (add_rms_norm, silu_mul): then a skinny Triton launch that split K returns its unsummed
# partials instead of launching the reduction. Every other path returns the tensor.
def linear_fp(x, weight: torch.Tensor, *, impl: str = "auto", partials: bool = False,
              _cfg=None):
    """x[..., K] @ weight[N, K].T -> [..., N] in x.dtype (fp32 accumulation)."""
    _check_weight(weight, "linear_fp")
    N, K = weight.shape
    M = math.prod(x.shape[:-1])
    # float64 (exactness runs) has no Triton kernel here: cuBLAS on CUDA under impl="auto".
    use_triton = _want_triton(impl, x) and M > 0 and (
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
    use_triton = _want_triton(impl, x) and math.prod(x.shape[:-1]) > 0
    x2, lead = _flat(x, K, "linear_w8a16")
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
    use_triton = (_want_triton(impl, x) and _triton_ok(kind, K, G)
                  and math.prod(x.shape[:-1]) > 0)
    x2, lead = _flat(x, K, "linear_w4a16")
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
    if not _want_triton(impl, x) or x.numel() == 0:
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
    if not _want_triton(impl, x) or x.numel() == 0:
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
    use_triton = _want_triton(impl, xq)
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
    if out_dtype not in _FLOAT_DTYPES:
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
    _check_impl(impl)
    return pack_int4_ref(q)


def unpack_int4(packed: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """int8 [N, K/2] -> int8 [N, K] in -8..7 (torch on every device)."""
    _check_impl(impl)
    return unpack_int4_ref(packed)


# =============================================================================================
# GPU self-check: correctness against the references and weight bandwidth, LLaMA-7B shapes
# =============================================================================================
LLAMA7B_SHAPES = (("qkv", 12288, 4096), ("o_proj", 4096, 4096), ("gate_up", 22016, 4096),
                  ("down", 4096, 11008), ("lm_head", 32000, 4096))


def _time_graph(fn: Callable[[int], object], n_copies: int, reps: int = 20) -> float:
    """Median ms of one call: a CUDA graph of n_copies calls (each on another weight copy, so
    the weights stream from HBM, not L2), replayed `reps` times after warm-up."""
    for i in range(n_copies):          # compile / warm up outside the capture
        fn(i)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                for i in range(n_copies):
                    fn(i)
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
    except Exception:                  # not capturable: time eagerly (launch gaps included)
        def run():
            for i in range(n_copies):
                fn(i)
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n_copies)
    return statistics.median(times)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def gpu_selfcheck(device="cuda", Ms=(1, 4, 16, 64), shapes=LLAMA7B_SHAPES,
                  dtype=torch.float16, group_size: int = 128, impls=("auto",),
                  baselines: bool = True, verbose: bool = True) -> list[dict]:
    """Run every public op at LLaMA-7B shapes; compare with the _ref (relative error) and time
    it (median of 20 CUDA-graph replays, weights rotated over copies that exceed L2).
    Returns rows {op, M, N, K, impl, rel_err, ms, weight_GBps}. Baselines add cuBLAS fp16
    (linear_fp impl=torch) and the torch paths of the quantized ops at M=64."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError("gpu_selfcheck needs a CUDA device")
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dt)

    def randint8(*shape, lo=-127, hi=128):
        return torch.randint(lo, hi, shape, device=device, dtype=torch.int8, generator=gen)

    def record(op, M, N, K, impl, out, ref, ms, nbytes):
        row = dict(op=op, M=M, N=N, K=K, impl=impl, rel_err=_rel_err(out, ref), ms=ms,
                   weight_GBps=nbytes / (ms * 1e-3) / 1e9)
        rows.append(row)
        if verbose:
            print(f"{op:16s} M={M:<3d} N={N:<6d} K={K:<6d} {impl:6s} "
                  f"err={row['rel_err']:.2e} {ms * 1e3:9.1f} us {row['weight_GBps']:7.0f} GB/s",
                  flush=True)

    L2_BYTES = 50 * 2 ** 20
    for name, N, K in shapes:
        w_fp = randn(N, K) * 0.02
        q8 = randint8(N, K)
        s8 = (torch.rand(N, device=device, generator=gen) * 0.01 + 1e-3).to(dtype)
        q4 = pack_int4_ref(randint8(N, K, lo=-8, hi=8))
        s4c = (torch.rand(1, N, device=device, generator=gen) * 0.01 + 1e-3).to(dtype)
        s4g = (torch.rand(K // group_size, N, device=device, generator=gen) * 0.01
               + 1e-3).to(dtype)
        ws_a8 = torch.rand(1, N, device=device, generator=gen) * 0.01 + 1e-3
        cases = {
            # op: (weight bytes, fn(x_like_inputs, weight copy index) builder, ref fn)
            "linear_fp": (w_fp.numel() * w_fp.element_size(), (w_fp,)),
            "linear_w8a16": (q8.numel() + s8.numel() * 2, (q8, s8)),
            "linear_w4a16_pc": (q4.numel() + s4c.numel() * 2, (q4, s4c)),
            f"linear_w4a16_g{group_size}": (q4.numel() + s4g.numel() * 2, (q4, s4g)),
            "linear_w8a8": (q8.numel() + ws_a8.numel() * 4, (q8, ws_a8)),
            "linear_w8a8_dynamic": (q8.numel() + ws_a8.numel() * 4, (q8, ws_a8)),
        }
        for op, (nbytes, base) in cases.items():
            n_copies = max(2, math.ceil(3 * L2_BYTES / nbytes))
            copies = [base] + [tuple(t.clone() for t in base) for _ in range(n_copies - 1)]
            for M in Ms:
                x = randn(M, K)
                xq, xs = quantize_per_token_ref(x)
                if op == "linear_fp":
                    call = lambda i, impl: linear_fp(x, copies[i][0], impl=impl)
                    ref = linear_fp_ref(x, w_fp)
                elif op == "linear_w8a16":
                    call = lambda i, impl: linear_w8a16(x, *copies[i], impl=impl)
                    ref = linear_w8a16_ref(x, q8, s8)
                elif op == "linear_w8a8":
                    call = lambda i, impl: linear_w8a8(xq, xs, copies[i][0], copies[i][1],
                                                       dtype, impl=impl)
                    ref = linear_w8a8_ref(xq, xs, q8, ws_a8, dtype)
                elif op == "linear_w8a8_dynamic":
                    call = lambda i, impl: linear_w8a8_dynamic(
                        x, copies[i][0], copies[i][1], dtype, impl=impl)
                    ref = linear_w8a8_ref(xq, xs, q8, ws_a8, dtype)
                else:
                    G = K if op.endswith("_pc") else group_size
                    call = lambda i, impl, G=G: linear_w4a16(x, *copies[i], G, impl=impl)
                    ref = linear_w4a16_ref(x, q4, base[1], G)
                run_impls = list(impls)
                if baselines and (op == "linear_fp" or M >= 64) and "torch" not in run_impls:
                    run_impls.append("torch")
                for impl in run_impls:
                    out = call(0, impl)
                    ms = _time_graph(lambda i: call(i, impl), n_copies)
                    record(op, M, N, K, impl, out, ref, ms, nbytes)
            del copies
        torch.cuda.empty_cache()
    # activation quantizers (bandwidth counts the activation read + int8 write; 20 calls
    # per graph replay, the activation stays in L2 as it does in decode)
    for M in Ms:
        for K in (4096, 11008):
            x = randn(M, K) * 3
            q, s = quantize_per_token(x)
            qr, sr = quantize_per_token_ref(x)
            ms = _time_graph(lambda i: quantize_per_token(x), 20)
            record("quant_per_token", M, 1, K, "auto", q.float() * s, qr.float() * sr, ms,
                   x.numel() * (x.element_size() + 1))
            ts = torch.full((1, 1), float(x.abs().max()) / 127, device=device)
            ms = _time_graph(lambda i: quantize_per_tensor(x, ts), 20)
            record("quant_per_tensor", M, 1, K, "auto", quantize_per_tensor(x, ts).float(),
                   quantize_per_tensor_ref(x, ts).float(), ms,
                   x.numel() * (x.element_size() + 1))
    if verbose:
        _print_summary(rows)
    return rows


def _print_summary(rows: list[dict]) -> None:
    """Bandwidth summed over the LLaMA-7B linears (total bytes / total time), per op and M."""
    agg: dict[tuple, list] = {}
    for r in rows:
        if r["op"].startswith("linear"):
            a = agg.setdefault((r["op"], r["impl"], r["M"]), [0.0, 0.0, 0.0])
            a[0] += r["weight_GBps"] * r["ms"] * 1e-3 * 1e9
            a[1] += r["ms"]
            a[2] = max(a[2], r["rel_err"])
    print("summary: weight bytes / time summed over the shapes")
    for (op, impl, M), (nbytes, ms, err) in sorted(agg.items()):
        print(f"  {op:18s} {impl:6s} M={M:<3d} {nbytes / (ms * 1e-3) / 1e9:7.0f} GB/s "
              f"{ms * 1e3:8.1f} us  max rel_err {err:.1e}")
