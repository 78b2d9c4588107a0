"""Attention-side kernels: RMSNorm, RoPE, paged KV-cache writes, decode and prefill attention.

Every public op has a plain-PyTorch ``*_ref`` twin (fp32 math) that is the CPU path and the
test oracle, and a Triton path used on CUDA. ``impl`` picks: ``"auto"`` (Triton on CUDA,
reference elsewhere), ``"triton"`` (also runs on CPU tensors under ``TRITON_INTERPRET=1``) or
``"torch"`` (the reference).

Conventions (docs/design.md):

* RMSNorm as HF ``LlamaRMSNorm``: ``(x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) * w``.
* RoPE in the rotate-half (GPT-NeoX / HF) layout: for ``x = [x1, x2]`` (halves of the head),
  ``out = [x1*cos - x2*sin, x2*cos + x1*sin]``; ``cos``/``sin`` are ``[max_pos, D/2]`` tables.
* Paged KV cache per layer: ``[num_blocks, Hkv, block_size, D]``, model dtype or int8; token
  slot ``= block * block_size + offset``; slot ``-1`` is padding and is not written. INT8 KV:
  ``q = clamp(round(x / s), -127, 127)``, ``x ~= q * s``, with static calibrated scales per
  (KV head, channel), separately for K and V (``kv_scale = (k_scale, v_scale)``, each float32
  ``[Hkv, D]``); TensorRT-LLM's single per-layer scale is the special case of constant
  vectors (a plain float ``kv_scale`` is accepted and expanded). The scales cost nothing in
  decode attention: ``q . (k_q * ks) = (q * ks) . k_q`` scales the query row once per
  program, and ``sum_t p_t (v_q,t * vs) = vs * sum_t p_t v_q,t`` scales the output once.
* Decode attention is flash-decoding (Dao et al., "Flash-Decoding for long-context
  inference", 2023) over a vLLM-style paged cache (Kwon et al., "PagedAttention", 2023): the
  context of each sequence is cut into partitions handled by separate programs, each of which
  serves all query heads of one KV head (GQA: K/V are loaded once per group), followed by a
  small log-sum-exp merge kernel.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama_engine.config import ConfigError

from . import pdl
from .linear import HAS_TRITON as _linear_has_triton
from .linear import partial_slices, summed

try:  # Triton is optional on CPU-only installs; the references need only torch.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False
# The norm kernel shares linear.py's split-K loader, so both modules need Triton in full.
HAS_TRITON = HAS_TRITON and _linear_has_triton

_IMPLS = ("auto", "triton", "torch")

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
_LOG2E = 1.4426950408889634


def _use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    if impl not in _IMPLS:
        raise ConfigError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise ConfigError("impl='triton' needs the triton package")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _one_kv_scale(s, hkv: int, head_dim: int, device, what: str) -> torch.Tensor:
    """A float or a tensor of 1 or Hkv*D values -> float32 [Hkv, D] contiguous on ``device``.

    Tensors already in that form come back as they are (no copy, no host sync: this runs
    inside captured CUDA graphs); values are checked where scales are loaded, not here."""
    if isinstance(s, torch.Tensor):
        if s.numel() == hkv * head_dim:
            t = s.reshape(hkv, head_dim)
        elif s.numel() == 1:
            t = s.reshape(1, 1).expand(hkv, head_dim)
        else:
            raise ConfigError(f"{what} scale has {s.numel()} values; expected 1 or "
                              f"Hkv*D = {hkv}*{head_dim} = {hkv * head_dim}")
        if device is not None and t.device != torch.device(device):
            t = t.to(device)
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.to(torch.float32).contiguous()
        return t
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} scale must be a float or a tensor, got {type(s).__name__}"
                          ) from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{what} scale must be finite and positive, got {v}")
    return torch.full((hkv, head_dim), v, dtype=torch.float32, device=device)


def kv_scale_tensors(kv_scale, hkv: int, head_dim: int, device=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 KV scales in the kernels' form: (k_scale, v_scale), float32 ``[Hkv, D]`` each.

    ``kv_scale``: one float for K and V (TensorRT-LLM's per-layer ``kv_cache_scaling_factor``)
    or a pair ``(k_scale, v_scale)``, each a float or a tensor of ``Hkv*D`` values (scale of
    KV head h, channel d at ``h*D + d``)."""
    if kv_scale is None:
        raise ConfigError("int8 KV cache needs kv_scale")
    if isinstance(kv_scale, (tuple, list)):
        if len(kv_scale) != 2:
            raise ConfigError(f"kv_scale pair must be (k_scale, v_scale), got {len(kv_scale)} "
                              "items")
        ks, vs = kv_scale
    else:
        ks = vs = kv_scale
    return (_one_kv_scale(ks, hkv, head_dim, device, "K"),
            _one_kv_scale(vs, hkv, head_dim, device, "V"))


# =============================================================================================
# References (fp32 math, fp64 for fp64 inputs). These are the CPU path and the test oracle.
# =============================================================================================
def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the references: fp64 engines stay fp64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # HF's LlamaRMSNorm normalizes in fp32 whatever the model dtype
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.to(_acc(x)) * weight.to(_acc(x))).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The sum is rounded to the model dtype first, as HF's `residual + hidden` is.
    new_res = (x.to(_acc(x)) + residual.to(_acc(x))).to(x.dtype)
    return rms_norm_ref(new_res, weight, eps), new_res


def _rotate_ref(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.to(_acc(x)).chunk(2, dim=-1)
    c, s = c.to(x1.dtype), s.to(x1.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = cos[positions].float()[:, None, :]  # [N, 1, D/2]
    s = sin[positions].float()[:, None, :]
    return _rotate_ref(q, c, s), _rotate_ref(k, c, s)


def quantize_kv_ref(x: torch.Tensor, kv_scale) -> torch.Tensor:
    """x [..., Hkv, D] -> int8; ``kv_scale`` a float or a tensor broadcasting to [Hkv, D].

    An IEEE fp32 division, as the write kernel does (``div_rn``), so both round alike."""
    return torch.round(x.float() / kv_scale).clamp_(-127, 127).to(torch.int8)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scale=None) -> None:
    bs = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blk, off = slots // bs, slots % bs
    scales = (None, None)
    if k_cache.dtype == torch.int8:
        scales = kv_scale_tensors(kv_scale, k.shape[1], k.shape[2], k.device)
    for src, cache, scale in ((k[keep], k_cache, scales[0]), (v[keep], v_cache, scales[1])):
        if cache.dtype == torch.int8:
            src = quantize_kv_ref(src, scale)  # [n, Hkv, D] / [Hkv, D]
        cache[blk, :, off] = src.to(cache.dtype)  # [n, Hkv, D] into [blk, :, off, :]


def rope_write_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                      kv_scale=None) -> torch.Tensor:
    q_rot, k_rot = apply_rope_ref(q, k, positions, cos, sin)
    write_kv_ref(k_rot, v, k_cache, v_cache, slot_mapping, kv_scale)
    return q_rot


