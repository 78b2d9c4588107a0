"""int4 with zero points and the pre-quantized formats (issue 18): pack/unpack round trips of
every format, the zero-point linear against float references (Triton interpreter, odd
shapes), importing AutoAWQ / GPTQ directories and GGUF Q4 blocks, TensorRT-LLM W4A16_AWQ (with
zeros) / W4A16_GPTQ export -> import bit-identical, and the one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import interpreter_on
from llama_engine.config import W4A16_AWQ, W4A16_GPTQ, ConfigError, ModelArgs, QuantConfig
from llama_engine.formats import awq as fawq, gptq as fgptq
from llama_engine.formats.common import pack_int32, unpack_int32
from llama_engine.formats.gguf_quant import decode_blocks, encode_blocks
from llama_engine.kernels.int4_zp import dequantize_w4_zp, linear_w4a16_zp, linear_w4a16_zp_ref
from llama_engine.kernels.reference import pack_int4_ref
from llama_engine.kernels.tuning import SkinnyCfg
from llama_engine.quant import make_linear, quantize_checkpoint, validate_quant_flags
from llama_engine.quant_int4 import WeightOnlyInt4ZeroLinear, quantize_int4_zp
from llama_engine.trtllm import from_trtllm, to_trtllm


def _codes(*shape, lo=0, hi=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g)


# --------------------------------------------------------------------------------------------
# Pack / unpack round trips
# --------------------------------------------------------------------------------------------
def test_int32_nibbles_round_trip_and_bit_order():
    u = _codes(5, 24)
    p = pack_int32(u)
    assert p.dtype == torch.int32 and p.shape == (5, 3)
    assert torch.equal(unpack_int32(p), u.to(torch.uint8))
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 1] = 0xF                                  # value 1 -> bits 4..7
    assert pack_int32(one).item() == 0xF0
    top = torch.zeros(1, 8, dtype=torch.int64)
    top[0, 7] = 0xF                                  # the sign nibble: a negative int32
    assert pack_int32(top).item() == -(1 << 28)


def test_awq_pack_round_trip_and_interleave():
    u = _codes(6, 32, seed=1)
    p = fawq.pack_awq(u)
    assert p.shape == (6, 4)
    assert torch.equal(fawq.unpack_awq(p), u.to(torch.uint8))
    # AutoAWQ's order: nibble i of a word holds output column AWQ_ORDER[i]
    u1 = torch.zeros(1, 8, dtype=torch.int64)
    u1[0, 2] = 5
    assert unpack_int32(fawq.pack_awq(u1))[0].tolist() == [0, 5, 0, 0, 0, 0, 0, 0]


def test_gptq_pack_round_trip_rows_along_k():
    u = _codes(32, 12, seed=2)
    p = fgptq.pack_gptq_weight(u)
    assert p.shape == (4, 12)
    assert torch.equal(fgptq.unpack_gptq_weight(p), u.to(torch.uint8))
    # input row 8r + i is nibble i of row r
    assert ((p[0, 3].item() & 0xFFFFFFFF) >> 4) & 0xF == u[1, 3].item()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_round_trip(kind):
    n, k = 3, 64
    u = _codes(n, k, seed=3)
    d = torch.rand(n, k // 32).to(torch.float16).float()
    m = None if kind == "Q4_0" else (-torch.rand(n, k // 32)).to(torch.float16).float()
    raw = encode_blocks(u, d, m)
    assert raw.shape == (n, (k // 32) * (18 if kind == "Q4_0" else 20))
    u2, d2, m2 = decode_blocks(raw, kind, n, k)
    assert torch.equal(u2, u.to(torch.uint8)) and torch.equal(d2, d)
    assert (m2 is None) == (m is None) and (m is None or torch.equal(m2, m))
    # weight j of a block is the low nibble of byte j, j + 16 its high nibble
    assert raw[0, (2 if m is None else 4) + 1] == (u[0, 1] | (u[0, 17] << 4)).item()


# --------------------------------------------------------------------------------------------
# Quantizer and linear
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128, 0])
def test_zero_point_rtn_error_bound(group):
    torch.manual_seed(0)
    w = torch.randn(40, 256) * 0.05 + 0.02
    p, s, z, err = quantize_int4_zp(w, group, torch.float32)
    g = group or 256
    assert s.shape == z.shape == (256 // g, 40)
    deq = dequantize_w4_zp(p, s, z, group)
    bound = s.t().repeat_interleave(g, dim=1) / 2 + 1e-6
    assert ((deq - w).abs() <= bound).all()
    assert abs(err - (deq - w).abs().max().item()) < 1e-7
    # asymmetric beats symmetric on a shifted distribution (the point of zeros)
    from llama_engine.quant import dequantize_int4, quantize_int4
    ps, ss, _ = quantize_int4(w, group or None, torch.float32)
    sym = dequantize_int4(ps, ss, group or None)
    assert (deq - w).norm() < (sym - w).norm()


def test_zero_point_reproduces_an_asymmetric_grid_exactly():
    """Weights already on a min + d*u grid (GGUF Q4_1 style) come back unchanged."""
    n, k, g = 8, 64, 32
    u = _codes(n, k, seed=4).float()
    u[:, 0], u[:, 1], u[:, 32], u[:, 33] = 0, 15, 0, 15        # each group spans its range
    d = torch.tensor([0.5, 0.25]).repeat(n, 1)
    m = -torch.tensor([1.0, 3.0]).repeat(n, 1)
    w = u * d.repeat_interleave(g, 1) + m.repeat_interleave(g, 1)
    p, s, z, err = quantize_int4_zp(w, g, torch.float32)
    assert err == 0.0


def test_group_size_must_divide_width_of_the_symmetric_format():
    from llama_engine.quant import quantize_int4
    with pytest.raises(ConfigError, match="group size 64 does not divide K=96"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ConfigError, match=r"--group_size 64 does not divide .*mlp.proj"):
        validate_quant_flags(ModelArgs.from_preset("tiny"), use_weight_only=True,
                             weight_only_precision="int4", group_size=64)


def _zp_case(N, K, G, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    GG = G or K
    s = (torch.rand(K // GG, N, generator=g) * 0.05 + 0.01).to(dtype)
    z = (torch.randn(K // GG, N, generator=g) * 0.05).to(dtype)
    return pack_int4_ref(q), s, z


def test_reference_equals_dequantized_float_matmul():
    p, s, z, = _zp_case(24, 96, 32)
    x = torch.randn(3, 96, dtype=torch.float64)
    w = dequantize_w4_zp(p, s, z, 32, torch.float64)
    assert torch.allclose(linear_w4a16_zp_ref(x, p, s, z, 32), x @ w.t(), rtol=0, atol=1e-12)


@pytest.mark.skipif(not interpreter_on(), reason="kernel checks run under TRITON_INTERPRET=1")
@pytest.mark.parametrize("M,N,K,G,kernel,split", [
    (1, 40, 128, 32, "fma", 1), (3, 72, 256, 64, "dot", 2), (5, 24, 192, 0, "dot", 1),
    (2, 33, 96, 32, "fma", 3), (17, 20, 256, 128, "dot", 1)])
def test_triton_kernel_matches_reference(M, N, K, G, kernel, split):
    p, s, z = _zp_case(N, K, G, seed=M)
    x = torch.randn(M, K)
    ref = linear_w4a16_zp_ref(x, p, s, z, G)
    out = linear_w4a16_zp(x, p, s, z, G, impl="triton", _cfg=SkinnyCfg(kernel, 32, 64, split))
    assert out.shape == (M, N)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4), (out - ref).abs().max()


@pytest.mark.skipif(not interpreter_on(), reason="kernel checks run under TRITON_INTERPRET=1")
def test_default_launch_splits_k_to_fill_the_gpu_and_matches_reference():
    from llama_engine.kernels import int4_zp
    assert int4_zp._pick(1, 4096, 4096, 128).split_k == 8      # 64 N tiles -> 512 programs
    assert int4_zp._pick(1, 22016, 4096, 128).split_k == 1     # 344 N tiles already
    assert int4_zp._pick(64, 4096, 4096, 128).split_k == 1     # M > 16: partials too dear
    p, s, z = _zp_case(40, 512, 32, seed=9)
    x = torch.randn(3, 512)
    assert int4_zp._pick(3, 40, 512, 32).split_k == 8          # 1 N tile, 16 K tiles: 2 a slice
    out = linear_w4a16_zp(x, p, s, z, 32, impl="triton")
    assert torch.allclose(out, linear_w4a16_zp_ref(x, p, s, z, 32), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not interpreter_on(), reason="kernel checks run under TRITON_INTERPRET=1")
def test_triton_kernel_partials_sum_to_output():
    p, s, z = _zp_case(16, 128, 32)
    x = torch.randn(2, 128)
    part = linear_w4a16_zp(x, p, s, z, 32, impl="triton", partials=True,
                           _cfg=SkinnyCfg("fma", 16, 32, 4))
    from llama_engine.kernels.partial import PartialSum
    assert isinstance(part, PartialSum)
    assert torch.allclose(part.parts.sum(0), linear_w4a16_zp_ref(x, p, s, z, 32), atol=1e-4)


def test_module_pre_quant_scale_and_checkpoint_tensors():
    p, s, z = _zp_case(8, 64, 32)
    pqs = torch.rand(64) + 0.5
    lin = WeightOnlyInt4ZeroLinear(p, s, z, 32, pqs)
    x = torch.randn(2, 64)
    want = (x * pqs) @ dequantize_w4_zp(p, s, z, 32).t()
    assert torch.allclose(lin(x), want, atol=1e-5)
    t = lin.checkpoint_tensors()
    assert set(t) == {"weight", "weights_scaling_factor", "zero", "prequant_scaling_factor"}
    q = QuantConfig(quant_algo=W4A16_AWQ, group_size=32, has_zero_point=True)
    again = make_linear("transformer.layers.0.mlp.proj", t, q)
    assert isinstance(again, WeightOnlyInt4ZeroLinear) and torch.equal(again(x), lin(x))
    with pytest.raises(ConfigError, match=r"transformer.layers.0.mlp.proj: .*missing \['zero'\]"):
        make_linear("transformer.layers.0.mlp.proj", {"weight": p, "weights_scaling_factor": s},
                    q)


# --------------------------------------------------------------------------------------------
# Checkpoints: TensorRT-LLM both ways, AutoAWQ and GPTQ directories
# --------------------------------------------------------------------------------------------
def _tiny_float_tensors(args: ModelArgs, seed=0):
    from llama_engine.checkpoint import expected_float_shapes
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(*s, generator=g) * 0.05 if len(s) == 2 else torch.ones(*s))
            for n, s in expected_float_shapes(args).items()}


@pytest.mark.parametrize("precision,group", [("int4", 32), ("int4", 0), ("int4_awq", 32),
                                             ("int4_gptq", 32)])
def test_trtllm_export_import_bit_identical(precision, group):
    args = ModelArgs.from_preset("tiny")
    quant = validate_quant_flags(args, use_weight_only=True, weight_only_precision=precision,
                                 group_size=group, has_zero_point=True)
    assert quant.int4_zero_point
    tensors, _ = quantize_checkpoint(_tiny_float_tensors(args), args, quant, progress=False)
    cfg, trt = to_trtllm(tensors, args, quant, "float32")
    p = "transformer.layers.0.attention.qkv"
    n, k = args.q_size + 2 * args.kv_size, args.hidden_size
    assert trt[p + ".weight"].shape == (n // 2, k)                      # packed along N
    assert trt[p + ".zero"].shape == (n, k // (group or k))
    assert cfg["quantization"]["has_zero_point"] is True
    args2, quant2, back = from_trtllm(json.loads(json.dumps(cfg)), trt)
    assert quant2.int4_zero_point and quant2.group_size == group
    assert quant2.quant_algo == quant.quant_algo
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


def _write_hf_dir(path, args: ModelArgs, method: str, group: int, desc_act=False, bits=4,
                  g_idx_perm=False, seed=0):
    """A tiny AutoAWQ / GPTQ directory packed from random codes; -> {hf module: w float}."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    floats = _tiny_float_tensors(args, seed)
    sd = {"model.embed_tokens.weight": floats["transformer.vocab_embedding.weight"],
          "model.norm.weight": floats["transformer.ln_f.weight"],
          "lm_head.weight": floats["lm_head.weight"]}
    want = {}
    d, f = args.hidden_size, args.intermediate_size
    shapes = {"self_attn.q_proj": (args.q_size, d), "self_attn.k_proj": (args.kv_size, d),
              "self_attn.v_proj": (args.kv_size, d), "self_attn.o_proj": (d, args.q_size),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for i in range(args.num_hidden_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = torch.ones(d)
        sd[pre + "post_attention_layernorm.weight"] = torch.ones(d)
        for mod, (n, k) in shapes.items():
            u = torch.randint(0, 16, (k, n), generator=g)
            # GPTQ v1 stores zp - 1, so zp = 0 does not exist there (its known quirk)
            zp = torch.randint(0 if method == "awq" else 1, 16, (k // group, n), generator=g)
            s = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).half()
            name = pre + mod
            want[name] = ((u - zp.repeat_interleave(group, 0)).float()
                          * s.float().repeat_interleave(group, 0)).t()
            sd[name + ".scales"] = s
            if method == "awq":
                sd[name + ".qweight"] = fawq.pack_awq(u)
                sd[name + ".qzeros"] = fawq.pack_awq(zp)
            else:
                sd[name + ".qweight"] = fgptq.pack_gptq_weight(u)
                sd[name + ".qzeros"] = pack_int32(zp - 1)              # v1 stores zp - 1
                gi = torch.arange(k, dtype=torch.int32) // group
                sd[name + ".g_idx"] = gi.flip(0).contiguous() if g_idx_perm else gi
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    cfg = args.to_hf_config()
    cfg["torch_dtype"] = "float32"
    cfg["quantization_config"] = (
        {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True,
         "version": "gemm"} if method == "awq" else
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act,
         "sym": False, "checkpoint_format": "gptq"})
    (path / "config.json").write_text(json.dumps(cfg))
    return want


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_import_prequantized_dir_as_it_is(method, tmp_path):
    args = ModelArgs.from_preset("tiny")
    want = _write_hf_dir(tmp_path, args, method, 32)
    load = fawq.load_awq_dir if method == "awq" else fgptq.load_gptq_dir
    args2, quant, tensors, dtype = load(str(tmp_path))
    assert quant.int4_zero_point and quant.group_size == 32
    assert quant.quant_algo == (W4A16_AWQ if method == "awq" else W4A16_GPTQ)
    for i in range(args.num_hidden_layers):
        pre = f"transformer.layers.{i}."
        lin = make_linear(pre + "attention.qkv",
                          {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                           if k.startswith(pre + "attention.qkv.")}, quant)
        w = torch.cat([want[f"model.layers.{i}.self_attn.{x}_proj"] for x in "qkv"])
        assert torch.equal(lin.dequantized(), w)            # float32: exactly (u - zp) * s
        lin = make_linear(pre + "mlp.proj", {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                                            if k.startswith(pre + "mlp.proj.")}, quant)
        assert torch.equal(lin.dequantized(), want[f"model.layers.{i}.mlp.down_proj"])


def test_convert_prequantized_then_build_and_run(tmp_path):
    import build
    import hf_llama_convert
    from llama_engine.runner import Engine
    args = ModelArgs.from_preset("tiny")
    src = tmp_path / "gptq"
    src.mkdir()
    _write_hf_dir(src, args, "gptq", 32)
    ck = tmp_path / "ck"
    assert hf_llama_convert.main(["-i", str(src), "-o", str(ck), "--dtype", "float32"]) == 0
    eng = tmp_path / "eng"
    assert build.main(["--ckpt_dir", str(ck), "--output_dir", str(eng), "--max_batch_size", "1",
                       "--max_input_len", "16", "--max_output_len", "4"]) == 0
    e = Engine.from_dir(str(eng), device="cpu")
    from llama_engine.kv_cache import static_block_tables
    cache = e.kv_cache(1, 8)
    logits = e.prefill([[1, 5, 7]], cache, static_block_tables(1, 8, e.block_size, e.device))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(desc_act=True), "desc_act=True .* not supported"),
    (dict(bits=3), "3-bit weights; only 4-bit"),
    (dict(g_idx_perm=True), r"g_idx is not k // 32 .*desc_act=False"),
])
def test_gptq_unsupported_is_one_line_error(kw, msg, tmp_path):
    _write_hf_dir(tmp_path, ModelArgs.from_preset("tiny"), "gptq", 32, **kw)
    with pytest.raises(ConfigError, match=msg) as e:
        fgptq.load_gptq_dir(str(tmp_path))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# GGUF kept as it is
