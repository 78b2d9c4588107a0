"""Group-wise int8 weight-only (TensorRT-LLM's W8A16_GPTQ; llama_engine/quant_int8.py): the
quantizer's codes and error bound, the linear against its float reference (and the Triton
kernel under the interpreter, odd shapes), flags, and checkpoint export -> import bit-identical
through build.py."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import interpreter_on
from llama_engine.config import W8A16, W8A16_GPTQ, ConfigError, ModelArgs, QuantConfig
from llama_engine.kernels.int8_group import (dequantize_w8_group, linear_w8a16_group,
                                             linear_w8a16_group_ref)
from llama_engine.quant import (linear_class, quantize_int8_per_channel, validate_quant_flags)
from llama_engine.quant_int8 import WeightOnlyInt8GroupLinear, quantize_int8_group


@pytest.mark.parametrize("n,k,g", [(48, 256, 64), (40, 576, 128), (7, 96, 32), (5, 200, 64)])
def test_quantize_codes_scales_and_error_bound(n, k, g):
    torch.manual_seed(0)
    w = torch.randn(n, k) * torch.rand(n, 1)
    q, s, z, err = quantize_int8_group(w, g)
    ng = -(-k // g)                                     # a narrower last group when g ∤ k
    assert q.dtype == torch.int8 and q.shape == (n, k)
    assert s.shape == z.shape == (ng, n)
    deq = dequantize_w8_group(q, s, z, g)
    # round to nearest on the stored (scale, zero): at most half a step per weight
    step = s.repeat_interleave(g, 0)[:k].t()
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    assert err == pytest.approx((deq - w).abs().max().item())
    # the stored pair reproduces the codes: quantizing the dequantized weight on it gives q
    zz = z.repeat_interleave(g, 0)[:k].t()
    assert torch.equal(torch.round((deq - zz) / step).to(torch.int8), q)


def test_groups_beat_per_channel_on_a_row_with_one_outlier():
    torch.manual_seed(1)
    w = torch.randn(16, 256) * 0.02
    w[:, 7] = 1.0                                       # one large weight in every row
    qc, sc, _ = quantize_int8_per_channel(w)
    err_pc = (qc.float() * sc.float().reshape(-1, 1) - w).pow(2).mean()
    q, s, z, _ = quantize_int8_group(w, 64)
    err_g = (dequantize_w8_group(q, s, z, 64) - w).pow(2).mean()
    assert err_g < err_pc / 4, (err_g, err_pc)          # the other 3 groups keep a fine grid


@pytest.mark.parametrize("m", [1, 3, 33])
def test_linear_matches_float_reference(m):
    torch.manual_seed(2)
    w = torch.randn(24, 192)
    lin = WeightOnlyInt8GroupLinear.from_float(w, 64)
    x = torch.randn(m, 192)
    ref = x @ lin.dequantized().t()
    assert torch.allclose(lin(x), ref, atol=1e-4, rtol=1e-5)
    x64 = x.double()
    assert torch.allclose(lin(x64), x64 @ lin.dequantized().double().t(), atol=1e-5)


@pytest.mark.interp
@pytest.mark.skipif(not interpreter_on(), reason="kernel checks run under TRITON_INTERPRET=1")
@pytest.mark.parametrize("m,n,k,g", [(1, 33, 200, 64), (4, 64, 576, 128), (17, 40, 96, 32)])
def test_triton_kernel_matches_reference(m, n, k, g):
    torch.manual_seed(3)
    q, s, z, _ = quantize_int8_group(torch.randn(n, k), g)
    x = torch.randn(m, k)
    out = linear_w8a16_group(x, q, s, z, g, impl="triton")
    assert torch.allclose(out, linear_w8a16_group_ref(x, q, s, z, g), atol=1e-4, rtol=1e-4)


def test_flags_pick_w8a16_gptq_for_groups_and_w8a16_per_channel():
    args = ModelArgs.from_preset("tiny")
    q = validate_quant_flags(args, use_weight_only=True, weight_only_precision="int8",
                             group_size=64)
    assert (q.quant_algo, q.group_size, q.weight_only) == (W8A16_GPTQ, 64, "int8")
    assert linear_class("transformer.layers.0.mlp.fc", q) is WeightOnlyInt8GroupLinear
    assert validate_quant_flags(args, use_weight_only=True,
                                weight_only_precision="int8").quant_algo == W8A16
    with pytest.raises(ConfigError, match="--group_size 48 is not supported for int8"):
        validate_quant_flags(args, use_weight_only=True, weight_only_precision="int8",
                             group_size=48)
    back = QuantConfig.from_checkpoint_dict(q.to_checkpoint_dict())
    assert (back.quant_algo, back.group_size) == (W8A16_GPTQ, 64)
    with pytest.raises(ConfigError, match="group_size 48"):
        QuantConfig.from_checkpoint_dict({**q.to_checkpoint_dict(), "group_size": 48})


def test_checkpoint_export_import_is_bit_identical(tiny_hf_factory, tmp_path):
    """hf_llama_convert --weight_only_precision int8 --group_size 64 -> checkpoint; build.py
    from it -> the engine holds exactly the checkpoint's tensors, and runs."""
    import build
    import hf_llama_convert
    from llama_engine.checkpoint import load_tensors, read_checkpoint
    from llama_engine.kv_cache import static_block_tables
    from llama_engine.runner import WEIGHTS_FILE, Engine
    ck, eng = tmp_path / "ck", tmp_path / "eng"
    assert hf_llama_convert.main(["-i", str(tiny_hf_factory(2, False)), "-o", str(ck),
                                  "--use_weight_only", "--weight_only_precision", "int8",
                                  "--group_size", "64", "--dtype", "float32", "--device", "cpu",
                                  "--no_progress"]) == 0
    q = json.loads((ck / "config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"]) == (W8A16_GPTQ, 64, True)
    assert build.main(["--ckpt_dir", str(ck), "--output_dir", str(eng), "--max_batch_size", "1",
                       "--max_input_len", "16", "--max_output_len", "4"]) == 0
    raw = load_tensors(str(ck / "rank0.safetensors"))       # TensorRT-LLM's layout: [N, K/G]
    p = "transformer.layers.0.mlp.fc."
    n, k = raw[p + "weight"].shape
    assert raw[p + "weight"].dtype == torch.int8 and raw[p + "zero"].shape == (n, k // 64)
    a = read_checkpoint(str(ck))[-1]                         # ours again
    b = load_tensors(str(eng / WEIGHTS_FILE))
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    e = Engine.from_dir(str(eng), device="cpu")
    cache = e.kv_cache(1, 8)
    logits = e.prefill([[1, 5, 7]], cache, static_block_tables(1, 8, e.block_size, e.device))
    assert torch.isfinite(logits).all()


def test_trtllm_layout_round_trip_pads_k_and_cuts_it_back():
    """Ours -> TensorRT-LLM (K zero-padded to a multiple of G, scales/zeros [N, K/G]) -> ours:
    bit-identical, with a width (576) that G = 128 does not divide."""
    from llama_engine.quant_int8 import int8_group_from_trtllm, int8_group_to_trtllm
    quant = QuantConfig(quant_algo=W8A16_GPTQ, group_size=128, has_zero_point=True)
    q, s, z, _ = quantize_int8_group(torch.randn(24, 576), 128)
    ours = {"l.weight": q, "l.weights_scaling_factor": s, "l.zero": z}
    trt = dict(ours)
    need = (lambda d, name: d[name])
    int8_group_to_trtllm(trt, ["l"], quant, torch.float32, need)
    assert trt["l.weight"].shape == (24, 640) and trt["l.zero"].shape == (24, 5)
    back = dict(trt)
    int8_group_from_trtllm(back, ["l"], quant, torch.float32, need, {"l": 576})
    for name, t in ours.items():
        assert torch.equal(back[name], t), name
    with pytest.raises(ConfigError, match="expects int8"):
        int8_group_from_trtllm(dict(trt), ["l"], quant, torch.float32, need, {"l": 512})


@pytest.mark.parametrize("group", ["64", "0"])
def test_convert_int8_awq_folds_scales_into_a_plain_int8_checkpoint(tiny_hf_factory, tmp_path,
                                                                    group):
    """--weight_only_precision int8_awq: AWQ's scales folded into norms and v/up rows, so the
    checkpoint is an ordinary W8A16_GPTQ (or W8A16) one, with no pre-quant scale."""
    import build
    import hf_llama_convert
    from llama_engine.checkpoint import read_checkpoint
    ck, eng = tmp_path / "ck", tmp_path / "eng"
    assert hf_llama_convert.main(["-i", str(tiny_hf_factory(2, False)), "-o", str(ck),
                                  "--use_weight_only", "--weight_only_precision", "int8_awq",
                                  "--group_size", group, "--calib_dataset", "synthetic",
                                  "--calib_size", "4", "--max_input_length", "32",
                                  "--dtype", "float32", "--device", "cpu",
                                  "--no_progress"]) == 0
    q = json.loads((ck / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == (W8A16_GPTQ if group == "64" else W8A16)
    assert q["calibration"]["awq"]["speed_only"] is True
    tensors = read_checkpoint(str(ck))[-1]
    assert not any(k.endswith("prequant_scaling_factor") for k in tensors)
    assert build.main(["--ckpt_dir", str(ck), "--output_dir", str(eng), "--max_batch_size", "1",
                       "--max_input_len", "16", "--max_output_len", "4"]) == 0