def gather_kv_ref(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  kv_scale=None, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 ``[B, Hkv, Lmax, D]`` view of a paged cache and the ``[B, Lmax]`` valid mask.

    ``kv_scale``: this cache's dequantization scale (int8): a float, or ``Hkv*D`` values."""
    bs = cache.shape[2]
    lmax = max(int(context_lens.max().item()), 1) if context_lens.numel() else 1
    t = torch.arange(lmax, device=cache.device)
    valid = t[None, :] < context_lens.to(cache.device).long()[:, None]  # [B, Lmax]
    col = (t // bs).clamp_(max=block_tables.shape[1] - 1)
    blk = block_tables.long()[:, col]  # [B, Lmax]; entries past the context may be garbage
    blk = torch.where(valid, blk, torch.zeros_like(blk)).clamp_(0, cache.shape[0] - 1)
    x = cache[blk, :, (t % bs)[None, :].expand_as(blk)]  # [B, Lmax, Hkv, D]
    x = x.to(dtype)
    if cache.dtype == torch.int8:
        x = x * _one_kv_scale(kv_scale, cache.shape[1], cache.shape[3], cache.device,
                              "KV").to(dtype)  # per (head, channel): [Hkv, D]
    return x.permute(0, 2, 1, 3), valid


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         softmax_scale: float, kv_scale=None,
                         **_unused) -> torch.Tensor:
    B, H, D = q.shape
    hkv = k_cache.shape[1]
    if B == 0:
        return torch.empty_like(q)
    ks = vs = None
    if k_cache.dtype == torch.int8:
        ks, vs = kv_scale_tensors(kv_scale, hkv, D, k_cache.device)
    k, valid = gather_kv_ref(k_cache, block_tables, context_lens, ks, _acc(q))
    v, _ = gather_kv_ref(v_cache, block_tables, context_lens, vs, _acc(q))
    qf = q.to(_acc(q)).view(B, hkv, H // hkv, D)  # query head h -> kv head h // (H // Hkv)
    s = torch.einsum("bgqd,bgtd->bgqt", qf, k) * softmax_scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # empty context -> zeros
    out = torch.einsum("bgqt,bgtd->bgqd", p, v)
    return out.reshape(B, H, D).to(q.dtype)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          causal_offset: Optional[int] = None,
                          softmax_scale: Optional[float] = None) -> torch.Tensor:
    T, H, D = q.shape
    S, hkv = k.shape[0], k.shape[1]
    if causal_offset is None:
        causal_offset = S - T
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    rep = H // hkv
    kf = k.to(_acc(q)).repeat_interleave(rep, dim=1)  # [S, H, D]
    vf = v.to(_acc(q)).repeat_interleave(rep, dim=1)
    s = torch.einsum("thd,shd->hts", q.to(_acc(q)), kf) * scale
    qpos = causal_offset + torch.arange(T, device=q.device)
    allowed = torch.arange(S, device=q.device)[None, :] <= qpos[:, None]  # [T, S]
    s = s.masked_fill(~allowed[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
    return torch.einsum("hts,shd->thd", p, vf).to(q.dtype)


# =============================================================================================
# Triton kernels
# =============================================================================================
if HAS_TRITON:
    from .linear import _load_summed
    from .pdl import wait_then_release

    @triton.jit
    def _rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_s, stride_x, stride_r, stride_o,
                         stride_ro, D, eps, S: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        # One program per row; the whole row (D <= 16k) sits in registers. X: [S, M, D], the
        # S split-K partials of the previous linear (S = 1: its output), summed here.
        wait_then_release(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = _load_summed(X + row * stride_x + cols, mask, stride_s, S, OUT.dtype.element_ty)
        _add_rms_norm_row(x, R + row * stride_r, W, OUT + row * stride_o,
                          RES_OUT + row * stride_ro, cols, mask, D, eps, HAS_RES)

    @triton.jit
    def _add_rms_norm_row(x, R, W, OUT, RES_OUT, cols, mask, D, eps, HAS_RES: tl.constexpr):
        """One row: [res_out = x + r;] out = rms_norm(res_out or x) * w. x: the row in the
        model dtype; R / OUT / RES_OUT point at the row's start. Loads r and w, then
        _add_rms_norm_vals (the one copy of the math, also the TP one-shot kernel's tail)."""
        if HAS_RES:
            r = tl.load(R + cols, mask=mask, other=0.0)
        else:
            r = x
        w = tl.load(W + cols, mask=mask, other=0.0)
        _add_rms_norm_vals(x, r, w, OUT, RES_OUT, cols, mask, D, eps, HAS_RES)

    @triton.jit
    def _add_rms_norm_vals(x, r, w, OUT, RES_OUT, cols, mask, D, eps, HAS_RES: tl.constexpr):
        """_add_rms_norm_row on a residual row r and weights w already loaded (the TP kernel
        loads them before it waits for its peers)."""
        if HAS_RES:
            # round the sum to the model dtype before normalizing, as HF does
            x = (x.to(tl.float32) + r.to(tl.float32)).to(RES_OUT.dtype.element_ty)
            tl.store(RES_OUT + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        y = (xf * rstd).to(OUT.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        tl.store(OUT + cols, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_int8(x, scale):
        # x, scale: fp32. A correctly rounded division (not x * (1/scale), which can land one
        # level off at a tie), exactly as the reference's x / scale. Clamp first (127 is an
        # integer, so clamp-then-round == round-then-clamp), then round half to even with the
        # 1.5*2^23 trick (exact for |x| < 2^22), matching torch.round.
        y = tl.math.div_rn(x, scale)
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        y = (y + 12582912.0) - 12582912.0
        return y.to(tl.int8)

    @triton.jit
    def _rot(x, xp, c, ss):
        # One rotate-half RoPE output in fp32: x * cos + partner * (+-sin), with the FMA
        # written out (left to the compiler, the two kernels contracted it differently and
        # their greedy tokens parted): the decode attention kernel's fused RoPE gives the
        # bits rope_write_kv gives.
        return tl.fma(x, c, xp * ss)

    @triton.jit
    def _rope_kv_kernel(Q, K, V, POS, COS, SIN, QO, KO, KC, VC, SLOT, KS, VS,
                        sq_n, sk_n, sv_n, s_cos, skc_b, svc_b,
                        H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                        ROPE: tl.constexpr, DO_Q: tl.constexpr, STORE_K: tl.constexpr,
                        WRITE_CACHE: tl.constexpr, QUANT: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                        BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        PDL: tl.constexpr):
        # One program per token: rotate all its q/k heads (rotate-half layout) and/or write its
        # k/v heads into the paged cache. Head vectors are handled as two halves [x1 | x2].
        # Rows of q/k/v are [heads, D] with D contiguous (strided token rows allowed); q/k
        # outputs are contiguous; caches are [blocks, HKV, BLOCK_SIZE, D] with a free block
        # stride; int8 scales KS/VS are fp32 [HKV, D]. Few runtime arguments keep the host-side
        # launch cost down.
        wait_then_release(PDL)
        D: tl.constexpr = 2 * HALF
        n = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        dmask = d < HALF
        if ROPE:
            pos = tl.load(POS + n).to(tl.int64)
            c = tl.load(COS + pos * s_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            s = tl.load(SIN + pos * s_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        if DO_Q:
            h = tl.arange(0, BLOCK_H)[:, None]
            m = (h < H) & dmask[None, :]
            qp = Q + n * sq_n + h * D + d[None, :]
            q1 = tl.load(qp, mask=m, other=0.0).to(tl.float32)
            q2 = tl.load(qp + HALF, mask=m, other=0.0).to(tl.float32)
            op = QO + n * (H * D) + h * D + d[None, :]
            tl.store(op, _rot(q1, q2, c, -s).to(QO.dtype.element_ty), mask=m)
            tl.store(op + HALF, _rot(q2, q1, c, s).to(QO.dtype.element_ty), mask=m)
        hk = tl.arange(0, BLOCK_HK)[:, None]
        mk = (hk < HKV) & dmask[None, :]
        kp = K + n * sk_n + hk * D + d[None, :]
        k1 = tl.load(kp, mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mk, other=0.0).to(tl.float32)
        if ROPE:
            k1r = _rot(k1, k2, c, -s)
            k2 = _rot(k2, k1, c, s)
            k1 = k1r
        if STORE_K:
            op = KO + n * (HKV * D) + hk * D + d[None, :]
            tl.store(op, k1.to(KO.dtype.element_ty), mask=mk)
            tl.store(op + HALF, k2.to(KO.dtype.element_ty), mask=mk)
        if WRITE_CACHE:
            slot = tl.load(SLOT + n).to(tl.int64)
            mw = mk & (slot >= 0)  # slot -1: padding token, nothing is written
            blk = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            vp = V + n * sv_n + hk * D + d[None, :]
            v1 = tl.load(vp, mask=mk, other=0.0).to(tl.float32)
            v2 = tl.load(vp + HALF, mask=mk, other=0.0).to(tl.float32)
            inner = hk * (BLOCK_SIZE * D) + off * D + d[None, :]
            kc = KC + blk * skc_b + inner
            vc = VC + blk * svc_b + inner
            if QUANT:
                # per (head, channel) scales of both halves, [BLOCK_HK, BLOCK_HALF] each
                sp = hk * D + d[None, :]
                ks1 = tl.load(KS + sp, mask=mk, other=1.0)
                ks2 = tl.load(KS + sp + HALF, mask=mk, other=1.0)
                vs1 = tl.load(VS + sp, mask=mk, other=1.0)
                vs2 = tl.load(VS + sp + HALF, mask=mk, other=1.0)
                tl.store(kc, _quant_int8(k1, ks1), mask=mw)
                tl.store(kc + HALF, _quant_int8(k2, ks2), mask=mw)
                tl.store(vc, _quant_int8(v1, vs1), mask=mw)
                tl.store(vc + HALF, _quant_int8(v2, vs2), mask=mw)
            else:
                tl.store(kc, k1.to(KC.dtype.element_ty), mask=mw)
                tl.store(kc + HALF, k2.to(KC.dtype.element_ty), mask=mw)
                tl.store(vc, v1.to(VC.dtype.element_ty), mask=mw)
                tl.store(vc + HALF, v2.to(VC.dtype.element_ty), mask=mw)

    @triton.jit
    def _i8_to_f16_shifted(x):
        # int8 v -> fp16 (v + 1152) without a conversion instruction (those issue at 1/4 rate
        # on Hopper): the bits 0x6400 + (v + 128) are the fp16 number 1024 + (v + 128).
        return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True)

    @triton.jit
    def _attn_tile(q, qf, qshift, m_i, l_i, acc, t0, end, kbase, vbase, btrow, qk_scale, d,
                   skc_b, svc_b, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                   MAGIC: tl.constexpr):
        # One tile of BLOCK_N context tokens [t0, t0+BLOCK_N) ∩ [.., end) for G_PAD query heads;
        # q [G_PAD, D], m_i/l_i [G_PAD], acc [G_PAD, D] (online softmax state, base 2).
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        # physical block of every token of the tile (block sizes below BLOCK_N cross blocks)
        blk = tl.load(btrow + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = (t % BLOCK_SIZE).to(tl.int64)
        k = tl.load(kbase + blk[:, None] * skc_b + off[:, None] * D + d[None, :],
                    mask=tmask[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(vbase + blk[:, None] * svc_b + off[:, None] * D + d[None, :],
                    mask=tmask[:, None], other=0.0)
        if MAGIC:
            # int8 cache, fp16 math: K and V arrive shifted by +1152 (see _i8_to_f16_shifted).
            # q.(k + 1152) = q.k + qshift; the V shift is removed once at the end.
            s = tl.dot(q, tl.trans(_i8_to_f16_shifted(k))) - qshift[:, None]
        elif USE_DOT:
            # int8 values are exact in fp16/bf16; their scales are folded into q and o
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [G_PAD, BLOCK_N]
        else:
            s = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, BLOCK_N]
        if MAGIC:
            # the V shift cancels exactly only if the weights summed are the ones multiplied
            p16 = p.to(tl.float16)
            l_i = l_i * alpha + tl.sum(p16.to(tl.float32), axis=1)
            pv = tl.dot(p16, _i8_to_f16_shifted(v))
        elif USE_DOT:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
            else:
                pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _decode_attn_kernel(Q, KC, VC, KS, VS, BT, CL, OUT, WS, qk_scale, partition, splits,
                            sq_b, skc_b, svc_b, sbt_b,
                            KN, VN, POS, SLOT, COS, SIN, skn_b, svn_b, s_cos,
                            G: tl.constexpr, G_PAD: tl.constexpr, HKV: tl.constexpr,
                            D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            SPLIT: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
                            MAGIC: tl.constexpr, QUANT: tl.constexpr, ROPE: tl.constexpr,
                            NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr,
                            PDL: tl.constexpr):
        # grid = (B, Hkv, splits). Program (b, g, sp) attends the G query heads of KV head g of
        # sequence b over tokens [sp*partition, (sp+1)*partition) of its context, with an
        # online softmax in base 2 (qk_scale already holds log2(e)).
        # Layouts: q [B, H, D] (row stride sq_b), out [B, H, D] contiguous, caches
        # [blocks, HKV, BLOCK_SIZE, D] (block stride skc_b/svc_b), workspace WS (fp32) =
        # partial outputs [B, H, splits, D], then row maxima m and sums l [B, H, splits].
        # int8 caches (QUANT): KS/VS are the fp32 [HKV, D] dequantization scales.
        # ROPE: rope_write_kv fused in front (decode: the new token is the last of its
        # context). Q is then the unrotated q; KN / VN [B, HKV, D] (row strides skn_b / svn_b)
        # the new token's k and v; POS / SLOT its position and cache slot (-1: none);
        # COS / SIN the fp32 tables [positions, D/2] (row stride s_cos).
        wait_then_release(PDL)
        H: tl.constexpr = HKV * G
        b = tl.program_id(0)
        g = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(CL + b)
        start = sp * partition
        if (start >= ctx) & (sp > 0):
            return  # nothing of this sequence here; the merge kernel skips this split
        end = tl.minimum(start + partition, ctx)

        gi = tl.arange(0, G_PAD)
        gmask = gi < G
        heads = g * G + gi
        d = tl.arange(0, D)
        qp = Q + b.to(tl.int64) * sq_b + heads[:, None] * D
        if ROPE:
            # Every program rotates its q heads in registers, the arithmetic of rope_write_kv
            # (_rot per element: x * cos + partner * (+-sin)). The program whose split holds
            # the context's last token (end == ctx) rotates the new k of KV head g and writes
            # it and v to the cache slot; the barrier makes those stores visible to this
            # program's own tile loads below (no other program reads that slot).
            HALF: tl.constexpr = D // 2
            first = d < HALF
            j = tl.where(first, d, d - HALF)
            partner = tl.where(first, d + HALF, d - HALF)
            pos = tl.load(POS + b).to(tl.int64)
            c = tl.load(COS + pos * s_cos + j).to(tl.float32)
            sn = tl.load(SIN + pos * s_cos + j).to(tl.float32)
            ss = tl.where(first, -sn, sn)
            x = tl.load(qp + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            xp = tl.load(qp + partner[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            q = _rot(x, xp, c[None, :], ss[None, :]).to(Q.dtype.element_ty)  # [G_PAD, D]
            slot = tl.load(SLOT + b).to(tl.int64)
            if (end == ctx) & (slot >= 0):
                kp = KN + b.to(tl.int64) * skn_b + g.to(tl.int64) * D
                kr = _rot(tl.load(kp + d).to(tl.float32), tl.load(kp + partner).to(tl.float32),
                          c, ss)
                vr = tl.load(VN + b.to(tl.int64) * svn_b + g.to(tl.int64) * D + d).to(
                    tl.float32)
                inner = g.to(tl.int64) * (BLOCK_SIZE * D) + (slot % BLOCK_SIZE) * D + d
                blk = slot // BLOCK_SIZE
                if QUANT:
                    tl.store(KC + blk * skc_b + inner,
                             _quant_int8(kr, tl.load(KS + g.to(tl.int64) * D + d)))
                    tl.store(VC + blk * svc_b + inner,
                             _quant_int8(vr, tl.load(VS + g.to(tl.int64) * D + d)))
                else:
                    tl.store(KC + blk * skc_b + inner, kr.to(KC.dtype.element_ty))
                    tl.store(VC + blk * svc_b + inner, vr.to(VC.dtype.element_ty))
            tl.debug_barrier()
        else:
            q = tl.load(qp + d[None, :], mask=gmask[:, None], other=0.0)  # [G_PAD, D]
        if QUANT:
            # q . (k_int8 * ks) = (q * ks) . k_int8: the K scales of this KV head go into q,
            # rounded back to q's dtype (the dot operand; qf and the MAGIC shift use the same
            # rounded values, so the +1152 shift still cancels exactly). Normalized by the
            # largest scale, which goes into the scalar qk_scale, so that q * ks / max(ks) never
            # leaves q's range (no fp16 overflow, no needless subnormals).
            ks = tl.load(KS + g.to(tl.int64) * D + d)  # [D] fp32
            ks_max = tl.max(ks, axis=0)
            q = (q.to(tl.float32) * (ks / ks_max)[None, :]).to(Q.dtype.element_ty)
            qk_scale = qk_scale * ks_max
        qf = q.to(tl.float32)  # FMA path operand (dead code on the dot path)
        qshift = tl.sum(qf, axis=1) * 1152.0  # MAGIC path: q.(k + 1152) - q.k, per head

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        kbase = KC + g.to(tl.int64) * (BLOCK_SIZE * D)
        vbase = VC + g.to(tl.int64) * (BLOCK_SIZE * D)
        btrow = BT + b.to(tl.int64) * sbt_b
        if INTERPRET:
            # The interpreter (numpy >= 2.4) cannot use program-id-derived range bounds; a
            # while loop runs the same tile code there.
            t0 = start
            while t0 < end:
                m_i, l_i, acc = _attn_tile(q, qf, qshift, m_i, l_i, acc, t0, end, kbase, vbase,
                                           btrow, qk_scale, d, skc_b, svc_b, D,
                                           BLOCK_N, BLOCK_SIZE, USE_DOT, IEEE, MAGIC)
                t0 += BLOCK_N
        else:
            for t0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
                m_i, l_i, acc = _attn_tile(q, qf, qshift, m_i, l_i, acc, t0, end, kbase, vbase,
                                           btrow, qk_scale, d, skc_b, svc_b, D,
                                           BLOCK_N, BLOCK_SIZE, USE_DOT, IEEE, MAGIC)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # empty context -> zeros, not NaN
        o = acc / l_safe[:, None]
        if MAGIC:
            o = tl.where(l_i[:, None] > 0.0, o - 1152.0, 0.0)
        if QUANT:
            # sum_t p_t (v_t * vs) = vs * sum_t p_t v_t; partial results are stored already
            # scaled (the merge is linear in them).
            vs = tl.load(VS + g.to(tl.int64) * D + d)  # [D] fp32
            o = o * vs[None, :]
        if SPLIT:
            row = (b.to(tl.int64) * H + heads) * splits + sp  # [G_PAD] rows of [B, H, splits]
            tl.store(WS + row[:, None] * D + d[None, :], o, mask=gmask[:, None])
            nrows = tl.num_programs(0).to(tl.int64) * H * splits
            pm = WS + nrows * D
            tl.store(pm + row, m_i, mask=gmask)
            tl.store(pm + nrows + row, l_i, mask=gmask)
        else:
            op = OUT + b.to(tl.int64) * (H * D) + heads[:, None] * D + d[None, :]
            tl.store(op, o.to(OUT.dtype.element_ty), mask=gmask[:, None])

    @triton.jit
    def _decode_merge_kernel(OUT, WS, CL, partition, splits,
                             H: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
                             PDL: tl.constexpr):
        # grid = (B, H): log-sum-exp merge of the per-partition results of one query head.
        wait_then_release(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        ctx = tl.load(CL + b)
        n = (ctx + partition - 1) // partition  # partitions that saw tokens
        sidx = tl.arange(0, S_PAD)
        smask = sidx < n
        row = (b * H + h) * splits + sidx  # [S_PAD]
        nrows = tl.num_programs(0).to(tl.int64) * H * splits
        pm = WS + nrows * D
        m = tl.load(pm + row, mask=smask, other=float("-inf"))
        l = tl.load(pm + nrows + row, mask=smask, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(smask, l * tl.exp2(m - m_max), 0.0)  # [S_PAD]
        d = tl.arange(0, D)
        o = tl.load(WS + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        den = tl.sum(w, axis=0)
        den = tl.where(den > 0.0, den, 1.0)
        out = tl.sum(w[:, None] * o, axis=0) * (1.0 / den)
        tl.store(OUT + (b * H + h) * D + d, out.to(OUT.dtype.element_ty))


# =============================================================================================
# Public ops
# =============================================================================================
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
        bd = _next_pow2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, 0, x2.stride(0), 0,
                                         out.stride(0), 0, D, float(eps), S=1, HAS_RES=False,
                                         BLOCK_D=bd, num_warps=_norm_warps(bd),
                                         **pdl.launch_kw(x2))
    return out.view(x.shape)


def add_rms_norm(x, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``new_residual = x + residual; normed = rms_norm(new_residual)``. ``x`` is a tensor
    or a linear's ``SplitKPartials``, whose slices the kernel sums (no reduction launch), or a
    tensor-parallel ``PendingAllReduce``, whose all-reduce runs fused with this op."""
    fused = getattr(x, "fused_add_rms_norm", None)
    if fused is not None:
        return fused(residual, weight, eps)
    if x.shape != residual.shape:
        raise ConfigError(f"add_rms_norm: x {tuple(x.shape)} and residual "
                          f"{tuple(residual.shape)} differ")
    if x.shape[-1] != weight.shape[0]:
        raise ConfigError(f"add_rms_norm: last dim {x.shape[-1]} != weight {weight.shape[0]}")
    if not _use_triton(impl, residual, weight):                    # x lives beside residual
        return add_rms_norm_ref(summed(x), residual, weight, eps)
    D = x.shape[-1]
    xs = partial_slices(x)                                         # [S, M, D]
    r2 = _last_dim_contig(residual).reshape(-1, D)
    out = torch.empty(r2.shape, dtype=x.dtype, device=r2.device)
    res = torch.empty(r2.shape, dtype=x.dtype, device=r2.device)
    if r2.shape[0]:
        bd = _next_pow2(D)
        _rms_norm_kernel[(r2.shape[0],)](xs, r2, weight, out, res, xs.stride(0), xs.stride(1),
                                         r2.stride(0), out.stride(0), res.stride(0), D,
                                         float(eps), S=xs.shape[0], HAS_RES=True, BLOCK_D=bd,
                                         num_warps=_norm_warps(bd), **pdl.launch_kw(r2))
    return out.view(x.shape), res.view(x.shape)


def _norm_warps(block_d: int) -> int:
    return 1 if block_d <= 256 else 4 if block_d <= 2048 else 8


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
    if k_cache.dtype == torch.int8 and kv_scale is None:
        raise ConfigError("int8 KV cache needs kv_scale")


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
    quant = write_cache and kc.dtype == torch.int8
    ks = vs = k  # unread unless QUANT
    if quant:
        ks, vs = kv_scale_tensors(kv_scale, Hkv, D, kc.device)
    block_size = kc.shape[2] if write_cache else 1
    bh, bhk = _next_pow2(H), _next_pow2(Hkv)
    half = D // 2
    _rope_kv_kernel[(N,)](
        q, k, v, pos, cos_t, sin_t, q_out, k_out, kc, vc, slots, ks, vs,
        q.stride(0), k.stride(0), v.stride(0), cos_t.stride(0) if rope else 0,
        kc.stride(0) if write_cache else 0, vc.stride(0) if write_cache else 0,
        H=H, HKV=Hkv, HALF=half,
        ROPE=rope, DO_Q=do_q, STORE_K=store_k, WRITE_CACHE=write_cache, QUANT=quant,
        BLOCK_H=bh, BLOCK_HK=bhk, BLOCK_HALF=_next_pow2(half), BLOCK_SIZE=block_size,
        # warps by the larger of the q and k/v head counts: write_kv alone (H = 1) moves
        # Hkv x D values too, and int8 quantizes each (one warp took 23 us at LLaMA-7B, H100)
        num_warps=4 if max(bh, bhk) * _next_pow2(half) >= 2048 else 1, **pdl.launch_kw(k))


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

    int8 caches quantize with ``kv_scale`` (see ``kv_scale_tensors``)."""
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
    result bit for bit on CUDA), in one launch on the Triton path: each attention program rotates its q
    heads in registers, and the one whose split holds the context's last token writes the new
    k / v first. The new token must be the last of its context (``context_lens`` counts it),
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


# Decode-attention launch parameters. Tuned on an H100 (see gpu_selfcheck); tests override them.
DECODE_CONFIG = {
    "block_n": 64,          # tokens per inner tile (fp16/bf16/fp32 caches)
    # int8: swept on an H100 at batch 32, context 2,048 (tools/gpu_attn_sweep.py): 128-token
    # tiles and no forced split, 233 us a layer (2.30 TB/s of K/V) vs 264 us for 64 / 512
    "block_n_int8": 128,    # tokens per inner tile for int8 caches
    "num_warps": 4,
    "num_stages": 3,
    "num_warps_int8": 4,
    "num_stages_int8": 2,
    "max_partition": 2048,  # upper bound of tokens per split (B*Hkv >= 2 x SMs: no split)
    "max_partition_int8": 2048,
    "max_splits": 64,       # the merge kernel holds all splits of a head in registers
    "dot_min_group": 1,     # query heads per KV head from which tl.dot is used (else FMA)
    "int8_magic": True,     # int8 -> fp16 by bit tricks instead of conversion instructions
    "target_programs": 0,   # programs to aim for when picking the split; 0: 2 x SM count
}


def _decode_config_override(text: str) -> dict:
    """Validated entries of LLAMA_ENGINE_DECODE_CONFIG (JSON object of DECODE_CONFIG keys)."""
    import json
    try:
        over = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"LLAMA_ENGINE_DECODE_CONFIG is not JSON: {e}") from None
    if not isinstance(over, dict):
        raise ConfigError("LLAMA_ENGINE_DECODE_CONFIG must be a JSON object, e.g. "
                          '\'{"block_n_int8": 128}\'')
    unknown = sorted(set(over) - set(DECODE_CONFIG))
    if unknown:
        raise ConfigError(f"LLAMA_ENGINE_DECODE_CONFIG: unknown keys {unknown}; known: "
                          f"{sorted(DECODE_CONFIG)}")
    for k, v in over.items():
        if type(v) is not type(DECODE_CONFIG[k]) or (isinstance(v, int) and v < 0):
            raise ConfigError(f"LLAMA_ENGINE_DECODE_CONFIG: {k}={v!r} must be a "
                              f"{type(DECODE_CONFIG[k]).__name__} >= 0")
        if k.startswith(("block_n", "max_partition", "num_warps")) and (v < 1 or v & (v - 1)):
            raise ConfigError(f"LLAMA_ENGINE_DECODE_CONFIG: {k}={v} must be a power of two")
    merged = {**DECODE_CONFIG, **over}
    for sfx in ("", "_int8"):
        if merged["max_partition" + sfx] < merged["block_n" + sfx]:
            raise ConfigError(f"LLAMA_ENGINE_DECODE_CONFIG: max_partition{sfx} must be at "
                              f"least block_n{sfx}")
    return over


# Triton reads TRITON_INTERPRET when it is imported, so reading it once here agrees with it.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
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
                     impl: str = "auto", _rope=None) -> torch.Tensor:
    """One new query token per sequence over its paged KV cache.

    q [B,H,D]; caches [num_blocks, Hkv, block_size, D] (model dtype, or int8 with
    ``kv_scale``: a float, or (k_scale, v_scale) per (KV head, channel), see
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
    quant = k_cache.dtype == torch.int8
    if quant and kv_scale is None:
        raise ConfigError("int8 KV cache needs kv_scale")
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
    cfg = DECODE_CONFIG
    G = H // hkv
    use_dot = G >= cfg["dot_min_group"]
    g_pad = max(16, _next_pow2(G)) if use_dot else _next_pow2(G)
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
        MAGIC=use_dot and quant and q.dtype == torch.float16 and cfg["int8_magic"],
        QUANT=quant, ROPE=_rope is not None,
        NUM_STAGES=cfg["num_stages_int8" if quant else "num_stages"],
        INTERPRET=_INTERPRET, num_warps=cfg["num_warps_int8" if quant else "num_warps"],
        **pdl.launch_kw(q))
    if split:
        _decode_merge_kernel[(B, H)](
            out, ws, context_lens, part, splits,
            H=H, D=D, S_PAD=_next_pow2(splits), num_warps=4 if splits * D >= 4096 else 2,
            **pdl.launch_kw(q))
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
    """Causal attention of B prompts of equal length T with no cached prefix, in one call:
    q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]. Equal to ``prefill_attention`` on each prompt;
    one SDPA launch instead of B (inflight batching admits many prompts a step)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3]:
        raise ConfigError(f"prefill_attention_batch: expected q [B,T,H,D], k/v [B,T,Hkv,D], "
                          f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    hkv = k.shape[2]
    if H % hkv:
        raise ConfigError(f"prefill_attention_batch: H {H} not a multiple of Hkv {hkv}")
    if impl not in _IMPLS:
        raise ConfigError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return torch.stack([prefill_attention_ref(q[b], k[b], v[b], 0, softmax_scale)
                            for b in range(B)]) if B else torch.empty_like(q)
    if hkv != H:  # expand GQA heads: [B, T, Hkv, D] -> [B, T, H, D]
        rep = H // hkv
        k = k[:, :, :, None, :].expand(B, T, hkv, rep, D).reshape(B, T, H, D)
        v = v[:, :, :, None, :].expand(B, T, hkv, rep, D).reshape(B, T, H, D)
    o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
              scale=softmax_scale)  # [B, H, T, D]
    return o.transpose(1, 2)


# =============================================================================================
# GPU self-check (run by the lead on an H100)
# =============================================================================================
def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return (torch.linalg.vector_norm(out - ref) /
            torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def _time_ms(fn, reps: int = 20, warmup: int = 3, flush: Optional[torch.Tensor] = None) -> float:
    """Median device time of ``fn`` (ms). A sleep kernel queued before the start event lets
    the host enqueue ``fn`` ahead of the device, so host overhead stays out of the number."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()  # evict L2 (50 MB on an H100) so that K/V come from HBM
        torch.cuda._sleep(2_000_000)  # ~1 ms of device time: longer than any host overhead
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def _host_us(fn, reps: int = 50) -> float:
    """Host time per call (µs) of back-to-back calls: the launch overhead of ``fn``."""
    import time
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # keep the device busy so the queue never drains
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    return dt


def make_paged_cache(B: int, ctx: int, hkv: int, D: int, block_size: int, dtype, device,
                     kv_scale: Optional[float] = None, static: bool = False,
                     extra_blocks: int = 0):
    """Random caches holding ``ctx`` tokens per sequence, with shuffled block tables.

    ``static``: one block per sequence (block_size >= ctx), block_tables[b] = [b].
    Returns (k_cache, v_cache, block_tables int32, context_lens int32).
    """
    nb_seq = 1 if static else triton_cdiv(ctx, block_size)
    num_blocks = B * nb_seq + extra_blocks
    shape = (num_blocks, hkv, block_size, D)
    if dtype == torch.int8:
        k_cache = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
        v_cache = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    else:
        k_cache = torch.randn(shape, dtype=dtype, device=device)
        v_cache = torch.randn(shape, dtype=dtype, device=device)
    if static:
        bt = torch.arange(B, dtype=torch.int32, device=device)[:, None]
    else:
        perm = torch.randperm(num_blocks)  # shuffled: blocks of a sequence are scattered
        bt = perm[:B * nb_seq].view(B, nb_seq).to(torch.int32).to(device)
    cl = torch.full((B,), ctx, dtype=torch.int32, device=device)
    return k_cache, v_cache, bt, cl


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def random_kv_scales(hkv: int, D: int, mean: float, device, spread: float = 0.5,
                     generator: Optional[torch.Generator] = None):
    """(k_scale, v_scale) float32 [Hkv, D], uniform in mean * [1 - spread, 1 + spread]."""
    def one():
        r = torch.rand(hkv, D, generator=generator)
        return (mean * (1.0 - spread + 2.0 * spread * r)).to(device)
    return one(), one()


def gpu_selfcheck(device="cuda", quick: bool = False) -> list[dict]:
    """Check and time every op at LLaMA-7B shapes (H=Hkv=32, D=128) on ``device``.

    Rows: {op, B, ctx, kv_dtype, impl, rel_err, ms, GBps, ok, block_size, H, Hkv}. GBps
    counts the bytes an op must move (decode attention: K and V of every context token).
    """
    device = torch.device(device)
    if device.type != "cuda" or not HAS_TRITON:
        raise ConfigError("gpu_selfcheck needs a CUDA device and triton")
    torch.manual_seed(0)
    rows: list[dict] = []
    dt = torch.float16
    H, D = 32, 128
    hidden = H * D
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)

    def row(op, B, ctx, kv, impl, err, ms, nbytes, tol, bs=None, h=H, hkv=H):
        rows.append(dict(op=op, B=B, ctx=ctx, kv_dtype=kv, impl=impl, rel_err=err, ms=ms,
                         GBps=nbytes / (ms * 1e6) if ms else None,
                         ok=bool(err == err and err < tol), block_size=bs, H=h, Hkv=hkv))

    # --- norms -----------------------------------------------------------------------------
    for M in (1, 32, 2048):
        x = torch.randn(M, hidden, dtype=dt, device=device)
        r = torch.randn(M, hidden, dtype=dt, device=device)
        w = torch.rand(hidden, dtype=dt, device=device) + 0.5
        err = _rel_err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
        ms = _time_ms(lambda: rms_norm(x, w, 1e-6), flush=flush)
        row("rms_norm", M, None, "-", "triton", err, ms, 2 * x.numel() * 2, 2e-3)
        o, nr = add_rms_norm(x, r, w, 1e-6)
        o_r, nr_r = add_rms_norm_ref(x, r, w, 1e-6)
        err = max(_rel_err(o, o_r), _rel_err(nr, nr_r))
        ms = _time_ms(lambda: add_rms_norm(x, r, w, 1e-6), flush=flush)
        row("add_rms_norm", M, None, "-", "triton", err, ms, 4 * x.numel() * 2, 2e-3)

    # --- rope / cache writes -------------------------------------------------------------
    max_pos = 4096
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
    ang = torch.arange(max_pos, device=device).float()[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    for N in (1, 32, 2048):
        qkv = torch.randn(N, 3 * hidden, dtype=dt, device=device)
        q = qkv[:, :hidden].view(N, H, D)
        k = qkv[:, hidden:2 * hidden].view(N, H, D)
        v = qkv[:, 2 * hidden:].view(N, H, D)
        pos = torch.randint(0, max_pos, (N,), device=device)
        qo, ko = apply_rope(q, k, pos, cos, sin)
        qr, kr = apply_rope_ref(q, k, pos, cos, sin)
        err = max(_rel_err(qo, qr), _rel_err(ko, kr))
        ms = _time_ms(lambda: apply_rope(q, k, pos, cos, sin), flush=flush)
        row("apply_rope", N, None, "-", "triton", err, ms, 4 * N * hidden * 2, 2e-3)
        for kvd in (dt, torch.int8):
            # int8: per (head, channel) K/V scales, as engines use them
            scale = random_kv_scales(H, D, 0.03, device) if kvd == torch.int8 else None
            bs = 64
            nblk = triton_cdiv(N, bs) + 3
            kc = torch.zeros(nblk, H, bs, D, dtype=kvd, device=device)
            vc = torch.zeros_like(kc)
            kc2, vc2 = kc.clone(), vc.clone()
            slots = torch.randperm(nblk * bs, device=device)[:N]
            if N > 1:
                slots[0] = -1
            write_kv(k, v, kc, vc, slots, scale)
            write_kv_ref(k, v, kc2, vc2, slots, scale)
            err = max(_rel_err(kc, kc2), _rel_err(vc, vc2))
            ms = _time_ms(lambda: write_kv(k, v, kc, vc, slots, scale), flush=flush)
            esz = 1 if kvd == torch.int8 else 2
            kvname = "int8" if kvd == torch.int8 else "fp16"
            row("write_kv", N, None, kvname, "triton", err, ms,
                2 * N * hidden * (2 + esz), 1e-6, bs)
            kc.zero_(), vc.zero_(), kc2.zero_(), vc2.zero_()
            qo = rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, scale)
            qr = rope_write_kv_ref(q, k, v, pos, cos, sin, kc2, vc2, slots, scale)
            # int8: the rotated k may round differently by one level -> compare loosely
            err = max(_rel_err(qo, qr), _rel_err(kc, kc2), _rel_err(vc, vc2))
            ms = _time_ms(lambda: rope_write_kv(q, k, v, pos, cos, sin, kc, vc, slots, scale),
                          flush=flush)
            row("rope_write_kv", N, None, kvname, "triton", err, ms,
                N * hidden * (4 + 2 * (2 + esz)), 1e-2 if kvd == torch.int8 else 2e-3, bs)

    # --- decode attention ----------------------------------------------------------------
    Bs = (1, 32) if quick else (1, 8, 32, 64)
    ctxs = (2048,) if quick else (128, 512, 2048)
    cases = [(B, c, H, H, dt) for B in Bs for c in ctxs]
    cases += [(1, 2048, 64, 8, dt), (32, 2048, 64, 8, dt), (32, 2048, H, H, torch.bfloat16)]
    for B, ctx, h, hkv, qdt in cases:
        for kvd in (qdt, torch.int8):
            for static in (False, True):
                bs = _next_pow2(ctx) if static else 64
                scale = random_kv_scales(hkv, D, 0.02, device) if kvd == torch.int8 else None
                kc, vc, bt, cl = make_paged_cache(B, ctx, hkv, D, bs, kvd, device,
                                                  static=static, extra_blocks=2)
                q = torch.randn(B, h, D, dtype=qdt, device=device)
                sm = 1.0 / math.sqrt(D)
                fn = lambda: decode_attention(q, kc, vc, bt, cl, sm, scale)  # noqa: E731
                out = fn()
                ref = decode_attention_ref(q, kc, vc, bt, cl, sm, scale)
                err = _rel_err(out, ref)
                ms = _time_ms(fn, flush=flush)
                esz = 1 if kvd == torch.int8 else 2
                kvname = "int8" if esz == 1 else ("bf16" if kvd == torch.bfloat16 else "fp16")
                row("decode_attention", B, ctx, kvname, "triton", err, ms,
                    2 * B * ctx * hkv * D * esz, 1e-2 if qdt == torch.bfloat16 else 5e-3,
                    bs, h, hkv)
                if B == 1 and ctx == 2048 and h == H and not static:
                    rows[-1]["host_us"] = _host_us(fn)  # launch overhead of the 2 kernels
                del kc, vc

    # --- decode attention with RoPE + KV write fused in, against the two kernels ----------
    if True:
        for B, ctx, h, hkv in ((1, 7, 40, 40), (1, 300, 40, 40), (8, 2048, H, H),
                               (32, 129, 64, 8)):
            for kvd in (dt, torch.int8):
                scale = random_kv_scales(hkv, D, 0.02, device) if kvd == torch.int8 else None
                kc, vc, bt, cl = make_paged_cache(B, ctx, hkv, D, 64, kvd, device,
                                                  extra_blocks=2)
                qkv = torch.randn(B, (h + 2 * hkv) * D, dtype=dt, device=device)
                q = qkv[:, :h * D].view(B, h, D)
                k = qkv[:, h * D:(h + hkv) * D].view(B, hkv, D)
                v = qkv[:, (h + hkv) * D:].view(B, hkv, D)
                pos = (cl - 1).long()
                slots = bt.gather(1, (pos // 64)[:, None]).squeeze(1).long() * 64 + pos % 64
                if B > 1:
                    slots[-1] = -1
                res = {}
                for fused in (True, False):
                    k1, v1 = kc.clone(), vc.clone()
                    if fused:
                        fn = lambda: rope_decode_attention(  # noqa: E731
                            q, k, v, pos, cos, sin, k1, v1, slots, bt, cl, 1 / math.sqrt(D),
                            scale)
                    else:
                        fn = lambda: decode_attention(  # noqa: E731
                            rope_write_kv(q, k, v, pos, cos, sin, k1, v1, slots, scale),
                            k1, v1, bt, cl, 1 / math.sqrt(D), scale)
                    res[fused] = (fn(), k1, v1, _time_ms(fn, flush=flush))
                (o, k1, v1, ms), (o2, k2, v2, ms2) = res[True], res[False]
                # bit for bit the two kernels' result: rel_err is the largest difference
                err = max(_rel_err(o, o2), _rel_err(k1.float(), k2.float()),
                          _rel_err(v1.float(), v2.float()))
                kvname = "int8" if kvd == torch.int8 else "fp16"
                esz = 1 if kvd == torch.int8 else 2
                row("rope_decode_attention", B, ctx, kvname, "fused", err, ms,
                    2 * B * ctx * hkv * D * esz, 1e-30, 64, h, hkv)
                rows[-1].update(two_kernels_ms=ms2, out_equal=torch.equal(o, o2),
                                k_equal=torch.equal(k1, k2), v_equal=torch.equal(v1, v2))
                del kc, vc, k1, v1, k2, v2

    # --- prefill attention (SDPA) --------------------------------------------------------
    for T, S, h, hkv in ((2048, 2048, H, H), (512, 1536, H, H), (1024, 1024, 64, 8)):
        q = torch.randn(T, h, D, dtype=dt, device=device)
        k = torch.randn(S, hkv, D, dtype=dt, device=device)
        v = torch.randn(S, hkv, D, dtype=dt, device=device)
        out = prefill_attention(q, k, v, S - T)
        err = _rel_err(out, prefill_attention_ref(q, k, v, S - T))
        ms = _time_ms(lambda: prefill_attention(q, k, v, S - T), flush=flush)
        row("prefill_attention", T, S, "fp16", "sdpa", err, ms,
            2 * (T * h + 2 * S * hkv) * D, 5e-3, None, h, hkv)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of gpu_selfcheck rows, then the int8-vs-fp16 decode speedups."""
    lines = [f"{'op':21s} {'B':>5s} {'ctx':>5s} {'H/Hkv':>6s} {'bs':>5s} {'kv':>5s} "
             f"{'rel_err':>9s} {'ms':>8s} {'GB/s':>7s} ok"]
    for r in rows:
        lines.append(
            f"{r['op']:21s} {r['B']:5d} {str(r['ctx'] or '-'):>5s} "
            f"{str(r['H']) + '/' + str(r['Hkv']):>6s} {str(r['block_size'] or '-'):>5s} "
            f"{r['kv_dtype']:>5s} {r['rel_err']:9.2e} {r['ms']:8.4f} "
            f"{(r['GBps'] or 0):7.0f} {'ok' if r['ok'] else 'FAIL'}"
            + (f"  host {r['host_us']:.0f} us/call" if 'host_us' in r else "")
            + (f"  two kernels {r['two_kernels_ms']:.4f} ms; bit-equal out/k/v "
               f"{r['out_equal']}/{r['k_equal']}/{r['v_equal']}"
               if 'two_kernels_ms' in r else ""))
    dec = {(r["B"], r["ctx"], r["H"], r["Hkv"], r["block_size"], r["kv_dtype"]): r["ms"]
           for r in rows if r["op"] == "decode_attention"}
    for key, ms in dec.items():
        if key[5] == "int8":
            for fkey in (key[:5] + ("fp16",), key[:5] + ("bf16",)):
                if fkey in dec:
                    lines.append(f"int8 KV speedup B={key[0]} ctx={key[1]} H={key[2]}/{key[3]} "
                                 f"bs={key[4]} vs {fkey[5]}: {dec[fkey] / ms:.2f}x")
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"{len(rows) - len(bad)}/{len(rows)} rows ok")
    return "\n".join(lines)
