"""Tests of llama_engine/kernels/linear.py: the plain-PyTorch references, int4 packing, the
activation quantizers (in-process, plain torch), and every Triton kernel run under Triton's CPU
interpreter (TRITON_INTERPRET=1, set by conftest.py) against the references, one test per
(op, dtype, shape, launch config) so that each failure is named.
"""
import pytest
import torch

from conftest import interpreter_on
from llama_engine.config import ConfigError
from llama_engine.kernels import linear as L
from llama_engine.kernels import linear_kernels as LK
from llama_engine.kernels import reference as R
from llama_engine.kernels.partial import PartialSum, slices, total
from llama_engine.kernels.tuning import GemmCfg, SkinnyCfg

needs_interpreter = pytest.mark.skipif(
    not interpreter_on(), reason="the kernel checks run under TRITON_INTERPRET=1 (no CUDA here "
    "sets it in conftest.py); on a GPU run tests/test_gpu.py")


# ---------------------------------------------------------------------------------------------
# References and packing (plain torch)
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


def test_w8a8_dynamic_cpu_is_unfused_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, generator=g)
    q8 = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    ws, sm = torch.rand(1, 24, generator=g), torch.rand(1, 40, generator=g) + 0.5
    xq, xs = R.quantize_per_token_ref((x.float() / sm).to(x.dtype))
    assert torch.equal(L.linear_w8a8_dynamic(x, q8, ws, smoother=sm),
                       R.linear_w8a8_ref(xq, xs, q8, ws, x.dtype))
    with pytest.raises(ConfigError):
        L.linear_w8a8_dynamic(x, q8, ws, smoother=torch.ones(1, 39))
    with pytest.raises(ConfigError):
        L.linear_w8a8_dynamic(x, q8, ws, act_scale=torch.ones(2))


def test_partials_flag_on_cpu_and_row_selection():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 64, generator=g), torch.randn(8, 64, generator=g)
    # the CPU (reference) path never splits K: partials=True still returns the tensor
    assert torch.equal(L.linear_fp(x, w, partials=True), R.linear_fp_ref(x, w))
    parts = torch.randn(3, 5, 7, generator=g)                  # S = 3, M = 5, N = 7
    p = PartialSum(parts, (5,), torch.float16)
    assert p.shape == (5, 7) and torch.equal(p.sum(), parts.sum(0).half())
    idx = torch.tensor([4, 0, 4])
    assert torch.equal(p[idx].sum(), p.sum()[idx])
    assert total(p).shape == (5, 7) and total(x) is x
    assert slices(p) is parts and slices(x).shape == (1, 3, 64)
    with pytest.raises(ConfigError):
        PartialSum(parts, (1, 5), torch.float16)[idx]


def test_auto_on_cpu_is_reference_even_under_the_interpreter():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(8, 64, generator=g)
    assert torch.equal(L.linear_fp(x, w), R.linear_fp_ref(x, w))
    assert torch.equal(L.linear_fp(x, w, impl="torch"), R.linear_fp_ref(x, w))
    if not interpreter_on():
        with pytest.raises(ConfigError):
            L.linear_fp(x, w, impl="triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ---------------------------------------------------------------------------------------------
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (M, N, K) with N, K not powers of two; K = 160 with 32-wide blocks splits unevenly.
SHAPES = [(1, 40, 96), (3, 24, 160), (17, 40, 64)]
CFGS = {"dot": SkinnyCfg("dot", 16, 32, 1), "dot-split2": SkinnyCfg("dot", 16, 32, 2),
        "fma": SkinnyCfg("fma", 8, 32, 1), "fma-split3": SkinnyCfg("fma", 4, 64, 3),
        "gemm": GemmCfg(16, 16, 32, 2, 4, 1)}
OPS = ("fp", "w8a16", "w4a16-pc", "w4a16-g32", "w8a8-token", "w8a8-tensor")


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out, ref, tol, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(out.float()).all()), f"{what}: non-finite output"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: rel_err {err:.2e} > {tol:.0e}"


