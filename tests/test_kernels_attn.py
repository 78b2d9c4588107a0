"""Tests of llama_engine/kernels/attn.py and norm.py: references vs first principles, Triton vs
references. The Triton kernels run in-process under the interpreter (TRITON_INTERPRET=1, set by
conftest.py where there is no GPU; CPU tensors, impl="triton"). Each kernel check collects
every failing case of its group in its assertion message.
"""
from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import interpreter_on
from llama_engine.kernels import attn, norm, reference, tuning
from llama_engine.kernels.partial import PartialSum


class _Ops(SimpleNamespace):
    """The attention-side ops and references in one namespace for the checks below;
    ``DECODE_CONFIG`` (the fallback table's copy) is what decode_attention launches with, so a
    check can change it."""

    def decode_attention(self, *a, **k):
        return attn.decode_attention(*a, _cfg=self.DECODE_CONFIG, **k)


def _ops() -> _Ops:
    public = {n: getattr(m, n) for m in (norm, attn) for n in dir(m) if not n.startswith("_")}
    refs = {n: getattr(reference, n) for n in dir(reference) if n.endswith("_ref")}
    ops = _Ops(**{**refs, **public}, DECODE_CONFIG=dict(tuning.FALLBACK_DECODE_CONFIG))
    del ops.decode_attention                      # the method above, with DECODE_CONFIG
    return ops


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _rope_tables(max_pos: int, D: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float(), ang


# =============================================================================================
# Kernel checks (run in the interpreter subprocess); each returns a list of failure strings.
# =============================================================================================
def _check_norms(A):
    fails = []
    g = torch.Generator().manual_seed(1)
    for shape, dt in (((3, 48), torch.float32), ((2, 3, 40), torch.float16),
                      ((5, 64), torch.bfloat16)):
        x = torch.randn(shape, generator=g).to(dt)
        r = torch.randn(shape, generator=g).to(dt)
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(dt)
        e = _rel(A.rms_norm(x, w, 1e-5, impl="triton"), A.rms_norm_ref(x, w, 1e-5))
        if e > (1e-6 if dt == torch.float32 else 8e-3):
            fails.append(f"rms_norm {shape} {dt}: {e:.2e}")
        o, nr = A.add_rms_norm(x, r, w, 1e-5, impl="triton")
        o2, nr2 = A.add_rms_norm_ref(x, r, w, 1e-5)
        # the interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest): 1 ulp slack
        res_tol = 8e-3 if dt == torch.bfloat16 else 0.0
        if _rel(nr, nr2) > res_tol or _rel(o, o2) > (1e-6 if dt == torch.float32 else 1e-2):
            fails.append(f"add_rms_norm {shape} {dt}: {_rel(o, o2):.2e}")
    # strided input (a column slice)
    x = torch.randn(4, 96, generator=g)[:, :48]
    w = torch.rand(48, generator=g)
    if _rel(A.rms_norm(x, w, 1e-6, impl="triton"), A.rms_norm_ref(x, w, 1e-6)) > 1e-6:
        fails.append("rms_norm strided")
    return fails


def _qkv(N, H, Hkv, D, dt, g):
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(dt)  # fused projection output
    q = qkv[:, :H * D].view(N, H, D)
    k = qkv[:, H * D:(H + Hkv) * D].view(N, Hkv, D)
    v = qkv[:, (H + Hkv) * D:].view(N, Hkv, D)
    return q, k, v


def _check_rope(A):
    fails = []
    g = torch.Generator().manual_seed(2)
    for N, H, Hkv, D, dt in ((5, 4, 2, 16, torch.float32), (3, 3, 3, 32, torch.float16),
                             (4, 8, 1, 64, torch.bfloat16)):
        q, k, _ = _qkv(N, H, Hkv, D, dt, g)
        cos, sin, _ = _rope_tables(64, D)
        pos = torch.randint(0, 64, (N,), generator=g)
        qo, ko = A.apply_rope(q, k, pos, cos, sin, impl="triton")
        qr, kr = A.apply_rope_ref(q, k, pos, cos, sin)
        tol = 1e-6 if dt == torch.float32 else 8e-3
        if _rel(qo, qr) > tol or _rel(ko, kr) > tol:
            fails.append(f"apply_rope {N},{H},{Hkv},{D} {dt}: {_rel(qo, qr):.2e}")
    # and the kernel against the complex-number rotation directly
    q = torch.randn(5, 4, 32, generator=g, dtype=torch.float64)
    k = torch.randn(5, 2, 32, generator=g, dtype=torch.float64)
    cos, sin, ang = _rope_tables(50, 32)
    pos = torch.tensor([0, 3, 49, 7, 7])
    qo, ko = A.apply_rope(q.float(), k.float(), pos, cos, sin, impl="triton")
    if _rel(qo, _complex_rope(q, ang[pos])) > 1e-6 or _rel(ko, _complex_rope(k, ang[pos])) > 1e-6:
        fails.append("apply_rope vs complex rotation")
    return fails


def _complex_rope(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication: (x_i + i x_{i+D/2}) * e^{i pos θ_i}; x [N,H,D]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    z = z * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def _check_write(A):
    fails = []
    g = torch.Generator().manual_seed(3)
    for dt, kv_dt, scale, bs in ((torch.float32, torch.float32, None, 16),
                                 (torch.float16, torch.float16, None, 64),
                                 (torch.float16, torch.int8, 0.03, 16),
                                 (torch.bfloat16, torch.int8, 0.05, 64)):
        N, H, Hkv, D = 9, 4, 2, 16
        q, k, v = _qkv(N, H, Hkv, D, dt, g)
        nb = 4
        slots = torch.randperm(nb * bs, generator=g)[:N]
        slots[3] = -1  # padding token: must not be written
        slots[7] = -1
        cos, sin, _ = _rope_tables(128, D)
        pos = torch.randint(0, 128, (N,), generator=g)
        for fused in (False, True):
            kc = torch.randint(-5, 5, (nb, Hkv, bs, D), generator=g).to(kv_dt)  # poisoned
            vc = torch.randint(-5, 5, (nb, Hkv, bs, D), generator=g).to(kv_dt)
            kc2, vc2 = kc.clone(), vc.clone()
            if fused:
                qo = A.rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, scale,
                                     impl="triton")
                qr = A.rope_write_kv_ref(q, k, v, pos, cos, sin, kc2, vc2, slots, scale)
                if _rel(qo, qr) > (1e-6 if dt == torch.float32 else 8e-3):
                    fails.append(f"rope_write_kv q {dt}")
            else:
                A.write_kv(k, v, kc, vc, slots, scale, impl="triton")
                A.write_kv_ref(k, v, kc2, vc2, slots, scale)
            dk = (kc.float() - kc2.float()).abs().max().item()
            dv = (vc.float() - vc2.float()).abs().max().item()
            # int8: fused rotation may round a value differently by one level
            tol = (1.0 if fused else 0.0) if kv_dt == torch.int8 else \
                (1e-5 if kv_dt == torch.float32 else 2e-2)
            if dk > tol or dv > tol:
                fails.append(f"{'rope_write_kv' if fused else 'write_kv'} {kv_dt} bs={bs}: "
                             f"max diff k {dk} v {dv}")
    return fails


def _decode_case(A, B, H, Hkv, D, ctxs, bs, q_dt, kv_dt, g, part=None, scale=None):
    nbs = [math.ceil(c / bs) for c in ctxs]
    nblocks = sum(nbs) + 3
    shape = (nblocks, Hkv, bs, D)
    if kv_dt == torch.int8:
        kc = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        vc = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    else:
        kc = torch.randn(shape, generator=g).to(kv_dt)
        vc = torch.randn(shape, generator=g).to(kv_dt)
    perm = torch.randperm(nblocks, generator=g)  # shuffled, non-contiguous block tables
    bt = torch.full((B, max(nbs) + 1), -1, dtype=torch.int32)  # -1 past the context
    i = 0
    for b, n in enumerate(nbs):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    cl = torch.tensor(ctxs, dtype=torch.int32)
    q = torch.randn(B, H, D, generator=g).to(q_dt)
    sm = 1.0 / math.sqrt(D)
    out = A.decode_attention(q, kc, vc, bt, cl, sm, scale, partition_size=part, impl="triton")
    ref = A.decode_attention_ref(q, kc, vc, bt, cl, sm, scale)
    return out, ref, (q, kc, vc, bt, cl, sm)


def _channel_scales(Hkv, D, g, spread=8.0):
    """(k_scale, v_scale) float32 [Hkv*D] spanning ``spread``x, as calibrated K/V scales do
    (K outlier channels; V much smaller than K)."""
    ks = 0.01 * spread ** torch.rand(Hkv * D, generator=g)
    vs = 0.002 * spread ** torch.rand(Hkv * D, generator=g)
    return ks, vs


def _check_write_per_channel(A):
    """write_kv / rope_write_kv with per-(KV head, channel) K and V scales: odd head counts,
    a head dim whose half is not a power of two, per-channel round trip within scale/2."""
    fails = []
    g = torch.Generator().manual_seed(13)
    for N, H, Hkv, D, dt, bs in ((7, 6, 3, 24, torch.float32, 16),
                                 (9, 4, 1, 16, torch.float16, 64),
                                 (5, 5, 5, 40, torch.float32, 32)):
        q, k, v = _qkv(N, H, Hkv, D, dt, g)
        ks, vs = _channel_scales(Hkv, D, g)
        # inputs inside the representable range of every channel (the round-trip bound needs it)
        k = (k.float().clamp(-1, 1) * ks.view(Hkv, D) * 120).to(dt)
        v = (v.float().clamp(-1, 1) * vs.view(Hkv, D) * 120).to(dt)
        nb = 3
        slots = torch.randperm(nb * bs, generator=g)[:N]
        slots[1] = -1
        cos, sin, _ = _rope_tables(64, D)
        pos = torch.randint(0, 64, (N,), generator=g)
        for fused in (False, True):
            kc = torch.randint(-5, 5, (nb, Hkv, bs, D), generator=g).to(torch.int8)
            vc = torch.randint(-5, 5, (nb, Hkv, bs, D), generator=g).to(torch.int8)
            kc2, vc2 = kc.clone(), vc.clone()
            if fused:
                A.rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, (ks, vs), impl="triton")
                A.rope_write_kv_ref(q, k, v, pos, cos, sin, kc2, vc2, slots, (ks, vs))
            else:
                A.write_kv(k, v, kc, vc, slots, (ks, vs), impl="triton")
                A.write_kv_ref(k, v, kc2, vc2, slots, (ks, vs))
            dk = (kc.float() - kc2.float()).abs().max().item()
            dv = (vc.float() - vc2.float()).abs().max().item()
            tol = 1.0 if fused else 0.0  # fused: the rotated k may round one level apart
            if dk > tol or dv > tol:
                fails.append(f"per-channel {'rope_write_kv' if fused else 'write_kv'} "
                             f"N={N} H={H}/{Hkv} D={D} {dt}: max diff k {dk} v {dv}")
            if not fused:
                # read back what the kernel wrote: |x - q*s| <= s/2 in every channel
                keep = slots >= 0
                blk, off = slots[keep] // bs, slots[keep] % bs
                for src, cache, s, nm in ((k, kc, ks, "k"), (v, vc, vs, "v")):
                    deq = cache[blk, :, off].float() * s.view(Hkv, D)       # [n, Hkv, D]
                    err = (deq - src[keep].float()).abs()
                    bound = s.view(Hkv, D) / 2 * (1 + 1e-5) + 1e-7
                    if not bool((err <= bound).all()):
                        fails.append(f"per-channel round trip {nm} D={D}: error over scale/2 "
                                     f"({(err / bound).max().item():.3f} x bound)")
                # a constant pair is exactly the scalar (old checkpoints' fallback)
                kc3, vc3 = torch.zeros_like(kc), torch.zeros_like(vc)
                kc4, vc4 = torch.zeros_like(kc), torch.zeros_like(vc)
                A.write_kv(k, v, kc3, vc3, slots, 0.013, impl="triton")
                c = torch.full((Hkv * D,), 0.013)
                A.write_kv(k, v, kc4, vc4, slots, (c, c), impl="triton")
                if not (torch.equal(kc3, kc4) and torch.equal(vc3, vc4)):
                    fails.append(f"float scale != constant per-channel scales D={D}")
    return fails


