"""TensorRT-LLM's group-wise int4 checkpoint tensors (W4A16_AWQ, with or without zero points,
and W4A16_GPTQ) <-> ours, both ways; ``trtllm.py`` calls these for those two quant_algos.

TensorRT-LLM (``WeightOnlyGroupwiseQuantLinear``; the ModelOpt export for AWQ, its GPTQ
converter for GPTQ) per linear [N, K], group G:

* ``weight`` int8 [N/2, K]: signed codes packed two per byte along N (ours: [N, K/2] along K);
* ``weights_scaling_factor`` [N, K/G] (ours: [K/G, N]);
* ``zero`` [N, K/G] when ``has_zero_point`` (always for W4A16_GPTQ): the additive zero,
  w = q * s + zero, the same arithmetic as ours (TensorRT-LLM's GPTQ converter writes
  (8 - zp) * s, as our importers do);
* ``prequant_scaling_factor`` [K] (W4A16_AWQ only, when ``pre_quant_scale``).

Round trip ours -> TensorRT-LLM -> ours is bit-identical (pure re-layout). The GPTQ layout is
the AWQ one plus ``zero``: written from TensorRT-LLM's documented loader, not checked against a
TensorRT-LLM install (none here)."""
from __future__ import annotations

import torch

from .config import W4A16_GPTQ, ConfigError, ModelArgs, QuantConfig
from .kernels.reference import pack_int4_ref, unpack_int4_ref
from .names import linear_shape


def _pack_along_n(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> int8 [N/2, K], rows 2i (low nibble) and 2i+1 (high) in byte i."""
    return pack_int4_ref(q.t().contiguous()).t().contiguous()


def _unpack_along_n(p: torch.Tensor) -> torch.Tensor:
    return unpack_int4_ref(p.view(torch.int8).t().contiguous()).t().contiguous()


def int4_group_to_trtllm(out: dict, prefixes: list, quant: QuantConfig, fdt: torch.dtype,
                         need) -> None:
    """Ours -> TensorRT-LLM, in place on ``out`` (float, excluded linears stay as they are)."""
    for p in prefixes:
        w = need(out, p + ".weight")
        if w.is_floating_point():
            continue
        q = unpack_int4_ref(w)
        g = quant.group_size
        if g and q.shape[1] % g:  # TensorRT-LLM's rule: K zero-padded to a multiple of G
            q = torch.nn.functional.pad(q, (0, -q.shape[1] % g))
        out[p + ".weight"] = _pack_along_n(q)
        out[p + ".weights_scaling_factor"] = need(out, p + ".weights_scaling_factor") \
            .t().contiguous().to(fdt)
        z = out.pop(p + ".zero", None)
        if quant.int4_zero_point:
            if z is None:
                raise ConfigError(f"{p}.zero is missing ({quant.describe()})")
            out[p + ".zero"] = z.t().contiguous().to(fdt)
        elif z is not None:
            raise ConfigError(f"{p}.zero is present but quant.has_zero_point is false")
        pq = out.pop(p + ".prequant_scaling_factor", None)
        if quant.pre_quant_scale and quant.quant_algo != W4A16_GPTQ:
            if pq is None:
                raise ConfigError(f"{p}.prequant_scaling_factor is missing "
                                  "(quant.pre_quant_scale is set)")
            out[p + ".prequant_scaling_factor"] = pq.reshape(-1).to(fdt)
        elif pq is not None and not bool(torch.all(pq == 1)):
            raise ConfigError(f"{p}.prequant_scaling_factor is not all ones but "
                              "quant.pre_quant_scale is false")


def int4_group_from_trtllm(out: dict, prefixes: list, quant: QuantConfig, fdt: torch.dtype,
                           need, args: ModelArgs) -> None:
    """TensorRT-LLM -> ours, in place on ``out``; a K that TensorRT-LLM zero-padded to a
    multiple of G is cut back to the architecture's width (our narrower last group)."""
    for p in prefixes:
        w = need(out, p + ".weight")
        if w.is_floating_point():
            continue
        if w.dtype not in (torch.int8, torch.uint8):
            raise ConfigError(f"{p}.weight: {quant.quant_algo} expects packed int8, got "
                              f"{w.dtype}")
        half_n, k_stored = w.shape
        n = 2 * half_n
        k = linear_shape(args, p)[1]
        g = quant.group_size or k
        if k_stored != k and k_stored != -(-k // g) * g:
            raise ConfigError(f"{p}.weight has K={k_stored}; the architecture says {k} "
                              f"(zero-padded to a multiple of {g}: {-(-k // g) * g})")
        if k % g and not quant.int4_zero_point:
            raise ConfigError(f"{p}: group size {g} does not divide K={k}")
        ng = -(-k // g)
        out[p + ".weight"] = pack_int4_ref(_unpack_along_n(w)[:, :k].contiguous())  # [N, K/2]
        for name in ("weights_scaling_factor",) + (("zero",) if quant.int4_zero_point else ()):
            t = need(out, f"{p}.{name}")
            if tuple(t.shape) != (n, ng):
                raise ConfigError(f"{p}.{name} has shape {tuple(t.shape)}, expected "
                                  f"{(n, ng)} (group size {quant.group_size})")
            out[f"{p}.{name}"] = t.t().contiguous().to(fdt)               # [K/G, N]
        if quant.quant_algo != W4A16_GPTQ:
            pq = out.get(p + ".prequant_scaling_factor")
            out[p + ".prequant_scaling_factor"] = (torch.ones(k, dtype=fdt) if pq is None
                                                   else pq.reshape(-1).to(fdt))


