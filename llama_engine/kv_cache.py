"""Paged KV cache storage: per layer, K and V as ``[num_blocks, Hkv, block_size, D]``.

One storage serves both runners: a static batch owns a fixed range of blocks per sequence
(``static_block_tables``); inflight batching hands blocks out through a block manager.
With ``kv_scales`` the cache is int8: values are quantized on write (q = round(x/scale),
clamped to ±127) and dequantized inside attention (x = q·scale), one scale per layer for K
and V as TensorRT-LLM's ``kv_cache_scaling_factor``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, kv_scales: Optional[Sequence[float]] = None):
        if kv_scales is not None and len(kv_scales) != num_layers:
            raise ValueError(f"need {num_layers} KV scales, got {len(kv_scales)}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.int8 = kv_scales is not None
        self.dtype = torch.int8 if self.int8 else dtype
        self.kv_scales = [float(s) for s in kv_scales] if self.int8 else [None] * num_layers
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, i: int):
        """-> (k_cache, v_cache, kv_scale or None) of layer i."""
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
