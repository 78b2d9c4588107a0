"""Tests of llama_engine/kernels/attn.py: references vs first principles, Triton vs references.

The Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tensors). That variable
must be set before triton is first imported in a process, so the kernel checks run in a
subprocess (``python tests/test_kernels_attn.py <check>``) whose result comes back as JSON.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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


CHECKS = {"norms": _check_norms, "rope": _check_rope, "write": _check_write,
          "decode": _check_decode}


def _run_in_interpreter(name: str) -> list:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), name], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"check {name} crashed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _need_triton():
    try:
        import triton  # noqa: F401
    except Exception:
        pytest.skip("triton is not installed; the interpreter checks need it")


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_vs_ref(name):
    _need_triton()
    fails = _run_in_interpreter(name)
    assert not fails, "\n".join(fails)


# =============================================================================================
# Reference checks (plain torch, in process)
# =============================================================================================
def test_rms_norm_ref_matches_hf_formula():
    from llama_engine.kernels import attn as A
    x = torch.randn(3, 32).half()
    w = torch.rand(32).half() + 0.5
    hs = x.float()
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)
    expect = w * hs.to(torch.float16)  # HF LlamaRMSNorm.forward
    assert torch.equal(A.rms_norm(x, w, 1e-6), expect)


def test_rope_ref_matches_complex_rotation():
    """Rotate-half RoPE == multiplying (x_i, x_{i+D/2}) as a complex number by e^{i pos θ_i}."""
    from llama_engine.kernels import attn as A
    N, H, Hkv, D = 6, 4, 2, 32
    q, k = torch.randn(N, H, D, dtype=torch.float64), torch.randn(N, Hkv, D, dtype=torch.float64)
    cos, sin, ang = _rope_tables(100, D)
    pos = torch.tensor([0, 1, 5, 17, 63, 99])

    qo, ko = A.apply_rope(q.float(), k.float(), pos, cos, sin)
    assert _rel(qo, _complex_rope(q, ang[pos])) < 1e-6
    assert _rel(ko, _complex_rope(k, ang[pos])) < 1e-6


def test_decode_ref_matches_dense_attention():
    from llama_engine.kernels import attn as A
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
    from llama_engine.kernels import attn as A
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


def test_bad_input_is_config_error():
    from llama_engine.config import ConfigError
    from llama_engine.kernels import attn as A
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


if __name__ == "__main__":  # interpreter subprocess: python tests/test_kernels_attn.py <check>
    from llama_engine.kernels import attn as _A
    print(json.dumps(CHECKS[sys.argv[1]](_A)))
