"""INT8 and FP8 KV cache scales: per layer (TensorRT-LLM's ``kv_cache_scaling_factor``) and per
(KV head, channel) (our extension), from calibrated maxima (max / 127 for INT8, max / 448 for
FP8 E4M3); the KV rounding rules; moving calibrated scales between the two formats.
Split out of ``quant.py`` (which re-exports these names)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import KV_FP8, KV_INT8, ConfigError, ModelArgs
from .names import KV_CHANNEL_SCALES, KV_SCALE

INT8_MAX = 127
FP8_E4M3_MAX = 448  # largest finite float8_e4m3fn
# kv_cache_quant_algo -> the largest quantized value, the scale's divisor
KV_QMAX = {KV_INT8: INT8_MAX, KV_FP8: FP8_E4M3_MAX}


def _qmax(algo: str) -> int:
    if algo not in KV_QMAX:
        raise ConfigError(f"kv_cache_quant_algo must be one of {sorted(KV_QMAX)}, got {algo!r}")
    return KV_QMAX[algo]


def kv_cache_scale(max_abs_k: float, max_abs_v: float, algo: str = KV_INT8) -> torch.Tensor:
    """One KV scale per layer (design.md): max(max|k|, max|v|) / qmax (127 for INT8, 448
    for FP8), float32 [1]."""
    amax = max(float(max_abs_k), float(max_abs_v))
    if not math.isfinite(amax):
        raise ConfigError(f"calibrated KV maximum is not finite ({amax})")
    return torch.tensor([amax / _qmax(algo) if amax > 0 else 1.0], dtype=torch.float32)


def kv_channel_scales(k_max: torch.Tensor, v_max: torch.Tensor, name: str = "KV",
                      algo: str = KV_INT8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(KV head, channel) KV scales from calibrated maxima ``k_max``, ``v_max``
    ([Hkv*D] each: max |k| after RoPE and max |v| of each channel over the calibration tokens)
    -> (k_scale, v_scale) float32 [Hkv*D] = max/qmax, and TensorRT-LLM's per-layer
    ``kv_cache_scaling_factor`` float32 [1] = max(max|k|, max|v|)/qmax (qmax: 127 for INT8,
    448 for FP8 E4M3).

    A channel that calibration saw only as 0 (e.g. a zeroed projection row) takes the layer's
    scale, which holds anything the per-layer scheme holds; non-finite maxima are an error."""
    k_max, v_max = k_max.float().reshape(-1), v_max.float().reshape(-1)
    for what, m in (("K", k_max), ("V", v_max)):
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ConfigError(f"calibrated {what} channel maxima of {name} are not finite and "
                              "non-negative; calibrate in float32 (--device cpu) or check "
                              "the weights")
    layer = kv_cache_scale(k_max.max().item() if k_max.numel() else 0.0,
                           v_max.max().item() if v_max.numel() else 0.0, algo)
    out = []
    for m in (k_max, v_max):
        out.append(torch.where(m > 0, m / _qmax(algo), layer).to(torch.float32))
    return out[0], out[1], layer


def quantize_kv(x: torch.Tensor, scale) -> torch.Tensor:
    """The INT8 KV rule (reference): round(x / scale) clamped to +-127; ``scale`` a float or
    a tensor broadcasting against ``x`` (per (KV head, channel): [Hkv, D] for x [..., Hkv, D])."""
    return torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_kv_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    """The FP8 KV rule (reference): x / scale clamped to +-448, rounded to the nearest
    float8_e4m3fn (ties to even). Its error is at most half an fp8 step: |x - q*s| <=
    2^-4 |x| for |x/s| >= 2^-6 (normal fp8), <= 2^-10 s below (subnormals)."""
    y = x.float() / scale
    return y.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def rescale_kv_scales(tensors: dict, from_algo: str, to_algo: str) -> dict:
    """Calibrated KV scales of one format as the other's: every scale is max / qmax, so
    INT8 -> FP8 multiplies by 127/448 (the maxima calibration saw are kept exactly). Returns
    a new dict; the other tensors are passed through."""
    if from_algo == to_algo:
        return dict(tensors)
    f = _qmax(from_algo) / _qmax(to_algo)
    scale_names = (KV_SCALE, *KV_CHANNEL_SCALES)
    return {k: (v.float() * f if k.rpartition(".")[2] in scale_names else v)
            for k, v in tensors.items()}


def _kv_scales(tensors: dict, args: ModelArgs, kv_stats: Optional[dict],
               algo: str = KV_INT8) -> dict:
    """-> {name: tensor} of the ``algo`` (INT8 / FP8) KV scales of every layer
    (docs/design.md). Scales already in ``tensors`` must be ``algo``'s."""
    names = [f"transformer.layers.{i}.attention" for i in range(args.num_hidden_layers)]
    if kv_stats is None:
        have = [f"{n}.{KV_SCALE}" in tensors for n in names]
        if all(have):  # an already-calibrated checkpoint: keep its scales
            out = {}
            for n in names:
                out[f"{n}.{KV_SCALE}"] = tensors[f"{n}.{KV_SCALE}"].float().reshape(1)
                for s in KV_CHANNEL_SCALES:
                    if f"{n}.{s}" in tensors:
                        out[f"{n}.{s}"] = tensors[f"{n}.{s}"].float().reshape(-1)
            return out
        flag = "--fp8_kv_cache" if algo == KV_FP8 else "--int8_kv_cache"
        raise ConfigError(f"{flag} needs calibrated scales: run hf_llama_convert.py "
                          "--calibrate-kv-cache -i HF_DIR -o CKPT_DIR and build with "
                          "--ckpt_dir CKPT_DIR")
    out = {}
    for n in names:
        if n not in kv_stats:
            raise ConfigError(f"KV calibration has no statistics for {n}")
        st = torch.as_tensor(kv_stats[n]).float()
        if st.numel() == 2:  # older statistics: per-layer maxima only
            mk, mv = (float(x) for x in st.reshape(2))
            out[f"{n}.{KV_SCALE}"] = kv_cache_scale(mk, mv, algo)
        elif st.shape == (2, args.kv_size):
            ks, vs, layer = kv_channel_scales(st[0], st[1], n, algo)
            out[f"{n}.{KV_SCALE}"] = layer
            out[f"{n}.{KV_CHANNEL_SCALES[0]}"] = ks
            out[f"{n}.{KV_CHANNEL_SCALES[1]}"] = vs
        else:
            raise ConfigError(f"KV statistics of {n} have shape {tuple(st.shape)}; expected "
                              f"[2, Hkv*D] = [2, {args.kv_size}] (or [2])")
    return out
