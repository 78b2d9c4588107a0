"""The LLaMA network, for readers of the TensorRT-LLM example layout.

The network itself lives in the package: ``llama_engine/model.py`` (``Transformer``,
``TransformerBlock``, ``Attention``, ``MLP``, ``RMSNorm``, RoPE tables). This file re-exports
it so ``from model import Transformer`` keeps working from the example directory.
"""
from llama_engine.model import *  # noqa: F401,F403
from llama_engine.model import (MLP, Attention, RMSNorm, Transformer,  # noqa: F401
                                TransformerBlock, fuse_gate_up, kv_scales_from_checkpoint,
                                rope_inv_freq, rope_tables)
