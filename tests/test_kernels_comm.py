"""llama_engine/kernels/comm.py, the one-shot all-reduce, in-process under TRITON_INTERPRET=1
(set by conftest.py without a GPU), the tp_allreduce run-time option (llama_engine/options.py)
of llama_engine/parallel.py, and a PartialSum's pending all-reduce taken by add_rms_norm.

The interpreter runs one process, so the kernel meets no real peer here: with one rank it
raises and waits for its own flags, call after call (the epochs and buffer halves advance),
and must return its input; with two ranks and the waits off it must push its input into its
slot of both buffers and sum its own buffer's slots (the peer's filled by the test) in rank
order, rounded once; the all-gather likewise places the blocks. Peers over NVLink are checked on GPUs by tools/gpu_tp_check.py."""
from __future__ import annotations

import pytest
import torch

from conftest import interpreter_on
from llama_engine.kernels import norm  # add_rms_norm: the fused op's oracle
from llama_engine.kernels.partial import PartialSum
from llama_engine.kernels.reference import add_rms_norm_ref

needs_interpreter = pytest.mark.skipif(
    not interpreter_on(), reason="the kernel checks run under TRITON_INTERPRET=1 (no CUDA here "
    "sets it in conftest.py); on a GPU tools/gpu_tp_check.py checks them")


def _one_rank_state(slot: int):
    """A lone rank's buffer (its storage must stay referenced), flags, epochs, and the
    address tables the kernels take."""
    from llama_engine.kernels import comm
    buf = torch.zeros(comm.buffer_bytes(slot, 1), dtype=torch.uint8)
    pad = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
    epochs = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
    return (buf, pad, epochs, torch.tensor([buf.data_ptr()], dtype=torch.int64),
            torch.tensor([pad.data_ptr()], dtype=torch.int64))


def _check_all_reduce(g) -> list:
    from llama_engine.kernels import comm
    fails = []
    slot = 8 * (comm.MAX_PROGRAMS + 1) * comm.BLOCK  # bytes: the largest size in fp64 fits
    # one block, a ragged tail, more blocks than programs (ITERS > 1)
    sizes = (5, 3000, comm.MAX_PROGRAMS * comm.BLOCK + 77)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        elems = slot // torch.tensor([], dtype=dt).element_size()
        # one rank: three calls of each size in a row on the same state
        buf, pad, epochs, bufs, pads = _one_rank_state(slot)
        calls = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
        for n in sizes:
            for _ in range(3):
                x = (torch.randn(n, generator=g) * 4).to(dt)
                y = x.clone()
                comm.one_shot_all_reduce(y, y, bufs, pads, epochs, slot, 0, 1)
                calls[: comm.num_programs(n)] += 1
                if not torch.equal(y, x):
                    fails.append(f"1 rank n={n} {dt}: output differs from input")
        if not (torch.equal(epochs, calls) and torch.equal(pad, calls)):
            fails.append(f"1 rank {dt}: epochs {epochs.tolist()} / flags {pad.tolist()} "
                         f"are not the per-program call counts {calls.tolist()}")
        # two ranks (this one is rank 1), no waits: epoch 1 -> buffer half 1
        for n in sizes:
            x = (torch.randn(n, generator=g) * 4).to(dt)
            mine = torch.zeros(2, 2, elems, dtype=dt)   # [half, slot, elems]
            peer = torch.zeros(2, 2, elems, dtype=dt)
            mine[1, 0] = (torch.randn(elems, generator=g) * 4).to(dt)  # rank 0's push
            before = mine[1, 0].clone()
            out = torch.full_like(x, 7)
            bufs2 = torch.tensor([peer.data_ptr(), mine.data_ptr()], dtype=torch.int64)
            ep = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
            comm.one_shot_all_reduce(x, out, bufs2, pads, ep, slot, 1, 2, sync=False)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            total = before[:n].to(acc) + x.to(acc)
            if dt == torch.bfloat16:
                # the interpreter rounds fp32 -> bf16 toward zero (a GPU: to nearest, checked
                # against NCCL by gpu_tp_check.py): drop the low 16 bits, exactly
                total = (total.view(torch.int32) & -65536).view(torch.float32)
            want = total.to(dt)
            if not torch.equal(out, want):
                fails.append(f"2 ranks n={n} {dt}: sum differs by "
                             f"{(out.double() - want.double()).abs().max():.3g}")
            for name, b in (("own", mine), ("peer's", peer)):
                if not torch.equal(b[1, 1, :n], x) or b[1, 1, n:].abs().sum() != 0:
                    fails.append(f"2 ranks n={n} {dt}: {name} buffer slot 1 is not the push")
            if peer[1, 0].abs().sum() != 0 or mine[0].abs().sum() != 0 or peer[0].abs().sum():
                fails.append(f"2 ranks n={n} {dt}: wrote outside its slot of half 1")
    return fails


