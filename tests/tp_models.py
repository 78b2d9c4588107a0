"""Tiny LLaMAs and the probe shared by the tensor-parallel tests (tests/test_tp.py, CPU, gloo)
and the GPU check (tools/gpu_tp_check.py, NCCL). No pytest here: the GPU machine runs it bare."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import build  # noqa: E402

PROMPTS = [[1, 5, 9, 33, 100, 7, 250], [1, 200, 3]]
DECODE_TOKENS = [[7, 11], [300, 2], [509, 0]]   # teacher-forced decode inputs (509: last row)
NEW_TOKENS = 6
COMMON = dict(vocab_size=510, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
              max_position_embeddings=128, rms_norm_eps=1e-6)
MODELS = {"mha": dict(COMMON, num_attention_heads=4, num_key_value_heads=4),
          "gqa": dict(COMMON, num_attention_heads=4, num_key_value_heads=2),
          "tied": dict(COMMON, num_attention_heads=4, num_key_value_heads=1,
                       tie_word_embeddings=True)}
# (model, dtype, extra build flags)
ENGINES = {"mha-fp32": ("mha", "float32", ()), "gqa-fp32": ("gqa", "float32", ()),
           "gqa-fp64": ("gqa", "float64", ()), "mha-fp64": ("mha", "float64", ()),
           "gqa-int8": ("gqa", "float32", ("--use_weight_only",)),
           "mqa-tied-fp32": ("tied", "float32", ()),
           # int4 group 32 at 2 ranks only: 4 ranks leave attention.dense 16 input columns each
           "gqa-int4g32": ("gqa", "float32", ("--use_weight_only", "--weight_only_precision",
                                              "int4", "--group_size", "32")),
           "gqa-sq": ("gqa", "float32", ("--use_smooth_quant", "--per_channel")),
           # INT8 KV with per-(KV head, channel) scales (synthetic calibration): the scales
           # must follow the KV heads (4 ranks replicate each of the 2). float64 so that K/V
           # reach the quantizer equal to ~1e-15 and round alike in every layout.
           "gqa-int8kv": ("gqa", "float64", ("--int8_kv_cache",)),
           # the same in float32, for GPUs (no float64 kernels there): tools/gpu_tp_check.py
           "gqa-int8kv-fp32": ("gqa", "float32", ("--int8_kv_cache",))}


def probe(engine) -> dict:
    """Prefill logits [B, V], teacher-forced decode logits [steps, B, V], greedy tokens."""
    from llama_engine.kv_cache import static_block_tables
    bsz, max_seq = len(PROMPTS), max(map(len, PROMPTS)) + len(DECODE_TOKENS) + 1
    cache = engine.kv_cache(bsz, max_seq)
    bt = static_block_tables(bsz, max_seq, engine.block_size, engine.device)
    prefill = engine.prefill(PROMPTS, cache, bt)
    dev = engine.device  # decode_step takes its inputs on the engine's device (GPU check too)
    ctx = torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32, device=dev)
    decode = [engine.decode_step(torch.tensor(t, device=dev), ctx, bt, cache).cpu()
              for t in DECODE_TOKENS]
    greedy = engine.generate(PROMPTS, NEW_TOKENS).output_ids
    return {"prefill": prefill.cpu(), "decode": torch.stack(decode), "greedy": greedy}



def model_config(tmp: Path, name: str) -> str:
    p = tmp / f"{name}.json"
    if not p.exists():
        p.write_text(json.dumps(MODELS[name]))
    return str(p)


def build_engine(tmp: Path, name: str, tp: int) -> str:
    """Engine ``name`` for ``tp`` ranks; tp 4 keeps the embedding vocabulary-parallel
    (build.py --use_parallel_embedding), tp 2 gathers it whole (the default)."""
    model, dtype, extra = ENGINES[name]
    if tp == 4:
        extra = (*extra, "--use_parallel_embedding")
    if tp > 2 and "int4" in extra:
        return None
    out = tmp / f"tp{tp}" / name
    rc = build.main(["--model_config", model_config(tmp, model), "--dtype", dtype, "--seed", "3",
                     "--output_dir", str(out), "--max_batch_size", "2", "--max_input_len", "16",
                     "--max_output_len", "8", "--tp_size", str(tp), *extra])
    assert rc == 0
    return str(out)