def run_op(op: str, x, N: int, dt, g, **kw):
    """(op's output, its reference) on random weights of N rows (K = x's last dim)."""
    K = x.shape[-1]
    if op == "fp":
        w = (torch.randn(N, K, generator=g) * 0.1).to(dt)
        return L.linear_fp(x, w, **kw), R.linear_fp_ref(x, w)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    if op == "w8a16":
        s8 = (torch.rand(N, generator=g) * 0.01 + 1e-3).to(dt)
        return L.linear_w8a16(x, q8, s8, **kw), R.linear_w8a16_ref(x, q8, s8)
    if op.startswith("w4a16"):
        G = K if op.endswith("pc") else int(op.split("-g")[1])
        q4 = R.pack_int4_ref(torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=g))
        s4 = (torch.rand(K // G, N, generator=g) * 0.01 + 1e-3).to(dt)
        return L.linear_w4a16(x, q4, s4, G, **kw), R.linear_w4a16_ref(x, q4, s4, G)
    xq, xs = R.quantize_per_token_ref(x)
    ws = torch.rand(1, N, generator=g) * 0.01
    if op == "w8a8-tensor":
        xs, ws = xs.reshape(-1)[:1].reshape(1, 1), ws[:, :1]
    return (L.linear_w8a8(xq, xs, q8, ws, dt, **kw), R.linear_w8a8_ref(xq, xs, q8, ws, dt))


def _kernel_cases():
    for dname, dt in DTYPES.items():
        for M, N, K in SHAPES:
            for cname, cfg in CFGS.items():
                # The interpreter's tl.dot is wrong for bfloat16 operands (it multiplies the
                # raw bits), so bfloat16 runs only the kernels without tl.dot; the GPU check
                # covers bf16 there.
                if dt == torch.bfloat16 and cname.startswith(("dot", "gemm")):
                    continue
                for op in OPS:
                    yield pytest.param(op, dt, (M, N, K), cfg,
                                       id=f"{op}-{dname}-M{M}N{N}K{K}-{cname}")


@needs_interpreter
@pytest.mark.parametrize("op,dt,shape,cfg", list(_kernel_cases()))
def test_linear_kernel_matches_reference(op, dt, shape, cfg):
    M, N, K = shape
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(dt)
    out, ref = run_op(op, x, N, dt, g, impl="triton", _cfg=cfg)
    assert_close(out, ref, TOL[dt])


@needs_interpreter
@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", [SkinnyCfg("dot", 16, 128, 1), SkinnyCfg("dot", 16, 64, 2)],
                         ids=["bk128", "bk64-split2"])
def test_w4a16_several_groups_per_tile_and_leading_dims(dt, cfg):
    """Grouped int4 with BLOCK_K > G: the weights are scaled in registers."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 128, generator=g).to(dt)
    out, ref = run_op("w4a16-g32", x, 24, dt, g, impl="triton", _cfg=cfg)
    assert_close(out, ref, TOL[dt])


@needs_interpreter
@pytest.mark.parametrize("M", [1, 5, 70])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_default_config_choice(M, dt):
    """The launch the tables / heuristics pick (skinny for M <= 64, the tiled GEMM above)."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 128, generator=g).to(dt)
    out, ref = run_op("w4a16-g32", x, 24, dt, g, impl="triton")
    assert_close(out, ref, TOL[dt])


SPLITS = {"dot-S2": (SkinnyCfg("dot", 16, 32, 2), 2), "fma-S3": (SkinnyCfg("fma", 8, 32, 3), 3),
          "dot-S4": (SkinnyCfg("dot", 32, 32, 4), 4), "dot-S1": (SkinnyCfg("dot", 16, 32, 1), 1)}


@needs_interpreter
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("op", ["fp", "w8a16", "w4a16-g32", "w8a8-token"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_partials_are_the_unsummed_split_k_slices(split, op, dt):
    """partials=True: a launch that split K returns a PartialSum [S, M, N] whose .sum() is the
    reduced output bit for bit; without a split (and with partials=False) the tensor."""
    cfg, S = SPLITS[split]
    M, N, K = 3, 40, 256                                # 8 blocks of 32: S = 2, 3 (uneven), 4
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, M, K, generator=g).to(dt)       # leading dims [2, M]
    p, _ = run_op(op, x, N, dt, torch.Generator().manual_seed(8), impl="triton", _cfg=cfg,
                  partials=True)
    t, ref = run_op(op, x, N, dt, torch.Generator().manual_seed(8), impl="triton", _cfg=cfg)
    assert isinstance(t, torch.Tensor)
    if S == 1:
        assert isinstance(p, torch.Tensor) and torch.equal(p, t)
    else:
        assert isinstance(p, PartialSum) and p.parts.shape == (S, 2 * M, N)
        assert p.parts.dtype == torch.float32 and p.shape == t.shape and p.dtype == dt
        assert torch.equal(p.sum(), t)
    assert_close(t, ref, TOL[dt])


@needs_interpreter
@pytest.mark.parametrize("dt", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("M,K", [(1, 100), (3, 4096), (2, 8200)],
                         ids=["M1K100", "M3K4096", "M2K8200-two-pass"])
def test_activation_quantizers(dt, M, K):
    """Error <= scale / 2 elementwise, scales equal to the reference, q within one level."""
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(M, K, generator=g) * 3).to(dt)
    x[0, :7] = 0
    if M > 1:
        x[1] = 0                                       # all-zero row
    q, s = L.quantize_per_token(x, impl="triton")
    qr, sr = R.quantize_per_token_ref(x)
    xf = x.float()
    assert q.dtype == torch.int8 and s.shape == (M, 1)
    assert bool(((q.float() * s - xf).abs() <= s / 2 * (1 + 1e-5) + 1e-12).all())
    assert torch.allclose(s, sr, rtol=1e-6, atol=0)
    assert int((q.int() - qr.int()).abs().max()) <= 1
    ts = torch.tensor([[float(xf.abs().max()) / 100]])         # some values clamp
    qt = L.quantize_per_tensor(x, ts, impl="triton")
    qtr = R.quantize_per_tensor_ref(x, ts)
    sc = float(ts)
    inside = (xf / sc).abs() <= 127
    assert bool(((qt.float() * sc - xf).abs()[inside] <= sc / 2 * (1 + 1e-5)).all())
    assert bool((qt[~inside].abs() == 127).all())
    assert int((qt.int() - qtr.int()).abs().max()) <= 1


@needs_interpreter
@pytest.mark.parametrize("xs_row,ws_col", [(True, True), (False, True), (True, False)],
                         ids=["per-token-per-channel", "per-tensor-x", "per-tensor-w"])
def test_w8a8_int_mm_epilogue_kernel(xs_row, ws_col):
    """The epilogue kernel run after torch._int_mm on CUDA: out = acc * x_scale * w_scale."""
    M, N = 5, 40
    g = torch.Generator().manual_seed(9)
    acc = torch.randint(-100000, 100000, (M, N), dtype=torch.int32, generator=g)
    xs, ws = torch.rand(M, generator=g), torch.rand(N, generator=g)
    xs_, ws_ = (xs if xs_row else xs[:1]), (ws if ws_col else ws[:1])
    out = torch.empty(M, N, dtype=torch.float32)
    LK._int32_scale_kernel[(1, 2)](acc, xs_, ws_, out, M, N, XS_ROW=xs_row, WS_COL=ws_col,
                                   BLOCK_M=8, BLOCK_N=32)
    want = acc.double() * xs_.double().reshape(-1, 1) * ws_.double().reshape(1, -1)
    assert_close(out, want, 1e-6)
