"""The rows benchmark.py measures: engine modes (quantization build flags, label) and the
ablation table's order. Data only, shared by the measurement and the report."""
from __future__ import annotations

MODES = {
    # name: (build flags for quantization, description)
    "fp16": ({}, "fp16"),
    "int8": ({"use_weight_only": True, "weight_only_precision": "int8"}, "int8 weight-only"),
    "int8_g128": ({"use_weight_only": True, "weight_only_precision": "int8", "group_size": 128},
                  "int8 weight-only g128 with zeros (W8A16_GPTQ)"),
    "int4": ({"use_weight_only": True, "weight_only_precision": "int4", "group_size": 128},
             "int4 weight-only g128"),
    "int4_zp": ({"use_weight_only": True, "weight_only_precision": "int4", "group_size": 128,
                 "has_zero_point": True}, "int4 weight-only g128 with zeros (AWQ's format)"),
    "int8kv": ({"int8_kv_cache": True}, "fp16 + INT8 KV cache"),
    "fp16_fp8kv": ({"fp8_kv_cache": True}, "fp16 + FP8 KV cache (E4M3, CC >= 8.9)"),
    "int4_int8kv": ({"use_weight_only": True, "weight_only_precision": "int4", "group_size": 128,
                     "int8_kv_cache": True}, "int4 g128 + INT8 KV"),
    "sq": ({"use_smooth_quant": True, "per_token": True, "per_channel": True},
           "SmoothQuant W8A8 (per-token, per-channel; speed-only calibration)"),
    # FP8 E4M3 W8A8 (Ada/Hopper): TensorRT-LLM's FP8 recipe (per-tensor weights, static
    # activations from speed-only calibration), its per-channel / per-token form, and the
    # per-tensor recipe with the FP8 KV cache (TensorRT-LLM's --qformat fp8 --kv_cache_dtype fp8).
    "fp8": ({"fp8": (False, False)}, "FP8 W8A8 (per-tensor, static; speed-only calibration)"),
    "fp8_pcpt": ({"fp8": (True, True)}, "FP8 W8A8 (per-channel weights, per-token activations)"),
    "fp8_fp8kv": ({"fp8": (False, False), "fp8_kv_cache": True},
                  "FP8 W8A8 per-tensor + FP8 KV cache (speed-only calibration)"),
}
HF_ROWS = {"hf_eager": "HF eager", "hf_compile": "HF static cache + compile"}
ABLATION = ["hf_eager", "hf_compile", "fp16", "int8", "int4", "int4_int8kv", "sq", "fp8"]
# The ablation's shape: batch 1, input 8, output 50 (the README's table).
ABLATION_SHAPE = (1, 8, 50)
