"""Programmatic dependent launch (PDL, Hopper and later) for the decode-step kernels.

A decode step at batch 1 is ~9 kernels per layer, most of them short (a TP=2 LLaMA-13B
layer on 2x H200: ~107 us for 9 kernels), and every kernel boundary costs a launch and a
drain of the GPU. With PDL a kernel is launched *before* its predecessor in the stream has
finished: its programs become resident and block in ``griddepcontrol.wait`` until the
predecessor has completed and its writes are visible, so the launch and the ramp-up overlap
the predecessor's tail:

* every kernel here launched with PDL waits (``wait_then_release``) first, before it touches
  any memory: activations, outputs, the KV cache, the all-reduce's buffers and counters;
* right after its wait it lets its own successor launch (``griddepcontrol.launch_dependents``):
  so one successor at most waits beside a running grid, and its programs only take the room
  the running grid has left (that grid's programs are all resident by then: none of them
  waits for a slot a waiting successor holds).

Kernels launched by PyTorch (cuBLAS, copies, sampling) are ordinary launches: a PDL kernel
after one of them overlaps only its tail and still waits for it; an ordinary kernel after a
PDL kernel starts when that kernel has completed, which implies its own predecessors have
(each waited on its predecessor). Under CUDA-graph capture the launch attribute becomes a
programmatic edge of the graph.

Measured (tools/gpu_pdl_sweep.py, LLaMA-13B fp16 batch 1, 2x H200, 2026-11-26, off -> on):
one GPU 143.2 -> 146.9 tok/s and TP=2 222.6 -> 233.6 in one call, 143.0 -> 149.3 and 223.7 ->
234.6 in another (docs/perf-notes.md, run 7). Having the early
GEMVs also prefetch their first weight bytes into L2 (``cp.async.bulk.prefetch.L2``) before
waiting did not help: 2 MB per GEMV changed nothing, 8-32 MB were slower (TP=2: 226.6, 214.8,
193.7), so it is not here.

``set_mode``: ``auto`` (default: on for CUDA devices of compute capability >= 9), ``off``,
``on`` (still only where the device supports it: NVIDIA sm90+, a Triton with
``griddepcontrol``, not the interpreter). The engine passes its run-time option here; graphs
captured before a change keep the launches they captured. Kernels launched by
PyTorch, and ours outside decode (the tiled GEMM, the activation quantizers), launch plainly.

Imports: ``llama_engine.config``, ``common``.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from .common import HAS_TRITON, INTERPRET as _INTERPRET, tl, triton

try:  # griddepcontrol in Triton: 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = HAS_TRITON
except Exception:  # pragma: no cover - depends on the install
    HAS_GDC = False
_MODES = ("auto", "on", "off")
_mode = "auto"
_capable: dict = {}


def set_mode(mode: str) -> None:
    """Switch PDL (``auto`` / ``on`` / ``off``) for later launches."""
    global _mode
    if mode not in _MODES:
        raise ConfigError(f"PDL mode must be one of {', '.join(_MODES)}, got {mode!r}")
    _mode = mode


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL."""
    if _mode == "off" or not HAS_GDC or not t.is_cuda or _INTERPRET or torch.version.hip:
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _capable.get(idx)
    if ok is None:
        ok = _capable[idx] = torch.cuda.get_device_capability(idx) >= (9, 0)
    return ok


def launch_kw(t: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch: the kernel's constexpr ``PDL`` and, when on,
    Triton's ``launch_pdl``. A kernel launched with PDL must call ``wait_then_release(PDL)``
    before touching anything an earlier kernel wrote."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}


if HAS_GDC:
    @triton.jit
    def wait_then_release(PDL: tl.constexpr):
        """Wait for the predecessor grid (its writes visible), then let the successor launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
elif HAS_TRITON:  # pragma: no cover - an older Triton: PDL is never on (``enabled``)
    @triton.jit
    def wait_then_release(PDL: tl.constexpr):
        pass
