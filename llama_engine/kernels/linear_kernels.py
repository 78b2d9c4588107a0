"""Triton kernels of the linear layers (weight GEMMs, activation quantizers). The host code that
picks and launches them is ``linear.py``; their plain-PyTorch twins are in ``reference.py``.

Why the kernels look the way they do:

* Decode (small M) is bound by weight bandwidth: each weight byte is read once per step and the
  arithmetic is ~M FMAs per weight. So for M <= 64 a *skinny* kernel streams weight tiles at
  full width along K, dequantizes them in registers and accumulates in fp32 (int32 for W8A8).
  Two variants, picked per (M bucket, N, K) from a table measured per GPU (``tuning.py``):
    - ``fma``: no tensor cores; ``acc[BM, BN, BK] += w * x`` elementwise, one reduction over
      K at the end (the classic GEMV). Wins for some M = 1 shapes.
    - ``dot``: swap-AB tensor-core tile ``acc[BN, BM] += w[BN, BK] @ x[BM, BK].T``: the weight
      is the large operand, the few tokens are the narrow MMA side (padded to 8/16). Wins
      almost everywhere else.
  Both share their tile loads, dequantization, scale epilogue and (split-K) store through the
  ``@triton.jit`` helpers below, and can split K over a second grid axis so that the narrow
  layers (o_proj, down_proj: N = 4096) still fill 132 SMs; their fp32 partials ``[S, M, N]``
  are summed by ``_splitk_reduce_kernel`` or handed to the next kernel (``partial.py``).
* Dequantization is ALU-bound before it is memory-bound: int -> float conversion (I2F) runs
  at a quarter of the FMA rate, which held int4 to ~1.4 TB/s. On CUDA the int8 / int4 -> fp16
  (and int4 -> bf16) conversion instead builds the half-precision bit pattern with
  ``prmt`` / ``lop3`` and one packed subtract (inline PTX, 4 weights per instance; the
  1024 + u magic-number trick). The interpreter and fp32 use plain casts (constexpr CVT 0).
* Large M is compute bound: the tiled GEMM dequantizes each weight tile in registers (never a
  full fp16 copy of the weight).
* int4 nibbles are split, not interleaved: ``w[n, 2j]`` is the low nibble and pairs with
  ``x[:, 2j]``, so the skinny kernels split the (small) activation tile into even / odd columns
  and run two half-width products instead of shuffling the weight tile.
* Group-wise int4 scales multiply the per-tile product (BK <= G: one group per tile), or the
  weight tile in registers (BK > G).

Weight kinds (constexpr WKIND): 0 float, 1 int8, 2 int4 per channel, 3 int4 grouped, 4 W8A8.

Imports: ``common``, ``pdl``.
"""
from __future__ import annotations

from .common import HAS_TRITON, libdevice, load_summed, tl, triton
from .pdl import wait_then_release

# Weight kinds, shared by host code and kernels (constexpr WKIND).
FP, I8, I4, I4G, A8 = 0, 1, 2, 3, 4

