"""Attention-side ops: RoPE, paged KV-cache writes, decode and prefill attention -- argument
checks, which kernel runs, and its launch. Kernels: ``attn_kernels.py``; references and the
cache / RoPE conventions: ``reference.py``; decode launch parameters: ``tuning.py`` (per GPU).

* ``rope_decode_attention`` (a decode step: RoPE of q and k, the new token's cache write and
  the attention in one kernel on the Triton path) is what the network calls at decode;
  ``rope_write_kv`` then ``decode_attention`` give the same bits (its reference and oracle).
* Prefill runs torch SDPA (flash / memory-efficient kernels on CUDA, never cuDNN's, whose
  per-shape plans made inflight batching host-bound).

``impl`` as everywhere (``common.py``).

Imports: ``common``, ``pdl``, ``reference``, ``tuning``, ``attn_kernels``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ConfigError
from . import tuning
from .common import HAS_TRITON, IMPLS as _IMPLS, INTERPRET as _INTERPRET, next_pow2
from .common import use_triton as _use_triton
from .pdl import launch_kw
from .reference import (decode_attention_ref, is_quant_kv, kv_scale_tensors,
                        prefill_attention_ref, apply_rope_ref, rope_write_kv_ref, write_kv_ref)

if HAS_TRITON:
    from .attn_kernels import (_decode_attn_kernel, _decode_merge_kernel, _rope_kv_kernel)

__all__ = ["apply_rope", "write_kv", "rope_write_kv", "decode_attention",
           "rope_decode_attention", "prefill_attention", "prefill_attention_batch",
           "kv_scale_tensors", "is_quant_kv", "check_fp8_kv_device"]

_LOG2E = 1.4426950408889634

# SDPA backends for prefill on CUDA. PyTorch may pick cuDNN's attention on an H100, which builds
# an execution plan for every new (batch, length) shape: 1.2-1.9 ms of host time per call (one a
# layer). Inflight batching sees a new prompt length nearly every step, so its mixed steps
# became host-bound (tools/gpu_step_profile.py: 58-192 ms for steps of 109-1,035 tokens whose
# kernels took 25-29 ms). Flash / memory-efficient attention have no per-shape setup.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """torch SDPA over [B, H, T, D] tensors, without cuDNN's per-shape plans on CUDA."""
    F = torch.nn.functional
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with sdpa_kernel(_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kw)

def _check_rope(q, k, positions, cos, sin):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ConfigError(f"rope: expected q [N,H,D] and k [N,Hkv,D], got {tuple(q.shape)} "
                          f"and {tuple(k.shape)}")
    D = q.shape[2]
    if D % 2 or cos.shape[-1] != D // 2 or sin.shape[-1] != D // 2:
        raise ConfigError(f"rope: head dim {D} needs cos/sin tables [max_pos, {D // 2}], got "
                          f"{tuple(cos.shape)}")
    if positions.shape[0] != q.shape[0]:
        raise ConfigError(f"rope: {positions.shape[0]} positions for {q.shape[0]} tokens")


def _rope_tables_contig(cos: torch.Tensor, sin: torch.Tensor):
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for c in (k_cache, v_cache):
        _, _, bs, d = c.shape
        if c.stride(3) != 1 or c.stride(2) != d or c.stride(1) != bs * d:
            raise ConfigError("KV cache [blocks, Hkv, block_size, D] must be contiguous "
                              "within a block (a layer slice of a bigger cache is fine)")
        if bs & (bs - 1):
            raise ConfigError(f"KV block size {bs} must be a power of two")


