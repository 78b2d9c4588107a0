"""Triton kernel of the zero-point (asymmetric) int4 linear: w = q * scale + zero per group.
The host code that picks and launches it is ``int4_zp.py``; its plain-PyTorch twin is
``int4_zp.linear_w4a16_zp_ref``.

Design (decode, M <= 64, bound by weight bytes): the weight is the symmetric format's packed
int8 [N, K/2] (element 2j in the low nibble), so the zero point costs no extra weight bytes and
no extra work per weight. Per group g and output n,

    sum_k x[m, k] * (q[n, k] * s[g, n] + z[g, n]) = s[g, n] * (x . q)[m, n] + z[g, n] * sum_k x[m, k]

so each tile (one group, BLOCK_K <= G) computes the integer-weight product, then applies the
group's scale and adds its zero times the tile's activation sum (one [BM] reduction of the
small activation tile). Two inner products, as the symmetric kernels: ``dot`` (swap-AB tensor
cores, acc[BN, BM] += w[BN, BK/2] @ x[BM, BK/2].T for even and odd columns) and ``fma``
(elementwise, reduce at the end). K can be split over a second grid axis (fp32 partials).

Imports: ``common``, ``linear_kernels`` (tile loads and the int4 unpack helpers).
"""
from __future__ import annotations

from .common import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .linear_kernels import _int4_unpack, _w_tile, _x_tile

    @triton.jit(do_not_specialize=["M"])
    def _w4zp_skinny_kernel(
            x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
            M, N, K, stride_xm, stride_wn, stride_sg, stride_om, stride_os, k_per_split,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ITERS_C: tl.constexpr,
            CVT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
        """out[M, N] (or split slice pid_s of fp32 partials) of x[M, K] times the zero-point
        int4 weight. BLOCK_K <= GROUP: one group per tile."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for i in range(0, ITERS_C if ITERS_C > 0 else k_per_split // BLOCK_K):
            k0 = k_lo + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _x_tile(x_ptr, offs_m, offs_k, m_ok, K, stride_xm, EVEN_K)      # [BM, BK]
            w = _w_tile(w_ptr, offs_n, n_ok, k0, K, stride_wn, BLOCK_K, EVEN_K, True)
            g_ok = n_ok & (k0 < K)
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=g_ok, other=0)
            z = tl.load(z_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=g_ok, other=0)
            x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
            xsum = tl.sum(x.to(tl.float32), axis=1)                                 # [BM]
            if USE_DOT:
                lo, hi = _int4_unpack(w, x_ptr.dtype.element_ty, CVT)               # [BN, BK/2]
                part = tl.dot(lo, tl.trans(x_even), input_precision=DOT_PREC)
                part = tl.dot(hi, tl.trans(x_odd), part, input_precision=DOT_PREC)   # [BN, BM]
            else:
                lo, hi = _int4_unpack(w, tl.float32, CVT)
                prod = (lo[:, None, :] * x_even.to(tl.float32)[None, :, :]
                        + hi[:, None, :] * x_odd.to(tl.float32)[None, :, :])
                part = tl.sum(prod, axis=2)                                         # [BN, BM]
            acc += part * s.to(tl.float32)[:, None] + z.to(tl.float32)[:, None] * xsum[None, :]
        ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
