"""GPU correctness checks as pytest, for the GPU machine: ``pytest -m gpu tests/test_gpu.py``.

* tools/gpu_check.py's checks: the engine's logits against Hugging Face (fp32 / fp16, eager and
  CUDA graphs, GQA and MHA) and the quantized engines' CUDA kernels against their CPU
  reference path;
* the correctness half of tools/gpu_kernel_check.py's self-checks: every linear op at LLaMA-7B
  shapes against its reference, and the attention-side rows (norms, RoPE, KV writes, decode
  attention, the fused RoPE + decode attention bit for bit against its two kernels, prefill).

Without a CUDA device every test is skipped with that reason (``pytest -rs`` prints it).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (run pytest -m gpu on the GPU machine)")]

ENGINE_CASES = ["fp32-kv2-eager", "fp32-kv2-graphs", "fp16-kv2-graphs", "fp32-kv4-eager",
                "fp32-kv4-graphs", "fp16-kv4-graphs", "int8-wo", "int4-g128-wo", "int4-pc-wo",
                "sq-per-token-per-channel", "sq-per-tensor"]


@pytest.fixture(scope="module")
def engine_cases(tmp_path_factory):
    import gpu_check
    cases = gpu_check.make_cases(str(tmp_path_factory.mktemp("gpu_check")))
    assert sorted(cases) == sorted(ENGINE_CASES)
    return gpu_check, cases


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_engine_on_gpu(engine_cases, name):
    gpu_check, cases = engine_cases
    gpu_check.FAILS.clear()
    cases[name]()
    assert not gpu_check.FAILS, gpu_check.FAILS


@pytest.fixture(scope="module")
def linear_rows():
    import gpu_kernel_check
    return gpu_kernel_check.linear_selfcheck("cuda", Ms=(1, 16, 64), baselines=False,
                                             verbose=False)


@pytest.mark.parametrize("op", ["linear_fp", "linear_w8a16", "linear_w4a16_pc",
                                "linear_w4a16_g128", "linear_w8a8", "linear_w8a8_dynamic",
                                "quant_per_token", "quant_per_tensor"])
def test_linear_kernels_on_gpu(linear_rows, op):
    import gpu_kernel_check
    rows = [r for r in linear_rows if r["op"] == op]
    assert rows, f"no rows for {op}"
    assert not gpu_kernel_check.linear_failures(rows)


@pytest.fixture(scope="module")
def attn_rows():
    import gpu_kernel_check
    return gpu_kernel_check.attn_selfcheck("cuda", quick=True)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "apply_rope", "write_kv",
                                "rope_write_kv", "decode_attention", "rope_decode_attention",
                                "prefill_attention"])
def test_attention_kernels_on_gpu(attn_rows, op):
    rows = [r for r in attn_rows if r["op"] == op]
    assert rows, f"no rows for {op}"
    bad = [f"B={r['B']} ctx={r['ctx']} {r['kv_dtype']} H={r['H']}/{r['Hkv']} "
           f"rel_err={r['rel_err']:.2e}" for r in rows if not r["ok"]]
    if op == "rope_decode_attention":     # bit for bit the two kernels' output and caches
        bad += [f"B={r['B']} ctx={r['ctx']} {r['kv_dtype']}: not bit-equal" for r in rows
                if not (r["out_equal"] and r["k_equal"] and r["v_equal"])]
    assert not bad, bad
