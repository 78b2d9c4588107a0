"""RMSNorm, the fused residual add + RMSNorm, and SwiGLU's ``silu(gate) * up``: the ops that
consume a layer's deferred output (``PartialSum``).

* ``add_rms_norm(x, residual, weight, eps)`` -> ``(rms_norm(x + residual), x + residual)``:
  vLLM's ``RMSNorm(x, residual)``. ``x`` may be a ``PartialSum``: its split-K slices are summed
  as the kernel loads them, and a pending tensor-parallel all-reduce runs fused with the norm
  (``PartialSum.pending.add_rms_norm``: kernels/comm.py's one-shot kernel).
* ``silu_mul(gate_up)``: ``[..., 2W]`` (gate then up) -> ``silu(gate) * up``: one read of each
  input, one write, instead of PyTorch's two elementwise kernels; a ``PartialSum`` input is
  summed as it loads. The Triton path rounds once, after the product in fp32; the reference
  is HF's arithmetic (silu rounded to the model dtype, then the product).

``impl`` as everywhere (``common.py``). Kernels: ``norm_kernels.py``; references:
``reference.py``.

Imports: ``common``, ``partial``, ``pdl``, ``reference``, ``norm_kernels``.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from .common import HAS_TRITON, next_pow2, triton
from .common import use_triton as _use_triton
from .partial import PartialSum, slices, total
from .pdl import launch_kw
from .reference import add_rms_norm_ref, rms_norm_ref, silu_mul_ref

if HAS_TRITON:
    from .norm_kernels import _rms_norm_kernel, _silu_mul_kernel


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim (fp32 accumulation), output in ``x.dtype``."""
    if x.shape[-1] != weight.shape[0]:
        raise ConfigError(f"rms_norm: last dim {x.shape[-1]} != weight size {weight.shape[0]}")
    if not _use_triton(impl, x, weight):
        return rms_norm_ref(x, weight, eps)
    D = x.shape[-1]
    x2 = _last_dim_contig(x).reshape(-1, D)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        bd = next_pow2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, 0, x2.stride(0), 0,
                                         out.stride(0), 0, D, float(eps), S=1, HAS_RES=False,
                                         BLOCK_D=bd, num_warps=_norm_warps(bd),
                                         **launch_kw(x2))
    return out.view(x.shape)


def add_rms_norm(x, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``new_residual = x + residual; normed = rms_norm(new_residual)``. ``x`` is a tensor
    or a ``PartialSum``: its split-K slices are summed by the kernel (no reduction launch), its
    pending all-reduce over ranks runs fused with this op."""
    if isinstance(x, PartialSum) and x.pending is not None:
        if _fusable(x, residual, weight):
            return x.pending.add_rms_norm(x.parts, residual, weight, eps)
        x = x.sum()                                # the linear's sum, then the all-reduce
    if x.shape != residual.shape:
        raise ConfigError(f"add_rms_norm: x {tuple(x.shape)} and residual "
                          f"{tuple(residual.shape)} differ")
    if x.shape[-1] != weight.shape[0]:
        raise ConfigError(f"add_rms_norm: last dim {x.shape[-1]} != weight {weight.shape[0]}")
    if not _use_triton(impl, residual, weight):                    # x lives beside residual
        return add_rms_norm_ref(total(x), residual, weight, eps)
    D = x.shape[-1]
    xs = slices(x)                                         # [S, M, D]
    r2 = _last_dim_contig(residual).reshape(-1, D)
    out = torch.empty(r2.shape, dtype=x.dtype, device=r2.device)
    res = torch.empty(r2.shape, dtype=x.dtype, device=r2.device)
    if r2.shape[0]:
        bd = next_pow2(D)
        _rms_norm_kernel[(r2.shape[0],)](xs, r2, weight, out, res, xs.stride(0), xs.stride(1),
                                         r2.stride(0), out.stride(0), res.stride(0), D,
                                         float(eps), S=xs.shape[0], HAS_RES=True, BLOCK_D=bd,
                                         num_warps=_norm_warps(bd), **launch_kw(r2))
    return out.view(x.shape), res.view(x.shape)


def _norm_warps(block_d: int) -> int:
    return 1 if block_d <= 256 else 4 if block_d <= 2048 else 8


def _fusable(x: PartialSum, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused all-reduce + add + norm kernel takes these: rows [M, D] in the
    residual's dtype, residual and weight contiguous."""
    return (len(x.shape) == 2 and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.is_contiguous() and weight.is_contiguous())

def silu_mul(gate_up, *, impl: str = "auto") -> torch.Tensor:
    """``[..., 2W]`` (gate then up; a tensor or a linear's ``PartialSum``) ->
    ``silu(gate) * up`` ``[..., W]`` in the input dtype."""
    if gate_up.shape[-1] % 2:
        raise ConfigError(f"silu_mul: last dim {gate_up.shape[-1]} is not [gate; up] (odd)")
    x = slices(gate_up)                                    # [S, M, 2W]
    if not _use_triton(impl, x) or gate_up.dtype == torch.float64:
        return silu_mul_ref(total(gate_up))
    w = gate_up.shape[-1] // 2
    out = torch.empty((x.shape[1], w), dtype=gate_up.dtype, device=x.device)
    if x.shape[1]:
        block = 1024 if w >= 1024 else triton.next_power_of_2(w)
        _silu_mul_kernel[(x.shape[1], triton.cdiv(w, block))](x, out, w, x.stride(0),
                                                               x.stride(1), out.stride(0),
                                                               S=x.shape[0], BLOCK=block,
                                                               num_warps=4,
                                                               **launch_kw(x))
    return out.view(*gate_up.shape[:-1], w)
