"""Shared by the pre-quantized importers: 4-bit values packed eight per int32 (the layout of
AutoAWQ and GPTQ checkpoints), HF directory reading, and assembling HF modules' (codes, scales,
zeros) into our unified tensors (q, k, v fused into ``attention.qkv``)."""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Optional

import torch

from ..config import ConfigError, ModelArgs
from ..kernels.reference import pack_int4_ref
from ..names import layer_prefix

# unified linear prefix -> the HF module(s) it is made of (stacked along the output dim)
HF_MODULES = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
# unified float tensors -> HF names
HF_FLOATS_GLOBAL = {"transformer.vocab_embedding.weight": "model.embed_tokens.weight",
                    "transformer.ln_f.weight": "model.norm.weight",
                    "lm_head.weight": "lm_head.weight"}
HF_FLOATS_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
                   "post_layernorm.weight": "post_attention_layernorm.weight"}


def unpack_int32(p: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., 8 C]: value i of word c is bits 4i..4i+3 (output 8c + i)."""
    if p.dtype != torch.int32:
        raise ConfigError(f"expected int32 packed 4-bit values, got {p.dtype}")
    w = p.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=p.device)
    return ((w[..., None] >> shifts) & 0xF).to(torch.uint8).reshape(*p.shape[:-1], -1)


def pack_int32(u: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_int32``: values in [0, 15], [..., 8 C] -> int32 [..., C]."""
    if u.shape[-1] % 8:
        raise ConfigError(f"packing eight 4-bit values per int32 needs a multiple of 8, got "
                          f"{tuple(u.shape)}")
    if bool((u < 0).any()) or bool((u > 15).any()):
        raise ConfigError("4-bit values must be in [0, 15]")
    v = u.to(torch.int64).reshape(*u.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=u.device)
    w = (v << shifts).sum(dim=-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def read_hf_dir(path: str) -> tuple[dict, dict]:
    """-> (config.json dict, all tensors of its *.safetensors files)."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path}: no config.json; not a Hugging Face model directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors files (pre-quantized checkpoints are read "
                          "from safetensors only)")
    tensors: dict = {}
    for fn in files:
        tensors.update(load_file(fn))
    return cfg, tensors


def assemble(args: ModelArgs, get_linear: Callable[[str], tuple], floats: dict,
             dtype: torch.dtype, zeros: bool = True) -> dict:
    """Unified tensors from per-HF-module ``get_linear(name) -> (q int8 [N, K] in [-8, 7],
    scales [K/G, N], zeros [K/G, N] or None)`` and HF float tensors ``floats``."""
    out = {}
    for uni, hf in HF_FLOATS_GLOBAL.items():
        if uni == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if hf not in floats:
            raise ConfigError(f"checkpoint is missing tensor {hf}")
        out[uni] = floats[hf].to(dtype)
    for i in range(args.num_hidden_layers):
        src, dst = f"model.layers.{i}.", layer_prefix(i)
        for uni, hf in HF_FLOATS_LAYER.items():
            if src + hf not in floats:
                raise ConfigError(f"checkpoint is missing tensor {src + hf}")
            out[dst + uni] = floats[src + hf].to(dtype)
        for uni, mods in HF_MODULES.items():
            parts = [get_linear(src + m) for m in mods]
            q = torch.cat([p[0] for p in parts], dim=0)
            out[dst + uni + ".weight"] = pack_int4_ref(q)
            out[dst + uni + ".weights_scaling_factor"] = torch.cat(
                [p[1] for p in parts], dim=1).to(dtype).contiguous()
            if zeros:
                out[dst + uni + ".zero"] = torch.cat(
                    [p[2] if p[2] is not None else torch.zeros_like(p[1]) for p in parts],
                    dim=1).to(dtype).contiguous()
    return out


def need(tensors: dict, name: str, what: str) -> torch.Tensor:
    if name not in tensors:
        raise ConfigError(f"{what}: tensor {name} is missing")
    return tensors[name]


def group_size_of(k: int, n_groups: int, name: str, declared: Optional[int]) -> int:
    g = k // n_groups if n_groups else 0
    if not n_groups or k % n_groups or (declared not in (None, -1, 0) and declared != g):
        raise ConfigError(f"{name}: {n_groups} scale groups do not fit K={k} with group size "
                          f"{declared}")
    return g
