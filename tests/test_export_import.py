"""TensorRT-LLM checkpoint round trip through the scripts: build.py --backend tensorrt_llm
--checkpoint_only writes the unified checkpoint; build.py --ckpt_dir reads it back into our
engine with identical logits to the engine built directly from the source."""
from __future__ import annotations

import json

import pytest
import torch

import build
import hf_llama_convert
from llama_engine.runner import Engine

MODES = [
    pytest.param([], id="fp32"),
    pytest.param(["--use_weight_only", "--weight_only_precision", "int8"], id="w8a16"),
    pytest.param(["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "0"],
                 id="w4a16"),
    pytest.param(["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "32"],
                 id="w4a16-g32"),
]
LIMITS = ["--max_batch_size", "2", "--max_input_len", "64", "--max_output_len", "16"]
IDS = list(range(3, 50))


def logits(engine_dir):
    return Engine.from_dir(str(engine_dir), "cpu").forward_logits(IDS)


@pytest.mark.parametrize("flags", MODES)
def test_export_then_import_gives_identical_logits(tiny_hf_factory, tmp_path, flags):
    src = str(tiny_hf_factory(2, False))
    direct, ckpt, back = tmp_path / "direct", tmp_path / "ckpt", tmp_path / "back"
    assert build.main(["--model_dir", src, "--dtype", "float32", "--output_dir", str(direct),
                       *LIMITS, *flags]) == 0
    assert build.main(["--model_dir", src, "--dtype", "float32", "--output_dir", str(ckpt),
                       "--backend", "tensorrt_llm", "--checkpoint_only", *flags]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and (ckpt / "rank0.safetensors").is_file()
    assert build.main(["--ckpt_dir", str(ckpt), "--dtype", "float32", "--output_dir", str(back),
                       *LIMITS]) == 0
    torch.testing.assert_close(logits(back), logits(direct), atol=0, rtol=0)


@pytest.mark.parametrize("sq_flags", [["--per_token", "--per_channel"], []],
                         ids=["sq-pt-pc", "sq-per-tensor"])
def test_calibrated_checkpoint_builds_and_runs(tiny_hf_factory, tmp_path, sq_flags):
    """hf_llama_convert (SmoothQuant + INT8 KV scales) -> build.py --ckpt_dir -> engine."""
    src = str(tiny_hf_factory(2, False))
    ckpt, eng = tmp_path / "ckpt", tmp_path / "eng"
    assert hf_llama_convert.main(["-i", src, "-o", str(ckpt), "-sq", "0.5", *sq_flags,
                                  "--calibrate-kv-cache", "--calib_dataset", "synthetic",
                                  "--calib_size", "4", "--dtype", "float32"]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"].startswith("W8A8_SQ")
    assert cfg["quantization"]["kv_cache_quant_algo"] == "INT8"
    assert build.main(["--ckpt_dir", str(ckpt), "--dtype", "float32", "--output_dir", str(eng),
                       "--use_smooth_quant", *sq_flags, "--int8_kv_cache", *LIMITS]) == 0
    out = Engine.from_dir(str(eng), "cpu").generate([IDS[:10]], 8)
    assert len(out.output_ids[0]) == 8


def decode_logits(engine_dir, prompt=IDS[:20], feed=IDS[20:28]):
    """Prefill, then teacher-forced decode steps that read K/V back from the (int8) cache."""
    from llama_engine.kv_cache import static_block_tables
    eng = Engine.from_dir(str(engine_dir), "cpu")
    total = len(prompt) + len(feed)
    cache = eng.kv_cache(1, total)
    bt = static_block_tables(1, total, eng.block_size, eng.device)
    with torch.inference_mode():
        rows = [eng.prefill([prompt], cache, bt)[0]]
        ctx = torch.tensor([len(prompt)], dtype=torch.int32)
        rows += [eng.decode_step(torch.tensor([t]), ctx, bt, cache)[0] for t in feed]
    return torch.stack(rows), eng


def test_int8_kv_checkpoint_per_channel_scales_and_old_checkpoints(tiny_hf_factory, tmp_path):
    """hf_llama_convert --calibrate-kv-cache writes TensorRT-LLM's kv_cache_scaling_factor [1]
    plus our per-(KV head, channel) k_cache_scale / v_cache_scale [Hkv*D]; the engine uses the
    per-channel ones. A checkpoint without them (older, or TensorRT-LLM's) still builds and
    uses the per-layer scale for K and V. The TensorRT-LLM export carries only the latter."""
    from safetensors.torch import load_file, save_file

    src = str(tiny_hf_factory(2, False))
    ckpt, eng = tmp_path / "ckpt", tmp_path / "eng"
    assert hf_llama_convert.main(["-i", src, "-o", str(ckpt), "--calibrate-kv-cache",
                                  "--calib_dataset", "synthetic", "--calib_size", "4",
                                  "--dtype", "float32"]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    hkv, d = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    t = load_file(str(ckpt / "rank0.safetensors"))
    for i in range(cfg["num_hidden_layers"]):
        lp = f"transformer.layers.{i}.attention."
        f = t[lp + "kv_cache_scaling_factor"]
        assert f.dtype == torch.float32 and f.shape == (1,)
        for s in ("k_cache_scale", "v_cache_scale"):
            assert t[lp + s].dtype == torch.float32 and t[lp + s].shape == (hkv * d,)
            assert bool((t[lp + s] > 0).all()) and bool((t[lp + s] <= f * (1 + 1e-6)).all())
        # the per-layer scale is the largest channel's (K or V)
        assert f.item() == pytest.approx(max(t[lp + "k_cache_scale"].max().item(),
                                             t[lp + "v_cache_scale"].max().item()), rel=1e-6)
    assert build.main(["--ckpt_dir", str(ckpt), "--dtype", "float32", "--output_dir", str(eng),
                       "--int8_kv_cache", *LIMITS]) == 0
    per_channel, e = decode_logits(eng)
    ks, vs = e.runner.cache.kv_scales[0]
    assert torch.equal(ks.reshape(-1), t["transformer.layers.0.attention.k_cache_scale"])
    assert torch.equal(vs.reshape(-1), t["transformer.layers.0.attention.v_cache_scale"])

    # An old checkpoint: the same, without the extension tensors.
    old, old_eng = tmp_path / "old", tmp_path / "old_eng"
    old.mkdir()
    for f in ckpt.iterdir():
        if f.name != "rank0.safetensors":
            (old / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in t.items() if not k.endswith(("k_cache_scale", "v_cache_scale"))},
              str(old / "rank0.safetensors"))
    assert build.main(["--ckpt_dir", str(old), "--dtype", "float32", "--output_dir",
                       str(old_eng), "--int8_kv_cache", *LIMITS]) == 0
    assert not any(k.endswith("cache_scale") for k in load_file(str(old_eng / "rank0.safetensors")))
    per_layer, e = decode_logits(old_eng)
    ks, vs = e.runner.cache.kv_scales[0]
    f0 = t["transformer.layers.0.attention.kv_cache_scaling_factor"]
    assert bool((ks == f0).all()) and bool((vs == f0).all())
    # ... which is exactly an engine whose per-channel scales all equal the per-layer one
    const = {k: (torch.full_like(v, t[k.rpartition(".")[0] + ".kv_cache_scaling_factor"].item())
                 if k.endswith(("k_cache_scale", "v_cache_scale")) else v) for k, v in t.items()}
    save_file(const, str(old / "rank0.safetensors"))
    assert build.main(["--ckpt_dir", str(old), "--dtype", "float32", "--output_dir",
                       str(tmp_path / "const_eng"), "--int8_kv_cache", *LIMITS]) == 0
    torch.testing.assert_close(decode_logits(tmp_path / "const_eng")[0], per_layer, atol=0, rtol=0)
    # the two schemes differ once K/V are read back from the cache, and both track float
    assert not torch.equal(per_channel[1:], per_layer[1:])
    float_eng = tmp_path / "float_eng"
    assert build.main(["--model_dir", src, "--dtype", "float32", "--output_dir", str(float_eng),
                       *LIMITS]) == 0
    ref = decode_logits(float_eng)[0]
    assert ((per_channel - ref).norm() / ref.norm()).item() < 0.05
    assert ((per_layer - ref).norm() / ref.norm()).item() < 0.05

    # TensorRT-LLM export of the calibrated checkpoint: only kv_cache_scaling_factor
    trt = tmp_path / "trt"
    assert build.main(["--ckpt_dir", str(ckpt), "--dtype", "float32", "--output_dir", str(trt),
                       "--backend", "tensorrt_llm", "--checkpoint_only", "--int8_kv_cache"]) == 0
    exported = load_file(str(trt / "rank0.safetensors"))
    assert not any(k.endswith(("k_cache_scale", "v_cache_scale")) for k in exported)
    assert all(exported[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"].shape == (1,)
               for i in range(cfg["num_hidden_layers"]))
    assert json.loads((trt / "config.json").read_text())["quantization"][
        "kv_cache_quant_algo"] == "INT8"


def test_trtllm_build_without_tensorrt_llm_says_what_to_run(tiny_hf_factory, tmp_path, capsys):
    pytest.importorskip  # (tensorrt_llm is never installed here; the message is what we test)
    try:
        import tensorrt_llm  # noqa: F401
        pytest.skip("tensorrt_llm is installed: this test covers the machine without it")
    except ImportError:
        pass
    out = tmp_path / "trt"
    rc = build.main(["--model_dir", str(tiny_hf_factory(2, False)), "--dtype", "float16",
                     "--output_dir", str(out), "--backend", "tensorrt_llm"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "trtllm-build" in err and "--checkpoint_dir" in err
    assert (tmp_path / "trt_ckpt" / "config.json").is_file()


def test_sq_flags_must_match_checkpoint(tiny_hf_factory, tmp_path, capsys):
    src = str(tiny_hf_factory(2, False))
    ckpt = tmp_path / "ckpt"
    assert hf_llama_convert.main(["-i", src, "-o", str(ckpt), "-sq", "0.5", "--per_token",
                                  "--calib_dataset", "synthetic", "--calib_size", "2",
                                  "--dtype", "float32"]) == 0
    rc = build.main(["--ckpt_dir", str(ckpt), "--dtype", "float32", "--use_weight_only",
                     "--output_dir", str(tmp_path / "e")])
    assert rc == 2 and "already quantized" in capsys.readouterr().err
