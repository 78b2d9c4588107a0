"""Importers of pre-quantized checkpoints, taken as they are (no dequantize-requantize):

* ``awq.py``        - AutoAWQ GEMM directories (``qweight``/``qzeros``/``scales``);
* ``gptq.py``       - GPTQ directories (AutoGPTQ / GPTQModel ``gptq`` format, ``g_idx``);
* ``gguf_quant.py`` - GGUF Q4_0 / Q4_1 blocks (and Q8_0, kept exactly where it is not a linear);
* ``common.py``     - the int32 nibble packing both HF formats use, and assembling per-module
  (codes, scales, zeros) into our unified tensors (fused qkv, docs/design.md).

Every importer returns (ModelArgs, QuantConfig, unified tensors) in the zero-point int4 format
of ``quant_int4.py``; ``hf_llama_convert.py`` writes them as a unified checkpoint.
"""
