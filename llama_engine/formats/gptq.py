"""GPTQ checkpoints (HF directory, ``quantization_config.quant_method: gptq``; the AutoGPTQ /
GPTQModel ``gptq`` checkpoint format), taken as they are; TensorRT-LLM's W4A16_GPTQ.

Format, written from the published layout (AutoGPTQ's ``QuantLinear`` pack, the format of
Frantar et al. 2022's reference code, arXiv:2210.17323; GPTQModel documents ``gptq`` = v1 and
``gptq_v2``), per linear [in K, out N], group size G:

* ``qweight`` int32 [K/8, N]: unsigned 4-bit codes u, eight *input* rows per word, nibble i
  of row r holding input 8r + i;
* ``qzeros`` int32 [K/G, N/8]: zero points, eight output columns per word in order; the
  ``gptq`` (v1) format stores zp - 1 (a historical off-by-one every loader undoes), ``gptq_v2``
  stores zp;
* ``scales`` fp16 [K/G, N]; ``g_idx`` int32 [K]: the group of each input row;
* w[n, k] = (u[k, n] - zp[g_idx[k], n]) * scales[g_idx[k], n].

``desc_act=True`` checkpoints quantized the rows in activation order, so ``g_idx`` is not
k // G: running them needs the input permuted, which our linears do not do; they are refused
with a clear message (any ``g_idx`` that is not k // G is refused the same way).
Ours: q = u - 8, s = scales, z = (8 - zp) * s."""
from __future__ import annotations

import torch

from ..config import W4A16_GPTQ, ConfigError, ModelArgs, QuantConfig
from .common import assemble, group_size_of, need, pack_int32, read_hf_dir, unpack_int32


def pack_gptq_weight(u: torch.Tensor) -> torch.Tensor:
    """codes [K, N] in [0, 15] -> qweight int32 [K/8, N] (eight input rows per word)."""
    k, n = u.shape
    if k % 8:
        raise ConfigError(f"GPTQ packing needs K a multiple of 8, got {k}")
    return pack_int32(u.reshape(k // 8, 8, n).transpose(1, 2)).squeeze(-1).contiguous()


def unpack_gptq_weight(p: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K/8, N] -> uint8 [K, N]."""
    r, n = p.shape
    return unpack_int32(p.t().contiguous()).reshape(n, r * 8).t().contiguous()


def check_gptq_config(qc: dict) -> tuple[int, int]:
    """-> (group size, zero offset) of a supported GPTQ ``quantization_config``."""
    if qc.get("quant_method") != "gptq":
        raise ConfigError(f"not a GPTQ checkpoint (quant_method {qc.get('quant_method')!r})")
    if qc.get("bits") != 4:
        raise ConfigError(f"GPTQ checkpoint with {qc.get('bits')}-bit weights; only 4-bit is "
                          "supported")
    if qc.get("desc_act"):
        raise ConfigError("GPTQ checkpoint with desc_act=True (activation-order groups, g_idx) "
                          "is not supported: re-quantize with desc_act=False")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    g = int(qc.get("group_size", 128))
    if g not in (-1, 32, 64, 128):
        raise ConfigError(f"GPTQ group size {g} is not supported (32, 64, 128, or -1)")
    return (0 if g == -1 else g), (1 if fmt == "gptq" else 0)


def gptq_linear(qweight, qzeros, scales, g_idx, group_size: int, zero_offset: int = 1,
                name: str = "linear"):
    """-> (q int8 [N, K] in [-8, 7], scales [K/G, N], zeros [K/G, N] float32)."""
    u = unpack_gptq_weight(qweight)                              # [K, N]
    k, n = u.shape
    g = group_size_of(k, scales.shape[0], name, group_size or None)
    zp = unpack_int32(qzeros).to(torch.int16)[:, :n] + zero_offset   # [K/G, N]
    if tuple(scales.shape) != (k // g, n) or tuple(zp.shape) != (k // g, n):
        raise ConfigError(f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(zp.shape)} do "
                          f"not fit qweight [K={k}, N={n}] with group size {g}")
    if g_idx is not None:
        want = torch.arange(k, device=g_idx.device) // g
        if not torch.equal(g_idx.to(torch.int64).reshape(-1), want):
            raise ConfigError(f"{name}.g_idx is not k // {g} (activation-order groups, as "
                              "desc_act=True writes); not supported: re-quantize with "
                              "desc_act=False")
    q = (u.t().to(torch.int16) - 8).to(torch.int8).contiguous()
    return q, scales, (8 - zp.float()) * scales.float()


def load_gptq_dir(path: str) -> tuple[ModelArgs, QuantConfig, dict, torch.dtype]:
    """A GPTQ directory -> (ModelArgs, QuantConfig, unified tensors, model dtype)."""
    cfg, tensors = read_hf_dir(path)
    g, off = check_gptq_config(cfg.get("quantization_config") or {})
    args = ModelArgs.from_hf_config(cfg)
    dtype = getattr(torch, str(cfg.get("torch_dtype", cfg.get("dtype", "float16"))))

    def get(mod: str):
        return gptq_linear(need(tensors, mod + ".qweight", path),
                           need(tensors, mod + ".qzeros", path),
                           need(tensors, mod + ".scales", path), tensors.get(mod + ".g_idx"),
                           g, off, mod)

    out = assemble(args, get, tensors, dtype)
    return args, QuantConfig(quant_algo=W4A16_GPTQ, group_size=g, has_zero_point=True), out, dtype