if HAS_TRITON:
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


    @triton.jit
    def _w_tile(w_ptr, offs_n, n_ok, k0, K, stride_wn, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, PACKED: tl.constexpr):
        """Weight tile [BN, BK] of rows offs_n from k0 (zeros outside); PACKED (int4): the
        packed bytes [BN, BK/2]."""
        if PACKED:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :]
            if EVEN_K:
                w = tl.load(ptrs, mask=n_ok[:, None], other=0)
            else:
                w = tl.load(ptrs, mask=n_ok[:, None] & (offs_p[None, :] < K // 2), other=0)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
            if EVEN_K:
                w = tl.load(ptrs, mask=n_ok[:, None], other=0)
            else:
                w = tl.load(ptrs, mask=n_ok[:, None] & (offs_k[None, :] < K), other=0)
        return w

    @triton.jit
    def _group_scale(s_ptr, k0, K, offs_n, n_ok, stride_sg, GROUP: tl.constexpr):
        """Grouped int4: the fp32 scales [BN] of the group holding k0 (a tile inside one group)."""
        return tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n,
                       mask=n_ok & (k0 < K), other=0).to(tl.float32)

    @triton.jit
    def _along_n(v, N_FIRST: tl.constexpr):
        """A per-output-column vector [BN] broadcast over a tile [BN, BM] (N_FIRST) or [BM, BN]."""
        if N_FIRST:
            return v[:, None]
        else:
            return v[None, :]

    @triton.jit
    def _along_m(v, N_FIRST: tl.constexpr):
        """A per-row vector [BM] broadcast over a tile [BN, BM] (N_FIRST) or [BM, BN]."""
        if N_FIRST:
            return v[None, :]
        else:
            return v[:, None]

    @triton.jit
    def _scale_epilogue(acc, s_ptr, xs_ptr, offs_n, n_ok, offs_m, m_ok, WKIND: tl.constexpr,
                        WS_COL: tl.constexpr, XS_ROW: tl.constexpr, N_FIRST: tl.constexpr):
        """Per-channel / per-token scales of the accumulated tile (linear, so also right for a
        split-K partial): W8A8 w_scale [N] or scalar, then x_scale [M] or scalar; int8 and
        per-channel int4 their per-channel scale; float and grouped int4 nothing."""
        if WKIND == 4:
            out = acc.to(tl.float32)
            if WS_COL:
                out = out * _along_n(tl.load(s_ptr + offs_n, mask=n_ok, other=0), N_FIRST)
            else:
                out = out * tl.load(s_ptr)
            if XS_ROW:
                out = out * _along_m(tl.load(xs_ptr + offs_m, mask=m_ok, other=0), N_FIRST)
            else:
                out = out * tl.load(xs_ptr)
        elif WKIND == 1 or WKIND == 2:
            out = acc * _along_n(tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32),
                                 N_FIRST)
        else:
            out = acc
        return out

    @triton.jit
    def _store_tile(out_ptr, out, pid_s, stride_os, offs_m, m_ok, stride_om, offs_n, n_ok,
                    N_FIRST: tl.constexpr):
        """Store a tile [BN, BM] (N_FIRST) or [BM, BN] in the output dtype, into split pid_s's
        slice (stride_os apart; 0 without a split)."""
        if N_FIRST:
            ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
            tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
        else:
            ptrs = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

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
            w = _w_tile(w_ptr, offs_n, n_ok, k0, K, stride_wn, BLOCK_K, EVEN_K,
                        WKIND == 2 or WKIND == 3)
            if WKIND == 2 or WKIND == 3:
                lo, hi = _int4_unpack(w, x.dtype, CVT)                     # [BN, BK/2]
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
                    s = _group_scale(s_ptr, k0, K, offs_n, n_ok, stride_sg, GROUP)
                    acc += part * s[:, None]
                else:
                    acc = tl.dot(lo.to(x.dtype), tl.trans(x_even), acc, input_precision=DOT_PREC)
                    acc = tl.dot(hi.to(x.dtype), tl.trans(x_odd), acc, input_precision=DOT_PREC)
            elif WKIND == 4:
                acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(_int8_convert(w, x.dtype, CVT), tl.trans(x), acc,
                             input_precision=DOT_PREC)
        out = _scale_epilogue(acc, s_ptr, xs_ptr, offs_n, n_ok, offs_m, m_ok, WKIND, WS_COL,
                              XS_ROW, True)
        _store_tile(out_ptr, out, pid_s, stride_os, offs_m, m_ok, stride_om, offs_n, n_ok, True)

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
            w = _w_tile(w_ptr, offs_n, n_ok, k0, K, stride_wn, BLOCK_K, EVEN_K,
                        WKIND == 2 or WKIND == 3)
            if WKIND == 2 or WKIND == 3:
                lo, hi = _int4_unpack(w, tl.float32, CVT)
                if WKIND == 3:
                    s = _group_scale(s_ptr, k0, K, offs_n, n_ok, stride_sg, GROUP)
                    lo = lo * s[:, None]
                    hi = hi * s[:, None]
                x_even, x_odd = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_M, BLOCK_K // 2, 2]))
                acc += lo[None, :, :] * x_even[:, None, :] + hi[None, :, :] * x_odd[:, None, :]
            elif WKIND == 4:
                acc += w.to(tl.int32)[None, :, :] * x.to(tl.int32)[:, None, :]
            else:
                acc += (_int8_convert(w, tl.float32, CVT)[None, :, :]
                        * x.to(tl.float32)[:, None, :])
        out = _scale_epilogue(tl.sum(acc, axis=2), s_ptr, xs_ptr, offs_n, n_ok, offs_m, m_ok,
                              WKIND, WS_COL, XS_ROW, False)                # [BM, BN]
        _store_tile(out_ptr, out, pid_s, stride_os, offs_m, m_ok, stride_om, offs_n, n_ok, False)

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
            w = _w_tile(w_ptr, offs_n, n_ok, k0, K, stride_wn, BLOCK_K, EVEN_K,
                        WKIND == 2 or WKIND == 3)
            if WKIND == 2 or WKIND == 3:
                lo, hi = _int4_unpack(w, x.dtype, CVT)
                # interleave back to [BN, BK]: element (n, 2j + t) = (lo, hi)[t][n, j]
                w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
                if WKIND == 3:
                    part = tl.dot(x, tl.trans(w), input_precision=DOT_PREC)
                    s = _group_scale(s_ptr, k0, K, offs_n, n_ok, stride_sg, GROUP)
                    acc += part * s[None, :]
                else:
                    acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
            elif WKIND == 4:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x, tl.trans(_int8_convert(w, x.dtype, CVT)), acc,
                             input_precision=DOT_PREC)
        out = _scale_epilogue(acc, s_ptr, xs_ptr, offs_n, n_ok, offs_m, m_ok, WKIND, WS_COL,
                              XS_ROW, False)
        _store_tile(out_ptr, out, 0, 0, offs_m, m_ok, stride_om, offs_n, n_ok, False)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, out_ptr, MN, S: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
        """out[i] = sum_s partial[s, i] (fp32 partials [S, M*N] -> out dtype)."""
        wait_then_release(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        tl.store(out_ptr + offs, load_summed(p_ptr + offs, ok, MN, S, out_ptr.dtype.element_ty),
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


