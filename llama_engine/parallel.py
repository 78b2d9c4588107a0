"""Tensor parallelism for the LLaMA network over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Megatron-LM's scheme (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism"), as TensorRT-LLM's ``--tp_size`` applies it to LLaMA:

* column-parallel (output rows split): ``attention.qkv`` *by heads* -- rank r holds
  ``[q heads of r; k heads of r; v heads of r]`` (TensorRT-LLM's ``split_qkv_tp``); when there are
  fewer KV heads than ranks each KV head is replicated on the ranks whose q heads use it
  (TensorRT-LLM's ``dup_kv_weight``) -- and ``mlp.fc`` / ``mlp.gate``;
* row-parallel (input columns split, partial sums all-reduced): ``attention.dense``, ``mlp.proj``;
* vocabulary-parallel: ``transformer.vocab_embedding`` (masked lookup + all-reduce) and
  ``lm_head`` (local logits all-gathered); the vocabulary is padded to a multiple of tp_size.

Everything else (norms, RoPE, the per-layer KV-cache scale) is replicated; the per-(KV head,
channel) INT8 KV scales ``attention.k_cache_scale`` / ``v_cache_scale`` [Hkv*D] follow the KV
heads (a rank keeps the rows of its KV heads, replicated with them). Quantized tensors follow the
weight they scale: per-output-channel scales split with column-parallel outputs and replicate
on row-parallel layers; group-wise ``weights_scaling_factor`` [K/G, N] splits N or K/G;
SmoothQuant's ``smoother`` [1, K] and AWQ's ``prequant_scaling_factor`` [K] split with the input
of row-parallel layers; ``act_scale`` replicates. (SmoothQuant per-token activation scales
of a row-parallel layer are then taken over the rank's input columns, as in TensorRT-LLM, so
those modes are close to, not equal to, one process.) Every rank samples from the same gathered
logits, so greedy tokens agree on all ranks without another collective.

Processes are started by ``torchrun``; ``init_from_env`` joins the group it describes.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
from typing import Optional

import torch
from torch import nn

from . import envs
from .config import W4A16, W4A16_GROUPWISE, ConfigError, ModelArgs, QuantConfig
from .names import KV_CHANNEL_SCALES, group_by_prefix
from .options import TP_ALLREDUCE_MODES
from .kernels.partial import PartialSum, total

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: off unless the user
# explicitly set these.
SAFE_CUDA_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}

ROW_LINEARS = ("attention.dense", "mlp.proj")


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist
    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_from_env(device: Optional[str] = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT). -> (rank, world_size); (0, 1) when not launched by torchrun.

    NCCL when ``device`` is CUDA (default: CUDA if present), gloo otherwise. On CUDA each rank
    takes GPU LOCAL_RANK and NVLink multicast is switched off (``SAFE_CUDA_ENV``)."""
    if is_initialized():
        return get_rank(), get_world_size()
    world, local_rank, _ = envs.torchrun_env()
    if world <= 1:
        return 0, 1
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        for k, v in SAFE_CUDA_ENV.items():
            envs.set_default(k, v)
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    _dist().init_process_group("nccl" if use_cuda else "gloo")
    # Leave the group before the interpreter tears down: a group still alive at exit can
    # abort the process ("terminate called without an active exception").
    atexit.register(shutdown)
    return get_rank(), get_world_size()


def shutdown() -> None:
    """Leave the process group. No barrier: a rank exiting on an error must not wait for
    ranks that are stuck in a collective (torchrun then stops them)."""
    if is_initialized():
        _dist().destroy_process_group()


def rank_device(device: str) -> str:
    """'cuda' -> 'cuda:LOCAL_RANK' under torchrun (an explicit index or 'cpu' is kept)."""
    if str(device) == "cuda" and is_initialized():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def require_world(world_size: int, device: Optional[str] = None) -> int:
    """This process's rank for an engine built for ``world_size`` ranks (joins the torchrun
    group if needed); a one-line error when the launch does not match the engine."""
    rank, world = init_from_env(device)
    if world != world_size:
        raise ConfigError(f"the engine was built for {world_size} ranks (--tp_size {world_size}) "
                          f"but this run has {world}; launch it with torchrun "
                          f"--nproc_per_node {world_size}")
    return rank


