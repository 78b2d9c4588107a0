"""llama_engine/kernels/pdl.py: the PDL mode, and the decode kernels compiled
for an H100 (sm_90, with Triton's bundled ptxas; no GPU needed) with PDL on: each must wait
for its predecessor (griddepcontrol.wait) before its first global memory access, release its
successor right after, and contain neither without PDL. On GPUs, tools/gpu_pdl_sweep.py checks
that the greedy tokens do not change with PDL and times it."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from llama_engine.envs import interpreting  # noqa: E402

MEM = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st|atom|red|cp\.async)\.\S*global")


# Compiling for sm_90 needs Triton's real JIT functions, which the interpreter (on in this
# process when conftest.py found no GPU) replaced when the kernels were decorated: then the
# compile tests run once in a fresh pytest process without it, and report its failures here.
INTERPRETED = interpreting()


@pytest.mark.skipif(not INTERPRETED, reason="the compile tests run in this process")
def test_compile_checks_in_a_process_without_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]


def test_pdl_mode_is_validated_and_off_without_a_gpu():
    from llama_engine.config import ConfigError
    from llama_engine.kernels import pdl
    with pytest.raises(ConfigError, match="PDL mode must be one of"):
        pdl.set_mode("1")
    old = pdl._mode
    try:
        pdl.set_mode("on")
        # CPU tensors (and the interpreter) never launch with PDL: no launch_pdl option
        assert pdl.launch_kw(torch.zeros(1)) == {"PDL": False}
    finally:
        pdl.set_mode(old)


def _compile_sm90(fn, ptrs: dict, constexprs: dict, floats=(), num_warps=4):
    """PTX of ``fn`` for sm_90 with PDL on; pointer args typed by ``ptrs``, the rest i32."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "fp32" if n in floats else "i32")
           for n in fn.arg_names}
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"launch_pdl": constexprs.get("PDL", False),
                                    "num_warps": num_warps})
    except FileNotFoundError as e:    # pragma: no cover - a Triton install without ptxas
        pytest.skip(f"Triton cannot compile for CUDA here (no ptxas): {e}")
    return c.asm["ptx"].splitlines()


def _check_order(ptx: list, what: str) -> None:
    waits = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
    releases = [i for i, line in enumerate(ptx) if "griddepcontrol.launch_dependents" in line]
    mem = [i for i, line in enumerate(ptx) if MEM.match(line)]
    assert waits and releases, f"{what}: no griddepcontrol with PDL on"
    assert mem, f"{what}: no global memory access found (the pattern is stale)"
    assert waits[0] < releases[0] < mem[0], (
        f"{what}: first wait at line {waits[0]}, release at {releases[0]}, first global "
        f"access at {mem[0]}: {ptx[mem[0]].strip()}")


