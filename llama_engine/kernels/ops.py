"""The ops the network calls, in one namespace (signatures: docs/design.md).

Each op dispatches by device: Triton kernels on CUDA, plain PyTorch elsewhere. The
implementations live in ``linear.py`` (weight GEMMs, activation quantization) and
``attn.py`` (norms, RoPE, KV-cache writes, attention).
"""
from __future__ import annotations

from .act import silu_mul  # noqa: F401
from .attn import (add_rms_norm, apply_rope, decode_attention,  # noqa: F401
                   kv_scale_tensors, prefill_attention, prefill_attention_batch, rms_norm,
                   rope_decode_attention, rope_write_kv, write_kv)
from .linear import (SplitKPartials, linear_fp, linear_w4a16, linear_w8a8,  # noqa: F401
                     linear_w8a8_dynamic,
                     linear_w8a16, pack_int4, quantize_per_tensor, quantize_per_token,
                     unpack_int4)