def sync_rng() -> None:
    """Seed every rank's global RNG with rank 0's draw, so unseeded sampling
    (``torch.multinomial`` without a generator) picks the same tokens on every rank."""
    if get_world_size() == 1:
        return
    dist = _dist()
    dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(dev)
    dist.broadcast(seed, 0)
    torch.manual_seed(int(seed.item()))


def quiet_non_main_ranks() -> None:
    """Send stdout of ranks other than 0 to /dev/null (every rank computes the same tokens;
    rank 0 prints them). stderr is kept so errors on any rank still show."""
    if get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


# ---------------------------------------------------------------------------------------------
# Collectives (identity with one rank)
# ---------------------------------------------------------------------------------------------
# RuntimeOptions.tp_allreduce (run.py --tp_allreduce): how CUDA tensors of at most
# ONESHOT_MAX_BYTES are summed.
#   "auto"    -- (default) "oneshot" where every rank is a GPU of one host with peer access
#                and symmetric memory sets up, else NCCL with a one-line notice;
#   "oneshot" -- kernels/comm.py's one-shot kernel (an error where it cannot run); after a
#                row-parallel linear it is fused with the add_rms_norm that follows;
#   "nccl"    -- NCCL's all_reduce (also every larger tensor, and all of gloo).
# On 2 H200s (2026-11-26) the one-shot kernel took 3.9-4.2 us per 10 KB all-reduce in a CUDA
# graph against NCCL's 18-21 us, and LLaMA-13B TP=2 batch-1 decode went from 202.1 (NCCL) to
# 222.6 tok/s (one GPU: 143.4; docs/perf-notes.md, run 6).
DEFAULT_TP_ALLREDUCE = "auto"
ONESHOT_MAX_BYTES = 1 << 20  # decode batches up to ~100 tokens of a 5120-wide model in fp16


