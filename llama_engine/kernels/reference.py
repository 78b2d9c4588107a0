"""Plain-PyTorch references of every kernel op: the CPU path of the engine and the oracle the
Triton kernels are tested against. fp32 math (fp64 for fp64 inputs), results in the input dtype.

Conventions (docs/design.md):

* Linear layouts are TensorRT-LLM's unified checkpoint: weights ``[N, K]`` (out, in); int4
  packs two signed nibbles per byte along K, even k in the low nibble; group-wise int4 scales
  are ``[K/G, N]``; W8A8 computes ``(xq @ qw.T) * x_scale * w_scale``.
* RMSNorm as HF ``LlamaRMSNorm``: ``(x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) * w``;
  SwiGLU's ``silu(gate) * up`` as HF computes it (silu rounded to the model dtype).
* RoPE in the rotate-half (GPT-NeoX / HF) layout: for ``x = [x1, x2]`` (halves of the head),
  ``out = [x1*cos - x2*sin, x2*cos + x1*sin]``; ``cos``/``sin`` are ``[max_pos, D/2]`` tables.
* Paged KV cache per layer: ``[num_blocks, Hkv, block_size, D]``, model dtype, int8 or FP8; token
  slot ``= block * block_size + offset``; slot ``-1`` is padding and is not written. INT8 KV:
  ``q = clamp(round(x / s), -127, 127)``, ``x ~= q * s``, with static calibrated scales per
  (KV head, channel), separately for K and V (``kv_scale = (k_scale, v_scale)``, each float32
  ``[Hkv, D]``); TensorRT-LLM's single per-layer scale is the special case of constant
  vectors (a plain float ``kv_scale`` is accepted and expanded). FP8 KV (``float8_e4m3fn``
  caches) is the same with another rounding rule: ``q = fp8(clamp(x / s, -448, 448))``
  (round to nearest even), ``x ~= float(q) * s``; both are "quantized caches"
  (``QUANT_KV_DTYPES``) and take the same scales and switches everywhere.

The input checks here (one-line ``ConfigError``) are shared with the dispatching ops.

Imports: ``llama_engine.config`` only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn import functional as F

from ..config import ConfigError

# Smallest amax used for a per-token scale: an all-zero row gets a tiny positive scale (and
# q = 0), so the scale can be divided by as well as multiplied by.
AMAX_EPS = 1e-8
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Quantized KV-cache storage dtypes (1 byte a value, dequantized with per-layer scales).
QUANT_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)
INT8_KV_MAX = 127.0
FP8_E4M3_MAX = 448.0   # largest finite float8_e4m3fn


def is_quant_kv(dtype: torch.dtype) -> bool:
    """A KV cache of this dtype holds quantized values (int8 or FP8) with scales."""
    return dtype in QUANT_KV_DTYPES


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the references: fp64 engines stay fp64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# =============================================================================================
# Linear layers: input checks, references, int4 packing, activation quantizers
# =============================================================================================
def flat(x, K: int, what: str) -> tuple[torch.Tensor, tuple]:
    """x[..., K] -> (x2d[M, K], leading shape)."""
    if x.dim() < 1 or x.shape[-1] != K:
        raise ConfigError(f"{what}: input last dim {tuple(x.shape)} does not match K={K}")
    return x.reshape(-1, K), tuple(x.shape[:-1])


def check_weight(w: torch.Tensor, what: str, dtype=None) -> None:
    if w.dim() != 2:
        raise ConfigError(f"{what}: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if dtype is not None and w.dtype != dtype:
        raise ConfigError(f"{what}: weight must be {dtype}, got {w.dtype}")


def check_float(x: torch.Tensor, what: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ConfigError(f"{what}: activations must be float16/bfloat16/float32, got {x.dtype}")


def w4_geometry(k_in: int, qweight: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> tuple[int, int, int, torch.Tensor]:
    """Validate a W4A16 call with input width k_in; returns (N, K, G, scales as [K/G, N])."""
    check_weight(qweight, "linear_w4a16", torch.int8)
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if k_in != K:
        raise ConfigError(f"linear_w4a16: input K={k_in} but packed weight holds K={K}")
    G = int(group_size)
    if G <= 0 or K % G:
        raise ConfigError(f"linear_w4a16: group_size {group_size} must divide K={K}")
    if scales.numel() != (K // G) * N:
        raise ConfigError(f"linear_w4a16: scales shape {tuple(scales.shape)} is not "
                          f"[K/G, N] = [{K // G}, {N}]")
    return N, K, G, scales.reshape(K // G, N)




def linear_fp_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    check_weight(weight, "linear_fp")
    x2, lead = flat(x, weight.shape[1], "linear_fp")
    acc = _acc(x)
    out = x2.to(acc) @ weight.to(acc).t()
    return out.to(x.dtype).reshape(*lead, weight.shape[0])


def linear_w8a16_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    check_weight(qweight, "linear_w8a16", torch.int8)
    N, K = qweight.shape
    if scale.numel() != N:
        raise ConfigError(f"linear_w8a16: scale shape {tuple(scale.shape)} is not [N={N}]")
    x2, lead = flat(x, K, "linear_w8a16")
    acc = _acc(x)
    w = qweight.to(acc) * scale.reshape(N, 1).to(acc)
    return (x2.to(acc) @ w.t()).to(x.dtype).reshape(*lead, N)


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in -8..7 -> int8 [N, K/2]; byte j = q[2j] (low) | q[2j+1] << 4."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % 2:
        raise ConfigError(f"pack_int4: need int8 [N, K] with K even, got {q.dtype} "
                          f"{tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ConfigError("pack_int4: values must lie in -8..7")
    q16 = q.to(torch.int16)
    lo, hi = q16[:, 0::2] & 0xF, q16[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] -> int8 [N, K] in -8..7 (inverse of pack_int4)."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise ConfigError(f"unpack_int4: need int8 [N, K/2], got {packed.dtype} "
                          f"{tuple(packed.shape)}")
    p = packed.to(torch.int16)              # sign-extended byte
    hi = p >> 4                             # arithmetic shift: the signed high nibble
    lo = ((p & 0xF) ^ 8) - 8                # sign-extend the low nibble
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1).to(torch.int8)


def linear_w4a16_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    N, K, G, s = w4_geometry(x.shape[-1], qweight, scales, group_size)
    x2, lead = flat(x, K, "linear_w4a16")
    acc = _acc(x)
    w = unpack_int4_ref(qweight).to(acc)                         # [N, K]
    w = w * s.to(acc).repeat_interleave(G, dim=0).t()            # scale of (n, k) = s[k // G, n]
    return (x2.to(acc) @ w.t()).to(x.dtype).reshape(*lead, N)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_float(x, "quantize_per_token")
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp_min(AMAX_EPS) / 127.0
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_tensor_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    check_float(x, "quantize_per_tensor")
    if scale.numel() != 1:
        raise ConfigError(f"quantize_per_tensor: scale must hold one value, got "
                          f"{tuple(scale.shape)}")
    return torch.round(x.float() / scale.float().reshape(())).clamp_(-127, 127).to(torch.int8)


def w8a8_check(xq, x_scale, qweight, w_scale, out_dtype):
    check_weight(qweight, "linear_w8a8", torch.int8)
    N, K = qweight.shape
    if xq.dtype != torch.int8:
        raise ConfigError(f"linear_w8a8: activations must be int8, got {xq.dtype}")
    x2, lead = flat(xq, K, "linear_w8a8")
    M = x2.shape[0]
    if x_scale.numel() not in (1, M):
        raise ConfigError(f"linear_w8a8: x_scale shape {tuple(x_scale.shape)} is neither "
                          f"[M={M}, 1] nor [1, 1]")
    if w_scale.numel() not in (1, N):
        raise ConfigError(f"linear_w8a8: w_scale shape {tuple(w_scale.shape)} is neither "
                          f"[1, N={N}] nor [1, 1]")
    if out_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"linear_w8a8: out_dtype must be a float dtype, got {out_dtype}")
    return x2, lead, M, N, K


def linear_w8a8_ref(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                    w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    x2, lead, M, N, K = w8a8_check(xq, x_scale, qweight, w_scale, out_dtype)
    acc = x2.float() @ qweight.float().t()       # exact while |acc| < 2**24
    out = acc * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    return out.to(out_dtype).reshape(*lead, N)



# =============================================================================================
# Norms and SwiGLU
# =============================================================================================
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # HF's LlamaRMSNorm normalizes in fp32 whatever the model dtype
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.to(_acc(x)) * weight.to(_acc(x))).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The sum is rounded to the model dtype first, as HF's `residual + hidden` is.
    new_res = (x.to(_acc(x)) + residual.to(_acc(x))).to(x.dtype)
    return rms_norm_ref(new_res, weight, eps), new_res


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# =============================================================================================
# RoPE, KV cache, attention
# =============================================================================================
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
        raise ConfigError("a quantized (int8 / FP8) KV cache needs kv_scale")
    if isinstance(kv_scale, (tuple, list)):
        if len(kv_scale) != 2:
            raise ConfigError(f"kv_scale pair must be (k_scale, v_scale), got {len(kv_scale)} "
                              "items")
        ks, vs = kv_scale
    else:
        ks = vs = kv_scale
    return (_one_kv_scale(ks, hkv, head_dim, device, "K"),
            _one_kv_scale(vs, hkv, head_dim, device, "V"))




def _rotate_ref(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.to(_acc(x)).chunk(2, dim=-1)
    c, s = c.to(x1.dtype), s.to(x1.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = cos[positions].float()[:, None, :]  # [N, 1, D/2]
    s = sin[positions].float()[:, None, :]
    return _rotate_ref(q, c, s), _rotate_ref(k, c, s)


def quantize_kv_ref(x: torch.Tensor, kv_scale, dtype: torch.dtype = torch.int8
                    ) -> torch.Tensor:
    """x [..., Hkv, D] -> ``dtype`` (int8 or float8_e4m3fn); ``kv_scale`` a float or a tensor
    broadcasting to [Hkv, D].

    An IEEE fp32 division, as the write kernel does (``div_rn``), so both round alike; FP8
    clamps to +-448 then rounds to nearest even (torch's conversion; the kernel's too)."""
    y = x.float() / kv_scale
    if dtype == torch.float8_e4m3fn:
        return y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return torch.round(y).clamp_(-INT8_KV_MAX, INT8_KV_MAX).to(torch.int8)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scale=None) -> None:
    bs = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blk, off = slots // bs, slots % bs
    scales = (None, None)
    if is_quant_kv(k_cache.dtype):
        scales = kv_scale_tensors(kv_scale, k.shape[1], k.shape[2], k.device)
    for src, cache, scale in ((k[keep], k_cache, scales[0]), (v[keep], v_cache, scales[1])):
        if is_quant_kv(cache.dtype):
            src = quantize_kv_ref(src, scale, cache.dtype)  # [n, Hkv, D] / [Hkv, D]
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

    ``kv_scale``: this cache's dequantization scale (int8 / FP8): a float, or ``Hkv*D``
    values."""
    bs = cache.shape[2]
    lmax = max(int(context_lens.max().item()), 1) if context_lens.numel() else 1
    t = torch.arange(lmax, device=cache.device)
    valid = t[None, :] < context_lens.to(cache.device).long()[:, None]  # [B, Lmax]
    col = (t // bs).clamp_(max=block_tables.shape[1] - 1)
    blk = block_tables.long()[:, col]  # [B, Lmax]; entries past the context may be garbage
    blk = torch.where(valid, blk, torch.zeros_like(blk)).clamp_(0, cache.shape[0] - 1)
    x = cache[blk, :, (t % bs)[None, :].expand_as(blk)]  # [B, Lmax, Hkv, D]
    x = x.to(dtype)
    if is_quant_kv(cache.dtype):
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
    if is_quant_kv(k_cache.dtype):
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




def cpu_weight(mod, x: torch.Tensor, make) -> torch.Tensor:
    """A quantized linear's weight as its CPU reference path uses it (dequantized or widened
    to fp32, fp64 for fp64 inputs), made by ``make(dtype)`` once and kept in ``mod._cpu_w``:
    the same numbers the reference would compute on every call."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if mod._cpu_w is None or mod._cpu_w.dtype != acc:
        mod._cpu_w = make(acc)
    return mod._cpu_w
