"""``PartialSum``: a layer output whose sum is not yet taken -- the one deferred layer-output
type of the engine.

A linear layer's output may leave its last reduction to the kernel that consumes it, which
sums while it loads its input instead of paying a launch for the sum (at batch 1 a launch
costs as much as the sum itself). Two sums can be outstanding:

* **split-K**: the skinny GEMV split K over programs and wrote fp32 partial products
  ``parts[S, M, N]``; the output is ``sum_s parts[s]`` (in order, fp32) rounded to ``dtype``;
* **over tensor-parallel ranks**: a row-parallel linear's local product still needs its
  all-reduce (``pending``: the object that performs it, from ``llama_engine.parallel``).

Who makes one: the linear ops and modules called with ``partials=True`` (a skinny launch that
split K), and ``parallel.RowParallelLinear`` (``with_pending``). Who consumes one:
``add_rms_norm(x, residual, ...)`` (the residual add + RMSNorm; with ``pending``, the one-shot
all-reduce fused in, vLLM's ``RMSNorm(x, residual)`` idea) and ``silu_mul``. Both give the
same bits as on the summed tensor. ``x[idx]`` selects rows (the logits rows) before any sum.
Anything else calls ``.sum()``. The network code never branches on it: it hands each layer
output to the next op.

``pending`` is duck-typed (so this module needs nothing from ``parallel``):
``pending.all_reduce(t)`` sums a tensor over ranks, ``pending.add_rms_norm(slices, residual,
weight, eps)`` is the fused all-reduce + add + RMSNorm on the slices ``[S, M, N]``.

Imports: ``llama_engine.config`` only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import ConfigError


@dataclass(frozen=True, eq=False)
class PartialSum:
    """``parts[S, M, N]`` (fp32 split-K slices, or one slice of the output itself) whose sum
    over S, rounded to ``dtype`` and all-reduced over ranks when ``pending`` is set, is the
    output ``[*lead, N]`` (M = prod(lead))."""
    parts: torch.Tensor
    lead: tuple
    dtype: torch.dtype
    pending: Optional[Any] = None

    @staticmethod
    def of(x) -> "PartialSum":
        """A tensor ``[..., N]`` as one slice (no copy when its last dim is contiguous)."""
        if isinstance(x, PartialSum):
            return x
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        return PartialSum(x2.unsqueeze(0), tuple(x.shape[:-1]), x.dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.lead, self.parts.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def is_cuda(self) -> bool:
        return self.parts.is_cuda

    def with_pending(self, pending) -> "PartialSum":
        """The same partials with an all-reduce over ranks still owed (``pending``)."""
        return dataclasses.replace(self, pending=pending)

    def sum(self) -> torch.Tensor:
        """The output tensor ``[*lead, N]`` in ``dtype``: the sum over S in fp32, the cast, then
        the all-reduce if one is pending."""
        out = self.parts.sum(0).to(self.dtype).reshape(self.shape)
        return out if self.pending is None else self.pending.all_reduce(out.contiguous())

    def __getitem__(self, idx: torch.Tensor) -> "PartialSum":
        """Rows ``idx`` of a 2-D output ``[M, N]``, still unsummed (one gather, as indexing the
        tensor would be)."""
        if len(self.lead) != 1:
            raise ConfigError(f"PartialSum row selection needs a 2-D output, got {self.shape}")
        p = self.parts[:, idx]                                   # [S, *idx.shape, N]
        return PartialSum(p.reshape(p.shape[0], -1, p.shape[-1]), tuple(p.shape[1:-1]),
                          self.dtype, self.pending)


def total(x) -> torch.Tensor:
    """A tensor as it is, or the sum of a PartialSum (the consumers' torch paths)."""
    return x.sum() if isinstance(x, PartialSum) else x


def slices(x) -> torch.Tensor:
    """Input of a consumer kernel: ``[S, M, N]`` with unit stride along N (a tensor is one
    slice). Kernels sum the slices with ``common.load_summed``. No pending all-reduce here."""
    p = PartialSum.of(x)
    if p.pending is not None:
        raise ConfigError("a pending all-reduce is summed by add_rms_norm, not by this op")
    return p.parts
