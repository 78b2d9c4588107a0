"""Triton kernels of attention: RoPE with the paged KV-cache write, flash-decoding over the
paged cache (with RoPE and the new token's cache write optionally fused in front), and the
log-sum-exp merge of its splits. Host code: ``attn.py``; conventions: ``reference.py``.

Decode attention is flash-decoding (Dao et al., "Flash-Decoding for long-context inference",
2023) over a vLLM-style paged cache (Kwon et al., "PagedAttention", 2023): the context of each
sequence is cut into partitions handled by separate programs, each of which serves all query
heads of one KV head (GQA: K/V are loaded once per group), followed by a small merge kernel.
INT8 / FP8 KV scales cost nothing here: ``q . (k_q * ks) = (q * ks) . k_q`` scales the query
row once per program, and ``sum_t p_t (v_q,t * vs) = vs * sum_t p_t v_q,t`` scales the output
once. The two quantized caches share every switch (``QUANT``); ``FP8`` only picks the rounding
rule of the writes (and the int8-only bit tricks stay off).

Imports: ``common``, ``pdl``.
"""
from __future__ import annotations

from .common import HAS_TRITON, tl, triton
from .pdl import wait_then_release

if HAS_TRITON:
    @triton.jit
    def _quant_int8(x, scale):
        # x, scale: fp32. A correctly rounded division (not x * (1/scale), which can land one
        # level off at a tie), exactly as the reference's x / scale. Clamp first (127 is an
        # integer, so clamp-then-round == round-then-clamp), then round half to even with the
        # 1.5*2^23 trick (exact for |x| < 2^22), matching torch.round.
        y = tl.math.div_rn(x, scale)
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        y = (y + 12582912.0) - 12582912.0
        return y.to(tl.int8)

    @triton.jit
    def _quant_fp8(x, scale):
        # x, scale: fp32 -> float8_e4m3fn: the correctly rounded x / scale, clamped to +-448,
        # rounded to 3 mantissa bits (to nearest even) in fp32 arithmetic before the
        # conversion, so the conversion itself is exact: the same bits on the GPU and in the
        # interpreter (whose fp8 conversion does not round to nearest even), and as torch's
        # x.to(float8_e4m3fn). Rounding: add and subtract 1.5 * 2^(e+20), whose ulp is the
        # fp8 step 2^(e-3) of |y|'s binade e (at least 2^-9: fp8 subnormals below 2^-6);
        # the sign goes back on by its bit (so -0 stays -0, as torch gives).
        y = tl.math.div_rn(x, scale)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        bits = y.to(tl.int32, bitcast=True)
        e = tl.maximum((bits >> 23) & 0xFF, 121)
        c = ((e + 20) << 23 | 0x400000).to(tl.float32, bitcast=True)
        r = ((tl.abs(y) + c) - c).to(tl.int32, bitcast=True) | (bits & -2147483648)
        return r.to(tl.float32, bitcast=True).to(tl.float8e4nv)

    @triton.jit
    def _quant_kv(x, scale, FP8: tl.constexpr):
        if FP8:
            return _quant_fp8(x, scale)
        else:
            return _quant_int8(x, scale)

    @triton.jit
    def _rot(x, xp, c, ss):
        # One rotate-half RoPE output in fp32: x * cos + partner * (+-sin), with the FMA
        # written out (left to the compiler, the two kernels contracted it differently and
        # their greedy tokens parted): the decode attention kernel's fused RoPE gives the
        # bits rope_write_kv gives.
        return tl.fma(x, c, xp * ss)

    @triton.jit
    def _rope_kv_kernel(Q, K, V, POS, COS, SIN, QO, KO, KC, VC, SLOT, KS, VS,
                        sq_n, sk_n, sv_n, s_cos, skc_b, svc_b,
                        H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                        ROPE: tl.constexpr, DO_Q: tl.constexpr, STORE_K: tl.constexpr,
                        WRITE_CACHE: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                        BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        PDL: tl.constexpr):
        # One program per token: rotate all its q/k heads (rotate-half layout) and/or write its
        # k/v heads into the paged cache. Head vectors are handled as two halves [x1 | x2].
        # Rows of q/k/v are [heads, D] with D contiguous (strided token rows allowed); q/k
        # outputs are contiguous; caches are [blocks, HKV, BLOCK_SIZE, D] with a free block
        # stride; int8 / FP8 scales KS/VS are fp32 [HKV, D]. Few runtime arguments keep the host-side
        # launch cost down.
        wait_then_release(PDL)
        D: tl.constexpr = 2 * HALF
        n = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        dmask = d < HALF
        if ROPE:
            pos = tl.load(POS + n).to(tl.int64)
            c = tl.load(COS + pos * s_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            s = tl.load(SIN + pos * s_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        if DO_Q:
            h = tl.arange(0, BLOCK_H)[:, None]
            m = (h < H) & dmask[None, :]
            qp = Q + n * sq_n + h * D + d[None, :]
            q1 = tl.load(qp, mask=m, other=0.0).to(tl.float32)
            q2 = tl.load(qp + HALF, mask=m, other=0.0).to(tl.float32)
            op = QO + n * (H * D) + h * D + d[None, :]
            tl.store(op, _rot(q1, q2, c, -s).to(QO.dtype.element_ty), mask=m)
            tl.store(op + HALF, _rot(q2, q1, c, s).to(QO.dtype.element_ty), mask=m)
        hk = tl.arange(0, BLOCK_HK)[:, None]
        mk = (hk < HKV) & dmask[None, :]
        kp = K + n * sk_n + hk * D + d[None, :]
        k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
        if ROPE:
            k1r = _rot(k1, k2, c, -s)
            k2 = _rot(k2, k1, c, s)
            k1 = k1r
        if STORE_K:
            op = KO + n * (HKV * D) + hk * D + d[None, :]
            tl.store(op, k1.to(KO.dtype.element_ty), mask=mk)
            tl.store(op + HALF, k2.to(KO.dtype.element_ty), mask=mk)
        if WRITE_CACHE:
            slot = tl.load(SLOT + n).to(tl.int64)
            mw = mk & (slot >= 0)  # slot -1: padding token, nothing is written
            blk = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            vp = V + n * sv_n + hk * D + d[None, :]
            v1 = tl.load(vp, mask=mk, other=0.0).to(tl.float32)
            v2 = tl.load(vp + HALF, mask=mk, other=0.0).to(tl.float32)
            inner = hk * (BLOCK_SIZE * D) + off * D + d[None, :]
            kc = KC + blk * skc_b + inner
            vc = VC + blk * svc_b + inner
            if QUANT:
                # per (head, channel) scales of both halves, [BLOCK_HK, BLOCK_HALF] each
                sp = hk * D + d[None, :]
                ks1 = tl.load(KS + sp, mask=mk, other=1.0)
                ks2 = tl.load(KS + sp + HALF, mask=mk, other=1.0)
                vs1 = tl.load(VS + sp, mask=mk, other=1.0)
                vs2 = tl.load(VS + sp + HALF, mask=mk, other=1.0)
                tl.store(kc, _quant_kv(k1, ks1, FP8), mask=mw)
                tl.store(kc + HALF, _quant_kv(k2, ks2, FP8), mask=mw)
                tl.store(vc, _quant_kv(v1, vs1, FP8), mask=mw)
                tl.store(vc + HALF, _quant_kv(v2, vs2, FP8), mask=mw)
            else:
                tl.store(kc, k1.to(KC.dtype.element_ty), mask=mw)
                tl.store(kc + HALF, k2.to(KC.dtype.element_ty), mask=mw)
                tl.store(vc, v1.to(VC.dtype.element_ty), mask=mw)
                tl.store(vc + HALF, v2.to(VC.dtype.element_ty), mask=mw)

    @triton.jit
    def _i8_to_f16_shifted(x):
        # int8 v -> fp16 (v + 1152) without a conversion instruction (those issue at 1/4 rate
        # on Hopper): the bits 0x6400 + (v + 128) are the fp16 number 1024 + (v + 128).
        return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True)

    @triton.jit
    def _attn_tile(q, qf, qshift, m_i, l_i, acc, t0, end, kbase, vbase, btrow, qk_scale, d,
                   skc_b, svc_b, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                   MAGIC: tl.constexpr):
        # One tile of BLOCK_N context tokens [t0, t0+BLOCK_N) ∩ [.., end) for G_PAD query heads;
        # q [G_PAD, D], m_i/l_i [G_PAD], acc [G_PAD, D] (online softmax state, base 2).
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        # physical block of every token of the tile (block sizes below BLOCK_N cross blocks)
        blk = tl.load(btrow + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = (t % BLOCK_SIZE).to(tl.int64)
        k = tl.load(kbase + blk[:, None] * skc_b + off[:, None] * D + d[None, :],
                    mask=tmask[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(vbase + blk[:, None] * svc_b + off[:, None] * D + d[None, :],
                    mask=tmask[:, None], other=0.0)
        if MAGIC:
            # int8 cache, fp16 math: K and V arrive shifted by +1152 (see _i8_to_f16_shifted).
            # q.(k + 1152) = q.k + qshift; the V shift is removed once at the end.
            s = tl.dot(q, tl.trans(_i8_to_f16_shifted(k))) - qshift[:, None]
        elif USE_DOT:
            # int8 and fp8 e4m3 values are exact in fp16/bf16; their scales are folded into q
            # and o
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [G_PAD, BLOCK_N]
        else:
            s = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, BLOCK_N]
        if MAGIC:
            # the V shift cancels exactly only if the weights summed are the ones multiplied
            p16 = p.to(tl.float16)
            l_i = l_i * alpha + tl.sum(p16.to(tl.float32), axis=1)
            pv = tl.dot(p16, _i8_to_f16_shifted(v))
        elif USE_DOT:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
            else:
                pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _decode_attn_kernel(Q, KC, VC, KS, VS, BT, CL, OUT, WS, qk_scale, partition, splits,
                            sq_b, skc_b, svc_b, sbt_b,
                            KN, VN, POS, SLOT, COS, SIN, skn_b, svn_b, s_cos,
                            G: tl.constexpr, G_PAD: tl.constexpr, HKV: tl.constexpr,
                            D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            SPLIT: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                            MAGIC: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr,
                            ROPE: tl.constexpr,
                            NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr,
                            PDL: tl.constexpr):
        # grid = (B, Hkv, splits). Program (b, g, sp) attends the G query heads of KV head g of
        # sequence b over tokens [sp*partition, (sp+1)*partition) of its context, with an
        # online softmax in base 2 (qk_scale already holds log2(e)).
        # Layouts: q [B, H, D] (row stride sq_b), out [B, H, D] contiguous, caches
        # [blocks, HKV, BLOCK_SIZE, D] (block stride skc_b/svc_b), workspace WS (fp32) =
        # partial outputs [B, H, splits, D], then row maxima m and sums l [B, H, splits].
        # int8 / FP8 caches (QUANT; FP8 picks the write's rounding): KS/VS are the fp32
        # [HKV, D] dequantization scales.
        # ROPE: rope_write_kv fused in front (decode: the new token is the last of its
        # context). Q is then the unrotated q; KN / VN [B, HKV, D] (row strides skn_b / svn_b)
        # the new token's k and v; POS / SLOT its position and cache slot (-1: none);
        # COS / SIN the fp32 tables [positions, D/2] (row stride s_cos).
        wait_then_release(PDL)
        H: tl.constexpr = HKV * G
        b = tl.program_id(0)
        g = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(CL + b)
        start = sp * partition
        if (start >= ctx) & (sp > 0):
            return  # nothing of this sequence here; the merge kernel skips this split
        end = tl.minimum(start + partition, ctx)

        gi = tl.arange(0, G_PAD)
        gmask = gi < G
        heads = g * G + gi
        d = tl.arange(0, D)
        qp = Q + b.to(tl.int64) * sq_b + heads[:, None] * D
        if ROPE:
            # Every program rotates its q heads in registers, the arithmetic of rope_write_kv
            # (_rot per element: x * cos + partner * (+-sin)). The program whose split holds
            # the context's last token (end == ctx) rotates the new k of KV head g and writes
            # it and v to the cache slot; the barrier makes those stores visible to this
            # program's own tile loads below (no other program reads that slot).
            HALF: tl.constexpr = D // 2
            first = d < HALF
            j = tl.where(first, d, d - HALF)
            partner = tl.where(first, d + HALF, d - HALF)
            pos = tl.load(POS + b).to(tl.int64)
            c = tl.load(COS + pos * s_cos + j).to(tl.float32)
            sn = tl.load(SIN + pos * s_cos + j).to(tl.float32)
            ss = tl.where(first, -sn, sn)
            x = tl.load(qp + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            xp = tl.load(qp + partner[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            q = _rot(x, xp, c[None, :], ss[None, :]).to(Q.dtype.element_ty)  # [G_PAD, D]
            slot = tl.load(SLOT + b).to(tl.int64)
            if (end == ctx) & (slot >= 0):
                kp = KN + b.to(tl.int64) * skn_b + g.to(tl.int64) * D
                kr = _rot(tl.load(kp + d).to(tl.float32), tl.load(kp + partner).to(tl.float32),
                          c, ss)
                vr = tl.load(VN + b.to(tl.int64) * svn_b + g.to(tl.int64) * D + d).to(
                    tl.float32)
                inner = g.to(tl.int64) * (BLOCK_SIZE * D) + (slot % BLOCK_SIZE) * D + d
                blk = slot // BLOCK_SIZE
                if QUANT:
                    tl.store(KC + blk * skc_b + inner,
                             _quant_kv(kr, tl.load(KS + g.to(tl.int64) * D + d), FP8))
                    tl.store(VC + blk * svc_b + inner,
                             _quant_kv(vr, tl.load(VS + g.to(tl.int64) * D + d), FP8))
                else:
                    tl.store(KC + blk * skc_b + inner, kr.to(KC.dtype.element_ty))
                    tl.store(VC + blk * svc_b + inner, vr.to(VC.dtype.element_ty))
            tl.debug_barrier()
        else:
            q = tl.load(qp + d[None, :], mask=gmask[:, None], other=0.0)  # [G_PAD, D]
        if QUANT:
            # q . (k_int8 * ks) = (q * ks) . k_int8: the K scales of this KV head go into q,
            # rounded back to q's dtype (the dot operand; qf and the MAGIC shift use the same
            # rounded values, so the +1152 shift still cancels exactly). Normalized by the
            # largest scale, which goes into the scalar qk_scale, so that q * ks / max(ks) never
            # leaves q's range (no fp16 overflow, no needless subnormals).
            ks = tl.load(KS + g.to(tl.int64) * D + d)  # [D] fp32
            ks_max = tl.max(ks, axis=0)
            q = (q.to(tl.float32) * (ks / ks_max)[None, :]).to(Q.dtype.element_ty)
            qk_scale = qk_scale * ks_max
        qf = q.to(tl.float32)  # FMA path operand (dead code on the dot path)
        qshift = tl.sum(qf, axis=1) * 1152.0  # MAGIC path: q.(k + 1152) - q.k, per head

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        kbase = KC + g.to(tl.int64) * (BLOCK_SIZE * D)
        vbase = VC + g.to(tl.int64) * (BLOCK_SIZE * D)
        btrow = BT + b.to(tl.int64) * sbt_b
        if INTERPRET:
            # The interpreter (numpy >= 2.4) cannot use program-id-derived range bounds; a
            # while loop runs the same tile code there.
            t0 = start
            while t0 < end:
                m_i, l_i, acc = _attn_tile(q, qf, qshift, m_i, l_i, acc, t0, end, kbase, vbase,
                                           btrow, qk_scale, d, skc_b, svc_b, D,
                                           BLOCK_N, BLOCK_SIZE, USE_DOT, IEEE, MAGIC)
                t0 += BLOCK_N
        else:
            for t0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
                m_i, l_i, acc = _attn_tile(q, qf, qshift, m_i, l_i, acc, t0, end, kbase, vbase,
                                           btrow, qk_scale, d, skc_b, svc_b, D,
                                           BLOCK_N, BLOCK_SIZE, USE_DOT, IEEE, MAGIC)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # empty context -> zeros, not NaN
        o = acc / l_safe[:, None]
        if MAGIC:
            o = tl.where(l_i[:, None] > 0.0, o - 1152.0, 0.0)
        if QUANT:
            # sum_t p_t (v_t * vs) = vs * sum_t p_t v_t; partial results are stored already
            # scaled (the merge is linear in them).
            vs = tl.load(VS + g.to(tl.int64) * D + d)  # [D] fp32
            o = o * vs[None, :]
        if SPLIT:
            row = (b.to(tl.int64) * H + heads) * splits + sp  # [G_PAD] rows of [B, H, splits]
            tl.store(WS + row[:, None] * D + d[None, :], o, mask=gmask[:, None])
            nrows = tl.num_programs(0).to(tl.int64) * H * splits
            pm = WS + nrows * D
            tl.store(pm + row, m_i, mask=gmask)
            tl.store(pm + nrows + row, l_i, mask=gmask)
        else:
            op = OUT + b.to(tl.int64) * (H * D) + heads[:, None] * D + d[None, :]
            tl.store(op, o.to(OUT.dtype.element_ty), mask=gmask[:, None])

    @triton.jit
    def _decode_merge_kernel(OUT, WS, CL, partition, splits,
                             H: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                             PDL: tl.constexpr):
        # grid = (B, H): log-sum-exp merge of the per-partition results of one query head.
        wait_then_release(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        ctx = tl.load(CL + b)
        n = (ctx + partition - 1) // partition  # partitions that saw tokens
        sidx = tl.arange(0, S_PAD)
        smask = sidx < n
        row = (b * H + h) * splits + sidx  # [S_PAD]
        nrows = tl.num_programs(0).to(tl.int64) * H * splits
        pm = WS + nrows * D
        m = tl.load(pm + row, mask=smask, other=float("-inf"))
        l = tl.load(pm + nrows + row, mask=smask, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(smask, l * tl.exp2(m - m_max), 0.0)  # [S_PAD]
        d = tl.arange(0, D)
        o = tl.load(WS + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        den = tl.sum(w, axis=0)
        den = tl.where(den > 0.0, den, 1.0)
        out = tl.sum(w[:, None] * o, axis=0) * (1.0 / den)
        tl.store(OUT + (b * H + h) * D + d, out.to(OUT.dtype.element_ty))
