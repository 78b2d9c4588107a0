"""SwiGLU's activation in one kernel: ``silu(gate) * up`` from the stacked ``[gate; up]`` GEMM
output (``model.MLP``), one read of each input and one write, instead of PyTorch's two
elementwise kernels and the intermediate ``silu(gate)`` tensor.

``impl`` as in ``attn.py``: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` (also
on CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (the reference, which is also HF's
arithmetic: silu rounded to the model dtype, then the product). The Triton path rounds once,
after the product in fp32. The input may be the ``[gate; up]`` linear's ``SplitKPartials``:
the kernel sums its fp32 slices as it loads them, saving the linear's reduction launch.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from llama_engine.config import ConfigError

from . import pdl
from .attn import HAS_TRITON, _use_triton
from .linear import partial_slices, summed

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .linear import _load_summed
    from .pdl import wait_then_release

    @triton.jit
    def _swiglu_load(ptrs, mask, W, stride_s, S: tl.constexpr, dtype: tl.constexpr):
        """silu(gate) * up of [gate; up] rows: gate at ptrs, up at ptrs + W (each summed over S
        split-K slices and rounded to dtype, as the linear's output), the product in fp32,
        rounded once to dtype."""
        g = _load_summed(ptrs, mask, stride_s, S, dtype).to(tl.float32)
        u = _load_summed(ptrs + W, mask, stride_s, S, dtype).to(tl.float32)
        return (g / (1.0 + tl.exp(-g)) * u).to(dtype)

    @triton.jit
    def _silu_mul_kernel(X, OUT, W, stride_s, stride_x, stride_o, S: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
        # grid = (rows, cdiv(W, BLOCK)); X [S, rows, 2W] (S split-K partials, summed here);
        # row r: gate = X[:, r, :W], up = X[:, r, W:2W].
        wait_then_release(PDL)
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < W
        y = _swiglu_load(X + r * stride_x + c, m, W, stride_s, S, OUT.dtype.element_ty)
        tl.store(OUT + r * stride_o + c, y, mask=m)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up, *, impl: str = "auto") -> torch.Tensor:
    """``[..., 2W]`` (gate then up; a tensor or a linear's ``SplitKPartials``) ->
    ``silu(gate) * up`` ``[..., W]`` in the input dtype."""
    if gate_up.shape[-1] % 2:
        raise ConfigError(f"silu_mul: last dim {gate_up.shape[-1]} is not [gate; up] (odd)")
    x = partial_slices(gate_up)                                    # [S, M, 2W]
    if not _use_triton(impl, x) or gate_up.dtype == torch.float64:
        return silu_mul_ref(summed(gate_up))
    w = gate_up.shape[-1] // 2
    out = torch.empty((x.shape[1], w), dtype=gate_up.dtype, device=x.device)
    if x.shape[1]:
        block = 1024 if w >= 1024 else triton.next_power_of_2(w)
        _silu_mul_kernel[(x.shape[1], triton.cdiv(w, block))](x, out, w, x.stride(0),
                                                               x.stride(1), out.stride(0),
                                                               S=x.shape[0], BLOCK=block,
                                                               num_warps=4,
                                                               **pdl.launch_kw(x))
    return out.view(*gate_up.shape[:-1], w)
