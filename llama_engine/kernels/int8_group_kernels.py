"""Triton kernel of the group-wise int8 linear (W8A16_GPTQ): w = q * scale + zero per group.
The host code that picks and launches it is ``int8_group.py``; its plain-PyTorch twin is
``int8_group.linear_w8a16_group_ref``.

Design (decode, M <= 64, bound by weight bytes), the int4 zero-point kernel's
(``int4_zp_kernels.py``) with one code per byte: per group g and output n,

    sum_k x[m, k] * (q[n, k] * s[g, n] + z[g, n]) = s[g, n] * (x . q)[m, n] + z[g, n] * sum_k x[m, k]

so each tile (one group, BLOCK_K <= G) computes the integer-weight product, then applies the
group's scale and adds its zero times the tile's activation sum. Two inner products: ``dot``
(swap-AB tensor cores, acc[BN, BM] += w[BN, BK] @ x[BM, BK].T) and ``fma`` (elementwise,
reduce at the end). K can be split over a second grid axis (fp32 partials).

Imports: ``common``, ``linear_kernels`` (tile loads, the int8 conversion helper).
"""
from __future__ import annotations

from .common import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .linear_kernels import _int8_convert, _w_tile, _x_tile

    @triton.jit(do_not_specialize=["M"])
    def _w8g_skinny_kernel(
            x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
            M, N, K, stride_xm, stride_wn, stride_sg, stride_om, stride_os, k_per_split,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ITERS_C: tl.constexpr,
            CVT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
        """out[M, N] (or split slice pid_s of fp32 partials) of x[M, K] times the group-wise
        int8 weight. BLOCK_K <= GROUP: one group per tile."""
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
            w = _w_tile(w_ptr, offs_n, n_ok, k0, K, stride_wn, BLOCK_K, EVEN_K, False)
            g_ok = n_ok & (k0 < K)
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=g_ok, other=0)
            z = tl.load(z_ptr + (k0 // GROUP) * stride_sg + offs_n, mask=g_ok, other=0)
            xsum = tl.sum(x.to(tl.float32), axis=1)                                 # [BM]
            if USE_DOT:
                wf = _int8_convert(w, x_ptr.dtype.element_ty, CVT)                  # [BN, BK]
                part = tl.dot(wf, tl.trans(x), input_precision=DOT_PREC)           # [BN, BM]
            else:
                prod = w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
                part = tl.sum(prod, axis=2)                                         # [BN, BM]
            acc += part * s.to(tl.float32)[:, None] + z.to(tl.float32)[:, None] * xsum[None, :]
        ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
