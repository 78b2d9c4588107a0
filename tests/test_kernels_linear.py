"""Tests of llama_engine/kernels/linear.py: the plain-PyTorch references, int4 packing, the
activation quantizers, and every Triton kernel run under Triton's CPU interpreter
(TRITON_INTERPRET=1) against the references.

The interpreter must be switched on before Triton is first imported, and other test modules in
this pytest process may import it earlier, so the kernel checks run in a subprocess.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llama_engine.config import ConfigError
from llama_engine.kernels import linear as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# References and packing (in-process, plain torch)
# ---------------------------------------------------------------------------------------------
def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 14), generator=g, dtype=torch.int8)
    p = L.pack_int4(q)
    assert p.shape == (5, 7) and p.dtype == torch.int8
    assert torch.equal(L.unpack_int4(p), q)
    # layout: even k in the low nibble, odd k in the high nibble
    u = p.view(torch.uint8).to(torch.int16)
    assert torch.equal(((u & 0xF) ^ 8) - 8, q[:, 0::2].to(torch.int16))
    assert torch.equal((u >> 4 ^ 8) - 8, q[:, 1::2].to(torch.int16))
    # every byte value unpacks and packs back
    allb = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(4, 64)
    assert torch.equal(L.pack_int4(L.unpack_int4(allb)), allb)


def test_pack_rejects_bad_input():
    with pytest.raises(ConfigError):
        L.pack_int4(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(ConfigError):
        L.pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ConfigError):
        L.linear_w4a16(torch.randn(2, 8), torch.zeros(4, 4, dtype=torch.int8),
                       torch.ones(1, 4), group_size=3)
    with pytest.raises(ConfigError):
        L.linear_w8a8(torch.zeros(3, 8, dtype=torch.int8), torch.ones(2, 1),
                      torch.zeros(4, 8, dtype=torch.int8), torch.ones(1, 4), torch.float32)
    with pytest.raises(ConfigError):
        L.linear_fp(torch.randn(2, 8), torch.randn(4, 8), impl="cuda")


def test_references_match_dequantized_float():
    g = torch.Generator().manual_seed(1)
    M, N, K, G = 3, 6, 16, 4
    x = torch.randn(M, K, generator=g, dtype=torch.float64).float()
    q8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s8 = torch.rand(N, generator=g) + 0.1
    want = x.double() @ (q8.double() * s8.double()[:, None]).t()
    torch.testing.assert_close(L.linear_w8a16(x, q8, s8).double(), want, rtol=1e-5, atol=1e-5)

    q4 = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    s4 = torch.rand(K // G, N, generator=g) + 0.1
    w = q4.double() * s4.double().repeat_interleave(G, 0).t()
    torch.testing.assert_close(L.linear_w4a16(x, L.pack_int4(q4), s4, G).double(),
                               x.double() @ w.t(), rtol=1e-5, atol=1e-5)
    # per channel: G = K with scales [1, N] (or [N])
    sc = torch.rand(N, generator=g) + 0.1
    w = q4.double() * sc.double()[:, None]
    for s in (sc.reshape(1, N), sc):
        torch.testing.assert_close(L.linear_w4a16(x, L.pack_int4(q4), s, K).double(),
                                   x.double() @ w.t(), rtol=1e-5, atol=1e-5)

    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(M, 1, generator=g), torch.rand(1, N, generator=g)
    want = (xq.double() @ q8.double().t()) * xs.double() * ws.double()
    torch.testing.assert_close(L.linear_w8a8(xq, xs, q8, ws, torch.float32).double(), want,
                               rtol=1e-5, atol=1e-5)
    # leading dims are kept
    x3 = torch.randn(2, 3, K, generator=g)
    assert L.linear_fp(x3, torch.randn(N, K, generator=g)).shape == (2, 3, N)


def test_quantizers_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 33, generator=g) * 4
    x[2] = 0.0                                         # all-zero row: finite scale, q = 0
    q, s = L.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1) and s.dtype == torch.float32
    assert torch.all(s > 0) and torch.all(q[2] == 0)
    assert torch.all((q.float() * s - x).abs() <= s / 2 * (1 + 1e-6) + 1e-12)
    assert int(q.abs().max()) == 127
    ts = torch.tensor([[0.02]])
    qt = L.quantize_per_tensor(x, ts)
    inside = (x / 0.02).abs() <= 127
    err = (qt.float() * 0.02 - x).abs()
    assert torch.all(err[inside] <= 0.01 * (1 + 1e-5))
    assert torch.all(qt[~inside].abs() == 127)


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------
_KERNEL_CHECKS = r'''
import os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from llama_engine.kernels import linear as L

torch.manual_seed(0)
fails = []

def check(name, out, ref, tol):
    out, ref = out.float(), ref.float()
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    ok = bool(torch.isfinite(out).all()) and err <= tol and out.shape == ref.shape
    print(("ok  " if ok else "FAIL"), f"{name}: rel_err={err:.2e}", flush=True)
    if not ok:
        fails.append(name)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
Skinny, Gemm = L.SkinnyCfg, L.GemmCfg
# (M, N, K) with N, K not powers of two; K = 160 with 32-wide blocks splits unevenly.
SHAPES = [(1, 40, 96), (3, 24, 160), (17, 40, 64)]
CFGS = [Skinny("dot", 16, 32, 1), Skinny("dot", 16, 32, 2), Skinny("fma", 8, 32, 1),
        Skinny("fma", 4, 64, 3), Gemm(16, 16, 32, 2, 4, 1)]
# The interpreter's tl.dot is wrong for bfloat16 operands (it multiplies the raw bits), so
# bfloat16 runs only the kernels without tl.dot; the GPU check covers bf16 there.
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for (M, N, K) in SHAPES:
        x = torch.randn(M, K).to(dt)
        w = (torch.randn(N, K) * 0.1).to(dt)
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        s8 = (torch.rand(N) * 0.01 + 1e-3).to(dt)
        q4 = L.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8))
        xq, xs = L.quantize_per_token_ref(x)
        ws = torch.rand(1, N) * 0.01
        for cfg in CFGS:
            if dt == torch.bfloat16 and getattr(cfg, "kernel", "gemm") != "fma":
                continue
            tag = f"{str(dt)[6:]} M={M} N={N} K={K} {cfg}"
            check("fp " + tag, L.linear_fp(x, w, impl="triton", _cfg=cfg),
                  L.linear_fp_ref(x, w), TOL[dt])
            check("w8a16 " + tag, L.linear_w8a16(x, q8, s8, impl="triton", _cfg=cfg),
                  L.linear_w8a16_ref(x, q8, s8), TOL[dt])
            for G in (K, 32):
                s4 = (torch.rand(K // G, N) * 0.01 + 1e-3).to(dt)
                check(f"w4a16 G={G} " + tag, L.linear_w4a16(x, q4, s4, G, impl="triton", _cfg=cfg),
                      L.linear_w4a16_ref(x, q4, s4, G), TOL[dt])
            for xs_, ws_ in ((xs, ws), (xs[:1, :1], ws[:, :1])):   # per token / per tensor
                check(f"w8a8 xs{tuple(xs_.shape)} " + tag,
                      L.linear_w8a8(xq, xs_, q8, ws_, dt, impl="triton", _cfg=cfg),
                      L.linear_w8a8_ref(xq, xs_, q8, ws_, dt), TOL[dt])

# grouped int4 with several groups per tile (weights scaled in registers), and leading dims
for dt in (torch.float32, torch.float16):
    M, N, K, G = 2, 24, 128, 32
    x = torch.randn(2, M, K).to(dt)
    q4 = L.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8))
    s4 = (torch.rand(K // G, N) * 0.01 + 1e-3).to(dt)
    for cfg in (Skinny("dot", 16, 128, 1), Skinny("dot", 16, 64, 2)):
        check(f"w4a16 in-register groups {dt} {cfg}",
              L.linear_w4a16(x, q4, s4, G, impl="triton", _cfg=cfg),
              L.linear_w4a16_ref(x, q4, s4, G), TOL[dt])
    # default configuration choice (auto table / heuristic), M in the skinny and GEMM ranges
    for M in (1, 5, 70):
        xx = torch.randn(M, K).to(dt)
        check(f"w4a16 default cfg M={M} {dt}", L.linear_w4a16(xx, q4, s4, G, impl="triton"),
              L.linear_w4a16_ref(xx, q4, s4, G), TOL[dt])

# split-K partials (partials=True): unsummed SplitKPartials [S, M, N] whose .sum() is exactly
# the reduced output; partials=False (and a launch without a split) return the plain tensor
for dt in (torch.float32, torch.float16):
    M, N, K, G = 3, 40, 256, 32                        # 8 blocks of 32: S = 2, 3 (uneven), 4
    x = torch.randn(2, M, K).to(dt)                     # leading dims [2, M]
    w = (torch.randn(N, K) * 0.1).to(dt)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s8 = (torch.rand(N) * 0.01 + 1e-3).to(dt)
    q4 = L.pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8))
    s4 = (torch.rand(K // G, N) * 0.01 + 1e-3).to(dt)
    xq, xs = L.quantize_per_token_ref(x)
    ws = torch.rand(1, N) * 0.01
    ops = {"fp": (lambda **k: L.linear_fp(x, w, impl="triton", **k), L.linear_fp_ref(x, w)),
           "w8a16": (lambda **k: L.linear_w8a16(x, q8, s8, impl="triton", **k),
                     L.linear_w8a16_ref(x, q8, s8)),
           "w4a16g": (lambda **k: L.linear_w4a16(x, q4, s4, G, impl="triton", **k),
                      L.linear_w4a16_ref(x, q4, s4, G)),
           "w8a8": (lambda **k: L.linear_w8a8(xq, xs, q8, ws, dt, impl="triton", **k),
                    L.linear_w8a8_ref(xq, xs, q8, ws, dt))}
    for cfg, S in ((Skinny("dot", 16, 32, 2), 2), (Skinny("fma", 8, 32, 3), 3),
                   (Skinny("dot", 32, 32, 4), 4), (Skinny("dot", 16, 32, 1), 1)):
        for name, (run, ref) in ops.items():
            tag = f"partials {name} {str(dt)[6:]} {cfg}"
            p, t = run(partials=True, _cfg=cfg), run(_cfg=cfg)
            if S == 1:
                ok = isinstance(p, torch.Tensor) and torch.equal(p, t)
            else:
                ok = (isinstance(p, L.SplitKPartials) and isinstance(t, torch.Tensor)
                      and p.parts.shape == (S, 2 * M, N) and p.parts.dtype == torch.float32
                      and p.shape == t.shape and p.dtype == dt and torch.equal(p.sum(), t))
            print(("ok  " if ok else "FAIL"), tag, flush=True)
            if not ok:
                fails.append(tag)
            check(tag + " vs ref", t, ref, TOL[dt])

# activation quantizers: error <= scale / 2 elementwise, scales equal to the reference
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for (M, K) in ((1, 100), (3, 4096), (2, 8200)):     # 8200: two-pass (long row) variant
        x = (torch.randn(M, K) * 3).to(dt)
        x[0, :7] = 0
        if M > 1:
            x[1] = 0                                   # all-zero row
        q, s = L.quantize_per_token(x, impl="triton")
        qr, sr = L.quantize_per_token_ref(x)
        xf = x.float()
        bound = bool(((q.float() * s - xf).abs() <= s / 2 * (1 + 1e-5) + 1e-12).all())
        same_s = torch.allclose(s, sr, rtol=1e-6, atol=0)
        near_q = int((q.int() - qr.int()).abs().max()) <= 1
        ok = bound and same_s and near_q and q.dtype == torch.int8 and s.shape == (M, 1)
        print(("ok  " if ok else "FAIL"), f"per_token {dt} M={M} K={K}: bound={bound} "
              f"scale={same_s} q_vs_ref={near_q}", flush=True)
        if not ok:
            fails.append(f"per_token {dt} {M} {K}")
        ts = torch.tensor([[float(xf.abs().max()) / 100]])         # some values clamp
        qt = L.quantize_per_tensor(x, ts, impl="triton")
        qtr = L.quantize_per_tensor_ref(x, ts)
        sc = float(ts)
        inside = (xf / sc).abs() <= 127
        bound = bool(((qt.float() * sc - xf).abs()[inside] <= sc / 2 * (1 + 1e-5)).all())
        clamp = bool((qt[~inside].abs() == 127).all())
        near_q = int((qt.int() - qtr.int()).abs().max()) <= 1
        ok = bound and clamp and near_q
        print(("ok  " if ok else "FAIL"), f"per_tensor {dt} M={M} K={K}: bound={bound} "
              f"clamp={clamp} q_vs_ref={near_q}", flush=True)
        if not ok:
            fails.append(f"per_tensor {dt} {M} {K}")

# W8A8 epilogue kernel used after torch._int_mm on CUDA
M, N = 5, 40
acc = torch.randint(-100000, 100000, (M, N), dtype=torch.int32)
xs, ws = torch.rand(M), torch.rand(N)
for xr, wc in ((True, True), (False, True), (True, False)):
    xs_, ws_ = (xs if xr else xs[:1]), (ws if wc else ws[:1])
    out = torch.empty(M, N, dtype=torch.float32)
    L._int32_scale_kernel[(1, 2)](acc, xs_, ws_, out, M, N, XS_ROW=xr, WS_COL=wc,
                                  BLOCK_M=8, BLOCK_N=32)
    check(f"int32 scale epilogue xs_row={xr} ws_col={wc}", out,
          acc.double() * xs_.double().reshape(-1, 1) * ws_.double().reshape(1, -1), 1e-6)
'''


def _run_interpreted(script: str, what: str) -> None:
    """Run a check script in a fresh process under Triton's interpreter (it must be set
    before triton is imported). The script collects failed checks in ``fails``; the runner
    appends the line that prints 'FAILED: none' when every check passed."""
    pytest.importorskip("triton", reason="Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = textwrap.dedent(script) + ('\nprint("FAILED:", fails if fails else "none")'
                                        '\nsys.exit(1 if fails else 0)\n')
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed:\n" + out[-6000:]
    assert "FAILED: none" in out


def test_triton_kernels_interpreted():
    _run_interpreted(_KERNEL_CHECKS, "kernel checks")


def test_w8a8_dynamic_cpu_is_unfused_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, generator=g)
    q8 = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    ws, sm = torch.rand(1, 24, generator=g), torch.rand(1, 40, generator=g) + 0.5
    xq, xs = L.quantize_per_token_ref((x.float() / sm).to(x.dtype))
    assert torch.equal(L.linear_w8a8_dynamic(x, q8, ws, smoother=sm),
                       L.linear_w8a8_ref(xq, xs, q8, ws, x.dtype))
    with pytest.raises(ConfigError):
        L.linear_w8a8_dynamic(x, q8, ws, smoother=torch.ones(1, 39))
    with pytest.raises(ConfigError):
        L.linear_w8a8_dynamic(x, q8, ws, act_scale=torch.ones(2))


def test_partials_flag_on_cpu_and_index_rows():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 64, generator=g), torch.randn(8, 64, generator=g)
    # the CPU (reference) path never splits K: partials=True still returns the tensor
    assert torch.equal(L.linear_fp(x, w, partials=True), L.linear_fp_ref(x, w))
    parts = torch.randn(3, 5, 7, generator=g)                  # S = 3, M = 5, N = 7
    p = L.SplitKPartials(parts, (5,), torch.float16)
    assert p.shape == (5, 7) and torch.equal(p.sum(), parts.sum(0).half())
    idx = torch.tensor([4, 0, 4])
    assert torch.equal(p.index_rows(idx).sum(), p.sum()[idx])
    assert L.summed(p).shape == (5, 7) and L.summed(x) is x
    assert L.partial_slices(p) is parts and L.partial_slices(x).shape == (1, 3, 64)
    with pytest.raises(ConfigError):
        L.SplitKPartials(parts, (1, 5), torch.float16).index_rows(idx)


def test_auto_on_cpu_is_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(8, 64, generator=g)
    assert torch.equal(L.linear_fp(x, w), L.linear_fp_ref(x, w))
    assert torch.equal(L.linear_fp(x, w, impl="torch"), L.linear_fp_ref(x, w))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ConfigError):
            L.linear_fp(x, w, impl="triton")


