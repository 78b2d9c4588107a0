"""An engine's tensors checked against its ``config.json`` at load, before a model is built.

An edited or mismatched ``config.json`` (fewer layers, another vocabulary or KV-head count,
``tokens_per_block: 0``) would otherwise run a truncated model silently or fail deep inside a
kernel; here it is a one-line ``ConfigError`` naming the field and the tensor.

Owns only checks; imports ``config`` and ``checkpoint`` (the tensor names and shapes).
"""
from __future__ import annotations

import re

import torch

from . import checkpoint as ckpt
from .config import ConfigError, EngineConfig

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


def validate_engine(config: EngineConfig, tensors: dict[str, torch.Tensor],
                    where: str = "engine") -> None:
    """Raise ``ConfigError`` where ``tensors`` (one rank's) disagree with ``config``."""
    _check_limits(config, where)
    _check_layer_count(config, tensors, where)
    if config.world_size == 1:
        _check_shapes(config, tensors, where)
    else:  # shards: heads and MLP width are split; the hidden size is not
        d = config.model.hidden_size
        for name in ("transformer.ln_f.weight", "transformer.layers.0.input_layernorm.weight"):
            _expect(tensors, name, (d,), where, "hidden_size")


def _check_limits(config: EngineConfig, where: str) -> None:
    b = config.build
    for name in ("max_batch_size", "max_input_len", "max_output_len", "tokens_per_block"):
        if getattr(b, name) <= 0:
            raise ConfigError(f"{where}: build_config.{name} must be positive, got "
                              f"{getattr(b, name)}")
    if config.world_size < 1:
        raise ConfigError(f"{where}: world_size must be positive, got {config.world_size}")


def _check_layer_count(config: EngineConfig, tensors: dict, where: str) -> None:
    layers = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
    n = config.model.num_hidden_layers
    if layers != set(range(n)):
        have = max(layers) + 1 if layers else 0
        raise ConfigError(f"{where}: config.json says num_hidden_layers {n} but the weights "
                          f"hold {have} layers; rebuild the engine")


def _check_shapes(config: EngineConfig, tensors: dict, where: str) -> None:
    args, quant = config.model, config.quant
    packed = 2 if quant.weight_only == "int4" else 1
    for name, shape in ckpt.expected_float_shapes(args).items():
        prefix = name[:-len(".weight")]
        quantized = (quant.quant_algo and prefix != "lm_head"
                     and any(prefix.endswith(x) for x in ckpt.LAYER_LINEARS))
        if quantized:
            shape = (shape[0], shape[1] // packed)
        _expect(tensors, name, shape, where, _field_of(name))
    if quant.kv_cache_dtype:
        for i in range(args.num_hidden_layers):
            for s in ckpt.KV_CHANNEL_SCALES:
                name = f"{ckpt.layer_prefix(i)}attention.{s}"
                if name in tensors:
                    _expect(tensors, name, (args.kv_size,), where, "num_key_value_heads")


def _field_of(name: str) -> str:
    """The config field a tensor's shape most likely contradicts, for the message."""
    if "vocab_embedding" in name or name.startswith("lm_head"):
        return "vocab_size"
    if "attention.qkv" in name:
        return "num_attention_heads / num_key_value_heads / head_dim"
    if ".mlp." in name:
        return "intermediate_size"
    return "hidden_size"


def _expect(tensors: dict, name: str, shape: tuple, where: str, field: str) -> None:
    if name not in tensors:
        raise ConfigError(f"{where}: tensor {name} is missing; the weights do not match "
                          "config.json")
    got = tuple(tensors[name].shape)
    if got != tuple(shape):
        raise ConfigError(f"{where}: {name} has shape {got} but config.json ({field}) implies "
                          f"{tuple(shape)}")
