"""The ops the network calls, in one namespace (signatures: docs/design.md); the rest of the
package imports kernels through here.

Each op dispatches by device: Triton kernels on CUDA, plain PyTorch (``reference.py``)
elsewhere. Implementations: ``linear.py`` (weight GEMMs, activation quantization),
``fp8.py`` (FP8 E4M3 W8A8), ``norm.py`` (RMSNorm, add + RMSNorm, SwiGLU), ``attn.py`` (RoPE,
KV-cache writes, attention).
A layer output may be a ``PartialSum`` (``partial.py``): hand it to the next op.
"""
from __future__ import annotations

from .attn import check_fp8_kv_device, is_quant_kv
from .attn import (apply_rope, decode_attention, kv_scale_tensors,
                   prefill_attention, prefill_attention_batch, rope_decode_attention,
                   rope_write_kv, write_kv)
from .fp8 import linear_fp8, quantize_fp8_act
from .linear import (linear_fp, linear_w4a16, linear_w8a8, linear_w8a8_dynamic,
                     linear_w8a16, pack_int4, quantize_per_tensor, quantize_per_token,
                     unpack_int4)
from .norm import add_rms_norm, rms_norm, silu_mul
from .partial import PartialSum

__all__ = ["PartialSum", "add_rms_norm", "apply_rope", "decode_attention", "kv_scale_tensors",
           "linear_fp", "linear_fp8", "linear_w4a16", "linear_w8a8", "linear_w8a8_dynamic",
           "linear_w8a16",
           "pack_int4", "prefill_attention", "prefill_attention_batch", "quantize_per_tensor",
           "quantize_fp8_act", "quantize_per_token", "rms_norm", "rope_decode_attention",
           "rope_write_kv", "silu_mul",
           "unpack_int4", "write_kv"]
__all__ += ["check_fp8_kv_device", "is_quant_kv"]