def _kernels():
    from llama_engine.kernels import attn_kernels as attn
    from llama_engine.kernels import comm
    from llama_engine.kernels import linear_kernels as L
    from llama_engine.kernels import norm_kernels
    skinny = dict(WKIND=0, GROUP=1, XS_ROW=False, WS_COL=False, BLOCK_M=8, BLOCK_N=32,
                  BLOCK_K=128, EVEN_K=True, ITERS_C=0, CVT=0)
    gemv_ptrs = {"x_ptr": "*fp16", "w_ptr": "*fp16", "s_ptr": "*fp16", "xs_ptr": "*fp16",
                 "out_ptr": "*fp16"}
    decode_ptrs = dict({k: "*fp16" for k in "Q KC VC KS VS OUT KN VN".split()}, BT="*i32",
                       CL="*i32", WS="*fp32", POS="*i64", SLOT="*i64", COS="*fp32",
                       SIN="*fp32")
    decode = dict(G=1, G_PAD=16, HKV=40, D=128, BLOCK_N=64, BLOCK_SIZE=16, SPLIT=True,
                  USE_DOT=True, IEEE=False, MAGIC=False, QUANT=False, NUM_STAGES=2,
                  INTERPRET=False)
    return {
        "skinny dot (fp16)": (L._skinny_dot_kernel, gemv_ptrs, dict(skinny, DOT_PREC="tf32"),
                              ()),
        "skinny fma (int8)": (L._skinny_fma_kernel, dict(gemv_ptrs, w_ptr="*i8"),
                              dict(skinny, WKIND=1, BLOCK_N=8, BLOCK_K=512, CVT=1), ()),
        "split-K reduce": (L._splitk_reduce_kernel, {"p_ptr": "*fp32", "out_ptr": "*fp16"},
                           dict(S=4, BLOCK=1024), ()),
        "add_rms_norm": (norm_kernels._rms_norm_kernel,
                         {k: "*fp16" for k in "X R W OUT RES_OUT".split()},
                         dict(S=1, HAS_RES=True, BLOCK_D=8192), ("eps",)),
        "silu_mul": (norm_kernels._silu_mul_kernel, {"X": "*fp16", "OUT": "*fp16"},
                     dict(S=1, BLOCK=1024), ()),
        "decode merge": (attn._decode_merge_kernel, {"OUT": "*fp16", "WS": "*fp32", "CL": "*i32"},
                         dict(H=40, D=128, S_PAD=8), ()),
        "rope + KV write": (
            attn._rope_kv_kernel,
            dict({k: "*fp16" for k in "Q K V COS SIN QO KO KC VC KS VS".split()},
                 POS="*i64", SLOT="*i64"),
            dict(H=40, HKV=40, HALF=64, ROPE=True, DO_Q=True, STORE_K=False, WRITE_CACHE=True,
                 QUANT=False, BLOCK_H=64, BLOCK_HK=64, BLOCK_HALF=64, BLOCK_SIZE=16), ()),
        "decode attention": (
            attn._decode_attn_kernel, decode_ptrs,
            dict(decode, ROPE=False), ("qk_scale",)),
        "decode attention with RoPE + KV write": (
            attn._decode_attn_kernel, decode_ptrs,
            dict(decode, ROPE=True), ("qk_scale",)),
        "one-shot all-reduce": (
            comm._one_shot_all_reduce_kernel,
            {"X": "*fp16", "OUT": "*fp16", "BUFS": "*i64", "PADS": "*i64", "EPOCHS": "*i32"},
            dict(ITERS=1, WORLD=2, SYNC=True, ASM=True, F64=False, BLOCK=1024), ()),
        "one-shot all-gather": (
            comm._one_shot_all_gather_kernel,
            {"X": "*fp16", "OUT": "*fp16", "BUFS": "*i64", "PADS": "*i64", "EPOCHS": "*i32"},
            dict(ITERS=1, WORLD=2, SYNC=True, ASM=True, BLOCK=1024), ()),
        "one-shot all-reduce + norm": (
            comm._one_shot_add_rms_norm_kernel,
            {"X": "*fp16", "R": "*fp16", "W": "*fp16", "OUT": "*fp16", "RES_OUT": "*fp16",
             "BUFS": "*i64", "PADS": "*i64", "EPOCHS": "*i32"},
            dict(S=1, ITERS=1, WORLD=2, SYNC=True, ASM=True, BLOCK_D=8192), ("eps",)),
    }


@pytest.mark.skipif(INTERPRETED, reason="interpreted kernels: checked in a fresh process")
def test_every_pdl_kernel_is_checked():
    """Every kernel that takes the PDL constexpr is in the list compiled below."""
    from triton.runtime.jit import JITFunction

    from llama_engine.kernels import attn_kernels, comm, common, linear_kernels, norm_kernels
    with_pdl = {v for m in (attn_kernels, comm, common, linear_kernels, norm_kernels)
                for v in vars(m).values()
                if isinstance(v, JITFunction) and "PDL" in v.arg_names
                and v.fn.__name__ != "wait_then_release"}
    assert with_pdl == {fn for fn, *_ in _kernels().values()}


@pytest.mark.skipif(INTERPRETED, reason="interpreted kernels: compiled in a fresh process")
@pytest.mark.parametrize("name", list(_kernels()))
def test_decode_kernels_wait_before_touching_memory_sm90(name):
    fn, ptrs, ce, floats = _kernels()[name]
    _check_order(_compile_sm90(fn, ptrs, dict(ce, PDL=True), floats), name)
    off = _compile_sm90(fn, ptrs, dict(ce, PDL=False), floats)
    assert not any("griddepcontrol" in line for line in off), f"{name}: griddepcontrol without PDL"
