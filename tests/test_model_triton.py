"""The whole network with its Triton kernels (RMSNorm, decode attention with RoPE and the KV
write fused in, prefill's RoPE + KV write,
SwiGLU activation, skinny linears) against the same network on the PyTorch reference ops, on
the CPU under ``TRITON_INTERPRET=1``: the model-level wiring of the kernels that only a GPU runs
by default (``impl="auto"`` picks them on CUDA). Prefill, teacher-forced decode steps and the
INT8 KV cache. Every skinny linear is forced to split K, so o_proj / gate_up / down_proj hand
their split-K partials to add_rms_norm / silu_mul (and through the logits-row gather), while
qkv and lm_head reduce them. In-process: conftest.py sets TRITON_INTERPRET=1 without a GPU."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from conftest import interpreter_on  # noqa: E402

PROMPTS = [[5, 9, 33, 100, 7, 250, 11], [1, 200, 3]]
DECODE = [[7, 11], [300, 2], [41, 0]]


def _probe(engine) -> torch.Tensor:
    from llama_engine.kv_cache import static_block_tables
    bsz, max_seq = len(PROMPTS), max(map(len, PROMPTS)) + len(DECODE) + 1
    cache = engine.kv_cache(bsz, max_seq)
    bt = static_block_tables(bsz, max_seq, engine.block_size, engine.device)
    logits = [engine.prefill(PROMPTS, cache, bt)]
    ctx = torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32)
    logits += [engine.decode_step(torch.tensor(t), ctx, bt, cache) for t in DECODE]
    return torch.stack(logits)


def _run(engine_dir: str, monkeypatch) -> dict:
    from llama_engine.kernels import attn, linear, norm, ops, tuning
    from llama_engine.runner import Engine
    eng = Engine.from_dir(engine_dir, device="cpu")
    ref = _probe(eng)
    calls = []

    def triton_everywhere(impl, *tensors):  # "auto" picks the Triton kernels on the CPU too
        use = impl != "torch"
        calls.append(use)
        return use
    for mod, name in ((attn, "_use_triton"), (norm, "_use_triton"), (linear, "wants_triton")):
        monkeypatch.setattr(mod, name, triton_everywhere)
    # K blocks of 32: hidden 64 splits in 2, intermediate 160 in 3
    monkeypatch.setattr(tuning, "pick_skinny",
                        lambda table, kind, M, N, K: tuning.SkinnyCfg("dot", 32, 32, 3))
    real_launch, launches = linear._launch_skinny, []

    def launch(*args, **kw):
        out = real_launch(*args, **kw)
        launches.append(isinstance(out, ops.PartialSum))
        return out
    monkeypatch.setattr(linear, "_launch_skinny", launch)
    real_decode, rope_fused = attn.decode_attention, []
    monkeypatch.setattr(attn, "decode_attention", lambda *a, **k: rope_fused.append(
        k.get("_rope") is not None) or real_decode(*a, **k))
    real_silu, silu_calls = ops.silu_mul, []
    monkeypatch.setattr(ops, "silu_mul",
                        lambda *a, **k: silu_calls.append(1) or real_silu(*a, **k))
    got = _probe(eng)
    err = float((got - ref).norm() / ref.norm())
    return {"rel_err": err, "triton_calls": sum(calls), "partials": sum(launches),
            "reduced": len(launches) - sum(launches),
            "silu_mul": len(silu_calls), "rope_fused": sum(rope_fused),
            "decode_attention": len(rope_fused)}


def _build(tmp: str, name: str, extra: list) -> str:
    import build
    d = os.path.join(tmp, name)
    assert build.main(["--model_config", "tiny", "--dtype", "float32", "--seed", "1",
                       "--output_dir", d, "--max_batch_size", "2", "--max_input_len", "16",
                       "--max_output_len", "8", *extra]) == 0
    return d


@pytest.mark.parametrize("name,extra", [("fp32", []), ("int8kv", ["--int8_kv_cache"])],
                         ids=["fp32", "int8kv"])
@pytest.mark.skipif(not interpreter_on(), reason="runs the kernels under TRITON_INTERPRET=1 "
                    "(conftest.py sets it without a GPU)")
def test_network_on_triton_kernels_equals_reference_ops(tmp_path, monkeypatch, name, extra):
    d = _build(str(tmp_path), name, extra)
    r = _run(d, monkeypatch)
    assert r["triton_calls"] > 0 and r["partials"] > 0 and r["reduced"] > 0, r
    # one silu_mul per layer and step (it sums gate_up's partials)
    assert r["silu_mul"] > 0, r
    # every decode step's attention rotated q and wrote the new k / v itself
    assert r["decode_attention"] > 0 and r["rope_fused"] == r["decode_attention"], r
    # int8 KV: the kernels quantize with the same correctly rounded division as the reference
    assert r["rel_err"] < 1e-4, r

