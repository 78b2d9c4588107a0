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
    "int8kv": ({"int8_kv_cache": True}, "fp16 + INT8 KV cache"),
    "int4_int8kv": ({"use_weight_only": True, "weight_only_precision": "int4", "group_size": 128,
                     "int8_kv_cache": True}, "int4 g128 + INT8 KV"),
    "sq": ({"use_smooth_quant": True, "per_token": True, "per_channel": True},
           "SmoothQuant W8A8 (per-token, per-channel; speed-only calibration)"),
}
HF_ROWS = {"hf_eager": "HF eager", "hf_compile": "HF static cache + compile"}
ABLATION = ["hf_eager", "hf_compile", "fp16", "int8", "int4", "int4_int8kv", "sq"]
# The ablation's shape: batch 1, input 8, output 50 (the README's table).
ABLATION_SHAPE = (1, 8, 50)
