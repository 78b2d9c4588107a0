"""One-shot all-reduce for tensor parallelism's small messages, in one Triton kernel.

A decode step of LLaMA-13B at TP=2 all-reduces 81 tensors of ``batch x 5120`` halves (one
per row-parallel layer, one for the embedding): at batch 1 each is 10 KB, so the cost is the
collective's latency, not its bandwidth. Here each rank, in one launch,

1. *pushes* its partial sums into its own slot of every rank's *symmetric* buffer (memory
   every rank of the group has mapped: ``torch.distributed._symmetric_memory``, PyTorch's
   allocator over CUDA's virtual-memory IPC; stores to a peer travel over NVLink and are
   posted: nothing waits for them; no multicast);
2. raises a flag in every rank's signal pad: the call's *epoch*, written with a release store
   at system scope after a block-wide barrier, so the peer sees the data before the flag;
3. waits until every rank's flag in its own pad has reached the epoch (acquire loads of local
   memory), then sums the slots of its own buffer in rank order in fp32 (fp64 for fp64),
   rounds once and writes the output -- the same arithmetic on every rank, so all ranks hold
   bit-identical sums, as they must for their greedy tokens to agree.

Only one one-way NVLink latency is on the critical path: no read from a peer and no
round-trip atomic. A first version that had each rank pull from the peers' buffers between
two compare-and-swap barriers took 12.0-12.6 us per call on 2 H100s (NCCL: ~17.6 us in the
same CUDA-graph microbenchmark, yet NCCL won end to end: tools/gpu_tp_check.py, docs/runs).

Program ``p`` handles blocks ``p, p + MAX_PROGRAMS, ...`` in every call (the grid is
``min(blocks, MAX_PROGRAMS)``), so a block's slots are only ever written by program ``p`` of
each rank and read by program ``p`` of their owner; each program keeps its own epoch counter
(a plain int32 per program on each rank) and synchronises only with program ``p`` of the
peers. The buffer has two halves, used by odd and even epochs: a rank can run one call ahead
of a peer (it passed epoch ``e``'s wait, the peer is still summing epoch ``e``) but not two
(epoch ``e + 1``'s wait needs the peer's epoch ``e + 1`` flag), so a push never overwrites
slots a peer has yet to read. Flags only grow; "reached" is a wrap-safe signed difference.

PyTorch ships a one-shot all-reduce (``torch.ops.symm_mem.one_shot_all_reduce``) for fp32 and
bf16 only; the engine runs fp16, hence this kernel. Used by ``llama_engine.parallel``
(``RuntimeOptions.tp_allreduce``). On a GPU the flags use PTX ``st.release.sys`` /
``ld.acquire.sys``; under ``TRITON_INTERPRET=1`` (no inline assembly) the same steps use
Triton atomics, and the CPU tests run one rank with its flags, or two ranks without the waits
and with the peer's slots filled by the test.

Imports: ``common``, ``pdl``, ``norm_kernels`` (the add + RMSNorm row math).
"""
from __future__ import annotations

import torch

from .common import HAS_TRITON, tl, triton
from .pdl import launch_kw

BLOCK = 1024        # elements per program per iteration
MAX_PROGRAMS = 32   # programs per call: they must all be resident (they wait for their
                    # counterparts on the peers), far below any GPU's SM count
NUM_WARPS = 4