def _check_decode_per_channel(A):
    """decode_attention with per-(KV head, channel) K/V scales vs the reference: GQA groups that
    are not powers of two, MQA, MHA, split and unsplit contexts of odd lengths, the dot (bit
    trick and plain conversion), FMA and fp32 paths."""
    fails = []
    g = torch.Generator().manual_seed(14)
    cases = [
        # B, H, Hkv, D, ctxs, block size, q dtype, partition
        (3, 6, 2, 16, [1, 37, 301], 16, torch.float16, 64),    # GQA 3, split
        (2, 6, 2, 32, [77, 5], 64, torch.float16, None),       # GQA 3, unsplit
        (2, 5, 1, 16, [129, 3], 16, torch.float16, 32),        # MQA, 5 query heads
        (2, 3, 3, 16, [65, 200], 32, torch.float32, 64),       # MHA, fp32 (IEEE dots)
        (1, 4, 2, 64, [513], 128, torch.float16, 128),
    ]
    saved = dict(A.DECODE_CONFIG)
    try:
        for cfg in ({}, {"int8_magic": False}, {"dot_min_group": 8}):
            A.DECODE_CONFIG.clear()
            A.DECODE_CONFIG.update(saved, **cfg)
            for B, H, Hkv, D, ctxs, bs, qd, part in cases:
                ks, vs = _channel_scales(Hkv, D, g)
                out, ref, (q, kc, vc, bt, cl, sm) = _decode_case(
                    A, B, H, Hkv, D, ctxs, bs, qd, torch.int8, g, part, (ks, vs))
                tol = 1e-5 if qd == torch.float32 else 1e-2
                e = _rel(out, ref)
                if not e < tol:
                    fails.append(f"per-channel decode {cfg} B={B} H={H}/{Hkv} D={D} "
                                 f"ctx={ctxs} bs={bs} {qd} part={part}: rel err {e:.2e}")
                # the reference itself: dense attention on the dequantized values
                kd = kc.float() * ks.view(1, Hkv, 1, D)
                vd = vc.float() * vs.view(1, Hkv, 1, D)
                dense = A.decode_attention_ref(q.float(), kd, vd, bt, cl, sm)
                if not _rel(ref.float(), dense) < (1e-6 if qd == torch.float32 else 2e-3):
                    fails.append(f"per-channel reference != dequantized float attention "
                                 f"H={H}/{Hkv} D={D}")
    finally:
        A.DECODE_CONFIG.clear()
        A.DECODE_CONFIG.update(saved)
    # Very small and very large scales: q * ks / max(ks) stays in fp16's normal range.
    for mult in (1e-3, 300.0):
        ks, vs = _channel_scales(2, 16, g)
        out, ref, _ = _decode_case(A, 2, 4, 2, 16, [50, 130], 16, torch.float16, torch.int8, g,
                                   64, (ks * mult, vs * mult))
        if not (torch.isfinite(out).all() and _rel(out, ref) < 1e-2):
            fails.append(f"per-channel decode with scales x{mult}: rel err {_rel(out, ref):.2e}")
    # Scales given as [Hkv, D] work too, and a float equals the constant pair.
    out, ref, (q, kc, vc, bt, cl, sm) = _decode_case(A, 2, 4, 2, 16, [40, 9], 16,
                                                     torch.float16, torch.int8, g, 32, 0.02)
    c = torch.full((2, 16), 0.02)
    out2 = A.decode_attention(q, kc, vc, bt, cl, sm, (c, c), partition_size=32, impl="triton")
    if not _rel(out2, out) < 1e-3:
        fails.append(f"float kv_scale vs constant [Hkv, D] pair: {_rel(out2, out):.2e}")
    # Per-channel quantization of K with outlier channels and a small V beats one shared
    # scale against float attention on the unquantized values.
    B, H, Hkv, D, bs = 2, 4, 2, 32, 16
    ctxs = [65, 300]
    _, _, (q, kc, vc, bt, cl, sm) = _decode_case(A, B, H, Hkv, D, ctxs, bs, torch.float32,
                                                 torch.float32, g, 64)
    gain = torch.ones(Hkv, D)
    gain[:, ::7] = 8.0                                    # K outlier channels
    kc, vc = kc * gain[None, :, None, :], vc * 0.25       # V: a smaller range than K
    exact = A.decode_attention_ref(q, kc, vc, bt, cl, sm)
    kmax = kc.abs().amax(dim=(0, 2)).reshape(-1)          # [Hkv*D] per (head, channel)
    vmax = vc.abs().amax(dim=(0, 2)).reshape(-1)
    ks, vs = kmax / 127, vmax / 127
    one = max(kmax.max().item(), vmax.max().item()) / 127
    errs = {}
    for name, sc_k, sc_v, scale in (("per-channel", ks.view(1, Hkv, 1, D), vs.view(1, Hkv, 1, D),
                                     (ks, vs)), ("per-layer", one, one, one)):
        kq, vq = A.quantize_kv_ref(kc, sc_k), A.quantize_kv_ref(vc, sc_v)
        out8 = A.decode_attention(q, kq, vq, bt, cl, sm, scale, partition_size=64,
                                  impl="triton")
        errs[name] = _rel(out8, exact)
    if not (errs["per-channel"] < 0.5 * errs["per-layer"] and errs["per-channel"] < 2e-2):
        fails.append(f"per-channel KV not more accurate than per-layer: {errs}")
    print(f"int8 KV vs float attention, rel err: {errs}", file=sys.stderr)
    return fails