def _cuda_device(device) -> torch.device:
    """'cuda' -> 'cuda:<current>' (the key _ONESHOT is kept under); other devices as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _SymmetricState:
    """One symmetric buffer (2 halves x world slots x ONESHOT_MAX_BYTES) with its signal pad
    and this rank's per-program epochs, for one of kernels/comm.py's kernels."""

    def __init__(self, device: torch.device, group):
        import torch.distributed._symmetric_memory as symm_mem

        from .kernels import comm
        world = get_world_size()
        self.buf = symm_mem.empty(comm.buffer_bytes(ONESHOT_MAX_BYTES, world),
                                  dtype=torch.uint8, device=device)
        self.buf.zero_()
        self.handle = h = symm_mem.rendezvous(self.buf, group)
        # Local checks do not raise here: every rank must still make the collective calls
        # that follow (OneShotAllReduce raises after them).
        off = int(getattr(h, "offset", 0))
        flags = comm.MAX_PROGRAMS * h.world_size * 4
        self.problem = (
            "symmetric buffer address does not match its handle"
            if h.buffer_ptrs[h.rank] + off != self.buf.data_ptr() else
            f"signal pad of {h.signal_pad_size} bytes < {flags} needed"
            if h.signal_pad_size < flags else "")
        self.bufs = torch.tensor([p + off for p in h.buffer_ptrs], dtype=torch.int64,
                                 device=device)
        self.pads = torch.tensor(list(h.signal_pad_ptrs), dtype=torch.int64, device=device)
        # the flags start at zero on every rank, as the epochs do
        h.get_signal_pad(h.rank, (comm.MAX_PROGRAMS * h.world_size,), torch.int32).zero_()
        self.epochs = torch.zeros(comm.MAX_PROGRAMS, dtype=torch.int32, device=device)
        self.args = (self.bufs, self.pads, self.epochs, ONESHOT_MAX_BYTES, h.rank, h.world_size)


class OneShotAllReduce:
    """kernels/comm.py's one-shot all-reduce, and its fusion with the add_rms_norm that follows
    a row-parallel linear (``fuse``: always on; tools/gpu_pdl_sweep.py turns it off for A/B
    timing), for this process's GPU and the default group. Set up collectively (every rank, at
    the same point)."""

    DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, device: torch.device, fuse: bool = True):
        import warnings

        import torch.distributed._symmetric_memory as symm_mem

        from .kernels import comm
        group = _dist().group.WORLD
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(group.group_name)
        self.device = torch.device(device)
        self.fuse = fuse
        self.plain = _SymmetricState(self.device, group)
        self.fused = _SymmetricState(self.device, group) if self.fuse else None
        self.gather = _SymmetricState(self.device, group)
        torch.cuda.synchronize(self.device)
        _dist().barrier()  # nobody pushes before every rank has cleared its flags
        problem = self.plain.problem or self.gather.problem or (
            self.fused.problem if self.fused else "")
        if problem:
            raise RuntimeError(problem)
        self._kernel, self._fused_kernel = comm.one_shot_all_reduce, comm.one_shot_add_rms_norm
        self._gather_kernel = comm.one_shot_all_gather

    def takes(self, x) -> bool:
        """x (a tensor, or a PartialSum for the fused op) fits the one-shot path."""
        contiguous = isinstance(x, PartialSum) or x.is_contiguous()
        return (x.device == self.device and x.dtype in self.DTYPES and contiguous
                and x.shape.numel() * x.dtype.itemsize <= ONESHOT_MAX_BYTES)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._kernel(x, x, *self.plain.args)
        return x

    def add_rms_norm(self, x, residual, weight, eps):
        """The fused all-reduce + add + RMSNorm of slices x [S, M, D] (a PartialSum's pending
        sum: kernels/norm.py's add_rms_norm calls it)."""
        return self._fused_kernel(x, residual, weight, eps, *self.fused.args)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A PartialSum's pending sum taken apart from the norm: the module's all_reduce."""
        return all_reduce(x)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather_kernel(x, *self.gather.args)


_ONESHOT: dict = {}  # device -> OneShotAllReduce (or None: NCCL for that device)


def _oneshot_unsupported(device: torch.device) -> str:
    """Why this rank cannot take part in the one-shot all-reduce ("" if it can): its peers must
    be GPUs of this host that it can address (symmetric memory maps their buffers)."""
    world = get_world_size()
    local = envs.torchrun_env()[2]
    if local != world:
        return f"ranks span hosts ({local} of {world} on this one)"
    if world > torch.cuda.device_count():
        return f"{world} ranks share {torch.cuda.device_count()} GPUs"
    for j in range(torch.cuda.device_count()):
        if j != device.index and not torch.cuda.can_device_access_peer(device.index, j):
            return f"GPU {device.index} cannot access GPU {j} (no peer access)"
    return ""


def setup_all_reduce(device, mode: str = DEFAULT_TP_ALLREDUCE) -> None:
    """Prepare this rank's all-reduce for CUDA tensors on ``device``; ``mode`` is one of
    ``options.TP_ALLREDUCE_MODES`` (``RuntimeOptions.tp_allreduce``).
    Collective: every rank calls it at the same point (Engine.from_tensors does, before any
    forward, so that no setup happens inside CUDA-graph capture). Once per process and device."""
    if get_world_size() == 1:
        return
    if mode not in TP_ALLREDUCE_MODES:
        raise ConfigError(f"tp_allreduce must be one of {', '.join(TP_ALLREDUCE_MODES)}, "
                          f"got {mode!r}")
    device = _cuda_device(device)
    if device.type != "cuda" or device in _ONESHOT:
        return
    _ONESHOT[device] = None
    if mode == "nccl":
        return
    # Every rank must take the same path (one rank on NCCL and another in the one-shot kernel
    # would wait for each other forever) and make the same collective calls: vote before the
    # set-up (its rendezvous is collective) and after it.
    def all_ranks(ok: bool) -> bool:
        t = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        _dist().all_reduce(t, op=_dist().ReduceOp.MIN)
        return bool(t.item())

    fast, err = None, _oneshot_unsupported(device)
    if all_ranks(not err):
        try:
            fast = OneShotAllReduce(device)
        except Exception as e:  # noqa: BLE001 - any failure of the optional fast path
            err = f"{type(e).__name__}: {e}"
        if all_ranks(fast is not None):
            _ONESHOT[device] = fast
            return
    why = err or "another rank cannot run it"
    if mode == "oneshot":
        raise ConfigError(f"--tp_allreduce oneshot cannot run here ({why}); use "
                          "--tp_allreduce nccl or auto")
    if is_main():
        print(f"[llama_engine] one-shot all-reduce unavailable ({why}); using NCCL",
              file=sys.stderr)


def all_reduce_path(device) -> str:
    """What sums this rank's small CUDA tensors: "none" (one rank), "nccl", "oneshot", or
    "oneshot+norm" (one-shot, fused with the add_rms_norm after row-parallel linears)."""
    if get_world_size() == 1:
        return "none"
    fast = _ONESHOT.get(_cuda_device(device))
    return "nccl" if fast is None else "oneshot+norm" if fast.fuse else "oneshot"


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if get_world_size() > 1:
        fast = _ONESHOT.get(x.device) if x.is_cuda else None
        if fast is not None and fast.takes(x):
            return fast(x)
        _dist().all_reduce(x)
    return x


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...], rank r's rows at [r*n, (r+1)*n)."""
    world = get_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    if x.is_cuda:
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _dist().all_gather_into_tensor(out, x)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    _dist().all_gather(parts, x)
    return torch.cat(parts)


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., world * n], rank r's block at [r*n, (r+1)*n)."""
    world = get_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    fast = _ONESHOT.get(x.device) if x.is_cuda else None
    if fast is not None and fast.takes(x):
        return fast.all_gather_last(x)   # the one-shot kernel (logits at decode)
    blocks = all_gather_rows(x.unsqueeze(0))                          # [world, ..., n]
    return torch.movedim(blocks, 0, -2).reshape(*x.shape[:-1], world * x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Modules inserted by Transformer.from_checkpoint when tp_size > 1
# ---------------------------------------------------------------------------------------------
class RowParallelLinear(nn.Module):
    """A linear whose input columns are split over ranks: local partial product, then all-reduce."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.out_features = getattr(inner, "out_features", None)
        self.in_features = getattr(inner, "in_features", None)

    def forward(self, x, partials: bool = False):
        # partials=True (the caller hands the result to add_rms_norm) may return a PartialSum
        # whose all-reduce is pending, summed by the norm's fused kernel.
        fast = _ONESHOT.get(x.device) if partials and x.is_cuda else None
        if fast is not None and fast.fuse:
            # the fused kernel also sums the local linear's split-K partials (no reduction
            # launch): ask for them
            y = self.inner(x, partials=True)
            if len(y.shape) == 2 and fast.takes(y):
                return PartialSum.of(y).with_pending(fast)
            return all_reduce(total(y).contiguous())
        return all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the (padded) table: tokens outside give zeros; all-reduce sums."""

    def __init__(self, weight: torch.Tensor, start: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V_pad / tp, D]
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


class VocabParallelLMHead(nn.Module):
    """Local logits [M, V_pad / tp] -> all-gathered [M, V] (vocabulary padding dropped)."""

    def __init__(self, inner: nn.Module, vocab_size: int):
        super().__init__()
        self.inner, self.vocab_size = inner, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.inner(x))[..., : self.vocab_size]


