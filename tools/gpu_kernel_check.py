#!/usr/bin/env python3
"""GPU self-checks of the kernels: every public op at LLaMA-7B shapes against its torch
reference (relative error) and timed (weight / K-V bandwidth), on a CUDA device.

    python3 tools/gpu_kernel_check.py [--quick] [--only linear|attn] [--json OUT.json]

``linear_selfcheck``: the weight GEMMs and activation quantizers (median of 20 CUDA-graph
replays, weights rotated over copies that exceed L2). ``attn_selfcheck``: norms, RoPE, KV
writes, decode attention (paged and static caches, fp16 / bf16 / int8 KV), the fused
RoPE + decode attention against the two kernels it replaces (bit for bit), prefill SDPA.
Their correctness parts also run as pytest (``pytest -m gpu tests/test_gpu.py``). Helpers
(``time_graph``, ``time_ms``, ``make_paged_cache``, ``random_kv_scales``, ``rel_err``) serve
the sweep tools too. Exits 1 when a row fails its tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from llama_engine.config import ConfigError  # noqa: E402
from llama_engine.kernels import tuning  # noqa: E402
from llama_engine.kernels.attn import (apply_rope, decode_attention,  # noqa: E402
                                       prefill_attention, rope_decode_attention,
                                       rope_write_kv, write_kv)
from llama_engine.kernels.common import HAS_TRITON, next_pow2  # noqa: E402
from llama_engine.kernels.linear import (linear_fp, linear_w4a16,  # noqa: E402
                                         linear_w8a8, linear_w8a8_dynamic, linear_w8a16,
                                         quantize_per_tensor, quantize_per_token)
from llama_engine.kernels.norm import add_rms_norm, rms_norm  # noqa: E402
from llama_engine.kernels.reference import (add_rms_norm_ref, apply_rope_ref,  # noqa: E402
                                            decode_attention_ref, linear_fp_ref,
                                            linear_w4a16_ref, linear_w8a8_ref,
                                            linear_w8a16_ref, pack_int4_ref,
                                            prefill_attention_ref, quantize_per_tensor_ref,
                                            quantize_per_token_ref, rms_norm_ref,
                                            rope_write_kv_ref, write_kv_ref)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; inf when out holds a non-finite value."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# =============================================================================================
# Linear layers
# =============================================================================================
LLAMA7B_SHAPES = (("qkv", 12288, 4096), ("o_proj", 4096, 4096), ("gate_up", 22016, 4096),
                  ("down", 4096, 11008), ("lm_head", 32000, 4096))


def time_graph(fn: Callable[[int], object], n_copies: int, reps: int = 20) -> float:
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


def linear_selfcheck(device="cuda", Ms=(1, 4, 16, 64), shapes=LLAMA7B_SHAPES,
                  dtype=torch.float16, group_size: int = 128, impls=("auto",),
                  baselines: bool = True, verbose: bool = True) -> list[dict]:
    """Run every public op at LLaMA-7B shapes; compare with the _ref (relative error) and time
    it (median of 20 CUDA-graph replays, weights rotated over copies that exceed L2).
    Returns rows {op, M, N, K, impl, rel_err, ms, weight_GBps}. Baselines add cuBLAS fp16
    (linear_fp impl=torch) and the torch paths of the quantized ops at M=64."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError("linear_selfcheck needs a CUDA device")
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dt)

    def randint8(*shape, lo=-127, hi=128):
        return torch.randint(lo, hi, shape, device=device, dtype=torch.int8, generator=gen)

    def record(op, M, N, K, impl, out, ref, ms, nbytes):
        row = dict(op=op, M=M, N=N, K=K, impl=impl, rel_err=rel_err(out, ref), ms=ms,
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
                    ms = time_graph(lambda i: call(i, impl), n_copies)
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
            ms = time_graph(lambda i: quantize_per_token(x), 20)
            record("quant_per_token", M, 1, K, "auto", q.float() * s, qr.float() * sr, ms,
                   x.numel() * (x.element_size() + 1))
            ts = torch.full((1, 1), float(x.abs().max()) / 127, device=device)
            ms = time_graph(lambda i: quantize_per_tensor(x, ts), 20)
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


# =============================================================================================
# Norms, RoPE, KV cache, attention
# =============================================================================================
def time_ms(fn, reps: int = 20, warmup: int = 3, flush: Optional[torch.Tensor] = None) -> float:
    """Median device time of ``fn`` (ms). A sleep kernel queued before the start event lets
    the host enqueue ``fn`` ahead of the device, so host overhead stays out of the number."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()  # evict L2 (50 MB on an H100) so that K/V come from HBM
        torch.cuda._sleep(2_000_000)  # ~1 ms of device time: longer than any host overhead
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def host_us(fn, reps: int = 50) -> float:
    """Host time per call (µs) of back-to-back calls: the launch overhead of ``fn``."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # keep the device busy so the queue never drains
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    return dt


def make_paged_cache(B: int, ctx: int, hkv: int, D: int, block_size: int, dtype, device,
                     kv_scale: Optional[float] = None, static: bool = False,
                     extra_blocks: int = 0):
    """Random caches holding ``ctx`` tokens per sequence, with shuffled block tables.

    ``static``: one block per sequence (block_size >= ctx), block_tables[b] = [b].
    Returns (k_cache, v_cache, block_tables int32, context_lens int32).
    """
    nb_seq = 1 if static else triton_cdiv(ctx, block_size)
    num_blocks = B * nb_seq + extra_blocks
    shape = (num_blocks, hkv, block_size, D)
    if dtype == torch.int8:
        k_cache = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
        v_cache = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    else:
        k_cache = torch.randn(shape, dtype=dtype, device=device)
        v_cache = torch.randn(shape, dtype=dtype, device=device)
    if static:
        bt = torch.arange(B, dtype=torch.int32, device=device)[:, None]
    else:
        perm = torch.randperm(num_blocks)  # shuffled: blocks of a sequence are scattered
        bt = perm[:B * nb_seq].view(B, nb_seq).to(torch.int32).to(device)
    cl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    return k_cache, v_cache, bt, cl


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def random_kv_scales(hkv: int, D: int, mean: float, device, spread: float = 0.5,
                     generator: Optional[torch.Generator] = None):
    """(k_scale, v_scale) float32 [Hkv, D], uniform in mean * [1 - spread, 1 + spread]."""
    def one():
        r = torch.rand(hkv, D, generator=generator)
        return (mean * (1.0 - spread + 2.0 * spread * r)).to(device)
    return one(), one()


def attn_selfcheck(device="cuda", quick: bool = False) -> list[dict]:
    """Check and time every attention-side op at LLaMA-7B shapes (H=Hkv=32, D=128) on ``device``.

    Rows: {op, B, ctx, kv_dtype, impl, rel_err, ms, GBps, ok, block_size, H, Hkv}. GBps
    counts the bytes an op must move (decode attention: K and V of every context token).
    """
    device = torch.device(device)
    if device.type != "cuda" or not HAS_TRITON:
        raise ConfigError("attn_selfcheck needs a CUDA device and triton")
    torch.manual_seed(0)
    rows: list[dict] = []
    dt = torch.float16
    H, D = 32, 128
    hidden = H * D
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)

    def row(op, B, ctx, kv, impl, err, ms, nbytes, tol, bs=None, h=H, hkv=H):
        rows.append(dict(op=op, B=B, ctx=ctx, kv_dtype=kv, impl=impl, rel_err=err, ms=ms,
                         GBps=nbytes / (ms * 1e6) if ms else None,
                         ok=bool(err == err and err < tol), block_size=bs, H=h, Hkv=hkv))

    # --- norms -----------------------------------------------------------------------------
    for M in (1, 32, 2048):
        x = torch.randn(M, hidden, dtype=dt, device=device)
        r = torch.randn(M, hidden, dtype=dt, device=device)
        w = torch.rand(hidden, dtype=dt, device=device) + 0.5
        err = rel_err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
        ms = time_ms(lambda: rms_norm(x, w, 1e-6), flush=flush)
        row("rms_norm", M, None, "-", "triton", err, ms, 2 * x.numel() * 2, 2e-3)
        o, nr = add_rms_norm(x, r, w, 1e-6)
        o_r, nr_r = add_rms_norm_ref(x, r, w, 1e-6)
        err = max(rel_err(o, o_r), rel_err(nr, nr_r))
        ms = time_ms(lambda: add_rms_norm(x, r, w, 1e-6), flush=flush)
        row("add_rms_norm", M, None, "-", "triton", err, ms, 4 * x.numel() * 2, 2e-3)

    # --- rope / cache writes -------------------------------------------------------------
    max_pos = 4096
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
    ang = torch.arange(max_pos, device=device).float()[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    for N in (1, 32, 2048):
        qkv = torch.randn(N, 3 * hidden, dtype=dt, device=device)
        q = qkv[:, :hidden].view(N, H, D)
        k = qkv[:, hidden:2 * hidden].view(N, H, D)
        v = qkv[:, 2 * hidden:].view(N, H, D)
        pos = torch.randint(0, max_pos, (N,), device=device)
        qo, ko = apply_rope(q, k, pos, cos, sin)
        qr, kr = apply_rope_ref(q, k, pos, cos, sin)
        err = max(rel_err(qo, qr), rel_err(ko, kr))
        ms = time_ms(lambda: apply_rope(q, k, pos, cos, sin), flush=flush)
        row("apply_rope", N, None, "-", "triton", err, ms, 4 * N * hidden * 2, 2e-3)
        for kvd in (dt, torch.int8):
            # int8: per (head, channel) K/V scales, as engines use them
            scale = random_kv_scales(H, D, 0.03, device) if kvd == torch.int8 else None
            bs = 64
            nblk = triton_cdiv(N, bs) + 3
            kc = torch.zeros(nblk, H, bs, D, dtype=kvd, device=device)
            vc = torch.zeros_like(kc)
            kc2, vc2 = kc.clone(), vc.clone()
            slots = torch.randperm(nblk * bs, device=device)[:N]
            if N > 1:
                slots[0] = -1
            write_kv(k, v, kc, vc, slots, scale)
            write_kv_ref(k, v, kc2, vc2, slots, scale)
            err = max(rel_err(kc, kc2), rel_err(vc, vc2))
            ms = time_ms(lambda: write_kv(k, v, kc, vc, slots, scale), flush=flush)
            esz = 1 if kvd == torch.int8 else 2
            kvname = "int8" if kvd == torch.int8 else "fp16"
            row("write_kv", N, None, kvname, "triton", err, ms,
                2 * N * hidden * (2 + esz), 1e-6, bs)
            kc.zero_(), vc.zero_(), kc2.zero_(), vc2.zero_()
            qo = rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, scale)
            qr = rope_write_kv_ref(q, k, v, pos, cos, sin, kc2, vc2, slots, scale)
            # int8: the rotated k may round differently by one level -> compare loosely
            err = max(rel_err(qo, qr), rel_err(kc, kc2), rel_err(vc, vc2))
            ms = time_ms(lambda: rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, scale),
                          flush=flush)
            row("rope_write_kv", N, None, kvname, "triton", err, ms,
                N * hidden * (4 + 2 * (2 + esz)), 1e-2 if kvd == torch.int8 else 2e-3, bs)

    # --- decode attention ----------------------------------------------------------------
    Bs = (1, 32) if quick else (1, 8, 32, 64)
    ctxs = (2048,) if quick else (128, 512, 2048)
    cases = [(B, c, H, H, dt) for B in Bs for c in ctxs]
    cases += [(1, 2048, 64, 8, dt), (32, 2048, 64, 8, dt), (32, 2048, H, H, torch.bfloat16)]
    for B, ctx, h, hkv, qdt in cases:
        for kvd in (qdt, torch.int8):
            for static in (False, True):
                bs = next_pow2(ctx) if static else 64
                scale = random_kv_scales(hkv, D, 0.02, device) if kvd == torch.int8 else None
                kc, vc, bt, cl = make_paged_cache(B, ctx, hkv, D, bs, kvd, device,
                                                  static=static, extra_blocks=2)
                q = torch.randn(B, h, D, dtype=qdt, device=device)
                sm = 1.0 / math.sqrt(D)
                fn = lambda: decode_attention(q, kc, vc, bt, cl, sm, scale)  # noqa: E731
                out = fn()
                ref = decode_attention_ref(q, kc, vc, bt, cl, sm, scale)
                err = rel_err(out, ref)
                ms = time_ms(fn, flush=flush)
                esz = 1 if kvd == torch.int8 else 2
                kvname = "int8" if esz == 1 else ("bf16" if kvd == torch.bfloat16 else "fp16")
                row("decode_attention", B, ctx, kvname, "triton", err, ms,
                    2 * B * ctx * hkv * D * esz, 1e-2 if qdt == torch.bfloat16 else 5e-3,
                    bs, h, hkv)
                if B == 1 and ctx == 2048 and h == H and not static:
                    rows[-1]["host_us"] = host_us(fn)  # launch overhead of the 2 kernels
                del kc, vc

    # --- decode attention with RoPE + KV write fused in, against the two kernels ----------
    if True:
        for B, ctx, h, hkv in ((1, 7, 40, 40), (1, 300, 40, 40), (8, 2048, H, H),
                               (32, 129, 64, 8)):
            for kvd in (dt, torch.int8):
                scale = random_kv_scales(hkv, D, 0.02, device) if kvd == torch.int8 else None
                kc, vc, bt, cl = make_paged_cache(B, ctx, hkv, D, 64, kvd, device,
                                                  extra_blocks=2)
                qkv = torch.randn(B, (h + 2 * hkv) * D, dtype=dt, device=device)
                q = qkv[:, :h * D].view(B, h, D)
                k = qkv[:, h * D:(h + hkv) * D].view(B, hkv, D)
                v = qkv[:, (h + hkv) * D:].view(B, hkv, D)
                pos = (cl - 1).long()
                slots = bt.gather(1, (pos // 64)[:, None]).squeeze(1).long() * 64 + pos % 64
                if B > 1:
                    slots[-1] = -1
                res = {}
                for fused in (True, False):
                    k1, v1 = kc.clone(), vc.clone()
                    if fused:
                        fn = lambda: rope_decode_attention(  # noqa: E731
                            q, k, v, pos, cos, sin, k1, v1, slots, bt, cl, 1 / math.sqrt(D),
                            scale)
                    else:
                        fn = lambda: decode_attention(  # noqa: E731
                            rope_write_kv(q, k, v, pos, cos, sin, k1, v1, slots, scale),
                            k1, v1, bt, cl, 1 / math.sqrt(D), scale)
                    res[fused] = (fn(), k1, v1, time_ms(fn, flush=flush))
                (o, k1, v1, ms), (o2, k2, v2, ms2) = res[True], res[False]
                # bit for bit the two kernels' result: rel_err is the largest difference
                err = max(rel_err(o, o2), rel_err(k1.float(), k2.float()),
                          rel_err(v1.float(), v2.float()))
                kvname = "int8" if kvd == torch.int8 else "fp16"
                esz = 1 if kvd == torch.int8 else 2
                row("rope_decode_attention", B, ctx, kvname, "fused", err, ms,
                    2 * B * ctx * hkv * D * esz, 1e-30, 64, h, hkv)
                rows[-1].update(two_kernels_ms=ms2, out_equal=torch.equal(o, o2),
                                k_equal=torch.equal(k1, k2), v_equal=torch.equal(v1, v2))
                del kc, vc, k1, v1, k2, v2

    # --- prefill attention (SDPA) --------------------------------------------------------
    for T, S, h, hkv in ((2048, 2048, H, H), (512, 1536, H, H), (1024, 1024, 64, 8)):
        q = torch.randn(T, h, D, dtype=dt, device=device)
        k = torch.randn(S, hkv, D, dtype=dt, device=device)
        v = torch.randn(S, hkv, D, dtype=dt, device=device)
        out = prefill_attention(q, k, v, S - T)
        err = rel_err(out, prefill_attention_ref(q, k, v, S - T))
        ms = time_ms(lambda: prefill_attention(q, k, v, S - T), flush=flush)
        row("prefill_attention", T, S, "fp16", "sdpa", err, ms,
            2 * (T * h + 2 * S * hkv) * D, 5e-3, None, h, hkv)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of attn_selfcheck rows, then the int8-vs-fp16 decode speedups."""
    lines = [f"{'op':21s} {'B':>5s} {'ctx':>5s} {'H/Hkv':>6s} {'bs':>5s} {'kv':>5s} "
             f"{'rel_err':>9s} {'ms':>8s} {'GB/s':>7s} ok"]
    for r in rows:
        lines.append(
            f"{r['op']:21s} {r['B']:5d} {str(r['ctx'] or '-'):>5s} "
            f"{str(r['H']) + '/' + str(r['Hkv']):>6s} {str(r['block_size'] or '-'):>5s} "
            f"{r['kv_dtype']:>5s} {r['rel_err']:9.2e} {r['ms']:8.4f} "
            f"{(r['GBps'] or 0):7.0f} {'ok' if r['ok'] else 'FAIL'}"
            + (f"  host {r['host_us']:.0f} us/call" if 'host_us' in r else "")
            + (f"  two kernels {r['two_kernels_ms']:.4f} ms; bit-equal out/k/v "
               f"{r['out_equal']}/{r['k_equal']}/{r['v_equal']}"
               if 'two_kernels_ms' in r else ""))
    dec = {(r["B"], r["ctx"], r["H"], r["Hkv"], r["block_size"], r["kv_dtype"]): r["ms"]
           for r in rows if r["op"] == "decode_attention"}
    for key, ms in dec.items():
        if key[5] == "int8":
            for fkey in (key[:5] + ("fp16",), key[:5] + ("bf16",)):
                if fkey in dec:
                    lines.append(f"int8 KV speedup B={key[0]} ctx={key[1]} H={key[2]}/{key[3]} "
                                 f"bs={key[4]} vs {fkey[5]}: {dec[fkey] / ms:.2f}x")
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"{len(rows) - len(bad)}/{len(rows)} rows ok")
    return "\n".join(lines)

# =============================================================================================
# Command line
# =============================================================================================
LINEAR_TOL = 2e-2   # fp16 GEMMs against the fp32 reference (relative error over the output)


def linear_failures(rows: list[dict]) -> list[str]:
    return [f"{r['op']} M={r['M']} N={r['N']} K={r['K']} {r['impl']}: {r['rel_err']:.2e}"
            for r in rows if not r["rel_err"] < LINEAR_TOL]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true", help="fewer decode-attention shapes")
    p.add_argument("--only", choices=("linear", "attn"), default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}: tuning table "
          f"{tuning.table_for(torch.device('cuda')).source}")
    out, bad = {}, []
    if a.only in (None, "linear"):
        out["linear"] = linear_selfcheck("cuda", Ms=(1, 16) if a.quick else (1, 4, 16, 64))
        bad += linear_failures(out["linear"])
    if a.only in (None, "attn"):
        out["attn"] = attn_selfcheck("cuda", quick=a.quick)
        print(format_rows(out["attn"]))
        bad += [f"{r['op']} B={r['B']} ctx={r['ctx']} {r['kv_dtype']}" for r in out["attn"]
                if not r["ok"]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"{len(bad)} failed: {bad}" if bad else "all kernel checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