def _check_decode(A):
    fails = []
    g = torch.Generator().manual_seed(4)
    cases = [
        # B, H, Hkv, D, ctxs, block size, q dtype, kv dtype, partition
        (3, 4, 2, 16, [1, 7, 65], 16, torch.float32, torch.float32, None),
        (2, 4, 4, 32, [300, 65], 64, torch.float32, torch.float32, 64),    # MHA, split
        (3, 8, 2, 16, [300, 1, 7], 16, torch.float16, torch.float16, 32),  # GQA 4, split
        (2, 2, 2, 16, [65, 300], 64, torch.float16, torch.float16, None),
        # (bf16 attention is checked by gpu_selfcheck: the interpreter cannot do bf16 dots)
        (2, 4, 1, 16, [7, 300], 16, torch.float16, torch.float16, 128),  # MQA
        (2, 4, 2, 16, [300, 65], 512, torch.float16, torch.float16, None),  # static-like
        (2, 4, 2, 16, [300, 1], 16, torch.float16, torch.int8, 64),
        (2, 2, 2, 32, [65, 7], 64, torch.float16, torch.int8, None),
    ]
    for B, H, Hkv, D, ctxs, bs, qd, kvd, part in cases:
        scale = 0.02 if kvd == torch.int8 else None
        out, ref, _ = _decode_case(A, B, H, Hkv, D, ctxs, bs, qd, kvd, g, part, scale)
        tol = 1e-5 if qd == torch.float32 else 1e-2
        e = _rel(out, ref)
        if not e < tol:
            fails.append(f"decode B={B} H={H}/{Hkv} D={D} ctx={ctxs} bs={bs} {qd}/{kvd} "
                         f"part={part}: rel err {e:.2e}")
    # the FMA (no tl.dot) path, used for small query groups when configured so, and int8
    # caches with a plain int8 -> fp16 conversion instead of the bit trick
    saved = dict(A.DECODE_CONFIG)
    A.DECODE_CONFIG.update(dot_min_group=4, int8_magic=False)
    try:
        for H, Hkv, kvd in ((2, 2, torch.float16), (4, 2, torch.float16), (4, 2, torch.int8)):
            out, ref, _ = _decode_case(A, 2, H, Hkv, 16, [65, 7], 16, torch.float16,
                                       kvd, g, 32, 0.02 if kvd == torch.int8 else None)
            if not _rel(out, ref) < 1e-2:
                fails.append(f"decode FMA path H={H}/{Hkv} {kvd}: {_rel(out, ref):.2e}")
        A.DECODE_CONFIG.update(dot_min_group=1)
        out, ref, _ = _decode_case(A, 2, 4, 2, 16, [300, 9], 16, torch.float16, torch.int8, g,
                                   64, 0.02)
        if not _rel(out, ref) < 1e-2:
            fails.append(f"decode int8 without the bit trick: {_rel(out, ref):.2e}")
    finally:
        A.DECODE_CONFIG.clear()
        A.DECODE_CONFIG.update(saved)
    # int8 KV vs float attention on the unquantized values
    B, H, Hkv, D, bs = 2, 4, 2, 32, 16
    ctxs = [65, 300]
    out, ref, (q, kc, vc, bt, cl, sm) = _decode_case(A, B, H, Hkv, D, ctxs, bs,
                                                     torch.float16, torch.float16, g, 64)
    kvs = max(kc.abs().max().item(), vc.abs().max().item()) / 127
    kq, vq = A.quantize_kv_ref(kc, kvs), A.quantize_kv_ref(vc, kvs)
    out8 = A.decode_attention(q, kq, vq, bt, cl, sm, kvs, partition_size=64, impl="triton")
    e = _rel(out8, A.decode_attention_ref(q, kc, vc, bt, cl, sm))
    if not e < 2e-2:
        fails.append(f"int8 KV vs float attention: rel err {e:.2e}")
    # empty context gives zeros, not NaN
    out, ref, _ = _decode_case(A, 2, 2, 2, 16, [0, 5], 16, torch.float32, torch.float32, g, 16)
    if not torch.isfinite(out).all() or out[0].abs().max() != 0 or _rel(out, ref) > 1e-5:
        fails.append("decode with an empty context")
    return fails


