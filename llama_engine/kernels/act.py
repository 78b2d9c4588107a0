"""SwiGLU's activation in one kernel: ``silu(gate) * up`` from the stacked ``[gate; up]`` GEMM
output (``model.MLP``), one read of each input and one write, instead of PyTorch's two
elementwise kernels and the intermediate ``silu(gate)`` tensor.

``impl`` as in ``attn.py``: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` (also
on CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (the reference, which is also HF's
arithmetic: silu rounded to the model dtype, then the product). The Triton path rounds once,
after the product in fp32.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from llama_engine.config import ConfigError

from .attn import HAS_TRITON, _use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(X, OUT, W, stride_x, stride_o, BLOCK: tl.constexpr):
        # grid = (rows, cdiv(W, BLOCK)); row r: gate = X[r, :W], up = X[r, W:2W].
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < W
        g = tl.load(X + r * stride_x + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(X + r * stride_x + W + c, mask=m, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(OUT + r * stride_o + c, y.to(OUT.dtype.element_ty), mask=m)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """``[..., 2W]`` (gate then up) -> ``silu(gate) * up`` ``[..., W]`` in the input dtype."""
    if gate_up.shape[-1] % 2:
        raise ConfigError(f"silu_mul: last dim {gate_up.shape[-1]} is not [gate; up] (odd)")
    if not _use_triton(impl, gate_up) or gate_up.dtype == torch.float64:
        return silu_mul_ref(gate_up)
    w2 = gate_up.shape[-1]
    x = gate_up.reshape(-1, w2)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = w2 // 2
    out = torch.empty((x.shape[0], w), dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0]:
        block = 1024 if w >= 1024 else triton.next_power_of_2(w)
        _silu_mul_kernel[(x.shape[0], triton.cdiv(w, block))](x, out, w, x.stride(0),
                                                               out.stride(0), BLOCK=block,
                                                               num_warps=4)
    return out.view(*gate_up.shape[:-1], w)
