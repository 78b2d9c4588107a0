"""Random LLaMA-shaped fp16 weights on the device, and an in-memory engine per mode built from
them, as TensorRT-LLM's builder does without a checkpoint: every mode is quantized from the
same fp16 weights. Under torchrun every rank makes the same weights and keeps its shard."""
from __future__ import annotations

import torch

import smoothquant
import weight
from llama_engine import parallel
from llama_engine import quant as q
from llama_engine.checkpoint import hf_to_unified, unified_to_hf
from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, QuantConfig
from llama_engine.runner import Engine

from .modes import MODES


def quant_config(mode: str, args: ModelArgs, group_size: int | None = None) -> QuantConfig:
    """The QuantConfig build.py makes for ``mode``'s flags from unquantized weights (calibration
    statistics are synthetic, so they count as present); ``group_size`` replaces the mode's."""
    flags, _ = MODES[mode]
    if group_size is not None and "group_size" in flags:
        flags = {**flags, "group_size": group_size}
    return q.validate_quant_flags(args, **flags, has_act_stats=True, has_kv_stats=True)


class Weights:
    """fp16 random weights (unified names) on ``device``, shared by every mode."""

    def __init__(self, model_config: str, device: str = "cuda", dtype: str = "float16",
                 seed: int = 0, engine_kw: dict | None = None):
        self.name = model_config  # a preset name or a config file
        self.args = ModelArgs.from_preset_or_file(model_config)
        self.device, self.dtype = device, dtype
        self.engine_kw = engine_kw or {}  # options.engine_kwargs(...)
        sd = weight.random_weights(self.args, dtype, seed=seed, device=device)
        self.tensors = hf_to_unified(sd, self.args)

    def engine(self, mode: str, max_batch: int, max_input: int, max_output: int,
               group_size: int | None = None) -> Engine:
        quant = quant_config(mode, self.args, group_size)
        tensors = self.tensors
        if quant.quant_algo or quant.kv_cache_dtype:
            calib = {}
            if quant.is_smooth_quant or quant.kv_cache_dtype or (quant.is_fp8 and
                                                                 not quant.fp8_dynamic_act):
                calib = smoothquant.synthetic_calibration(self.args, self.tensors,
                                                          device=self.device)
            tensors, _ = q.quantize_checkpoint(self.tensors, self.args, quant, progress=False,
                                               **calib)
        world = parallel.get_world_size()
        if world > 1:
            # Tensor parallelism (torchrun): each rank keeps its own shard, as build.py
            # --tp_size writes rank files.
            tensors = parallel.shard_checkpoint(tensors, self.args, quant, world,
                                                parallel.get_rank())
        cfg = EngineConfig(model=self.args, quant=quant, dtype=self.dtype, world_size=world,
                           build=BuildConfig(max_batch_size=max_batch, max_input_len=max_input,
                                             max_output_len=max_output))
        return Engine.from_tensors(cfg, tensors, self.device, **self.engine_kw)

    def hf_model(self):
        """transformers' LlamaForCausalLM on the same weights (the HF baselines)."""
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        cfg = LlamaConfig(**{k: v for k, v in self.args.to_hf_config().items()
                             if k not in ("architectures",)})
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        sd = unified_to_hf(self.tensors, self.args)
        model.load_state_dict(sd, assign=True, strict=False)
        # The rotary inv_freq buffer was made on the meta device: make the module again.
        # (LlamaRotaryEmbedding's device= argument is deprecated in transformers 5.17)
        with torch.device(self.device):
            model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
        return model.to(dtype=self.tensors["transformer.ln_f.weight"].dtype).eval()


def load_engine(engine_dir: str, device: str, engine_kw: dict) -> Engine:
    """An engine built by build.py, with the run-time choices of ``engine_kw``."""
    return Engine.from_dir(engine_dir, device, **engine_kw)