# --------------------------------------------------------------------------------------------
def test_gguf_type_we_do_not_keep_names_the_tensor(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from llama_engine.formats.gguf_quant import load_gguf_linears
    path = tmp_path / "q8.gguf"
    w = GGUFWriter(str(path), "llama")
    raw = np.zeros((64, 34 * 2), dtype=np.uint8)                  # Q8_0 [64, 64]
    w.add_tensor("blk.0.attn_q.weight", raw, raw_shape=(64, 68),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"blk.0.attn_q.weight is Q8_0; "
                                          r"--keep_gguf_quantization keeps Q4_0 / Q4_1"):
        load_gguf_linears(str(path), ModelArgs.from_preset("tiny"), {}, torch.float32)


def test_keep_gguf_needs_a_gguf_file(tmp_path, capsys):
    import build
    rc = build.main(["--model_config", "tiny", "--keep_gguf_quantization", "--output_dir",
                     str(tmp_path / "e")])
    assert rc == 2 and "--keep_gguf_quantization applies to --gguf_file" in capsys.readouterr().err


def _logits(engine_dir, prompts):
    from llama_engine.kv_cache import static_block_tables
    from llama_engine.runner import Engine
    e = Engine.from_dir(str(engine_dir), device="cpu")
    n = max(len(p) for p in prompts)
    out = []
    for p in prompts:
        cache = e.kv_cache(1, n)
        out.append(e.prefill([p], cache, static_block_tables(1, n, e.block_size, e.device))[0])
    return torch.stack(out)


def test_gguf_q4_1_kept_equals_dequantized_fp32_engine(smollm2_gguf, tmp_path):
    """SmolLM2's 210 Q4_1 linears kept as int4 g32 with zeros: the same weights, so the logits
    equal the fp32 engine built from transformers' dequantized copy to fp32 rounding."""
    import build
    common = ["--gguf_file", smollm2_gguf, "--dtype", "float32", "--max_batch_size", "1",
              "--max_input_len", "64", "--max_output_len", "4"]
    assert build.main([*common, "--output_dir", str(tmp_path / "f")]) == 0
    assert build.main([*common, "--keep_gguf_quantization", "--output_dir",
                       str(tmp_path / "k")]) == 0
    cfg = json.loads((tmp_path / "k" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert cfg["quantization"]["has_zero_point"] and cfg["quantization"]["group_size"] == 32
    prompts = [[1, 504, 3458, 314, 260], [1, 30, 2000, 5, 17, 99, 1003]]
    a, b = _logits(tmp_path / "f", prompts), _logits(tmp_path / "k", prompts)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_group_not_dividing_width_has_a_narrower_last_group():
    """SmolLM2's K = 576 with G = 128: five groups, the last 64 wide (TensorRT-LLM zero-pads
    K to 640, which computes the same); kernel, reference and export agree."""
    torch.manual_seed(1)
    w = torch.randn(24, 576) * 0.05
    p, s, z, err = quantize_int4_zp(w, 128, torch.float32)
    assert s.shape == z.shape == (5, 24)
    deq = dequantize_w4_zp(p, s, z, 128)
    assert ((deq - w).abs() <= s.t().repeat_interleave(128, 1)[:, :576] / 2 + 1e-6).all()
    x = torch.randn(3, 576)
    ref = linear_w4a16_zp_ref(x, p, s, z, 128)
    assert torch.allclose(ref, x @ deq.t(), atol=1e-5)
    if interpreter_on():
        out = linear_w4a16_zp(x, p, s, z, 128, impl="triton",
                              _cfg=SkinnyCfg("dot", 16, 128, 1))
        assert torch.allclose(out, ref, atol=1e-4)


def test_trtllm_round_trip_pads_and_cuts_k():
    args = ModelArgs(vocab_size=64, hidden_size=96, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    quant = validate_quant_flags(args, use_weight_only=True, weight_only_precision="int4",
                                 group_size=64, has_zero_point=True)
    tensors, _ = quantize_checkpoint(_tiny_float_tensors(args), args, quant, progress=False)
    cfg, trt = to_trtllm(tensors, args, quant, "float32")
    assert trt["transformer.layers.0.attention.qkv.weight"].shape == (144, 128)   # K 96 -> 128
    _, _, back = from_trtllm(json.loads(json.dumps(cfg)), trt)
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


def test_llama7b_weight_bytes_g128_with_zeros_under_028x_fp16():
    """Issue 18's size target: packed codes + fp16 scales + fp16 zeros of LLaMA-7B's linears
    at g128 are <= 0.28x their fp16 bytes (measured on the tensors the quantizer writes)."""
    from llama_engine.names import linear_prefixes, linear_shape
    args = ModelArgs.from_preset("llama-7b")
    q = QuantConfig(quant_algo=W4A16_AWQ, group_size=128, has_zero_point=True)
    fp16 = packed = 0
    for prefix in linear_prefixes(args):
        if prefix == "lm_head":
            continue
        n, k = linear_shape(args, prefix)
        fp16 += 2 * n * k
        # the tensors' sizes, from a small stand-in with the same K / G ratio per row
        p, s, z, _ = quantize_int4_zp(torch.randn(2, k, dtype=torch.float16), q.group_size)
        per_row = p.numel() * p.element_size() + (s.numel() + z.numel()) * 2
        packed += per_row // 2 * n
    assert packed / fp16 <= 0.28, packed / fp16


def test_awq_against_autoawq_reference_packer():
    """Where AutoAWQ imports (its sdist, `pip download autoawq`, is pure Python for these two
    functions): its own packer (WQLinear_GEMM.from_linear) and dequantizer agree with ours."""
    gemm = pytest.importorskip("awq.modules.linear.gemm",
                               reason="AutoAWQ is not installed (reference loader unavailable)")
    packing = pytest.importorskip("awq.utils.packing_utils", reason="AutoAWQ is not installed")
    torch.manual_seed(0)
    K, N, G = 128, 64, 32
    lin = torch.nn.Linear(K, N, bias=False)
    wg = lin.weight.data.reshape(N, K // G, G)
    s = ((wg.amax(2) - wg.amin(2)).clamp(min=1e-5) / 15)
    z = (-torch.round(wg.amin(2) / s)).clamp(0, 15)
    ref = gemm.WQLinear_GEMM.from_linear(lin, 4, G, False, scales=s.t().contiguous().half(),
                                         zeros=z.t().contiguous())
    assert torch.equal(fawq.pack_awq(fawq.unpack_awq(ref.qweight)), ref.qweight)
    q, ss, zz = fawq.awq_linear(ref.qweight, ref.qzeros, ref.scales, G)
    mine = dequantize_w4_zp(pack_int4_ref(q), ss.float(), zz, G)
    theirs = packing.dequantize_gemm(ref.qweight, ref.qzeros, ref.scales, 4, G).float()
    assert torch.allclose(mine, theirs.t(), rtol=1e-3, atol=1e-6)   # theirs is in fp16
