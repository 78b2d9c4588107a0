"""llama_engine/kernels/norm.py's SwiGLU activation ``silu_mul`` (Triton in-process under
TRITON_INTERPRET=1, set by conftest.py without a GPU) against PyTorch, and its reference.
RMSNorm / add_rms_norm are checked in test_kernels_attn.py with the other row kernels."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import interpreter_on
from llama_engine.config import ConfigError
from llama_engine.kernels import norm
from llama_engine.kernels.partial import PartialSum
from llama_engine.kernels.reference import silu_mul_ref

needs_interpreter = pytest.mark.skipif(
    not interpreter_on(), reason="the kernel checks run under TRITON_INTERPRET=1 (no CUDA here "
    "sets it in conftest.py); on a GPU run tests/test_gpu.py")


@needs_interpreter
@pytest.mark.parametrize("shape,dt", [((3, 2 * 37), torch.float32),
                                      ((5, 2 * 1500), torch.float32),
                                      ((2, 3, 2 * 64), torch.float16),
                                      ((0, 2 * 8), torch.float32)],
                         ids=["odd-width", "over-one-block", "3d-fp16", "zero-rows"])
def test_silu_mul_triton_matches_torch(shape, dt):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dt)
    got = norm.silu_mul(x, impl="triton")
    gate, up = x.float().chunk(2, dim=-1)
    want = (gate * torch.sigmoid(gate) * up).to(dt)   # rounded once, as the kernel does
    assert got.shape == want.shape and got.dtype == dt
    tol = 1e-6 if dt == torch.float32 else 1e-3
    if want.numel():
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        assert err <= tol, f"rel err {err:.2e}"


@needs_interpreter
@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("lead,w2,dt", [((3,), 2 * 37, torch.float32),
                                        ((2, 3), 2 * 1100, torch.float16),
                                        ((1,), 2 * 64, torch.float16)],
                         ids=["fp32-3x74", "fp16-2x3x2200", "fp16-1x128"])
def test_silu_mul_sums_split_k_partials(S, lead, w2, dt):
    """The [gate; up] linear's split-K partials: bit for bit the result on their in-order fp32
    sum rounded to the model dtype (what the linear's own reduction stores)."""
    g = torch.Generator().manual_seed(S)
    parts = torch.randn(S, math.prod(lead), w2, generator=g) * 2
    total = parts[0].clone()
    for s in range(1, S):
        total += parts[s]
    x = total.to(dt).view(*lead, w2)
    got = norm.silu_mul(PartialSum(parts, lead, dt), impl="triton")
    assert got.shape == (*lead, w2 // 2)
    assert torch.equal(got, norm.silu_mul(x, impl="triton"))
    if dt == torch.float32:
        assert torch.allclose(got, silu_mul_ref(x), atol=1e-5)


@needs_interpreter
def test_silu_mul_strided_rows():
    big = torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(1))[::2]
    assert torch.allclose(norm.silu_mul(big, impl="triton"), silu_mul_ref(big), atol=1e-6)


def test_silu_mul_reference_is_hf_arithmetic_and_rejects_odd_width():
    x = torch.randn(4, 2 * 9, dtype=torch.float16)
    gate, up = x[:, :9], x[:, 9:]
    assert torch.equal(norm.silu_mul(x), torch.nn.functional.silu(gate) * up)  # CPU: torch
    with pytest.raises(ConfigError, match="not \\[gate; up\\]"):
        norm.silu_mul(torch.randn(2, 7))