def _split(x: torch.Tensor, S: int, g) -> tuple:
    """Random fp32 split-K partials [S, M, D] of an output shaped like x -> (PartialSum,
    their in-order fp32 sum rounded to x.dtype: what the linear's own reduction stores)."""
    parts = torch.randn(S, x.numel() // x.shape[-1], x.shape[-1], generator=g) / S
    total = parts[0].clone()
    for s in range(1, S):
        total += parts[s]
    return PartialSum(parts, tuple(x.shape[:-1]), x.dtype), total.to(x.dtype).view(x.shape)


def _check_norm_partials(A):
    """add_rms_norm given a linear's split-K partials: the same result (bit for bit) as on the
    summed tensor, and the reference within the tolerances of _check_norms."""
    fails = []
    g = torch.Generator().manual_seed(2)
    for shape, dt in (((3, 37), torch.float32), ((2, 3, 40), torch.float16),
                      ((1, 64), torch.float16), ((5, 48), torch.bfloat16)):
        for S in (1, 2, 3):
            r = torch.randn(shape, generator=g).to(dt)
            w = (torch.rand(shape[-1], generator=g) + 0.5).to(dt)
            p, x = _split(r, S, g)
            o, nr = A.add_rms_norm(p, r, w, 1e-5, impl="triton")
            o1, nr1 = A.add_rms_norm(x, r, w, 1e-5, impl="triton")
            o2, nr2 = A.add_rms_norm_ref(x, r, w, 1e-5)
            # the interpreter rounds fp32 -> bf16 toward zero, torch to nearest: 1 ulp slack
            res_tol = 8e-3 if dt == torch.bfloat16 else 0.0
            same = (_rel(o, o1) <= res_tol and _rel(nr, nr1) <= res_tol if res_tol else
                    torch.equal(o, o1) and torch.equal(nr, nr1))
            if not (same and o.shape == shape and _rel(nr, nr2) <= res_tol
                    and _rel(o, o2) <= (1e-6 if dt == torch.float32 else 1e-2)):
                fails.append(f"add_rms_norm partials S={S} {shape} {dt}: {_rel(o, o2):.2e}")
    return fails


def _check_rope_decode(A):
    """rope_decode_attention (RoPE + cache write fused into the decode attention kernel)
    against the two kernels it replaces (rope_write_kv, then decode_attention: the same bits,
    output and both caches) and against the references; splits, GQA / MQA, int8 caches with
    per-channel scales, a padding row (slot -1: nothing written) and context length 1."""
    fails = []
    g = torch.Generator().manual_seed(6)
    cases = [
        # B, H, Hkv, D, ctxs, block size, q dtype, kv dtype, partition
        (3, 4, 2, 16, [1, 7, 65], 16, torch.float32, torch.float32, None),
        (2, 4, 4, 32, [300, 65], 64, torch.float32, torch.float32, 64),    # MHA, split
        (3, 8, 2, 16, [300, 1, 7], 16, torch.float16, torch.float16, 32),  # GQA 4, split
        (2, 4, 1, 16, [7, 300], 16, torch.float16, torch.float16, 128),    # MQA
        (2, 4, 2, 16, [300, 64], 16, torch.float16, torch.int8, 64),       # split edge
        (2, 2, 2, 32, [65, 7], 64, torch.float16, torch.int8, None),
    ]
    for B, H, Hkv, D, ctxs, bs, qd, kvd, part in cases:
        scale = _channel_scales(Hkv, D, g) if kvd == torch.int8 else None
        _, _, (q0, kc, vc, bt, cl, sm) = _decode_case(A, B, H, Hkv, D, ctxs, bs, qd, kvd, g,
                                                      part, scale)
        q, k, v = _qkv(B, H, Hkv, D, qd, g)
        cos, sin, _ = _rope_tables(512, D)
        pos = (cl - 1).clamp_min(0).long()
        # each sequence's last context slot, from its block table; the last row pads (-1)
        slots = torch.stack([bt[b, p // bs].long() * bs + p % bs for b, p in enumerate(pos)])
        slots[-1] = -1
        tag = f"B={B} H={H}/{Hkv} D={D} ctx={ctxs} bs={bs} {qd}/{kvd} part={part}"
        caches = {}
        for name in ("fused", "two", "ref"):
            kc1, vc1 = kc.clone(), vc.clone()
            if name == "ref":
                qr = A.rope_write_kv_ref(q, k, v, pos, cos, sin, kc1, vc1, slots, scale)
                o = A.decode_attention_ref(qr, kc1, vc1, bt, cl, sm, scale)
            elif name == "two":
                qr = A.rope_write_kv(q, k, v, pos, cos, sin, kc1, vc1, slots, scale,
                                     impl="triton")
                o = A.decode_attention(qr, kc1, vc1, bt, cl, sm, scale, partition_size=part,
                                       impl="triton")
            else:
                o = A.rope_decode_attention(q, k, v, pos, cos, sin, kc1, vc1, slots, bt, cl,
                                            sm, scale, partition_size=part, impl="triton")
            caches[name] = (o, kc1, vc1)
        (of, kf, vf), (o2, k2, v2), (orf, kr, vr) = (caches[n] for n in ("fused", "two", "ref"))
        if not (torch.equal(of, o2) and torch.equal(kf, k2) and torch.equal(vf, v2)):
            fails.append(f"rope_decode_attention fused != two kernels {tag}: "
                         f"{_rel(of, o2):.2e}")
        tol = 1e-5 if qd == torch.float32 else 1e-2
        # int8: the kernel's rotation may land a value one level off the reference's
        ctol = 1.0 if kvd == torch.int8 else 1e-5 if kvd == torch.float32 else 2e-2
        dk = (kf.float() - kr.float()).abs().max().item()
        dv = (vf.float() - vr.float()).abs().max().item()
        if not (_rel(of, orf) < tol and dk <= ctol and dv <= ctol):
            fails.append(f"rope_decode_attention vs ref {tag}: out {_rel(of, orf):.2e}, "
                         f"cache k {dk} v {dv}")
        # the padding row wrote nothing; every other row wrote its slot
        pb, pp = bt[-1, pos[-1] // bs].long(), pos[-1] % bs
        if not (torch.equal(kf[pb, :, pp], kc[pb, :, pp])
                and torch.equal(vf[pb, :, pp], vc[pb, :, pp])):
            fails.append(f"rope_decode_attention wrote the padding row's slot {tag}")
        if B > 1:
            b0, p0 = bt[0, pos[0] // bs].long(), pos[0] % bs
            if torch.equal(kf[b0, :, p0], kc[b0, :, p0]):
                fails.append(f"rope_decode_attention did not write row 0's k {tag}")
    return fails


CHECKS = {"norms": _check_norms, "norm_partials": _check_norm_partials, "rope": _check_rope,
          "write": _check_write,
          "decode": _check_decode, "write_per_channel": _check_write_per_channel,
          "decode_per_channel": _check_decode_per_channel, "rope_decode": _check_rope_decode}


@pytest.mark.skipif(not interpreter_on(), reason="the kernel checks run under "
                    "TRITON_INTERPRET=1 (conftest.py sets it without a GPU); on a GPU run "
                    "tests/test_gpu.py")
@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_vs_ref(name):
    fails = CHECKS[name](_ops())
    assert not fails, "\n".join(fails)


# =============================================================================================
# Reference checks (plain torch, in process)
# =============================================================================================
def test_rms_norm_ref_matches_hf_formula():
    A = _ops()
    x = torch.randn(3, 32).half()
    w = torch.rand(32).half() + 0.5
    hs = x.float()
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)
    expect = w * hs.to(torch.float16)  # HF LlamaRMSNorm.forward
    assert torch.equal(A.rms_norm(x, w, 1e-6), expect)


def test_rope_ref_matches_complex_rotation():
    """Rotate-half RoPE == multiplying (x_i, x_{i+D/2}) as a complex number by e^{i pos θ_i}."""
    A = _ops()
    N, H, Hkv, D = 6, 4, 2, 32
    q, k = torch.randn(N, H, D, dtype=torch.float64), torch.randn(N, Hkv, D, dtype=torch.float64)
    cos, sin, ang = _rope_tables(100, D)
    pos = torch.tensor([0, 1, 5, 17, 63, 99])

    qo, ko = A.apply_rope(q.float(), k.float(), pos, cos, sin)
    assert _rel(qo, _complex_rope(q, ang[pos])) < 1e-6
    assert _rel(ko, _complex_rope(k, ang[pos])) < 1e-6


def test_decode_ref_matches_dense_attention():
    A = _ops()
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, D, bs = 2, 4, 2, 16, 8
    ctxs = [13, 5]
    kd = [torch.randn(c, Hkv, D, generator=g) for c in ctxs]
    vd = [torch.randn(c, Hkv, D, generator=g) for c in ctxs]
    k_cache = torch.zeros(8, Hkv, bs, D)
    v_cache = torch.zeros_like(k_cache)
    tables = [[5, 2], [7]]
    bt = torch.tensor([[5, 2], [7, 0]], dtype=torch.int32)
    slots = torch.cat([torch.tensor([tables[b][t // bs] * bs + t % bs for t in range(c)])
                       for b, c in enumerate(ctxs)])
    A.write_kv(torch.cat(kd), torch.cat(vd), k_cache, v_cache, slots)
    q = torch.randn(B, H, D, generator=g)
    out = A.decode_attention(q, k_cache, v_cache, bt, torch.tensor(ctxs, dtype=torch.int32),
                             0.25)
    for b in range(B):
        kk = kd[b].repeat_interleave(H // Hkv, dim=1)  # [c, H, D]
        p = torch.softmax(torch.einsum("hd,thd->ht", q[b], kk) * 0.25, -1)
        expect = torch.einsum("ht,thd->hd", p, vd[b].repeat_interleave(H // Hkv, dim=1))
        assert _rel(out[b], expect) < 1e-5


def test_prefill_ref_causal_offset():
    A = _ops()
    g = torch.Generator().manual_seed(6)
    S, T, H, Hkv, D = 9, 4, 4, 2, 16
    q = torch.randn(S, H, D, generator=g)
    k = torch.randn(S, Hkv, D, generator=g)
    v = torch.randn(S, Hkv, D, generator=g)
    full = A.prefill_attention(q, k, v, 0)  # the whole sequence at once
    tail = A.prefill_attention(q[S - T:], k, v, S - T)  # last T tokens over a cached prefix
    assert _rel(tail, full[S - T:]) < 1e-6
    # and vs torch SDPA with GQA expanded
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True)
    assert _rel(full, sdpa.transpose(0, 1)) < 1e-5


def test_kv_scale_forms_and_errors():
    from llama_engine.config import ConfigError
    A = _ops()
    ks, vs = A.kv_scale_tensors(0.5, 2, 4)  # TensorRT-LLM's one scale: every channel, K and V
    assert ks.shape == vs.shape == (2, 4) and ks.dtype == torch.float32
    assert bool((ks == 0.5).all()) and bool((vs == 0.5).all())
    k8, v8 = torch.rand(8) + 0.1, torch.rand(2, 4) + 0.1
    ks, vs = A.kv_scale_tensors((k8, v8), 2, 4)
    assert torch.equal(ks, k8.view(2, 4)) and torch.equal(vs, v8)
    assert ks.data_ptr() == k8.data_ptr() and vs.data_ptr() == v8.data_ptr()  # views, no copy
    for bad, msg in ((None, "needs kv_scale"), (0.0, "finite and positive"),
                     (float("nan"), "finite and positive"), ((k8, torch.ones(5)), "expected 1 or"),
                     ((k8, v8, v8), "pair")):
        with pytest.raises(ConfigError, match=msg):
            A.kv_scale_tensors(bad, 2, 4)


def test_chunked_prefill_and_decode_read_per_channel_int8_cache():
    """paged_attention over an int8 cache with per-(KV head, channel) scales: a chunk after a
    cached prefix and a decode step see the dequantized prefix (K and V each with their own
    scales) and their own fresh K/V."""
    from llama_engine.attention import AttentionMeta, paged_attention
    A = _ops()
    g = torch.Generator().manual_seed(8)
    T, P, H, Hkv, D, bs = 12, 7, 6, 2, 16, 4
    q = torch.randn(T, H, D, generator=g)
    k = torch.randn(T, Hkv, D, generator=g) * (1 + 7 * (torch.arange(D) % 5 == 0))  # outliers
    v = torch.randn(T, Hkv, D, generator=g) * 0.1
    ks = (k.abs().amax(0) / 127).reshape(-1)   # [Hkv*D], calibrated on exactly these values
    vs = (v.abs().amax(0) / 127).reshape(-1)
    scales = A.kv_scale_tensors((ks, vs), Hkv, D)
    kc = torch.zeros(5, Hkv, bs, D, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    bt = torch.tensor([[3, 0, 4, 1]], dtype=torch.int32)
    slots = (bt[0].long()[torch.arange(T) // bs] * bs + torch.arange(T) % bs)
    sm = D ** -0.5

    def meta(a, b, decode):
        return AttentionMeta(positions=torch.arange(a, b), slot_mapping=slots[a:b],
                             block_tables=bt, context_lens=torch.tensor([b], dtype=torch.int32),
                             query_lens=[b - a], is_decode=decode, context_lens_host=[b])
    paged_attention(q[:P], k[:P], v[:P], meta(0, P, False), kc, vc, scales, sm)
    out = paged_attention(q[P:T - 1], k[P:T - 1], v[P:T - 1], meta(P, T - 1, False), kc, vc,
                          scales, sm)
    deq_k = A.quantize_kv_ref(k, scales[0]).float() * scales[0]
    deq_v = A.quantize_kv_ref(v, scales[1]).float() * scales[1]
    assert bool(((deq_k - k).abs() <= scales[0] / 2 + 1e-7).all())
    assert bool(((deq_v - v).abs() <= scales[1] / 2 + 1e-7).all())
    want = A.prefill_attention_ref(q[P:T - 1], torch.cat([deq_k[:P], k[P:T - 1]]),
                                   torch.cat([deq_v[:P], v[P:T - 1]]), P, sm)
    assert _rel(out, want) < 1e-5
    dec = paged_attention(q[T - 1:], k[T - 1:], v[T - 1:], meta(T - 1, T, True), kc, vc,
                          scales, sm)
    want = A.prefill_attention_ref(q[T - 1:], deq_k, deq_v, T - 1, sm)
    assert _rel(dec, want) < 1e-5
    # ... and is close to float attention on the unquantized values
    assert _rel(dec, A.prefill_attention_ref(q[T - 1:], k, v, T - 1, sm)) < 3e-2


def test_bad_input_is_config_error():
    from llama_engine.config import ConfigError
    A = _ops()
    with pytest.raises(ConfigError):
        A.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ConfigError):
        A.decode_attention(torch.randn(1, 3, 16), torch.zeros(1, 2, 16, 16),
                           torch.zeros(1, 2, 16, 16), torch.zeros(1, 1, dtype=torch.int32),
                           torch.ones(1, dtype=torch.int32), 0.25)
    with pytest.raises(ConfigError):
        A.write_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16),
                   torch.zeros(1, 2, 16, 16, dtype=torch.int8),
                   torch.zeros(1, 2, 16, 16, dtype=torch.int8), torch.zeros(1).long(), None)


@pytest.mark.parametrize("H,hkv,S", [(4, 4, 7), (6, 2, 7), (4, 4, 19), (6, 2, 12)])
def test_prefill_attention_batch_equals_one_by_one(H, hkv, S):
    """T = 7 new tokens each, over no cached prefix (S = T) or one of S - T tokens."""
    from llama_engine.config import ConfigError
    A = _ops()
    g = torch.Generator().manual_seed(3)
    B, T, D = 3, 7, 16
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, hkv, D, generator=g, dtype=torch.float64)
    got = A.prefill_attention_batch(q, k, v, softmax_scale=0.3)
    for b in range(B):
        want = A.prefill_attention_ref(q[b], k[b], v[b], S - T, 0.3)
        assert _rel(A.prefill_attention(q[b], k[b], v[b], softmax_scale=0.3), want) < 1e-12
        assert _rel(got[b], want) < 1e-12
        assert _rel(A.prefill_attention_batch(q, k, v, softmax_scale=0.3, impl="torch")[b],
                    want) == 0
    with pytest.raises(ConfigError, match="expected q \\[B,T,H,D\\]"):
        A.prefill_attention_batch(q[0], k[0], v[0])
    with pytest.raises(ConfigError, match="S>=T"):
        A.prefill_attention_batch(q, k[:, :T - 1], v[:, :T - 1])


def test_rope_decode_attention_cpu_equals_two_ops():
    """On the CPU (the reference path) the fused op is rope_write_kv then decode_attention."""
    A = _ops()
    g = torch.Generator().manual_seed(9)
    q, k, v = _qkv(2, 4, 2, 16, torch.float32, g)
    cos, sin, _ = _rope_tables(64, 16)
    kc = torch.randn(4, 2, 16, 16, generator=g)
    vc = torch.randn(4, 2, 16, 16, generator=g)
    bt = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    cl = torch.tensor([20, 5], dtype=torch.int32)
    pos = (cl - 1).long()
    slots = torch.tensor([0 * 16 + 3, 1 * 16 + 4])
    kc2, vc2 = kc.clone(), vc.clone()
    out = A.rope_decode_attention(q, k, v, pos, cos, sin, kc, vc, slots, bt, cl, 0.25)
    qr = A.rope_write_kv_ref(q, k, v, pos, cos, sin, kc2, vc2, slots)
    ref = A.decode_attention_ref(qr, kc2, vc2, bt, cl, 0.25)
    assert torch.equal(out, ref) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(vc[1, :, 4], v[1])  # the new token's v went to its slot
