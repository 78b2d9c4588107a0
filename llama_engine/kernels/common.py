"""What every kernel module shares: whether Triton is there, which implementation an op runs
(``impl``), and the ``@triton.jit`` loader that sums split-K slices.

``impl`` of every public op: ``"auto"`` (Triton on CUDA tensors, the plain-PyTorch reference
elsewhere: the CPU path), ``"triton"`` (also on CPU tensors when Triton interprets,
``TRITON_INTERPRET=1``: how the tests check the kernels) or ``"torch"`` (the reference, or
on CUDA the best plain-PyTorch path where the op has one).

Imports: ``llama_engine.config``, ``llama_engine.envs``.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..envs import interpreting

try:  # Triton is optional: without it every op runs its torch path.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = tl = libdevice = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")
INTERPRET = interpreting()   # Triton decided it when it decorated the kernels


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ConfigError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Whether an op called with ``impl`` on ``tensors`` runs its Triton kernel: the one rule
    of every kernel module."""
    check_impl(impl)
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise ConfigError("impl='triton' but Triton is not installed")
        if not INTERPRET and not all(t.is_cuda for t in tensors):
            raise ConfigError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if HAS_TRITON:
    @triton.jit
    def load_summed(ptrs, mask, stride_s, S: tl.constexpr, dtype: tl.constexpr):
        """sum_s x[s] at ptrs + s * stride_s (fp32 split-K partials, added in order), rounded to
        dtype: the linear's output. S = 1 is a plain load of the tensor itself."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        for s in tl.static_range(1, S):
            x += tl.load(ptrs + s * stride_s, mask=mask, other=0.0)
        return x.to(dtype)