def _check_fused(g) -> list:
    """one_shot_add_rms_norm == add_rms_norm (the Triton kernel) of the summed input, bit for
    bit: one rank with its flags; two ranks without the waits, the peer's rows pre-filled."""
    from llama_engine.kernels import comm
    fails = []
    slot = 8 * 40 * 300
    for dt in (torch.float16, torch.float32):
        buf, pad, epochs, bufs, pads = _one_rank_state(slot)
        calls = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
        for M, D in ((1, 300), (5, 64), (comm.MAX_PROGRAMS + 7, 40)):  # ITERS 1, 1, 2
            x = torch.randn(M, D, generator=g).to(dt)
            res = torch.randn(M, D, generator=g).to(dt)
            w = (torch.rand(D, generator=g) + 0.5).to(dt)
            want = norm.add_rms_norm(x, res, w, 1e-5, impl="triton")
            for _ in range(2):
                got = comm.one_shot_add_rms_norm(x, res, w, 1e-5, bufs, pads, epochs, slot,
                                                 0, 1)
                calls[: min(M, comm.MAX_PROGRAMS)] += 1
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    fails.append(f"fused 1 rank M={M} D={D} {dt}: differs from add_rms_norm")
            # two ranks, this one rank 0, no waits: rows of rank 1 in half 1, slot 1
            elems = slot // x.element_size()
            mine = torch.zeros(2, 2, elems, dtype=dt)
            peer = torch.zeros(2, 2, elems, dtype=dt)
            other = torch.randn(M, D, generator=g).to(dt)
            mine[1, 1, : M * D] = other.reshape(-1)
            bufs2 = torch.tensor([mine.data_ptr(), peer.data_ptr()], dtype=torch.int64)
            ep = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
            got = comm.one_shot_add_rms_norm(x, res, w, 1e-5, bufs2, pads, ep, slot, 0, 2,
                                             sync=False)
            total = (x.float() + other.float()).to(dt)
            want = norm.add_rms_norm(total, res, w, 1e-5, impl="triton")
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                fails.append(f"fused 2 ranks M={M} D={D} {dt}: differs from add_rms_norm")
            if not torch.equal(peer[1, 0, : M * D], x.reshape(-1)):
                fails.append(f"fused 2 ranks M={M} D={D} {dt}: rows not pushed to the peer")
        # split-K partials (fp32, 3 slices): summed and rounded as the linear's reduction
        # would, then as above
        for M, D in ((1, 300), (comm.MAX_PROGRAMS + 7, 40)):
            parts = PartialSum(torch.randn(3, M, D, generator=g), (M,), dt)
            res = torch.randn(M, D, generator=g).to(dt)
            w = (torch.rand(D, generator=g) + 0.5).to(dt)
            want = norm.add_rms_norm(parts, res, w, 1e-5, impl="triton")
            got = comm.one_shot_add_rms_norm(parts.parts, res, w, 1e-5, bufs, pads, epochs,
                                             slot, 0, 1)
            calls[: min(M, comm.MAX_PROGRAMS)] += 1
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                fails.append(f"fused 1 rank partials M={M} D={D} {dt}: differs")
        if not (torch.equal(epochs, calls) and torch.equal(pad, calls)):
            fails.append(f"fused {dt}: epochs {epochs.tolist()} / flags {pad.tolist()} are "
                         f"not the per-program call counts {calls.tolist()}")
    return fails