def make_vocab_parallel(model: nn.Module, vocab_size: int, rank: int,
                        parallel_embedding: bool = False) -> None:
    """Give a rank's Transformer (built from vocabulary shards) its embedding and the
    vocabulary-parallel lm_head (its logits all-gathered). The embedding (the engine's
    ``use_parallel_embedding``, build.py --use_parallel_embedding): False (default) gathers
    the whole table from every rank (collective: every rank at the same point), so every rank
    looks its tokens up locally: no all-reduce and no masking per step, for up to one more
    table a rank (TensorRT-LLM, too, replicates the embedding unless built with
    --use_parallel_embedding); True keeps it vocabulary-parallel (VocabParallelEmbedding).
    Every rank reads the same config.json, so every rank makes the same collectives."""
    weight = model.embed.weight.data
    if parallel_embedding:
        model.embed = VocabParallelEmbedding(weight, rank * weight.shape[0])
    else:
        model.embed = nn.Embedding.from_pretrained(all_gather_rows(weight), freeze=True)
    model.lm_head = VocabParallelLMHead(model.lm_head, vocab_size)


# ---------------------------------------------------------------------------------------------
# Sharding plan
# ---------------------------------------------------------------------------------------------
def padded_vocab(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def check_tp(args: ModelArgs, quant: Optional[QuantConfig], tp_size: int) -> None:
    """One-line ConfigError when the model cannot be split over ``tp_size`` ranks."""
    if tp_size < 1:
        raise ConfigError(f"--tp_size must be at least 1, got {tp_size}")
    if tp_size == 1:
        return
    h, hkv = args.num_attention_heads, args.num_key_value_heads
    if h % tp_size:
        raise ConfigError(f"num_attention_heads {h} is not divisible by --tp_size {tp_size}")
    if hkv >= tp_size and hkv % tp_size:
        raise ConfigError(f"num_key_value_heads {hkv} is not divisible by --tp_size {tp_size}")
    if hkv < tp_size and tp_size % hkv:
        raise ConfigError(f"--tp_size {tp_size} is not a multiple of num_key_value_heads {hkv} "
                          "(KV heads are replicated only in whole copies)")
    if args.intermediate_size % tp_size:
        raise ConfigError(f"intermediate_size {args.intermediate_size} is not divisible by "
                          f"--tp_size {tp_size}")
    if quant is not None and quant.quant_algo in (W4A16, W4A16_GROUPWISE):
        g = quant.group_size if quant.quant_algo == W4A16_GROUPWISE else None
        for name, k in (("attention.dense", args.q_size), ("mlp.proj", args.intermediate_size)):
            k_local = k // tp_size
            if k_local % 2:
                raise ConfigError(f"int4 {name}: its input width per rank {k}/{tp_size} = "
                                  f"{k_local} is odd (two int4 values per byte)")
            if g and k_local % g:
                raise ConfigError(f"int4 {name}: its input width per rank {k}/{tp_size} = "
                                  f"{k_local} is not a multiple of --group_size {g}")


def local_args(args: ModelArgs, tp_size: int) -> ModelArgs:
    """The architecture one rank runs: its heads and MLP width; hidden size and vocabulary
    stay global (the embedding output and the gathered logits are full width)."""
    if tp_size == 1:
        return args
    hkv = args.num_key_value_heads
    return dataclasses.replace(
        args, num_attention_heads=args.num_attention_heads // tp_size,
        num_key_value_heads=max(1, hkv // tp_size),
        intermediate_size=args.intermediate_size // tp_size, head_dim=args.head_dim)


def kv_heads_of_rank(args: ModelArgs, tp_size: int, rank: int) -> list[int]:
    """The KV heads rank ``rank`` needs: a block of Hkv/tp, or the one its q heads share."""
    h, hkv = args.num_attention_heads, args.num_key_value_heads
    if hkv >= tp_size:
        n = hkv // tp_size
        return list(range(rank * n, (rank + 1) * n))
    q_per_rank, group = h // tp_size, h // hkv
    return [rank * q_per_rank // group]


def qkv_rows(args: ModelArgs, tp_size: int, rank: int) -> torch.Tensor:
    """Row indices into the fused [q; k; v] output of rank ``rank``: int64[(Hl + 2 Hkvl) * D]."""
    d = args.head_dim
    hl = args.num_attention_heads // tp_size

    def heads(first_row: int, idx: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(first_row + i * d, first_row + (i + 1) * d) for i in idx])

    kv = kv_heads_of_rank(args, tp_size, rank)
    return torch.cat([heads(0, list(range(rank * hl, (rank + 1) * hl))),
                      heads(args.q_size, kv), heads(args.q_size + args.kv_size, kv)])


def _chunk(t: torch.Tensor, dim: int, tp_size: int, rank: int) -> torch.Tensor:
    if t.shape[dim] % tp_size:
        raise ConfigError(f"cannot split a tensor of shape {tuple(t.shape)} into {tp_size} "
                          f"equal parts along dim {dim}")
    return t.chunk(tp_size, dim=dim)[rank].contiguous()


# FP8 (quant_fp8.py): one-value weight / activation scales hold for every shard.
FP8_REPLICATED = ("weights_scaling_factor", "activation_scaling_factor")


def _pad_rows(t: torch.Tensor, dim: int, n: int, value: float) -> torch.Tensor:
    """Pad dim ``dim`` of ``t`` to ``n`` with ``value`` (vocabulary padding)."""
    if t.shape[dim] >= n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=dim)


def _shard_column(prefix: str, group: dict, rows, tp_size: int, rank: int,
                  n_out: int) -> dict:
    """Output-split linear. ``rows``: int64 index of this rank's output rows, or None for a
    contiguous chunk. ``n_out``: the (padded) output width."""
    def take(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = _pad_rows(t, dim, n_out, 1 if t.is_floating_point() else 0)
        return _chunk(t, dim, tp_size, rank) if rows is None else \
            t.index_select(dim, rows.to(t.device)).contiguous()

    out = {}
    for suffix, t in group.items():
        if suffix == "weight":
            out[suffix] = take(t, 0)                         # [N, K] or packed [N, K/2]
        elif suffix in FP8_REPLICATED and t.numel() == 1:
            out[suffix] = t                                  # FP8 per-tensor scales
        elif suffix == "per_channel_scale":
            out[suffix] = t if t.numel() == 1 else take(t, t.dim() - 1)   # [N] / [1, N]
        elif suffix in ("weights_scaling_factor", "zero"):
            out[suffix] = take(t, 1)                         # [K/G, N]
        elif suffix in ("prequant_scaling_factor", "smoother", "act_scale"):
            out[suffix] = t                                  # input side: full input
        else:
            raise ConfigError(f"tensor parallelism: no sharding rule for {prefix}.{suffix}")
    return out


def _shard_row(prefix: str, group: dict, tp_size: int, rank: int) -> dict:
    """Input-split linear: weight columns, input-side scales; output scales replicate."""
    out = {}
    for suffix, t in group.items():
        if suffix == "weight":
            out[suffix] = _chunk(t, 1, tp_size, rank)       # [N, K/tp] or packed [N, K/tp/2]
        elif suffix in FP8_REPLICATED and t.numel() == 1:
            out[suffix] = t                                  # FP8 per-tensor scales
        elif suffix in ("weights_scaling_factor", "zero"):
            out[suffix] = _chunk(t, 0, tp_size, rank)       # [K/G/tp, N]
        elif suffix in ("prequant_scaling_factor", "smoother"):
            out[suffix] = _chunk(t, t.dim() - 1, tp_size, rank)   # [K] / [1, K]
        elif suffix in ("per_channel_scale", "act_scale"):
            out[suffix] = t
        else:
            raise ConfigError(f"tensor parallelism: no sharding rule for {prefix}.{suffix}")
    return out


def kv_channel_rows(args: ModelArgs, tp_size: int, rank: int) -> torch.Tensor:
    """Indices into a [Hkv*D] per-(KV head, channel) vector of rank ``rank``'s KV heads."""
    d = args.head_dim
    return torch.cat([torch.arange(h * d, (h + 1) * d)
                      for h in kv_heads_of_rank(args, tp_size, rank)])


def _shard_kv_scales(prefix: str, group: dict, args: ModelArgs, tp_size: int,
                     rank: int) -> dict:
    """``...attention`` tensors: per-layer KV scale replicated, per-channel ones by KV head."""
    out = {}
    for suffix, t in group.items():
        if suffix in KV_CHANNEL_SCALES:
            if t.numel() != args.kv_size:
                raise ConfigError(f"{prefix}.{suffix} has {t.numel()} values; expected Hkv*D "
                                  f"= {args.kv_size}")
            rows = kv_channel_rows(args, tp_size, rank).to(t.device)
            out[suffix] = t.reshape(-1).index_select(0, rows).contiguous()
        else:
            out[suffix] = t  # kv_cache_scaling_factor [1]: one value for the whole layer
    return out


def shard_checkpoint(tensors: dict, args: ModelArgs, quant: Optional[QuantConfig],
                     tp_size: int, rank: int) -> dict:
    """Canonical unified-checkpoint tensors (docs/design.md) -> rank ``rank``'s tensors, same
    names, local shapes."""
    check_tp(args, quant, tp_size)
    if tp_size == 1:
        return dict(tensors)
    if not 0 <= rank < tp_size:
        raise ConfigError(f"rank {rank} is outside tp_size {tp_size}")
    vp = padded_vocab(args.vocab_size, tp_size)
    qkv = qkv_rows(args, tp_size, rank)
    out: dict[str, torch.Tensor] = {}
    for prefix, group in group_by_prefix(tensors).items():
        kind = prefix.rsplit(".", 2)[-2:] if prefix.startswith("transformer.layers.") else None
        name = ".".join(kind) if kind else prefix
        if prefix == "transformer.vocab_embedding":
            local = {"weight": _chunk(_pad_rows(group["weight"], 0, vp, 0), 0, tp_size, rank)}
        elif prefix == "lm_head":
            local = _shard_column(prefix, group, None, tp_size, rank, vp)
        elif name == "attention.qkv":
            local = _shard_column(prefix, group, qkv, tp_size, rank, group["weight"].shape[0])
        elif name in ("mlp.fc", "mlp.gate"):
            local = _shard_column(prefix, group, None, tp_size, rank, group["weight"].shape[0])
        elif name in ROW_LINEARS:
            local = _shard_row(prefix, group, tp_size, rank)
        elif kind and prefix.endswith(".attention"):  # transformer.layers.{i}.attention
            local = _shard_kv_scales(prefix, group, args, tp_size, rank)
        else:
            local = dict(group)  # norms, KV-cache scales: replicated
        for suffix, t in local.items():
            out[f"{prefix}.{suffix}"] = t
    return out
