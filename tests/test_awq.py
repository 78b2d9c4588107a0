"""AWQ calibration (Lin et al. 2023; llama_engine/awq.py): the scale search lowers each
layer's output error against round to nearest on a tiny model (measured and asserted), the
folding keeps the float model's function, and hf_llama_convert.py --weight_only_precision
int4_awq writes a checkpoint that builds and runs."""
from __future__ import annotations

import json

import pytest
import torch

from llama_engine import awq
from llama_engine.checkpoint import hf_to_unified
from llama_engine.config import ModelArgs
from llama_engine.quant import validate_quant_flags


def _tiny_with_outliers(tiny_hf_factory):
    """The tiny HF model with a few input channels of every norm made 20x louder (the salient
    channels AWQ is about), and its prompts."""
    from safetensors.torch import load_file
    path = tiny_hf_factory(2, False)
    cfg = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_hf_config(cfg)
    sd = load_file(str(path / "model.safetensors"))
    for k in list(sd):
        if k.endswith("layernorm.weight"):
            sd[k] = sd[k].clone()
            sd[k][::13] *= 20.0
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (48,), generator=g).tolist() for _ in range(6)]
    return args, sd, prompts


@pytest.mark.parametrize("zero", [False, True])
def test_awq_search_beats_rtn_on_every_layer(tiny_hf_factory, zero):
    from llama_engine.smoothquant import hf_model_from_state_dict
    args, sd, prompts = _tiny_with_outliers(tiny_hf_factory)
    model = hf_model_from_state_dict(args, sd)
    means, rows = awq.capture_inputs(model, prompts, tokens_per_prompt=32, progress=False)
    quant = validate_quant_flags(args, use_weight_only=True, weight_only_precision="int4_awq",
                                 group_size=32, has_zero_point=zero)
    tensors = hf_to_unified(sd, args)
    _, pqs, clips, report = awq.apply_awq(tensors, args, quant, means, rows, progress=False)
    assert len(report) == 5 * args.num_hidden_layers
    for prefix, r in report.items():
        assert r["awq_err"] <= r["rtn_err"], prefix
    gains = [r["rtn_err"] / r["awq_err"] for r in report.values()]
    # measured on this model: the salient-channel inputs (qkv, gate/up) gain most
    assert sum(g > 1.05 for g in gains) >= len(gains) // 2, gains
    assert set(pqs) == {f"transformer.layers.{i}.{n}" for i in range(args.num_hidden_layers)
                        for n in ("attention.dense", "mlp.proj")}
    assert bool(clips) == zero


def test_awq_folding_keeps_the_float_function(tiny_hf_factory):
    """Scaled weights with the norm gains / pre-quant scales folded compute what the original
    layer computed (before quantization)."""
    args, sd, prompts = _tiny_with_outliers(tiny_hf_factory)
    tensors = hf_to_unified(sd, args)
    quant = validate_quant_flags(args, use_weight_only=True, weight_only_precision="int4_awq",
                                 group_size=32)
    k = args.hidden_size
    means = {f"model.layers.{i}.{m}": torch.rand(k if m != "mlp.down_proj"
                                                  else args.intermediate_size) + 0.1
             for i in range(args.num_hidden_layers) for _, m, _ in awq.AWQ_GROUPS}
    rows = {n: torch.randn(16, v.numel()) * v for n, v in means.items()}
    out, pqs, _, _ = awq.apply_awq(tensors, args, quant, means, rows, progress=False)
    x = torch.randn(4, k)
    p = "transformer.layers.0."
    g0, g1 = tensors[p + "input_layernorm.weight"], out[p + "input_layernorm.weight"]
    w0, w1 = tensors[p + "attention.qkv.weight"], out[p + "attention.qkv.weight"]
    assert torch.allclose((x * g1) @ w1.t(), (x * g0) @ w0.t(), atol=1e-4)
    xd = torch.randn(4, args.q_size)
    d0, d1 = tensors[p + "attention.dense.weight"], out[p + "attention.dense.weight"]
    assert torch.allclose((xd * pqs[p + "attention.dense"]) @ d1.t(), xd @ d0.t(), atol=1e-4)


