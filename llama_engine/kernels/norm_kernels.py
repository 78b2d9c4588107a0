"""Triton kernels of the norms and SwiGLU's activation: RMSNorm with the residual add fused in
(the row math is one ``@triton.jit`` function, also the tail of ``comm.py``'s one-shot
all-reduce + norm), and ``silu(gate) * up``. Both sum a linear's split-K slices while they
load their input (``common.load_summed``). Host code: ``norm.py``.

Imports: ``common``, ``pdl``.
"""
from __future__ import annotations

from .common import HAS_TRITON, load_summed, tl, triton
from .pdl import wait_then_release

if HAS_TRITON:
    @triton.jit
    def _rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_s, stride_x, stride_r, stride_o,
                         stride_ro, D, eps, S: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        # One program per row; the whole row (D <= 16k) sits in registers. X: [S, M, D], the
        # S split-K partials of the previous linear (S = 1: its output), summed here.
        wait_then_release(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = load_summed(X + row * stride_x + cols, mask, stride_s, S, OUT.dtype.element_ty)
        _add_rms_norm_row(x, R + row * stride_r, W, OUT + row * stride_o,
                          RES_OUT + row * stride_ro, cols, mask, D, eps, HAS_RES)

    @triton.jit
    def _add_rms_norm_row(x, R, W, OUT, RES_OUT, cols, mask, D, eps, HAS_RES: tl.constexpr):
        """One row: [res_out = x + r;] out = rms_norm(res_out or x) * w. x: the row in the
        model dtype; R / OUT / RES_OUT point at the row's start. Loads r and w, then
        _add_rms_norm_vals (the one copy of the math, also the TP one-shot kernel's tail)."""
        if HAS_RES:
            r = tl.load(R + cols, mask=mask, other=0.0)
        else:
            r = x
        w = tl.load(W + cols, mask=mask, other=0.0)
        _add_rms_norm_vals(x, r, w, OUT, RES_OUT, cols, mask, D, eps, HAS_RES)

    @triton.jit
    def _add_rms_norm_vals(x, r, w, OUT, RES_OUT, cols, mask, D, eps, HAS_RES: tl.constexpr):
        """_add_rms_norm_row on a residual row r and weights w already loaded (the TP kernel
        loads them before it waits for its peers)."""
        if HAS_RES:
            # round the sum to the model dtype before normalizing, as HF does
            x = (x.to(tl.float32) + r.to(tl.float32)).to(RES_OUT.dtype.element_ty)
            tl.store(RES_OUT + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        y = (xf * rstd).to(OUT.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        tl.store(OUT + cols, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_load(ptrs, mask, W, stride_s, S: tl.constexpr, dtype: tl.constexpr):
        """silu(gate) * up of [gate; up] rows: gate at ptrs, up at ptrs + W (each summed over S
        split-K slices and rounded to dtype, as the linear's output), the product in fp32,
        rounded once to dtype."""
        g = load_summed(ptrs, mask, stride_s, S, dtype).to(tl.float32)
        u = load_summed(ptrs + W, mask, stride_s, S, dtype).to(tl.float32)
        return (g / (1.0 + tl.exp(-g)) * u).to(dtype)

    @triton.jit
    def _silu_mul_kernel(X, OUT, W, stride_s, stride_x, stride_o, S: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
        # grid = (rows, cdiv(W, BLOCK)); X [S, rows, 2W] (S split-K partials, summed here);
        # row r: gate = X[:, r, :W], up = X[:, r, W:2W].
        wait_then_release(PDL)
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < W
        y = _swiglu_load(X + r * stride_x + c, m, W, stride_s, S, OUT.dtype.element_ty)
        tl.store(OUT + r * stride_o + c, y, mask=m)