if HAS_TRITON:
    from .norm_kernels import _add_rms_norm_vals
    from .pdl import wait_then_release

    @triton.jit
    def _store_release(flag, value, ASM: tl.constexpr):
        if ASM:
            # thread 0 alone (after the block barrier): one system-scope fence, not one per
            # thread
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
                "@p st.release.sys.global.b32 [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [flag, value], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.atomic_xchg(flag, value, sem="release", scope="sys")

    @triton.jit
    def _load_acquire(flag, ASM: tl.constexpr):
        if ASM:
            v = tl.inline_asm_elementwise("ld.acquire.sys.global.b32 $0, [$1];", "=r,l",
                                          [flag], dtype=tl.int32, is_pure=False, pack=1)
        else:
            v = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        return v

    @triton.jit
    def _signal(PADS, pid, rank, epoch, WORLD: tl.constexpr, ASM: tl.constexpr):
        # Raise this program's flag on every rank. The release waits for every earlier
        # memory access of the thread: issue no load to hide behind the wait before it.
        tl.debug_barrier()  # every thread's pushes precede the flags' release
        for r in tl.static_range(WORLD):
            pad = tl.load(PADS + r).to(tl.pointer_type(tl.int32))
            _store_release(pad + pid * WORLD + rank, epoch, ASM)

    @triton.jit
    def _wait(PADS, pid, rank, epoch, WORLD: tl.constexpr, ASM: tl.constexpr):
        # Wait until every rank's flag for this program on this rank has reached the epoch.
        mine = tl.load(PADS + rank).to(tl.pointer_type(tl.int32))
        for r in tl.static_range(WORLD):
            while _load_acquire(mine + pid * WORLD + r, ASM) - epoch < 0:
                pass
        tl.debug_barrier()

    @triton.jit
    def _signal_and_wait(PADS, pid, rank, epoch, WORLD: tl.constexpr, ASM: tl.constexpr):
        _signal(PADS, pid, rank, epoch, WORLD, ASM)
        _wait(PADS, pid, rank, epoch, WORLD, ASM)

    @triton.jit
    def _push_blocks(X, BUFS, n, cap, rank, half, pid, grid, ITERS: tl.constexpr,
                     WORLD: tl.constexpr, BLOCK: tl.constexpr):
        # Blocks pid, pid + grid, ... of the flat X into this rank's slot of every rank's
        # buffer half ``half`` (posted stores; the flags that follow publish them).
        for i in tl.static_range(ITERS):
            offs = (i * grid + pid) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            x = tl.load(X + offs, mask=m)
            for r in tl.static_range(WORLD):
                dst = tl.load(BUFS + r).to(tl.pointer_type(X.dtype.element_ty))
                tl.store(dst + (half * WORLD + rank) * cap + offs, x, mask=m)

    @triton.jit
    def _one_shot_all_reduce_kernel(X, OUT, BUFS, PADS, EPOCHS, n, cap, rank,
                                    ITERS: tl.constexpr, WORLD: tl.constexpr,
                                    SYNC: tl.constexpr, ASM: tl.constexpr,
                                    F64: tl.constexpr, BLOCK: tl.constexpr,
                                    PDL: tl.constexpr):
        # BUFS / PADS: int64 [WORLD], the address of each rank's symmetric buffer (2 halves x
        # WORLD slots x cap elements) and signal pad (int32 flags [programs, WORLD]).
        # EPOCHS: int32 [MAX_PROGRAMS], this rank's per-program call counters.
        wait_then_release(PDL)
        pid = tl.program_id(0)
        grid = tl.num_programs(0)
        dt = X.dtype.element_ty
        ACC: tl.constexpr = tl.float64 if F64 else tl.float32
        epoch = tl.load(EPOCHS + pid) + 1
        half = epoch % 2
        _push_blocks(X, BUFS, n, cap, rank, half, pid, grid, ITERS, WORLD, BLOCK)
        if SYNC:
            _signal_and_wait(PADS, pid, rank, epoch, WORLD, ASM)
        own = tl.load(BUFS + rank).to(tl.pointer_type(dt))
        for i in tl.static_range(ITERS):
            offs = (i * grid + pid) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            acc = tl.zeros([BLOCK], ACC)
            for r in tl.static_range(WORLD):
                acc += tl.load(own + (half * WORLD + r) * cap + offs, mask=m, other=0).to(ACC)
            tl.store(OUT + offs, acc.to(dt), mask=m)
        tl.store(EPOCHS + pid, epoch)

    @triton.jit
    def _one_shot_all_gather_kernel(X, OUT, BUFS, PADS, EPOCHS, n, cols, cap, rank,
                                    ITERS: tl.constexpr, WORLD: tl.constexpr,
                                    SYNC: tl.constexpr, ASM: tl.constexpr,
                                    BLOCK: tl.constexpr, PDL: tl.constexpr):
        # The plain kernel's push / flags / wait, then a copy instead of a sum: element i of
        # rank r's flat local [rows, cols] goes to OUT[i // cols, r * cols + i % cols]
        # ([rows, WORLD * cols]: the ranks' blocks side by side along the last dim).
        wait_then_release(PDL)
        pid = tl.program_id(0)
        grid = tl.num_programs(0)
        dt = X.dtype.element_ty
        epoch = tl.load(EPOCHS + pid) + 1
        half = epoch % 2
        _push_blocks(X, BUFS, n, cap, rank, half, pid, grid, ITERS, WORLD, BLOCK)
        if SYNC:
            _signal_and_wait(PADS, pid, rank, epoch, WORLD, ASM)
        own = tl.load(BUFS + rank).to(tl.pointer_type(dt))
        for i in tl.static_range(ITERS):
            offs = (i * grid + pid) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            row = offs // cols
            col = offs % cols
            for r in tl.static_range(WORLD):
                v = tl.load(own + (half * WORLD + r) * cap + offs, mask=m)
                tl.store(OUT + row * (WORLD * cols) + r * cols + col, v, mask=m)
        tl.store(EPOCHS + pid, epoch)

    @triton.jit
    def _one_shot_add_rms_norm_kernel(X, R, W, OUT, RES_OUT, BUFS, PADS, EPOCHS, M, D, cap,
                                      stride_s, eps, rank, S: tl.constexpr,
                                      ITERS: tl.constexpr, WORLD: tl.constexpr,
                                      SYNC: tl.constexpr, ASM: tl.constexpr,
                                      BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        # The all-reduce of X fused with the add_rms_norm that follows it. X: [S, M, D], the
        # row-parallel linear's S split-K partials (fp32; S = 1: its output), summed in order
        # and rounded to the model dtype as the linear's own reduction would, then pushed.
        # Program pid takes rows pid, pid + grid, ... (ITERS of them; whole rows, for the
        # norm). After the all-reduce sum (rounded to the model dtype, as the plain kernel
        # stores it) the row goes through attn._add_rms_norm_vals, add_rms_norm's arithmetic.
        wait_then_release(PDL)
        pid = tl.program_id(0)
        grid = tl.num_programs(0)
        dt = R.dtype.element_ty
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        epoch = tl.load(EPOCHS + pid) + 1
        half = epoch % 2
        for i in tl.static_range(ITERS):
            row = i * grid + pid
            m = cm & (row < M)
            x = tl.load(X + row * D + cols, mask=m, other=0.0)
            for s in tl.static_range(1, S):
                x += tl.load(X + s * stride_s + row * D + cols, mask=m, other=0.0)
            x = x.to(dt)
            for r in tl.static_range(WORLD):
                dst = tl.load(BUFS + r).to(tl.pointer_type(dt))
                tl.store(dst + (half * WORLD + rank) * cap + row * D + cols, x, mask=m)
        if SYNC:
            _signal(PADS, pid, rank, epoch, WORLD, ASM)
        # the weights, and with one row per program its residual, load while the peers' flags
        # travel (after the release: it would wait for them)
        w = tl.load(W + cols, mask=cm, other=0.0)
        if ITERS == 1:
            res0 = tl.load(R + pid * D + cols, mask=cm & (pid < M), other=0.0)
        if SYNC:
            _wait(PADS, pid, rank, epoch, WORLD, ASM)
        own = tl.load(BUFS + rank).to(tl.pointer_type(dt))
        for i in tl.static_range(ITERS):
            row = i * grid + pid
            if row < M:
                acc = tl.zeros([BLOCK_D], tl.float32)
                for r in tl.static_range(WORLD):
                    acc += tl.load(own + (half * WORLD + r) * cap + row * D + cols, mask=cm,
                                   other=0).to(tl.float32)
                if ITERS == 1:
                    res = res0
                else:
                    res = tl.load(R + row * D + cols, mask=cm, other=0.0)
                _add_rms_norm_vals(acc.to(dt), res, w, OUT + row * D, RES_OUT + row * D,
                                   cols, cm, D, eps, True)
        tl.store(EPOCHS + pid, epoch)


def num_programs(n: int) -> int:
    return max(1, min(MAX_PROGRAMS, -(-n // BLOCK)))


def buffer_bytes(max_bytes: int, world: int) -> int:
    """Symmetric buffer size for messages of up to ``max_bytes``: 2 halves x world slots."""
    return 2 * world * max_bytes


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, bufs: torch.Tensor,
                        pads: torch.Tensor, epochs: torch.Tensor, slot_bytes: int, rank: int,
                        world: int, sync: bool = True) -> None:
    """``out`` <- the sum over ranks of ``x`` (contiguous, same numel; ``out`` may be ``x``).

    ``bufs`` / ``pads``: int64 [world] on the device, the addresses of every rank's symmetric
    buffer (``buffer_bytes(slot_bytes, world)``; ``x.nbytes <= slot_bytes``) and signal pad
    (``MAX_PROGRAMS * world`` int32 flags, zero before the first call). ``epochs``: int32
    [MAX_PROGRAMS] on the device, zero before the first call, then left to the kernel.
    ``sync=False`` skips raising and waiting for flags (tests only: the peers' slots must
    already hold their data)."""
    n = x.numel()
    if n == 0:
        return
    assert x.nbytes <= slot_bytes and x.is_contiguous() and out.is_contiguous()
    grid = num_programs(n)
    _one_shot_all_reduce_kernel[(grid,)](
        x, out, bufs, pads, epochs, n, slot_bytes // x.element_size(), rank,
        ITERS=-(-n // (grid * BLOCK)), WORLD=world, SYNC=sync, ASM=x.is_cuda,
        F64=x.dtype == torch.float64,
        BLOCK=BLOCK, num_warps=NUM_WARPS, **launch_kw(x))


def one_shot_all_gather(x: torch.Tensor, bufs: torch.Tensor, pads: torch.Tensor,
                        epochs: torch.Tensor, slot_bytes: int, rank: int, world: int,
                        sync: bool = True) -> torch.Tensor:
    """[..., n] on each rank -> [..., world * n], rank r's block at [r*n, (r+1)*n): x
    contiguous, ``x.nbytes <= slot_bytes``; the buffers as for ``one_shot_all_reduce`` but
    this op's own."""
    cols = x.shape[-1]
    out = torch.empty((*x.shape[:-1], world * cols), dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    assert x.nbytes <= slot_bytes and x.is_contiguous()
    grid = num_programs(n)
    _one_shot_all_gather_kernel[(grid,)](
        x, out, bufs, pads, epochs, n, cols, slot_bytes // x.element_size(), rank,
        ITERS=-(-n // (grid * BLOCK)), WORLD=world, SYNC=sync, ASM=x.is_cuda,
        BLOCK=BLOCK, num_warps=NUM_WARPS, **launch_kw(x))
    return out


def one_shot_add_rms_norm(x, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float, bufs: torch.Tensor, pads: torch.Tensor,
                          epochs: torch.Tensor, slot_bytes: int, rank: int, world: int,
                          sync: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm(all_reduce(x), residual, weight, eps)`` in one launch: -> (normed,
    new residual), both [M, D] in residual's dtype. x: [M, D] in that dtype, or split-K
    partials [S, M, D] (fp32, summed and rounded first, as the linear's reduction would);
    residual contiguous [M, D]; the buffers as for ``one_shot_all_reduce``, but their own (rows
    map to programs differently: the two kernels must not share a buffer, signal pad or
    epochs)."""
    xs = x if x.dim() == 3 else x.unsqueeze(0)
    S, M, D = xs.shape
    assert residual.shape == (M, D) and residual.is_contiguous() and xs.stride(2) == 1
    assert xs.stride(1) == D and M * D * residual.element_size() <= slot_bytes
    out = torch.empty_like(residual)
    res = torch.empty_like(residual)
    if M == 0:
        return out, res
    grid = min(M, MAX_PROGRAMS)
    bd = 1 << (D - 1).bit_length()
    _one_shot_add_rms_norm_kernel[(grid,)](
        xs, residual, weight, out, res, bufs, pads, epochs, M, D,
        slot_bytes // residual.element_size(), xs.stride(0), float(eps), rank, S=S,
        ITERS=-(-M // grid), WORLD=world, SYNC=sync, ASM=xs.is_cuda, BLOCK_D=bd,
        num_warps=4 if bd <= 2048 else 8, **launch_kw(xs))
    return out, res
