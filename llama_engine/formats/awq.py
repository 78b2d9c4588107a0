"""AutoAWQ GEMM checkpoints (a HF directory whose config.json has ``quantization_config`` with
``quant_method: awq``, ``version: gemm``), taken as they are.

Format, written from AutoAWQ's published layout (``awq/modules/linear/gemm.py``, WQLinear_GEMM,
the format of the AWQ paper's reference code, Lin et al. 2023, arXiv:2306.00978), per linear
[in K, out N], group size G:

* ``qweight`` int32 [K, N/8]: unsigned 4-bit codes u, eight output columns per word, nibble i
  (bits 4i..4i+3) holding column 8c + AWQ_ORDER[i] with AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  (the interleave its fast dequantization wants);
* ``qzeros`` int32 [K/G, N/8]: unsigned 4-bit zero points zp, packed the same way;
* ``scales`` fp16 [K/G, N];
* w[n, k] = (u[k, n] - zp[k // G, n]) * scales[k // G, n].

Ours (``quant_int4.py``): q = u - 8, s = scales, z = (8 - zp) * s (one rounding to the model
dtype; exact in float32, as TensorRT-LLM's own conversion of these checkpoints)."""
from __future__ import annotations

import torch

from ..config import W4A16_AWQ, ConfigError, ModelArgs, QuantConfig
from .common import assemble, group_size_of, need, pack_int32, read_hf_dir, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INVERSE = tuple(AWQ_ORDER.index(i) for i in range(8))


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """uint8/int values in [0, 15] [R, N] -> AutoAWQ int32 [R, N/8] (AWQ_ORDER interleave)."""
    r, n = u.shape
    if n % 8:
        raise ConfigError(f"AWQ packing needs N a multiple of 8, got {n}")
    return pack_int32(u.reshape(r, n // 8, 8)[..., list(AWQ_ORDER)].reshape(r, n))


def unpack_awq(p: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [R, N/8] -> uint8 [R, N] in output-column order."""
    r = p.shape[0]
    v = unpack_int32(p).reshape(r, -1, 8)
    return v[..., list(_INVERSE)].reshape(r, -1)


def check_awq_config(qc: dict) -> int:
    """The group size of a supported AutoAWQ ``quantization_config``; else a one-line error."""
    if qc.get("quant_method") != "awq":
        raise ConfigError(f"not an AWQ checkpoint (quant_method {qc.get('quant_method')!r})")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ConfigError(f"AWQ checkpoint with {bits}-bit weights; only 4-bit is supported")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"AWQ version {version!r} is not supported (GEMM only; GEMV and "
                          "Marlin checkpoints pack differently)")
    if not qc.get("zero_point", True):
        raise ConfigError("AWQ checkpoint without zero points is not supported")
    g = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if g not in (32, 64, 128):
        raise ConfigError(f"AWQ group size {g} is not supported (32, 64, 128)")
    return g


def awq_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, name: str = "linear"):
    """-> (q int8 [N, K] in [-8, 7], scales [K/G, N], zeros [K/G, N] float32)."""
    u = unpack_awq(qweight)                                       # [K, N]
    k, n = u.shape
    g = group_size_of(k, scales.shape[0], name, group_size)
    zp = unpack_awq(qzeros)                                       # [K/G, N]
    if tuple(scales.shape) != (k // g, n) or tuple(zp.shape) != (k // g, n):
        raise ConfigError(f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(zp.shape)} do "
                          f"not fit qweight [K={k}, N={n}] with group size {g}")
    q = (u.t().to(torch.int16) - 8).to(torch.int8).contiguous()
    s = scales.float()
    return q, scales, (8 - zp.float()) * s


def load_awq_dir(path: str) -> tuple[ModelArgs, QuantConfig, dict, torch.dtype]:
    """An AutoAWQ GEMM directory -> (ModelArgs, QuantConfig, unified tensors, model dtype)."""
    cfg, tensors = read_hf_dir(path)
    g = check_awq_config(cfg.get("quantization_config") or {})
    args = ModelArgs.from_hf_config(cfg)
    dtype = getattr(torch, str(cfg.get("torch_dtype", cfg.get("dtype", "float16"))))

    def get(mod: str):
        return awq_linear(need(tensors, mod + ".qweight", path), need(tensors, mod + ".qzeros",
                          path), need(tensors, mod + ".scales", path), g, mod)

    out = assemble(args, get, tensors, dtype)
    k_pqs = {}
    for name, t in out.items():
        if name.endswith(".weight") and t.dtype == torch.int8:
            k_pqs[name[:-len(".weight")] + ".prequant_scaling_factor"] = torch.ones(
                2 * t.shape[1], dtype=dtype)
    out.update(k_pqs)
    quant = QuantConfig(quant_algo=W4A16_AWQ, group_size=g, has_zero_point=True)
    return args, quant, out, dtype
