"""The checkpoint stage: TensorRT-LLM's unified checkpoint format, read and written in one place.

A checkpoint directory holds ``config.json`` (architecture + ``quantization`` dict, see
``ModelArgs.to_checkpoint_config``) and ``rank{N}.safetensors``. Tensor names follow
TensorRT-LLM (``transformer.layers.{i}.attention.qkv.weight`` ...); docs/design.md lists the
tensors of every quantization mode. Every source (HF, Meta, GGUF, random) becomes these
tensors through ``hf_to_unified``; both backends read them.

Writes go through ``llama_engine.outdir``: a staging directory beside the target, swapped in
only when complete; a target that is not ours, a source or the current directory is refused.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

from . import outdir, parallel, trtllm
from .config import ConfigError, ModelArgs, QuantConfig, _load_json
from .names import (KV_CHANNEL_SCALES, KV_SCALE, LAYER_LINEARS, group_by_prefix,  # noqa: F401
                    is_kv_channel_scale, layer_prefix, linear_prefixes, linear_shape)
from .tokenizer import save_tokenizer

# One table: unified-checkpoint prefix -> (our module path, HF LlamaForCausalLM prefix).
# TensorRT-LLM's names are misleading for the MLP: its `mlp.fc` is HF's gate_proj (the
# activated branch) and its `mlp.gate` is HF's up_proj; our modules use the HF meaning.
LAYER_TABLE = [
    ("input_layernorm", "attn_norm", "input_layernorm"),
    ("attention.qkv", "attn.qkv_proj", None),  # fused from q_proj, k_proj, v_proj
    ("attention.dense", "attn.o_proj", "self_attn.o_proj"),
    ("post_layernorm", "mlp_norm", "post_attention_layernorm"),
    ("mlp.fc", "mlp.gate_up_proj[:F]", "mlp.gate_proj"),  # stacked into one GEMM at load
    ("mlp.gate", "mlp.gate_up_proj[F:]", "mlp.up_proj"),
    ("mlp.proj", "mlp.down_proj", "mlp.down_proj"),
]
GLOBAL_TABLE = [
    ("transformer.vocab_embedding", "embed", "model.embed_tokens"),
    ("transformer.ln_f", "norm", "model.norm"),
    ("lm_head", "lm_head", "lm_head"),
]
def expected_float_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an unquantized checkpoint."""
    d = args.hidden_size
    shapes = {"transformer.vocab_embedding.weight": (args.vocab_size, d),
              "transformer.ln_f.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, d)
    for i in range(args.num_hidden_layers):
        p = layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_layernorm.weight"] = (d,)
        for name in LAYER_LINEARS:
            shapes[p + name + ".weight"] = linear_shape(args, p + name)
    return shapes


def hf_to_unified(hf_sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors (rotate-half RoPE layout) -> unified float tensors."""
    out: dict[str, torch.Tensor] = {}
    try:
        for uni, _, hf in GLOBAL_TABLE:
            if uni == "lm_head" and args.tie_word_embeddings:
                continue
            out[uni + ".weight"] = hf_sd[hf + ".weight"]
        for i in range(args.num_hidden_layers):
            src, dst = f"model.layers.{i}.", layer_prefix(i)
            for uni, _, hf in LAYER_TABLE:
                if hf is not None:
                    out[dst + uni + ".weight"] = hf_sd[src + hf + ".weight"]
            out[dst + "attention.qkv.weight"] = torch.cat(
                [hf_sd[src + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
    except KeyError as e:
        raise ConfigError(f"checkpoint is missing tensor {e.args[0]}") from None
    check_shapes(out, expected_float_shapes(args))
    return out


def unified_to_hf(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Inverse of ``hf_to_unified`` for float tensors (HF baselines of random models)."""
    out: dict[str, torch.Tensor] = {}
    for uni, _, hf in GLOBAL_TABLE:
        if uni + ".weight" in tensors:
            out[hf + ".weight"] = tensors[uni + ".weight"]
    if args.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i in range(args.num_hidden_layers):
        src, dst = layer_prefix(i), f"model.layers.{i}."
        for uni, _, hf in LAYER_TABLE:
            if hf is not None:
                out[dst + hf + ".weight"] = tensors[src + uni + ".weight"]
        q, k, v = tensors[src + "attention.qkv.weight"].split(
            [args.q_size, args.kv_size, args.kv_size], dim=0)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
    return out


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """One-line error naming the first tensor that disagrees with the config."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ConfigError(f"checkpoint disagrees with its config: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ConfigError(f"checkpoint disagrees with its config: {name} has shape "
                              f"{tuple(tensors[name].shape)}, config implies {tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# Directory I/O
# ---------------------------------------------------------------------------------------------
def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None):
    from safetensors.torch import save_file
    # safetensors refuses shared or non-contiguous storage: store compact copies.
    compact = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(compact, path, metadata=metadata)


def load_tensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise ConfigError(f"missing weights file {path}")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: corrupt or unreadable safetensors file ({msg})") from None


def write_checkpoint(out_dir: str, args: ModelArgs, dtype: str, quant: QuantConfig,
                     tensors: dict[str, torch.Tensor], rank: int = 0, world_size: int = 1,
                     extra_config: Optional[dict] = None, tokenizer_src: Optional[str] = None,
                     extensions: bool = True, sources: Iterable[Optional[str]] = (),
                     force: bool = False, flag: str = "-o") -> str:
    """Write a TensorRT-LLM unified checkpoint (config.json + rank{rank}.safetensors).

    The tensors are canonical (docs/design.md); ``llama_engine.trtllm.to_trtllm`` turns them
    into exactly what TensorRT-LLM's builder reads, where the two differ.

    With ``world_size`` > 1 the tensors are the full model: they are split for tensor
    parallelism as TensorRT-LLM's LLaMA converter splits them (llama_engine/parallel.py;
    embedding and lm_head by vocabulary, ``use_parallel_embedding``) and every rank's
    ``rank{r}.safetensors`` is written (``rank`` is ignored).

    ``extensions``: keep our tensors that TensorRT-LLM does not define (the per-channel INT8
    KV scales ``attention.k_cache_scale`` / ``v_cache_scale``; its loader only warns about
    them). ``False`` writes a pure TensorRT-LLM export (``build.py --backend tensorrt_llm``).

    ``sources``, ``force``, ``flag``: the output-directory rules (``outdir.check_output_dir``)."""
    if world_size > 1:
        parallel.check_tp(args, quant, world_size)
        shards = (parallel.shard_checkpoint(tensors, args, quant, world_size, r)
                  for r in range(world_size))
        ranks = list(range(world_size))
    else:
        shards, ranks = iter([tensors]), [rank]
    config = None
    with outdir.writing(out_dir, sources, force, flag) as tmp:
        for r, shard in zip(ranks, shards):  # one rank's tensors in memory at a time
            config, out_tensors = _to_trtllm(args, dtype, quant, shard, world_size, extensions)
            save_tensors(os.path.join(tmp, f"rank{r}.safetensors"), out_tensors)
            del out_tensors
        if world_size > 1:
            config.update({"use_parallel_embedding": True, "embedding_sharding_dim": 0})
        if extra_config:
            config.update(extra_config)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if tokenizer_src:
            save_tokenizer(tokenizer_src, tmp)
    return out_dir


def read_checkpoint(ckpt_dir: str, rank: int = 0):
    """-> (ModelArgs, QuantConfig, dtype, canonical tensors) of a unified checkpoint."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{ckpt_dir}: no config.json; not a TensorRT-LLM checkpoint directory")
    with open(cfg_path) as f:
        config = _load_json(f, cfg_path)
    tensors = load_tensors(os.path.join(ckpt_dir, f"rank{rank}.safetensors"))
    return _from_trtllm(config, tensors)


def _to_trtllm(args, dtype, quant, tensors, world_size, extensions=False):
    return trtllm.to_trtllm(tensors, args, quant, dtype=dtype, world_size=world_size,
                            extensions=extensions)


def _from_trtllm(config: dict, tensors: dict[str, torch.Tensor]):
    dtype = config.get("dtype", "float16")
    args, quant, tensors = trtllm.from_trtllm(config, tensors)
    mapping = config.get("mapping") or {}
    if int(mapping.get("world_size", 1)) != 1:
        raise ConfigError(f"checkpoint is split for world_size {mapping.get('world_size')}; "
                          "build.py reads unsplit (world_size 1) checkpoints and splits them "
                          "itself with --tp_size")
    return args, quant, dtype, tensors
