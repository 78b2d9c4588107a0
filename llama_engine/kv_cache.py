"""Paged KV cache storage: per layer, K and V as ``[num_blocks, Hkv, block_size, D]``.

One storage serves both runners: a static batch owns a fixed range of blocks per sequence
(``static_block_tables``); inflight batching hands blocks out through a block manager.
With ``kv_scales`` the cache is int8: values are quantized on write (q = round(x/scale),
clamped to ±127) and dequantized inside attention (x = q·scale), with static scales per
(KV head, channel), separately for K and V (docs/design.md: ``attention.k_cache_scale`` /
``attention.v_cache_scale``). A layer given one float (TensorRT-LLM's per-layer
``kv_cache_scaling_factor``) uses it for every channel of K and V. The scale tensors live on
the cache's device for its whole life, so captured CUDA graphs can point at them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .kernels.attn import kv_scale_tensors


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, kv_scales: Optional[Sequence] = None):
        """``kv_scales``: None (float cache) or one entry per layer: a float (K and V) or a
        pair (k_scale, v_scale) of float32 tensors with ``num_kv_heads * head_dim`` values."""
        if kv_scales is not None and len(kv_scales) != num_layers:
            raise ValueError(f"need {num_layers} KV scales, got {len(kv_scales)}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.int8 = kv_scales is not None
        self.dtype = torch.int8 if self.int8 else dtype
        # per layer: (k_scale, v_scale) float32 [Hkv, D] on `device` (no copy when already so)
        self.kv_scales = ([kv_scale_tensors(s, num_kv_heads, head_dim, device) for s in kv_scales]
                          if self.int8 else [None] * num_layers)
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
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, int8: bool,
                        dtype: torch.dtype) -> int:
        elem = 1 if int8 else torch.empty((), dtype=dtype).element_size()
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
