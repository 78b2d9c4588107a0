"""Canonical tensor names of the unified checkpoint (TensorRT-LLM's), and the few helpers that
read them. The lowest layer above ``config``: every module that handles checkpoint tensors
(parallel sharding, the TensorRT-LLM exchange, quantization, the network) names them
through here. Imports only ``config``."""
from __future__ import annotations

import torch

from .config import ModelArgs

LAYER_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
# INT8 KV cache scales, under each layer's ``attention.`` (docs/design.md): TensorRT-LLM's one
# scale for K and V (float32 [1]) and our extension, per (KV head, channel) for K and for V
# (float32 [Hkv*D] each). TensorRT-LLM exports (trtllm.to_trtllm) carry only the first.
KV_SCALE = "kv_cache_scaling_factor"
KV_CHANNEL_SCALES = ("k_cache_scale", "v_cache_scale")


def is_kv_channel_scale(name: str) -> bool:
    """True for our per-channel INT8 KV scale tensors (not part of TensorRT-LLM's format)."""
    prefix, _, suffix = name.rpartition(".")
    return suffix in KV_CHANNEL_SCALES and prefix.endswith(".attention")


def layer_prefix(i: int) -> str:
    return f"transformer.layers.{i}."


def linear_prefixes(args: ModelArgs) -> list[str]:
    """Every linear layer's unified prefix (lm_head included when it has its own weight)."""
    out = [layer_prefix(i) + name for i in range(args.num_hidden_layers) for name in LAYER_LINEARS]
    if not args.tie_word_embeddings:
        out.append("lm_head")
    return out


def linear_shape(args: ModelArgs, prefix: str) -> tuple[int, int]:
    """(out_features, in_features) of a linear given its unified prefix."""
    d, f = args.hidden_size, args.intermediate_size
    shapes = {
        "attention.qkv": (args.q_size + 2 * args.kv_size, d),
        "attention.dense": (d, args.q_size),
        "mlp.fc": (f, d),
        "mlp.gate": (f, d),
        "mlp.proj": (d, f),
    }
    if prefix == "lm_head":
        return (args.vocab_size, d)
    return shapes[prefix.split(".", 3)[-1]]


def group_by_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'transformer.layers.0.attention.qkv': {'weight': ..., 'per_channel_scale': ...}, ...}.

    ``attention.kv_cache_scaling_factor`` (and ``k_cache_scale`` / ``v_cache_scale``) are
    grouped under '...attention'."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        groups.setdefault(prefix, {})[suffix] = t
    return groups