def _check_cache(k, v, k_cache, v_cache, slot_mapping, kv_scale):
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ConfigError("KV caches must both be [num_blocks, Hkv, block_size, D], got "
                          f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]) or v.shape != k.shape:
        raise ConfigError(f"write_kv: k {tuple(k.shape)} / v {tuple(v.shape)} do not match "
                          f"cache {tuple(k_cache.shape)}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ConfigError(f"write_kv: {slot_mapping.shape[0]} slots for {k.shape[0]} tokens")
    if is_quant_kv(k_cache.dtype) and kv_scale is None:
        raise ConfigError(f"{k_cache.dtype} KV cache needs kv_scale")


def check_fp8_kv_device(device) -> None:
    """FP8 KV caches need FP8 conversions in hardware: CUDA compute capability >= 8.9 (Ada,
    Hopper); the CPU emulates them with torch's float8 dtypes. One-line ``ConfigError``."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise ConfigError(f"FP8 KV cache needs a GPU with compute capability >= 8.9 (Ada, "
                          f"Hopper); {torch.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}: "
                          "use the INT8 KV cache (--int8_kv_cache) or none")


def _heads_contig(x: torch.Tensor) -> torch.Tensor:
    """[N, heads, D] with D contiguous and heads packed; token rows may be strided."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _launch_rope_kv(q, k, v, positions, cos, sin, q_out, k_out, k_cache, v_cache, slot_mapping,
                    kv_scale, rope: bool, do_q: bool, store_k: bool, write_cache: bool):
    N, Hkv, D = k.shape
    H = q.shape[1] if q is not None else 1
    if N == 0:
        return
    # Unused pointer arguments get `k` (the constexpr flags keep them unread).
    q = q if q is not None else k
    q_out = q_out if q_out is not None else k
    k_out = k_out if k_out is not None else k
    v = v if v is not None else k
    pos = positions if positions is not None else slot_mapping
    cos_t = cos if cos is not None else k
    sin_t = sin if sin is not None else k
    slots = slot_mapping if slot_mapping is not None else pos
    kc = k_cache if k_cache is not None else k
    vc = v_cache if v_cache is not None else k
    quant = write_cache and is_quant_kv(kc.dtype)
    ks = vs = k  # unread unless QUANT
    if quant:
        ks, vs = kv_scale_tensors(kv_scale, Hkv, D, kc.device)
    block_size = kc.shape[2] if write_cache else 1
    bh, bhk = next_pow2(H), next_pow2(Hkv)
    half = D // 2
    _rope_kv_kernel[(N,)](
        q, k, v, pos, cos_t, sin_t, q_out, k_out, kc, vc, slots, ks, vs,
        q.stride(0), k.stride(0), v.stride(0), cos_t.stride(0) if rope else 0,
        kc.stride(0) if write_cache else 0, vc.stride(0) if write_cache else 0,
        H=H, HKV=Hkv, HALF=half,
        ROPE=rope, DO_Q=do_q, STORE_K=store_k, WRITE_CACHE=write_cache, QUANT=quant,
        FP8=quant and kc.dtype == torch.float8_e4m3fn,
        BLOCK_H=bh, BLOCK_HK=bhk, BLOCK_HALF=next_pow2(half), BLOCK_SIZE=block_size,
        # warps by the larger of the q and k/v head counts: write_kv alone (H = 1) moves
        # Hkv x D values too, and int8 quantizes each (one warp took 23 us at LLaMA-7B, H100)
        num_warps=4 if max(bh, bhk) * next_pow2(half) >= 2048 else 1, **launch_kw(k))


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [N,H,D] and k [N,Hkv,D] at ``positions``; new tensors out.

    q and k may be strided views (e.g. column slices of a fused qkv output).
    """
    _check_rope(q, k, positions, cos, sin)
    if not _use_triton(impl, q, k, positions, cos, sin):
        return apply_rope_ref(q, k, positions, cos, sin)
    q, k = _heads_contig(q), _heads_contig(k)
    cos, sin = _rope_tables_contig(cos, sin)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), \
        torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch_rope_kv(q, k, None, positions, cos, sin, q_out, k_out, None, None, None, None,
                    rope=True, do_q=True, store_k=True, write_cache=False)
    return q_out, k_out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scale=None, *,
             impl: str = "auto") -> None:
    """Scatter k/v [N,Hkv,D] into the paged caches at ``slot_mapping`` (in place; -1 skips).

    int8 / FP8 caches quantize with ``kv_scale`` (see ``kv_scale_tensors``)."""
    _check_cache(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    if not _use_triton(impl, k, v, k_cache, v_cache, slot_mapping):
        return write_kv_ref(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    if k.shape[2] % 2:
        raise ConfigError(f"write_kv: head dim {k.shape[2]} must be even")
    _check_cache_layout(k_cache, v_cache)
    k, v = _heads_contig(k), _heads_contig(v)
    _launch_rope_kv(None, k, v, None, None, None, None, None, k_cache, v_cache, slot_mapping,
                    kv_scale, rope=False, do_q=False, store_k=False, write_cache=True)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  kv_scale=None, *, impl: str = "auto") -> torch.Tensor:
    """Fused RoPE of q and k plus the KV-cache write of (rotated k, v); returns rotated q."""
    _check_rope(q, k, positions, cos, sin)
    _check_cache(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    if not _use_triton(impl, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
        return rope_write_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache,
                                 slot_mapping, kv_scale)
    _check_cache_layout(k_cache, v_cache)
    q, k, v = _heads_contig(q), _heads_contig(k), _heads_contig(v)
    cos, sin = _rope_tables_contig(cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_rope_kv(q, k, v, positions, cos, sin, q_out, None, k_cache, v_cache, slot_mapping,
                    kv_scale, rope=True, do_q=True, store_k=False, write_cache=True)
    return q_out


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, softmax_scale: float, kv_scale=None, *,
                          max_context_len: Optional[int] = None,
                          partition_size: Optional[int] = None,
                          impl: str = "auto") -> torch.Tensor:
    """A decode step's attention from the unrotated q [B,H,D], k, v [B,Hkv,D] of each
    sequence's new token: ``rope_write_kv`` then ``decode_attention`` (same arguments, same
    result bit for bit on CUDA), in one launch on the Triton path: each attention program
    rotates its q heads in registers, and the one whose split holds the context's last token
    writes the new k / v first. The new token must be the last of its context (``context_lens`` counts it),
    as in every decode step; a slot of -1 writes nothing. ``max_context_len``, if given, must
    bound every context (as for ``decode_attention``): a split past it is never run, and then
    neither is the fused path's cache write."""
    _check_rope(q, k, positions, cos, sin)
    _check_cache(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    kw = dict(max_context_len=max_context_len, partition_size=partition_size, impl=impl)
    if not _use_triton(impl, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                       block_tables, context_lens):
        q = rope_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                          kv_scale, impl=impl)
        return decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                softmax_scale, kv_scale, **kw)
    cos, sin = _rope_tables_contig(cos, sin)  # (the checks above tie positions, slots to q)
    k, v = _heads_contig(k), _heads_contig(v)
    return decode_attention(_heads_contig(q), k_cache, v_cache, block_tables, context_lens,
                            softmax_scale, kv_scale, **kw,
                            _rope=(k, v, positions, slot_mapping, cos, sin))


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     softmax_scale: float, kv_scale=None, *,
                     max_context_len: Optional[int] = None,
                     partition_size: Optional[int] = None,
                     impl: str = "auto", _rope=None, _cfg=None) -> torch.Tensor:
    """One new query token per sequence over its paged KV cache.

    q [B,H,D]; caches [num_blocks, Hkv, block_size, D] (model dtype, or int8 / float8_e4m3fn
    with ``kv_scale``: a float, or (k_scale, v_scale) per (KV head, channel), see
    ``kv_scale_tensors``); block_tables int32 [B, max_blocks]; context_lens int32 [B] (tokens in the
    cache, this step's included). ``max_context_len`` (optional host int, an upper bound)
    only tunes the split; without it the bound is ``max_blocks * block_size``.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ConfigError(f"decode_attention: expected q [B,H,D] and caches "
                          f"[blocks,Hkv,bs,D], got {tuple(q.shape)}, {tuple(k_cache.shape)}")
    B, H, D = q.shape
    hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != D or H % hkv:
        raise ConfigError(f"decode_attention: q {tuple(q.shape)} does not fit cache "
                          f"{tuple(k_cache.shape)} (H must be a multiple of Hkv)")
    if block_tables.shape[0] != B or context_lens.shape[0] != B:
        raise ConfigError("decode_attention: block_tables/context_lens batch != q batch")
    quant = is_quant_kv(k_cache.dtype)
    if quant and kv_scale is None:
        raise ConfigError(f"{k_cache.dtype} KV cache needs kv_scale")
    if not _use_triton(impl, q, k_cache, v_cache, block_tables, context_lens):
        return decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens,
                                    softmax_scale, kv_scale)
    if D & (D - 1) or D < 16:
        raise ConfigError(f"decode_attention: Triton path needs a power-of-two head dim >= 16,"
                          f" got {D}")
    _check_cache_layout(k_cache, v_cache)
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    q = _heads_contig(q)
    ks = vs = q  # unread unless QUANT
    if quant:
        ks, vs = kv_scale_tensors(kv_scale, hkv, D, k_cache.device)
    cfg = _cfg if _cfg is not None else tuning.table_for(q.device).decode
    G = H // hkv
    use_dot = G >= cfg["dot_min_group"]
    g_pad = max(16, next_pow2(G)) if use_dot else next_pow2(G)
    # the "_int8" launch parameters serve both 1-byte caches (int8 and FP8: same bytes a tile)
    block_n = cfg["block_n_int8"] if quant else cfg["block_n"]
    if q.dtype == torch.float32 and not quant:
        block_n = min(block_n, 32)  # fp32 tiles are twice the bytes
    max_ctx = max_context_len if max_context_len is not None \
        else block_tables.shape[1] * block_size
    max_ctx = max(int(max_ctx), 1)
    if partition_size is None:
        # Largest partition (up to max_partition) that still gives ~target programs: batch 1
        # with a long context is spread over the SMs, big batches are not split at all.
        target = cfg["target_programs"] or 2 * _sm_count(q.device)
        part = max(cfg["max_partition_int8" if quant else "max_partition"], block_n)
        while part > block_n and B * hkv * -(-max_ctx // part) < target:
            part //= 2
        part = max(part, -(-max_ctx // (cfg["max_splits"] * block_n)) * block_n)
    else:
        part = partition_size
        if part % block_n:
            block_n = math.gcd(part, block_n)
            if block_n < 16:
                raise ConfigError(f"partition_size {part} must be a multiple of 16")
    splits = -(-max_ctx // part)
    split = splits > 1
    qk_scale = float(softmax_scale) * _LOG2E  # the K scales go into q inside the kernel
    # one fp32 workspace: partial outputs [B, H, splits, D], then m and l [B, H, splits]
    ws = torch.empty(B * H * splits * (D + 2) if split else 1, dtype=torch.float32,
                     device=q.device)
    if _rope is None:  # unread pointers (constexpr ROPE off): q stands in for them
        kn = vn = pos = slots = cos = sin = q
        s_cos = 0
    else:
        kn, vn, pos, slots, cos, sin = _rope
        s_cos = cos.stride(0)
    _decode_attn_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, context_lens, out, ws, qk_scale, part,
        splits, q.stride(0), k_cache.stride(0), v_cache.stride(0), block_tables.stride(0),
        kn, vn, pos, slots, cos, sin, kn.stride(0), vn.stride(0), s_cos,
        G=G, G_PAD=g_pad, HKV=hkv, D=D, BLOCK_N=block_n, BLOCK_SIZE=block_size, SPLIT=split,
        USE_DOT=use_dot, IEEE=q.dtype == torch.float32,
        MAGIC=use_dot and k_cache.dtype == torch.int8 and q.dtype == torch.float16
        and cfg["int8_magic"],
        QUANT=quant, FP8=k_cache.dtype == torch.float8_e4m3fn, ROPE=_rope is not None,
        NUM_STAGES=cfg["num_stages_int8" if quant else "num_stages"],
        INTERPRET=_INTERPRET, num_warps=cfg["num_warps_int8" if quant else "num_warps"],
        **launch_kw(q))
    if split:
        _decode_merge_kernel[(B, H)](
            out, ws, context_lens, part, splits,
            H=H, D=D, S_PAD=next_pow2(splits), num_warps=4 if splits * D >= 4096 else 2,
            **launch_kw(q))
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal_offset: Optional[int] = None, *,
                      softmax_scale: Optional[float] = None,
                      impl: str = "auto") -> torch.Tensor:
    """Causal attention of T new tokens q [T,H,D] over S = prefix + T keys k/v [S,Hkv,D].

    Query i sits at absolute position ``causal_offset + i`` (default ``S - T``) and sees keys
    ``0..causal_offset + i``. torch SDPA (flash / memory-efficient kernels on CUDA, the fused
    CPU kernel elsewhere, as HF's default attention); ``impl="torch"`` is the plain reference.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ConfigError(f"prefill_attention: expected q [T,H,D], k/v [S,Hkv,D], got "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    T, H, D = q.shape
    S, hkv = k.shape[0], k.shape[1]
    if H % hkv:
        raise ConfigError(f"prefill_attention: H {H} not a multiple of Hkv {hkv}")
    if causal_offset is None:
        causal_offset = S - T
    if impl not in _IMPLS:
        raise ConfigError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return prefill_attention_ref(q, k, v, causal_offset, softmax_scale)
    if hkv != H:  # expand GQA heads: [S, Hkv, D] -> [S, H, D]
        rep = H // hkv
        k = k[:, :, None, :].expand(S, hkv, rep, D).reshape(S, H, D)
        v = v[:, :, None, :].expand(S, hkv, rep, D).reshape(S, H, D)
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if causal_offset == 0 and S == T:
        o = _sdpa(qt, kt, vt, is_causal=True, scale=softmax_scale)
    elif causal_offset >= S - 1:  # every query sees every key
        o = _sdpa(qt, kt, vt, scale=softmax_scale)
    else:
        qpos = causal_offset + torch.arange(T, device=q.device)
        mask = torch.arange(S, device=q.device)[None, :] <= qpos[:, None]  # [T, S]
        o = _sdpa(qt, kt, vt, attn_mask=mask, scale=softmax_scale)
    return o[0].transpose(0, 1).contiguous()


def prefill_attention_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            softmax_scale: Optional[float] = None,
                            impl: str = "auto") -> torch.Tensor:
    """Causal attention of B prompts of T new tokens each over S >= T keys each (a cached
    prefix of S - T the same length for all, then the new tokens), in one call:
    q [B,T,H,D], k/v [B,S,Hkv,D] -> [B,T,H,D]. Equal to ``prefill_attention`` on each prompt;
    one SDPA launch instead of B (inflight batching admits many prompts a step, and with
    prefix caching many of them continue the same cached prefix)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or k.shape[1] < q.shape[1] or q.shape[3] != k.shape[3]:
        raise ConfigError(f"prefill_attention_batch: expected q [B,T,H,D], k/v [B,S>=T,Hkv,D], "
                          f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    S, hkv = k.shape[1], k.shape[2]
    if H % hkv:
        raise ConfigError(f"prefill_attention_batch: H {H} not a multiple of Hkv {hkv}")
    if impl not in _IMPLS:
        raise ConfigError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return torch.stack([prefill_attention_ref(q[b], k[b], v[b], S - T, softmax_scale)
                            for b in range(B)]) if B else torch.empty_like(q)
    if hkv != H:  # expand GQA heads: [B, S, Hkv, D] -> [B, S, H, D]
        rep = H // hkv
        k = k[:, :, :, None, :].expand(B, S, hkv, rep, D).reshape(B, S, H, D)
        v = v[:, :, :, None, :].expand(B, S, hkv, rep, D).reshape(B, S, H, D)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if S == T:
        o = _sdpa(qt, kt, vt, is_causal=True, scale=softmax_scale)  # [B, H, T, D]
    else:  # SDPA's is_causal aligns to the top left; new token i sees keys 0..S-T+i
        qpos = (S - T) + torch.arange(T, device=q.device)
        mask = torch.arange(S, device=q.device)[None, :] <= qpos[:, None]  # [T, S]
        o = _sdpa(qt, kt, vt, attn_mask=mask, scale=softmax_scale)
    return o.transpose(1, 2)
