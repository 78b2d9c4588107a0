"""One-shot all-reduce for tensor parallelism's small messages, in one Triton kernel.

A decode step of LLaMA-13B at TP=2 all-reduces 81 tensors of ``batch x 5120`` halves (one
per row-parallel layer, one for the embedding): at batch 1 each is 10 KB, so the cost is the
collective's latency, not its bandwidth. NCCL's ring all-reduce of a small message is several
launches' worth of protocol per call; here each rank instead

1. copies its partial sum into its own *symmetric* buffer (memory every rank of the group
   has mapped: ``torch.distributed._symmetric_memory``, PyTorch's allocator over CUDA's
   virtual-memory IPC -- peer loads and stores over NVLink, no multicast);
2. meets the other ranks at a barrier (flags in the group's signal pads);
3. loads the same slice from every rank's buffer, sums in fp32 (fp64 for fp64), rounds once
   and writes its output -- the same sum in the same rank order on every rank, so all ranks
   hold bit-identical results, as they must for their greedy tokens to agree;
4. meets them again, so that no rank's next call overwrites a buffer a peer is still reading.

Program ``p`` of every rank handles the same slices, so it synchronises only with program
``p`` of the other ranks (one flag per (program, source rank) in each rank's signal pad).
A flag is raised by compare-and-swap 0 -> 1 on the destination's pad (release, system
scope: the program's stores are visible over NVLink before the flag) and lowered by its
owner 1 -> 0 (acquire); a raise spins while the previous flag is still up, so the same
flags serve both barriers and every later call.

PyTorch ships a one-shot all-reduce (``torch.ops.symm_mem.one_shot_all_reduce``) for fp32 and
bf16 only; the engine runs fp16, hence this kernel. Used by ``llama_engine.parallel``
(``LLAMA_ENGINE_TP_ALLREDUCE``); the CPU tests run it under ``TRITON_INTERPRET=1`` with one
rank and, without the barrier, with a peer buffer the test fills.
"""
from __future__ import annotations

import torch

from .attn import HAS_TRITON

BLOCK = 1024        # elements per program per iteration
MAX_PROGRAMS = 32   # programs per call: they must all be resident (they wait for each other's
                    # counterparts on the peers), far below any GPU's SM count
NUM_WARPS = 4

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _raise_flag(flag):
        while tl.atomic_cas(flag, 0, 1, sem="release", scope="sys") != 0:
            pass

    @triton.jit
    def _lower_flag(flag):
        while tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys") != 1:
            pass

    @triton.jit
    def _program_barrier(PADS, pid, rank, WORLD: tl.constexpr):
        # PADS: int64 [WORLD], the address of each rank's signal pad (int32 flags).
        tl.debug_barrier()  # every thread's stores precede the release
        for r in tl.static_range(WORLD):
            pad = tl.load(PADS + r).to(tl.pointer_type(tl.int32))
            _raise_flag(pad + pid * WORLD + rank)
        mine = tl.load(PADS + rank).to(tl.pointer_type(tl.int32))
        for r in tl.static_range(WORLD):
            _lower_flag(mine + pid * WORLD + r)
        tl.debug_barrier()  # every thread's loads follow the acquire

    @triton.jit
    def _one_shot_all_reduce_kernel(X, OUT, BUFS, PADS, n, rank, ITERS: tl.constexpr,
                                    WORLD: tl.constexpr,
                                    SYNC: tl.constexpr, ACC: tl.constexpr,
                                    BLOCK: tl.constexpr):
        # BUFS: int64 [WORLD], the address of each rank's symmetric buffer. Program pid takes
        # blocks pid, pid + grid, ... (ITERS of them).
        pid = tl.program_id(0)
        grid = tl.num_programs(0)
        dt = X.dtype.element_ty
        mine = tl.load(BUFS + rank).to(tl.pointer_type(dt))
        for i in tl.static_range(ITERS):
            offs = (i * grid + pid) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(mine + offs, tl.load(X + offs, mask=m), mask=m)
        if SYNC:
            _program_barrier(PADS, pid, rank, WORLD)
        for i in tl.static_range(ITERS):
            offs = (i * grid + pid) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            acc = tl.zeros([BLOCK], ACC)
            for r in tl.static_range(WORLD):
                peer = tl.load(BUFS + r).to(tl.pointer_type(dt))
                acc += tl.load(peer + offs, mask=m, other=0).to(ACC)
            tl.store(OUT + offs, acc.to(dt), mask=m)
        if SYNC:
            _program_barrier(PADS, pid, rank, WORLD)


def num_programs(n: int) -> int:
    return max(1, min(MAX_PROGRAMS, -(-n // BLOCK)))


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, bufs: torch.Tensor,
                        pads: torch.Tensor, rank: int, world: int, sync: bool = True) -> None:
    """``out`` <- the sum over ranks of ``x`` (contiguous, same numel; ``out`` may be ``x``).

    ``bufs`` / ``pads``: int64 [world] on the device, the addresses of every rank's symmetric
    buffer (at least ``x.nbytes``) and signal pad (at least ``num_programs(n) * world`` int32
    flags, all zero between calls). ``sync=False`` skips both barriers (tests only: the peers'
    buffers must already hold their data)."""
    n = x.numel()
    if n == 0:
        return
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = num_programs(n)
    _one_shot_all_reduce_kernel[(grid,)](
        x, out, bufs, pads, n, rank, ITERS=-(-n // (grid * BLOCK)), WORLD=world, SYNC=sync, ACC=acc, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
