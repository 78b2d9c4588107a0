"""Triton kernels of the FP8 (E4M3) linear: the row quantizer of the activations and the
FP8-weight GEMV for small M (decode, M <= 16). The host code that picks and launches them is
``fp8.py``; their plain-PyTorch twins are ``fp8.quantize_fp8_act_ref`` and ``fp8.linear_fp8_ref``.

GEMV design (bound by weight bytes: one byte per weight, half of fp16): each program owns
BLOCK_N output channels and one K slice (``split_k``), streams the e4m3 weight tile
[BLOCK_N, BLOCK_K], converts it in registers (e4m3 -> fp16 is exact) and multiplies it with the
e4m3 activation tile (also exact in fp16; every product of two e4m3 values is exact in fp32).
Three inner products: ``dot`` (swap-AB tensor cores on the codes widened to fp16, acc[BN, BM]
in fp32), ``dot8`` (the same on FP8 tensor cores, no widening) and ``fma`` (elementwise, for
M = 1); USE_DOT 1 / 2 / 0. The scales are applied once at the end:
out[m, n] = acc[n, m] * x_scale[m] * w_scale[n] (per-tensor scales are one value). With
split_k > 1 each slice writes fp32 partials, summed by the caller. Loop trip counts are
constexpr (``ITERS_C``) under the interpreter, which cannot loop over a runtime bound.

Imports: ``common``.
"""
from __future__ import annotations

from .common import HAS_TRITON, tl, triton

if HAS_TRITON:
    @triton.jit
    def _fp8_quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, qmax, eps,
                               STATIC: tl.constexpr, BLOCK_K: tl.constexpr,
                               ITERS_C: tl.constexpr):
        """One row of x -> e4m3 codes clamp(x / s, +-qmax). STATIC: s = s_ptr[0] (calibrated);
        else s = max(amax(row), eps) / qmax, written to s_ptr[row] (a second pass over the
        row, which is in L2 by then)."""
        row = tl.program_id(0)
        x_row = x_ptr + row * stride_xm
        if STATIC:
            s = tl.load(s_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for i in range(0, ITERS_C if ITERS_C > 0 else tl.cdiv(K, BLOCK_K)):
                offs = i * BLOCK_K + tl.arange(0, BLOCK_K)
                x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            s = tl.maximum(tl.max(amax, axis=0), eps) / qmax
            tl.store(s_ptr + row, s)
        for i in range(0, ITERS_C if ITERS_C > 0 else tl.cdiv(K, BLOCK_K)):
            offs = i * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / s, -qmax), qmax)
            tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)

    @triton.jit(do_not_specialize=["M"])
    def _fp8_gemv_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr,
                         M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_per_split,
                         qmax, eps, unit,
                         XS_ROWS: tl.constexpr, WS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                         ITERS_C: tl.constexpr, QUANT_X: tl.constexpr = 0,
                         ITERS_ALL_C: tl.constexpr = 0):
        """out[M, N] (or slice pid_s of fp32 partials) = (xq @ wq.T) * xs * ws; wq e4m3 [N, K];
        WS_ROWS: one weight scale per channel. QUANT_X 0: x holds the codes xq [M, K] and xs
        its scales (XS_ROWS: one per row). QUANT_X 1 / 2: x is the float activation, quantized
        here as the row quantizer above does (same ops, same codes): 1 with the static scale
        xs_ptr[0], 2 with per-row scales from each row's amax over all of K (every program
        reads its rows once more, from L2: worth it for small M only)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if QUANT_X == 2:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j in range(0, ITERS_ALL_C if ITERS_ALL_C > 0 else tl.cdiv(K, BLOCK_K)):
                offs_a = j * BLOCK_K + tl.arange(0, BLOCK_K)
                xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_a[None, :],
                             mask=m_ok[:, None] & (offs_a < K)[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(xa.to(tl.float32)), axis=1))
            xs = tl.maximum(amax, eps) / qmax                                   # [BM]
        elif QUANT_X == 1:
            xs = tl.load(xs_ptr + offs_m * 0).to(tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for i in range(0, ITERS_C if ITERS_C > 0 else k_per_split // BLOCK_K):
            offs_k = k_lo + i * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)          # [BN, BK]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)          # [BM, BK]
            if QUANT_X > 0:
                xq = tl.minimum(tl.maximum(x.to(tl.float32) / xs[:, None], -qmax), qmax)
                x = xq.to(w.dtype)
            if USE_DOT == 2:
                # e4m3 x e4m3 tensor cores (sm_89+). Hopper's FP8 MMA keeps about 14 bits in
                # its accumulator (DeepSeek-V3 report, section 3.3.2): over K = 4096 that is
                # ~1e-3 relative error, five times fp16 rounding. Each K tile gets a fresh
                # accumulator, added in fp32 (``unit`` is a runtime 1.0, so the compiler
                # cannot fold the add back into the MMA).
                acc += tl.dot(w, tl.trans(x)) * unit
            elif USE_DOT == 1:
                acc = tl.dot(w.to(tl.float16), tl.trans(x.to(tl.float16)), acc,
                             input_precision="ieee")
            else:
                prod = w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
                acc += tl.sum(prod, axis=2)                                     # [BN, BM]
        if QUANT_X == 0:
            if XS_ROWS:
                xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
            else:
                xs = tl.load(xs_ptr + offs_m * 0)
        if WS_ROWS:
            ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
        else:
            ws = tl.load(ws_ptr + offs_n * 0)
        acc = acc * ws.to(tl.float32)[:, None] * xs.to(tl.float32)[None, :]
        ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
