"""From checkpoint tensors to an engine directory (our backend).

An engine directory holds ``config.json`` (``EngineConfig``: architecture, quantization,
build limits, dtype, backend, format version), ``rank0.safetensors`` (canonical tensors,
device-independent: kernels repack at load if they need to) and the tokenizer files when a
tokenizer was found beside the checkpoint.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Optional

import torch

from . import checkpoint as ckpt, outdir
from . import parallel
from .config import BuildConfig, ConfigError, EngineConfig, ModelArgs, QuantConfig
from .runner import TORCH_DTYPES, WEIGHTS_FILE
from .tokenizer import save_tokenizer


def cast_float(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Cast floating tensors to the engine dtype (integer tensors untouched)."""
    td = TORCH_DTYPES[dtype]
    return {k: (v.to(td) if v.is_floating_point() and v.dtype != td else v) for k, v in sd.items()}


def tensor_bytes(tensors: dict[str, torch.Tensor], linear_only: bool = False) -> int:
    """Bytes of the tensors; with ``linear_only`` only the per-layer linears (no embeddings,
    norms or lm_head), as the weight-size targets count them."""
    total = 0
    for name, t in tensors.items():
        if linear_only and not any(f".{x}." in name for x in ckpt.LAYER_LINEARS):
            continue
        total += t.numel() * t.element_size()
    return total


def write_engine(out_dir: str, config: EngineConfig, tensors: dict[str, torch.Tensor],
                 tokenizer_src: Optional[str] = None, sources: Iterable[Optional[str]] = (),
                 force: bool = False) -> None:
    """Write an engine directory atomically: nothing is left half-written on failure, and
    only where ``outdir.check_output_dir`` allows (``sources``: what the build read).

    With ``config.world_size`` > 1 the (full, canonical) tensors are sharded for tensor
    parallelism, each rank's shard written as ``rank{r}.safetensors`` (llama_engine/parallel.py)."""
    meta = {"format": "llama_engine", "version": str(config.format_version)}
    world = config.world_size
    if world > 1:
        parallel.check_tp(config.model, config.quant, world)  # before anything is written
    with outdir.writing(out_dir, sources, force) as tmp:
        if world > 1:
            for rank in range(world):  # one shard in memory at a time
                shard = parallel.shard_checkpoint(tensors, config.model, config.quant, world, rank)
                ckpt.save_tensors(os.path.join(tmp, f"rank{rank}.safetensors"), shard,
                                  metadata={**meta, "rank": str(rank), "world_size": str(world)})
                del shard
        else:
            ckpt.save_tensors(os.path.join(tmp, WEIGHTS_FILE), tensors, metadata=meta)
        config.save(tmp)
        if tokenizer_src:
            save_tokenizer(tokenizer_src, tmp)


def describe(config: EngineConfig, tensors: dict[str, torch.Tensor], seconds: float) -> str:
    a, b = config.model, config.build
    gib = tensor_bytes(tensors) / 2**30
    tp = f", tensor parallel over {config.world_size} ranks" if config.world_size > 1 else ""
    return (f"built {config.backend} engine{tp}: LLaMA {a.num_hidden_layers} layers, hidden "
            f"{a.hidden_size}, heads {a.num_attention_heads}/{a.num_key_value_heads} kv, "
            f"vocab {a.vocab_size}, {config.dtype}, {config.quant.describe()}; limits batch "
            f"{b.max_batch_size}, input {b.max_input_len}, output {b.max_output_len}; "
            f"{gib:.3f} GiB of weights in {seconds:.1f} s")


def engine_from_tensors(args: ModelArgs, quant: QuantConfig, dtype: str,
                        tensors: dict[str, torch.Tensor], build: BuildConfig,
                        source: Optional[dict] = None, world_size: int = 1) -> EngineConfig:
    """Check tensors against the config and make the EngineConfig (``world_size`` ranks of
    tensor parallelism)."""
    build.validate()
    if world_size != 1:
        parallel.check_tp(args, quant, world_size)
    if build.max_seq_len > 1 << 20:
        raise ConfigError(f"max_input_len + max_output_len = {build.max_seq_len} is unreasonably "
                          "large")
    if not quant.quant_algo:
        ckpt.check_shapes(tensors, ckpt.expected_float_shapes(args))
    return EngineConfig(model=args, quant=quant, build=build, dtype=dtype, source=source or {},
                        world_size=world_size)


def timed() -> "callable":
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
