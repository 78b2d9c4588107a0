"""llama_engine/kernels/act.py: the fused SwiGLU activation (Triton under TRITON_INTERPRET=1
in a subprocess, since the variable must be set before triton is imported) against PyTorch."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from conftest import run_interpreted_json  # noqa: E402


def _check() -> list:
    from llama_engine.kernels import act
    fails = []
    g = torch.Generator().manual_seed(0)
    # odd widths, a width over one block (1024), 3-d input, fp16 and fp32, zero rows
    for shape, dt in (((3, 2 * 37), torch.float32), ((5, 2 * 1500), torch.float32),
                      ((2, 3, 2 * 64), torch.float16), ((0, 2 * 8), torch.float32)):
        x = (torch.randn(shape, generator=g) * 3).to(dt)
        got = act.silu_mul(x, impl="triton")
        gate, up = x.float().chunk(2, dim=-1)
        want = (gate * torch.sigmoid(gate) * up).to(dt)   # rounded once, as the kernel does
        if got.shape != want.shape or got.dtype != dt:
            fails.append(f"{shape} {dt}: shape/dtype {tuple(got.shape)} {got.dtype}")
            continue
        tol = 1e-6 if dt == torch.float32 else 1e-3
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        if want.numel() and err > tol:
            fails.append(f"{shape} {dt}: rel err {err:.2e}")
    # the [gate; up] linear's split-K partials: bit for bit the result on their in-order fp32
    # sum rounded to the model dtype (what the linear's own reduction stores)
    from llama_engine.kernels.linear import SplitKPartials
    for lead, w2, dt in (((3,), 2 * 37, torch.float32), ((2, 3), 2 * 1100, torch.float16),
                         ((1,), 2 * 64, torch.float16)):
        for S in (1, 2, 3):
            parts = torch.randn(S, math.prod(lead), w2, generator=g) * 2
            total = parts[0].clone()
            for s in range(1, S):
                total += parts[s]
            x = total.to(dt).view(*lead, w2)
            got = act.silu_mul(SplitKPartials(parts, lead, dt), impl="triton")
            want = act.silu_mul(x, impl="triton")
            if not torch.equal(got, want) or got.shape != (*lead, w2 // 2):
                fails.append(f"partials S={S} {lead} {w2} {dt}")
            if dt == torch.float32 and not torch.allclose(got, act.silu_mul_ref(x), atol=1e-5):
                fails.append(f"partials S={S} {lead} vs reference")
    # a strided input (every other row of a wider buffer)
    big = torch.randn(6, 2 * 40, generator=g)[::2]
    if not torch.allclose(act.silu_mul(big, impl="triton"), act.silu_mul_ref(big), atol=1e-6):
        fails.append("strided rows")
    return fails


def test_silu_mul_triton_matches_torch():
    assert run_interpreted_json(__file__, "--check", timeout=300) == []


def test_silu_mul_reference_is_hf_arithmetic_and_rejects_odd_width():
    from llama_engine.config import ConfigError
    from llama_engine.kernels import act
    x = torch.randn(4, 2 * 9, dtype=torch.float16)
    gate, up = x[:, :9], x[:, 9:]
    assert torch.equal(act.silu_mul(x), torch.nn.functional.silu(gate) * up)  # CPU: torch path
    with pytest.raises(ConfigError, match="not \\[gate; up\\]"):
        act.silu_mul(torch.randn(2, 7))


if __name__ == "__main__" and sys.argv[1:] == ["--check"]:
    print(json.dumps(_check()))