def test_convert_int4_awq_builds_and_runs(tiny_hf_factory, tmp_path):
    import build
    import hf_llama_convert
    from llama_engine.kv_cache import static_block_tables
    from llama_engine.runner import Engine
    src = tiny_hf_factory(2, False)
    ck = tmp_path / "ck"
    rc = hf_llama_convert.main(["-i", str(src), "-o", str(ck), "--use_weight_only",
                                "--weight_only_precision", "int4_awq", "--group_size", "32",
                                "--has_zero_point", "--calib_dataset", "synthetic",
                                "--calib_size", "4", "--max_input_length", "32",
                                "--dtype", "float32", "--device", "cpu", "--no_progress"])
    assert rc == 0
    cfg = json.loads((ck / "config.json").read_text())
    q = cfg["quantization"]
    assert q["quant_algo"] == "W4A16_AWQ" and q["pre_quant_scale"] and q["has_zero_point"]
    assert q["calibration"]["awq"]["speed_only"] is True
    eng = tmp_path / "eng"
    assert build.main(["--ckpt_dir", str(ck), "--output_dir", str(eng), "--max_batch_size", "1",
                       "--max_input_len", "16", "--max_output_len", "4"]) == 0
    e = Engine.from_dir(str(eng), device="cpu")
    cache = e.kv_cache(1, 8)
    logits = e.prefill([[1, 5, 7]], cache, static_block_tables(1, 8, e.block_size, e.device))
    assert torch.isfinite(logits).all()


def test_build_int4_awq_from_real_weights_points_to_convert(tiny_hf_factory, tmp_path, capsys):
    import build
    rc = build.main(["--model_dir", str(tiny_hf_factory(2, False)), "--use_weight_only",
                     "--weight_only_precision", "int4_awq", "--output_dir", str(tmp_path / "e")])
    assert rc == 2
    assert "needs AWQ calibration: run hf_llama_convert.py" in capsys.readouterr().err


def test_build_random_int4_awq_is_speed_only(tmp_path):
    import build
    out = tmp_path / "e"
    assert build.main(["--model_config", "tiny", "--use_weight_only", "--weight_only_precision",
                       "int4_awq", "--group_size", "32", "--has_zero_point", "--output_dir",
                       str(out), "--max_batch_size", "1", "--max_input_len", "8",
                       "--max_output_len", "4"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "speed-only" in cfg["source"]["calibration"]
    assert cfg["quantization"]["has_zero_point"] is True


def test_folding_into_v_and_up_keeps_the_model_function(tiny_hf_factory):
    """fold_prev (the paper's folding: o_proj's scale into v_proj's rows, tied over the q heads
    of a KV head; down_proj's into up_proj's rows): the scaled float model's logits equal the
    original's, with no pre-quant scales left; and the search there still beats RTN."""
    from llama_engine.checkpoint import unified_to_hf
    from llama_engine.smoothquant import hf_model_from_state_dict
    args, sd, prompts = _tiny_with_outliers(tiny_hf_factory)
    assert args.num_attention_heads > args.num_key_value_heads        # GQA: the tie matters
    model = hf_model_from_state_dict(args, sd)
    means, rows = awq.capture_inputs(model, prompts, tokens_per_prompt=32, progress=False)
    quant = validate_quant_flags(args, use_weight_only=True, weight_only_precision="int8",
                                 group_size=32)
    tensors = hf_to_unified(sd, args)
    out, pqs, _, report = awq.apply_awq(tensors, args, quant, means, rows, progress=False)
    assert pqs == {}
    assert all(r["awq_err"] <= r["rtn_err"] for r in report.values())
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        ref = model(ids).logits
        got = hf_model_from_state_dict(args, unified_to_hf(out, args))(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
