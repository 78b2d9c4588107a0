"""Paged KV cache storage: per layer, K and V as ``[num_blocks, Hkv, block_size, D]``.

One storage serves both runners: a static batch owns a fixed range of blocks per sequence
(``static_block_tables``); inflight batching hands blocks out through a block manager.
With ``kv_scales`` the cache is quantized, int8 or FP8 E4M3 (``quant_dtype``): values are
quantized on write (int8: q = round(x/scale) clamped to ±127; FP8: q = fp8(x/scale) clamped
to ±448) and dequantized inside attention (x = q·scale), one byte a value, with static scales per
(KV head, channel), separately for K and V (docs/design.md: ``attention.k_cache_scale`` /
``attention.v_cache_scale``). A layer given one float (TensorRT-LLM's per-layer
``kv_cache_scaling_factor``) uses it for every channel of K and V. The scale tensors live on
the cache's device for its whole life, so captured CUDA graphs can point at them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .config import ConfigError
from .kernels.attn import kv_scale_tensors

# QuantConfig.kv_cache_dtype -> storage dtype of a quantized cache
QUANT_CACHE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def quant_cache_dtype(name: Optional[str]) -> torch.dtype:
    """'int8' / 'fp8' (``QuantConfig.kv_cache_dtype``) -> torch dtype; None means int8 (the
    scales alone used to say "int8")."""
    if name is None:
        return torch.int8
    if name not in QUANT_CACHE_DTYPES:
        raise ConfigError(f"KV cache dtype must be one of {sorted(QUANT_CACHE_DTYPES)}, "
                          f"got {name!r}")
    return QUANT_CACHE_DTYPES[name]


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, kv_scales: Optional[Sequence] = None,
                 quant_dtype: torch.dtype = torch.int8):
        """``kv_scales``: None (float cache) or one entry per layer: a float (K and V) or a
        pair (k_scale, v_scale) of float32 tensors with ``num_kv_heads * head_dim`` values.
        ``quant_dtype``: storage of a cache with scales, torch.int8 or torch.float8_e4m3fn."""
        if kv_scales is not None and len(kv_scales) != num_layers:
            raise ValueError(f"need {num_layers} KV scales, got {len(kv_scales)}")
        if quant_dtype not in QUANT_CACHE_DTYPES.values():
            raise ConfigError(f"quantized KV cache dtype must be int8 or float8_e4m3fn, got "
                              f"{quant_dtype}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.quantized = kv_scales is not None
        self.int8 = self.quantized and quant_dtype == torch.int8
        self.dtype = quant_dtype if self.quantized else dtype
        # per layer: (k_scale, v_scale) float32 [Hkv, D] on `device` (no copy when already so)
        self.kv_scales = ([kv_scale_tensors(s, num_kv_heads, head_dim, device) for s in kv_scales]
                          if self.quantized else [None] * num_layers)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, i: int):
        """-> (k_cache, v_cache, (k_scale, v_scale) or None) of layer i."""
        return self.k[i], self.v[i], self.kv_scales[i]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, quantized: bool,
                        dtype: torch.dtype) -> int:
        """Cache bytes of one token; a quantized cache (int8 or FP8) takes 1 byte a value."""
        elem = 1 if quantized else torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * elem

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return max(1, math.ceil(num_tokens / block_size))


def static_block_tables(batch_size: int, max_seq_len: int, block_size: int, device) -> torch.Tensor:
    """Block tables of a static batch: sequence b owns blocks [b*n, (b+1)*n). -> int32[B, n]."""
    n = blocks_for(max_seq_len, block_size)
    return torch.arange(batch_size * n, dtype=torch.int32, device=device).view(batch_size, n)


def slots_for(block_tables: torch.Tensor, seq_index: torch.Tensor, positions: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """Cache slot of each token: block_tables[seq, pos // bs] * bs + pos % bs. -> int64[N]."""
    blocks = block_tables[seq_index, positions // block_size].to(torch.int64)
    return blocks * block_size + positions % block_size