def _check_gather(g) -> list:
    """one_shot_all_gather: one rank with its flags (the output is the input, call after call);
    two ranks without the waits, the peer's block pre-filled: [rows, 2 * cols] with rank r's
    columns at [r * cols, (r + 1) * cols), and this rank's block pushed to both buffers."""
    from llama_engine.kernels import comm
    fails = []
    slot = 4 * (comm.MAX_PROGRAMS + 1) * comm.BLOCK
    for dt in (torch.float16, torch.float32):
        elems = slot // torch.tensor([], dtype=dt).element_size()
        buf, pad, epochs, bufs, pads = _one_rank_state(slot)
        for shape in ((1, 300), (3, 1000), (2, comm.MAX_PROGRAMS * comm.BLOCK // 2 + 5)):
            for _ in range(2):
                x = torch.randn(shape, generator=g).to(dt)
                out = comm.one_shot_all_gather(x, bufs, pads, epochs, slot, 0, 1)
                if not torch.equal(out, x):
                    fails.append(f"all-gather 1 rank {shape} {dt}: output is not the input")
            x = torch.randn(shape, generator=g).to(dt)
            other = torch.randn(shape, generator=g).to(dt)
            mine = torch.zeros(2, 2, elems, dtype=dt)   # [half, slot, elems]
            peer = torch.zeros(2, 2, elems, dtype=dt)
            mine[1, 0, : x.numel()] = other.reshape(-1)  # rank 0's block; this one is rank 1
            bufs2 = torch.tensor([peer.data_ptr(), mine.data_ptr()], dtype=torch.int64)
            ep = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32)
            out = comm.one_shot_all_gather(x, bufs2, pads, ep, slot, 1, 2, sync=False)
            if not torch.equal(out, torch.cat([other, x], dim=-1)):
                fails.append(f"all-gather 2 ranks {shape} {dt}: not [rank 0 | rank 1] blocks")
            for name, b in (("own", mine), ("peer's", peer)):
                if not torch.equal(b[1, 1, : x.numel()], x.reshape(-1)):
                    fails.append(f"all-gather 2 ranks {shape} {dt}: {name} slot 1 is not the "
                                 "push")
    return fails


@needs_interpreter
@pytest.mark.parametrize("name", ["all_reduce", "all_reduce+norm", "all_gather"])
def test_one_shot_kernel_interpreted(name):
    check = {"all_reduce": _check_all_reduce, "all_reduce+norm": _check_fused,
             "all_gather": _check_gather}[name]
    fails = check(torch.Generator().manual_seed(0))
    assert not fails, "\n".join(fails)


def test_tp_allreduce_mode_is_validated(monkeypatch):
    from llama_engine import parallel
    from llama_engine.config import ConfigError
    from llama_engine.options import TP_ALLREDUCE_MODES, RuntimeOptions
    for mode in TP_ALLREDUCE_MODES:
        assert RuntimeOptions(tp_allreduce=mode).tp_allreduce == mode
    with pytest.raises(ConfigError, match="tp_allreduce must be one of"):
        RuntimeOptions(tp_allreduce="fast")


def test_single_process_all_reduce_is_identity_and_path_none():
    from llama_engine import parallel
    assert parallel.get_world_size() == 1
    parallel.setup_all_reduce("cpu")  # nothing to set up: no error, no state
    x = torch.randn(4, 8)
    assert parallel.all_reduce(x.clone()).equal(x)
    assert parallel.all_reduce_path("cpu") == "none"


def test_pending_all_reduce_goes_to_the_norm_and_selects_rows_first():
    """The plumbing of the fused path (its CUDA kernel is checked above and on GPUs): a
    PartialSum with a pending all-reduce given to ops.add_rms_norm runs the pending object's
    fused op; row selection happens on the local rows; shapes the fused op does not take fall
    back to the plain sum (pending.all_reduce), then the norm."""
    from llama_engine.kernels import ops

    class Fake:
        calls, sums = [], 0

        def add_rms_norm(self, xs, residual, weight, eps):  # xs: [S, M, D] slices
            self.calls.append(tuple(xs.shape))
            return add_rms_norm_ref(xs.float().sum(0).to(residual.dtype), residual, weight,
                                    eps)

        def all_reduce(self, t):                             # one process: the identity
            self.sums += 1
            return t

    fake = Fake()
    x, res, w = torch.randn(5, 8), torch.randn(5, 8), torch.rand(8) + 0.5
    pending = PartialSum.of(x).with_pending(fake)
    got = ops.add_rms_norm(pending, res, w, 1e-5)
    want = add_rms_norm_ref(x, res, w, 1e-5)
    assert fake.calls == [(1, 5, 8)] and torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    idx = torch.tensor([4, 1])
    sel = pending[idx]
    assert sel.shape == (2, 8) and sel.pending is fake and torch.equal(sel.sum(), x[idx])
    # a residual of another layout: the plain all-reduce, then the norm
    got = ops.add_rms_norm(pending, res.t().contiguous().t(), w, 1e-5)
    assert fake.calls == [(1, 5, 8)] and fake.sums == 2 and torch.allclose(got[0], want[0])
    # split-K partials: handed over unsummed, rows selected on the partials
    parts = PartialSum(torch.randn(3, 5, 8), (5,), torch.float32)
    got = ops.add_rms_norm(parts.with_pending(fake), res, w, 1e-5)
    assert fake.calls[-1] == (3, 5, 8)
    want = add_rms_norm_ref(parts.sum(), res, w, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    sel = parts.with_pending(fake)[idx]
    assert sel.parts.shape == (3, 2, 8) and torch.equal(sel.sum(), parts.sum()[idx])
