"""Tests of llama_engine/trtllm.py: TensorRT-LLM 1.2.x unified-checkpoint exchange, build-flag
mapping, engine-dir detection. CPU only; tests that need tensorrt_llm skip with the reason.

The spec table below is derived from TensorRT-LLM's sources as listed in docs/trtllm-format.md:
  - tensorrt_llm/quantization/layers.py (parameter shapes/dtypes: WeightOnlyQuant*Linear,
    WeightOnlyGroupwiseQuant*Linear, SmoothQuant{Linear,RowLinear,RmsNorm,Attention,GatedMLP})
  - tensorrt_llm/models/modeling_utils.py (preprocess_weights: float W8A16/W4A16 weights are
    quantized by the builder; AWQ weight [N/2, K] and weights_scaling_factor [N, K/G] are
    transposed there), tensorrt_llm/models/llama/convert.py + convert_utils.py
    (get_tllm_linear_sq_weight: scale_to_int, quantization_scaling_factor, act_scale,
    smoother; tied lm_head written; kv_cache_scaling_factor [1]),
  - ModelOpt to_quantized_weight (INT4_AWQ packing: two output channels per byte),
  - tensorrt_llm QuantConfig fields (StrictBaseModel) and LLaMAConfig fields,
at TensorRT-LLM 1.2.0rc2 (b35ac1b6) where the index had that commit, else the stored version.
A stand-in object (FakeTrtllmBuildAPI) checks how our flags map onto the build calls; it
proves nothing about TensorRT-LLM itself.
"""
import json
import os
import sys

import pytest
import torch

from llama_engine import trtllm as T
from llama_engine.config import ConfigError, ModelArgs, QuantConfig

F32 = torch.float32
I8 = torch.int8

# --------------------------------------------------------------------------------------------
# Spec table (TensorRT-LLM 1.2.x LLaMA checkpoint), N = out, K = in, G = group size.
# Each entry: suffix -> (dtype or "model", shape as a function of (N, K, G)) or None (absent).
# --------------------------------------------------------------------------------------------
SPEC_LINEAR = {
    "float": {"weight": ("model", lambda n, k, g: (n, k))},
    # Portable weight-only form: float weight (builder quantizes), our scale alongside.
    "W8A16": {"weight": ("model", lambda n, k, g: (n, k)),
              "per_channel_scale": ("model", lambda n, k, g: (n,))},
    "W4A16": {"weight": ("model", lambda n, k, g: (n, k)),
              "per_channel_scale": ("model", lambda n, k, g: (n,))},
    "W4A16_AWQ": {"weight": (I8, lambda n, k, g: (n // 2, k)),
                  "weights_scaling_factor": ("model", lambda n, k, g: (n, k // g))},
    "W4A16_AWQ+prequant": {"weight": (I8, lambda n, k, g: (n // 2, k)),
                           "weights_scaling_factor": ("model", lambda n, k, g: (n, k // g)),
                           "prequant_scaling_factor": ("model", lambda n, k, g: (k,))},
}
SQ_ALGOS = {  # quant_algo -> (per_channel weights, per_token activations)
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (True, True),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": (True, False),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": (False, True),
    "W8A8_SQ_PER_TENSOR_PLUGIN": (False, False),
}
# TensorRT-LLM QuantConfig fields (pydantic, extra="forbid" in the newest code).
TRTLLM_QUANT_FIELDS = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val",
                       "clamp_val", "use_meta_recipe", "has_zero_point", "pre_quant_scale",
                       "exclude_modules", "mamba_ssm_cache_dtype"}
CONFIG_FIELDS = {  # LLaMA config.json fields and the value our tiny model must give
    "architecture": "LlamaForCausalLM", "position_embedding_type": "rope_gpt_neox",
    "hidden_act": "silu", "logits_dtype": "float32", "head_size": 16, "rotary_base": 10000.0,
    "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 96,
}


def sq_linear_spec(name, per_channel, per_token):
    per_ch = per_channel or name == "attention.qkv"  # QKV is always per-channel in TRT-LLM
    s = {"weight": (I8, lambda n, k, g: (n, k)),
         "per_channel_scale": (F32, (lambda n, k, g: (1, n)) if per_ch else (lambda n, k, g: (1, 1)))}
    if not per_token:
        s["act_scale"] = (F32, lambda n, k, g: (1, 1))
    if name in ("attention.dense", "mlp.proj"):
        s["smoother"] = (F32, lambda n, k, g: (1, k))
    return s


def sq_layer_extras(per_token):
    out = {"input_layernorm.scale_to_int": (F32, (1,)), "post_layernorm.scale_to_int": (F32, (1,))}
    if not per_token:
        out["attention.quantization_scaling_factor"] = (F32, (1,))
        out["mlp.quantization_scaling_factor"] = (F32, (1,))
    return out


def tiny_args(tied=False):
    return ModelArgs(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                     tie_word_embeddings=tied)


def linear_dims(args):
    d, f = args.hidden_size, args.intermediate_size
    return {"attention.qkv": (args.q_size + 2 * args.kv_size, d), "attention.dense": (d, args.q_size),
            "mlp.fc": (f, d), "mlp.gate": (f, d), "mlp.proj": (d, f)}


def expected_spec(args, mode, model_dtype, kv=False, group=64):
    """Full {name: (dtype, shape)} of the TensorRT-LLM checkpoint for a mode."""
    md = model_dtype
    d, v = args.hidden_size, args.vocab_size
    spec = {"transformer.vocab_embedding.weight": (md, (v, d)), "transformer.ln_f.weight": (md, (d,)),
            "lm_head.weight": (md, (v, d))}  # written also when tied
    sq = SQ_ALGOS.get(mode)
    for i in range(args.num_hidden_layers):
        lp = f"transformer.layers.{i}."
        spec[lp + "input_layernorm.weight"] = (md, (d,))
        spec[lp + "post_layernorm.weight"] = (md, (d,))
        for name, (n, k) in linear_dims(args).items():
            table = sq_linear_spec(name, *sq) if sq else SPEC_LINEAR[mode]
            for suffix, (dt, shp) in table.items():
                spec[f"{lp}{name}.{suffix}"] = (md if dt == "model" else dt, shp(n, k, group))
        if sq:
            for suffix, (dt, shp) in sq_layer_extras(sq[1]).items():
                spec[lp + suffix] = (dt, shp)
        if kv:
            spec[lp + "attention.kv_cache_scaling_factor"] = (F32, (1,))
    return spec


# --------------------------------------------------------------------------------------------
# Tiny canonical checkpoints, made directly per docs/design.md's table
# --------------------------------------------------------------------------------------------
def pack_k(q):  # int8 [N, K] in [-8, 7] -> [N, K/2], even k in the low nibble
    lo, hi = q[:, 0::2].to(torch.int16) & 0xF, q[:, 1::2].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(I8)


def unpack_k(p):
    u = p.view(torch.uint8).to(torch.int16)
    lo, hi = ((u & 0xF) ^ 8) - 8, (((u >> 4) & 0xF) ^ 8) - 8
    return torch.stack([lo, hi], -1).reshape(p.shape[0], -1).to(I8)


def make_canonical(args, algo=None, dtype=torch.float16, kv=False, group=64, pre_quant=False,
                   seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.05)
    d, v = args.hidden_size, args.vocab_size
    t = {"transformer.vocab_embedding.weight": rnd(v, d).to(dtype),
         "transformer.ln_f.weight": (1 + rnd(d)).to(dtype)}
    if not args.tie_word_embeddings:
        t["lm_head.weight"] = rnd(v, d).to(dtype)
    sq = SQ_ALGOS.get(algo)
    for i in range(args.num_hidden_layers):
        lp = f"transformer.layers.{i}."
        t[lp + "input_layernorm.weight"] = (1 + rnd(d)).to(dtype)
        t[lp + "post_layernorm.weight"] = (1 + rnd(d)).to(dtype)
        shared_fc_act = torch.rand(1, 1, generator=g) * 0.05 + 0.01
        for name, (n, k) in linear_dims(args).items():
            p = lp + name
            if algo is None:
                t[p + ".weight"] = rnd(n, k).to(dtype)
            elif algo == "W8A16":
                t[p + ".weight"] = torch.randint(-127, 128, (n, k), generator=g, dtype=I8)
                t[p + ".per_channel_scale"] = (torch.rand(n, generator=g) * 1e-3 + 1e-4).to(dtype)
            elif algo == "W4A16":
                t[p + ".weight"] = pack_k(torch.randint(-8, 8, (n, k), generator=g, dtype=I8))
                t[p + ".per_channel_scale"] = (torch.rand(n, generator=g) * 1e-2 + 1e-3).to(dtype)
            elif algo == "W4A16_AWQ":
                t[p + ".weight"] = pack_k(torch.randint(-8, 8, (n, k), generator=g, dtype=I8))
                t[p + ".weights_scaling_factor"] = (torch.rand(k // group, n, generator=g) * 1e-2
                                                    + 1e-3).to(dtype)
                pq = (torch.rand(k, generator=g) + 0.5) if pre_quant else torch.ones(k)
                t[p + ".prequant_scaling_factor"] = pq.to(dtype)
            else:
                per_channel, per_token = sq
                t[p + ".weight"] = torch.randint(-127, 128, (n, k), generator=g, dtype=I8)
                t[p + ".per_channel_scale"] = (torch.rand(1, n if per_channel else 1, generator=g)
                                               * 1e-3 + 1e-4).float()
                if not per_token:
                    a = shared_fc_act if name in ("mlp.fc", "mlp.gate") else \
                        torch.rand(1, 1, generator=g) * 0.05 + 0.01
                    t[p + ".act_scale"] = a.float().clone()
                if name in ("attention.dense", "mlp.proj"):
                    t[p + ".smoother"] = (torch.rand(1, k, generator=g) + 0.5).float()
        if kv:
            t[lp + "attention.kv_cache_scaling_factor"] = (torch.rand(1, generator=g) * 0.1
                                                           + 0.01).float()
    quant = QuantConfig(quant_algo=algo, kv_cache_quant_algo="INT8" if kv else None,
                        group_size=group, pre_quant_scale=pre_quant,
                        smoothquant_val=0.5 if sq else None)
    return t, quant


MODES = [  # (id, algo, dtype, kv, tied, pre_quant)
    ("fp16", None, torch.float16, False, False, False),
    ("bf16", None, torch.bfloat16, False, False, False),
    ("fp16-tied", None, torch.float16, False, True, False),
    ("W8A16", "W8A16", torch.float16, False, False, False),
    ("W8A16-bf16", "W8A16", torch.bfloat16, False, False, False),
    ("W4A16", "W4A16", torch.float16, False, False, False),
    ("W4A16_AWQ", "W4A16_AWQ", torch.float16, False, False, False),
    ("W4A16_AWQ-prequant", "W4A16_AWQ", torch.float16, False, False, True),
    ("fp16-int8kv", None, torch.float16, True, False, False),
    ("W8A16-int8kv", "W8A16", torch.float16, True, False, False),
] + [(a, a, torch.float16, False, False, False) for a in SQ_ALGOS] + [
    ("SQ-static-int8kv", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", torch.float16, True, False,
     False)]
DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def build_mode(mode):
    _, algo, dtype, kv, tied, pre_quant = mode
    args = tiny_args(tied)
    tensors, quant = make_canonical(args, algo, dtype, kv, pre_quant=pre_quant)
    return args, tensors, quant


def spec_mode_key(algo, pre_quant):
    if algo is None:
        return "float"
    if algo == "W4A16_AWQ" and pre_quant:
        return "W4A16_AWQ+prequant"
    return algo


# --------------------------------------------------------------------------------------------
# Export matches the spec table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_export_matches_spec(mode):
    _, algo, dtype, kv, tied, pre_quant = mode
    args, tensors, quant = build_mode(mode)
    config, out = T.to_trtllm(tensors, args, quant)
    spec = expected_spec(args, spec_mode_key(algo, pre_quant), dtype, kv)
    assert set(out) == set(spec), (sorted(set(out) ^ set(spec)))
    for name, (dt, shape) in spec.items():
        assert out[name].dtype == dt, f"{name}: {out[name].dtype} != {dt}"
        assert tuple(out[name].shape) == tuple(shape), f"{name}: {tuple(out[name].shape)} != {shape}"
    # config fields
    assert config["dtype"] == DTYPE_NAME[dtype]
    for k, v in CONFIG_FIELDS.items():
        assert config[k] == v, k
    assert config["tie_word_embeddings"] is tied
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    q = config["quantization"]
    assert set(q) <= TRTLLM_QUANT_FIELDS, set(q) - TRTLLM_QUANT_FIELDS
    assert q["quant_algo"] == algo
    assert q["kv_cache_quant_algo"] == ("INT8" if kv else None)
    assert q["exclude_modules"] is None  # TensorRT-LLM's default list (excludes *vocab_embedding)
    assert q["has_zero_point"] is False
    if algo == "W4A16_AWQ":
        assert q["group_size"] == 64 and q["pre_quant_scale"] is pre_quant
    if algo in SQ_ALGOS:
        assert q["smoothquant_val"] == 0.5
    json.dumps(config)  # serializable


@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_round_trip_is_exact(mode):
    args, tensors, quant = build_mode(mode)
    config, out = T.to_trtllm(tensors, args, quant)
    args2, quant2, back = T.from_trtllm(json.loads(json.dumps(config)), out)
    assert args2 == args
    assert quant2 == quant
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype, k
        assert tuple(back[k].shape) == tuple(v.shape), k
        assert torch.equal(back[k], v), k


def _with_kv_channel_scales(args, tensors, seed=1):
    """Our extension: per-(KV head, channel) K/V scales float32 [Hkv*D] beside TensorRT-LLM's."""
    g = torch.Generator().manual_seed(seed)
    t = dict(tensors)
    for i in range(args.num_hidden_layers):
        for s in ("k_cache_scale", "v_cache_scale"):
            t[f"transformer.layers.{i}.attention.{s}"] = torch.rand(args.kv_size, generator=g) + .01
    return t


@pytest.mark.parametrize("mode", [m for m in MODES if m[3]], ids=[m[0] for m in MODES if m[3]])
def test_export_has_only_trtllm_kv_scale(mode):
    """TensorRT-LLM's export carries one kv_cache_scaling_factor [1] per layer and none of our
    per-channel scales; our own checkpoints (extensions=True) keep them, bit-exact both ways."""
    _, algo, dtype, kv, tied, pre_quant = mode
    args, tensors, quant = build_mode(mode)
    ours = _with_kv_channel_scales(args, tensors)
    config, out = T.to_trtllm(ours, args, quant)
    spec = expected_spec(args, spec_mode_key(algo, pre_quant), dtype, kv)
    assert set(out) == set(spec), sorted(set(out) ^ set(spec))
    assert not any(n.endswith(("k_cache_scale", "v_cache_scale")) for n in out)
    for i in range(args.num_hidden_layers):
        f = out[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]
        assert f.dtype == F32 and f.shape == (1,)
    # an export reads back as an old checkpoint: per-layer scale only
    _, _, back = T.from_trtllm(json.loads(json.dumps(config)), out)
    assert set(back) == set(tensors)
    # our own checkpoint keeps the extension and round-trips exactly
    config, out = T.to_trtllm(ours, args, quant, extensions=True)
    assert set(out) == set(spec) | {n for n in ours if n.endswith(("k_cache_scale",
                                                                     "v_cache_scale"))}
    _, _, back = T.from_trtllm(json.loads(json.dumps(config)), out)
    assert set(back) == set(ours)
    for k, v in ours.items():
        assert torch.equal(back[k], v), k
    # without an INT8 KV cache there is nothing to keep
    _, out = T.to_trtllm(ours, args, QuantConfig(quant_algo=quant.quant_algo,
                                                 group_size=quant.group_size,
                                                 smoothquant_val=quant.smoothquant_val),
                         extensions=True)
    assert not any(n.endswith(("k_cache_scale", "v_cache_scale")) for n in out)


def test_input_not_modified():
    args, tensors, quant = build_mode(MODES[5])  # W4A16
    before = {k: v.clone() for k, v in tensors.items()}
    T.to_trtllm(tensors, args, quant)
    assert set(before) == set(tensors) and all(torch.equal(before[k], tensors[k]) for k in before)


# --------------------------------------------------------------------------------------------
# Semantics of the converted tensors
# --------------------------------------------------------------------------------------------
def test_weight_only_exports_dequantized_weight():
    args = tiny_args()
    for algo in ("W8A16", "W4A16"):
        tensors, quant = make_canonical(args, algo)
        _, out = T.to_trtllm(tensors, args, quant)
        p = "transformer.layers.1.mlp.proj"
        q = tensors[p + ".weight"] if algo == "W8A16" else unpack_k(tensors[p + ".weight"])
        want = (q.float() * tensors[p + ".per_channel_scale"].float()[:, None]).half()
        assert torch.equal(out[p + ".weight"], want)


def test_awq_packing_is_along_output_channels():
    # ModelOpt: byte[j, k] = (q[2j, k] & 0xF) | (q[2j+1, k] << 4); wsf [N, K/G]
    args = tiny_args()
    tensors, quant = make_canonical(args, "W4A16_AWQ", group=64)
    _, out = T.to_trtllm(tensors, args, quant)
    p = "transformer.layers.0.attention.qkv"
    q = unpack_k(tensors[p + ".weight"])                    # [N, K]
    b = out[p + ".weight"].view(torch.uint8).to(torch.int16)  # [N/2, K]
    assert torch.equal(((b & 0xF) ^ 8) - 8, q[0::2].to(torch.int16))
    assert torch.equal((((b >> 4) & 0xF) ^ 8) - 8, q[1::2].to(torch.int16))
    assert torch.equal(out[p + ".weights_scaling_factor"], tensors[p + ".weights_scaling_factor"].t())
    # dequantized weights agree: w[n, k] = q[n, k] * wsf[n, k // G]
    wsf = out[p + ".weights_scaling_factor"].float()
    deq_trt = q.float() * wsf.repeat_interleave(64, dim=1)
    deq_ours = q.float() * tensors[p + ".weights_scaling_factor"].float().t().repeat_interleave(64, 1)
    assert torch.equal(deq_trt, deq_ours)


@pytest.mark.parametrize("algo", list(SQ_ALGOS))
def test_smoothquant_input_quantizers(algo):
    per_channel, per_token = SQ_ALGOS[algo]
    args = tiny_args()
    tensors, quant = make_canonical(args, algo)
    _, out = T.to_trtllm(tensors, args, quant)
    lp = "transformer.layers.0."
    if per_token:
        assert out[lp + "input_layernorm.scale_to_int"].item() == 1.0
        assert out[lp + "post_layernorm.scale_to_int"].item() == 1.0
    else:
        # TensorRT-LLM quantizes with round(x * scale_to_int): the reciprocal of our act_scale.
        pairs = [("input_layernorm.scale_to_int", "attention.qkv"),
                 ("post_layernorm.scale_to_int", "mlp.fc"),
                 ("post_layernorm.scale_to_int", "mlp.gate"),
                 ("attention.quantization_scaling_factor", "attention.dense"),
                 ("mlp.quantization_scaling_factor", "mlp.proj")]
        for qn, lin in pairs:
            prod = out[lp + qn].double() * tensors[lp + lin + ".act_scale"].double()
            assert abs(prod.item() - 1.0) < 1e-6
    qkv_s = out[lp + "attention.qkv.per_channel_scale"]
    assert qkv_s.shape == (1, linear_dims(args)["attention.qkv"][0])
    if not per_channel:
        assert bool(torch.all(qkv_s == tensors[lp + "attention.qkv.per_channel_scale"].item()))


def trtllm_converter_style(out, args, quant):
    """Re-express a to_trtllm SQ static checkpoint the way TensorRT-LLM's converter splits the
    output scale (get_tllm_linear_sq_weight): act_scale = amax_y/127, per_channel_scale =
    scale_y_accum_quant = s_x*s_w / act_scale; scale_to_int = 127/amax_x unchanged."""
    g = torch.Generator().manual_seed(5)
    res = dict(out)
    for i in range(args.num_hidden_layers):
        for name in T.LINEARS:
            p = f"transformer.layers.{i}.{name}"
            y_scale = torch.rand(1, 1, generator=g) * 0.3 + 0.05
            prod = out[p + ".act_scale"] * out[p + ".per_channel_scale"]
            res[p + ".act_scale"] = y_scale
            res[p + ".per_channel_scale"] = (prod / y_scale).float()
    return res


def test_import_trtllm_converter_style_smoothquant():
    algo = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    args = tiny_args()
    tensors, quant = make_canonical(args, algo)
    config, out = T.to_trtllm(tensors, args, quant)
    theirs = trtllm_converter_style(out, args, quant)
    _, _, back = T.from_trtllm(config, theirs)
    for i in range(args.num_hidden_layers):
        for name in T.LINEARS:
            p = f"transformer.layers.{i}.{name}"
            # input scale from the quantizer, product s_x*s_w preserved
            torch.testing.assert_close(back[p + ".act_scale"], tensors[p + ".act_scale"],
                                       rtol=1e-6, atol=0)
            torch.testing.assert_close(back[p + ".per_channel_scale"],
                                       tensors[p + ".per_channel_scale"], rtol=1e-5, atol=0)
            assert torch.equal(back[p + ".weight"], tensors[p + ".weight"])


def test_import_trtllm_per_tensor_qkv_with_three_scales():
    algo = "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"
    args = tiny_args()
    tensors, quant = make_canonical(args, algo)
    config, out = T.to_trtllm(tensors, args, quant)
    p = "transformer.layers.0.attention.qkv"
    qs, ks = args.q_size, args.kv_size
    s = torch.cat([torch.full((qs,), 1e-3), torch.full((ks,), 2e-3), torch.full((ks,), 3e-3)])
    out[p + ".per_channel_scale"] = s.reshape(1, -1)
    _, _, back = T.from_trtllm(config, out)
    assert back[p + ".per_channel_scale"].shape == (1, qs + 2 * ks)  # kept per channel


def test_trtllm_written_weight_only_is_refused():
    args = tiny_args()
    tensors, quant = make_canonical(args, "W8A16")
    config, out = T.to_trtllm(tensors, args, quant)
    p = "transformer.layers.0.attention.dense"
    n, k = linear_dims(args)["attention.dense"]
    out[p + ".weight"] = torch.zeros(k, n, dtype=I8)  # TensorRT-LLM: processed [K, N]
    with pytest.raises(ConfigError, match="preprocessed"):
        T.from_trtllm(config, out)


def test_float_weight_only_checkpoint_uses_trtllm_rtn():
    args = tiny_args()
    tensors, _ = make_canonical(args, None)
    config, out = T.to_trtllm(tensors, args, QuantConfig())
    config["quantization"] = {"quant_algo": "W8A16", "exclude_modules": None}
    _, quant, back = T.from_trtllm(config, out)
    p = "transformer.layers.0.mlp.fc"
    w = tensors[p + ".weight"].float()
    scale = w.abs().amax(1) / 128  # TensorRT-LLM: amax/128, clamp to [-128, 127]
    assert torch.allclose(back[p + ".per_channel_scale"].float(), scale, rtol=1e-3)
    q = back[p + ".weight"]
    assert q.dtype == I8 and int(q.max()) <= 127 and int(q.min()) >= -128
    assert quant.quant_algo == "W8A16"


def test_static_fc_gate_scales_must_agree():
    algo = "W8A8_SQ_PER_TENSOR_PLUGIN"
    args = tiny_args()
    tensors, quant = make_canonical(args, algo)
    tensors["transformer.layers.1.mlp.gate.act_scale"] = tensors[
        "transformer.layers.1.mlp.fc.act_scale"] * 1.5
    with pytest.raises(ConfigError, match="quantizes their shared input once"):
        T.to_trtllm(tensors, args, quant)


def test_awq_prequant_must_be_ones_without_flag():
    args = tiny_args()
    tensors, quant = make_canonical(args, "W4A16_AWQ", pre_quant=True)
    quant.pre_quant_scale = False
    with pytest.raises(ConfigError, match="not all ones"):
        T.to_trtllm(tensors, args, quant)


def test_quantized_lm_head_is_refused():
    args = tiny_args()
    tensors, quant = make_canonical(args, "W8A16")
    tensors["lm_head.weight"] = torch.zeros(args.vocab_size, args.hidden_size, dtype=I8)
    with pytest.raises(ConfigError, match="lm_head"):
        T.to_trtllm(tensors, args, quant)


def test_exclude_modules_mapping():
    assert T._exclude_to_trtllm(["lm_head"]) is None
    pats = T._exclude_to_trtllm(["lm_head", "transformer.layers.0.mlp.proj"])
    assert pats == ["*lm_head", "*transformer.layers.0.mlp.proj", "*vocab_embedding"]
    assert T._exclude_from_trtllm(pats) == ["lm_head", "transformer.layers.0.mlp.proj"]
    assert T._exclude_from_trtllm(None) == ["lm_head"]
    assert T._exclude_from_trtllm(list(T.TRTLLM_DEFAULT_EXCLUDES)) == ["lm_head"]


def test_weight_only_exclusions_stay_float():
    args = tiny_args()
    tensors, quant = make_canonical(args, "W8A16")
    p = "transformer.layers.1.mlp.proj"
    tensors[p + ".weight"] = torch.randn(*linear_dims(args)["mlp.proj"]).half()
    del tensors[p + ".per_channel_scale"]
    quant.exclude_modules = ["lm_head", p]
    config, out = T.to_trtllm(tensors, args, quant)
    assert config["quantization"]["exclude_modules"] == ["*lm_head", "*" + p, "*vocab_embedding"]
    assert p + ".per_channel_scale" not in out
    _, quant2, back = T.from_trtllm(config, out)
    assert quant2.exclude_modules == ["lm_head", p]
    assert torch.equal(back[p + ".weight"], tensors[p + ".weight"])
    assert set(back) == set(tensors)


def test_llama3_rotary_scaling_defaults_filled():
    args = tiny_args()
    tensors, quant = make_canonical(args)
    config, out = T.to_trtllm(tensors, args, quant)
    config["rotary_scaling"] = {"type": "llama3"}  # what TensorRT-LLM's Meta path writes
    args2, _, _ = T.from_trtllm(config, out)
    assert args2.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}


def test_unsupported_quant_algo_is_one_line_error():
    args = tiny_args()
    tensors, quant = make_canonical(args)
    config, out = T.to_trtllm(tensors, args, quant)
    config["quantization"] = {"quant_algo": "W8A8_SQ_PER_CHANNEL"}  # ModelOpt's non-plugin SQ
    with pytest.raises(ConfigError) as e:
        T.from_trtllm(config, out)
    assert "\n" not in str(e.value)


def test_through_checkpoint_dir(tmp_path):
    """The lead's write_checkpoint/read_checkpoint route through to_trtllm/from_trtllm."""
    ck = pytest.importorskip("llama_engine.checkpoint")
    if not hasattr(ck, "write_checkpoint"):
        pytest.skip("llama_engine.checkpoint.write_checkpoint not written yet")
    mode = ("SQ", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", torch.float16, True, True, False)
    args, tensors, quant = build_mode(mode)
    d = str(tmp_path / "ckpt")
    ck.write_checkpoint(d, args, "float16", quant, tensors)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["quantization"]["exclude_modules"] is None
    from safetensors.torch import load_file
    on_disk = load_file(os.path.join(d, "rank0.safetensors"))
    spec = expected_spec(args, "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", torch.float16, kv=True)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in on_disk.items()} == \
        {k: (dt, tuple(s)) for k, (dt, s) in spec.items()}
    args2, quant2, dtype2, back = ck.read_checkpoint(d)
    assert args2 == args and quant2 == quant and dtype2 == "float16"
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


# --------------------------------------------------------------------------------------------
# Engine directories, availability, build command and flag mapping
# --------------------------------------------------------------------------------------------
def test_is_trtllm_engine_dir(tmp_path):
    # Directory fixtures shaped like trtllm-build's output (files only, no TensorRT involved).
    d = tmp_path / "trt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"version": "1.2.0", "pretrained_config": {},
                                               "build_config": {}}))
    assert not T.is_trtllm_engine_dir(str(d))  # no engine file yet
    (d / "rank0.engine").write_bytes(b"\0")
    assert T.is_trtllm_engine_dir(str(d))
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({"backend": "pytorch", "pretrained_config": {},
                                                  "build_config": {}}))
    (ours / "rank0.safetensors").write_bytes(b"\0")
    assert not T.is_trtllm_engine_dir(str(ours))
    assert not T.is_trtllm_engine_dir(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert not T.is_trtllm_engine_dir(str(bad))


def test_build_command_static_and_inflight():
    static = T.trtllm_build_command("/c k", "/out", {"max_batch_size": 4, "max_input_len": 100,
                                                     "max_output_len": 28}, dtype="float16")
    assert static == ("trtllm-build --checkpoint_dir '/c k' --output_dir /out "
                      "--gemm_plugin float16 --gpt_attention_plugin float16 "
                      "--remove_input_padding enable --kv_cache_type continuous "
                      "--max_batch_size 4 --max_input_len 100 --max_seq_len 128 --max_beam_width 1")
    ifb = T.trtllm_build_command("/c", "/o", {"use_inflight_batching": True, "use_gemm_plugin": False,
                                              "tokens_per_block": 32, "max_num_tokens": 4096, "max_input_len": 256,
                                              "max_seq_len": 512}, dtype="bfloat16")
    assert "--gemm_plugin disable" in ifb and "--gpt_attention_plugin bfloat16" in ifb
    assert "--kv_cache_type paged --tokens_per_block 32" in ifb
    assert "--remove_input_padding enable" in ifb and "--max_num_tokens 4096" in ifb
    assert "--max_seq_len 512" in ifb
    with pytest.raises(ConfigError, match="attention plugin"):
        T.resolve_build_flags({"use_inflight_batching": True, "gpt_attention_plugin": "disable"},
                              "float16")
    with pytest.raises(ConfigError):
        T.resolve_build_flags({"gemm_plugin": "int3"}, "float16")


def write_ckpt(tmp_path, algo="W8A16", group=64):
    args = tiny_args()
    tensors, quant = make_canonical(args, algo, group=group)
    config, out = T.to_trtllm(tensors, args, quant)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "rank0.safetensors"))
    return str(d), args, tensors, out


@pytest.mark.skipif(T.tensorrt_llm_available(), reason="tensorrt_llm is installed here")
def test_build_without_tensorrt_llm_names_checkpoint_and_command(tmp_path):
    ckpt, *_ = write_ckpt(tmp_path)
    out = str(tmp_path / "engine")
    with pytest.raises(T.TrtllmUnavailable) as e:
        T.build_trtllm_engine(ckpt, out, {"max_batch_size": 2, "use_gemm_plugin": "float16"})
    msg = str(e.value)
    assert "\n" not in msg and ckpt in msg
    assert e.value.command in msg and e.value.command.startswith(
        f"trtllm-build --checkpoint_dir {ckpt} --output_dir {out} --gemm_plugin float16")
    assert "--max_batch_size 2" in msg
    assert isinstance(e.value, ConfigError)  # scripts print it and exit non-zero
    assert not os.path.exists(out)


def test_group_size_unsupported_by_trtllm(tmp_path):
    ckpt, *_ = write_ckpt(tmp_path, "W4A16_AWQ", group=32)
    with pytest.raises(ConfigError, match="group size 64 or 128"):
        T.build_trtllm_engine(ckpt, str(tmp_path / "e"), {})


class FakeTrtllmBuildAPI:
    """STAND-IN for TensorRT-LLM's build API: records what build_trtllm_engine asks for.
    It proves nothing about TensorRT-LLM itself."""

    def __init__(self):
        self.calls = []
        self.loaded = {}

    @staticmethod
    def preprocess_weights_for_mixed_gemm(t, quant_mode, act_dtype):
        # stand-in: the real one permutes for the GPU; identity keeps codes inspectable
        return t.clone()

    def make_build_config(self, r):
        self.calls.append(("make_build_config", r))
        return {"build_config": r}

    def load_model(self, ckpt_dir, rank, hook):
        from safetensors.torch import load_file
        w = load_file(os.path.join(ckpt_dir, f"rank{rank}.safetensors"))
        self.loaded = hook(w) if hook else w
        self.calls.append(("load_model", ckpt_dir, rank, hook is not None))
        return "model"

    def build(self, model, build_config):
        api = self

        class FakeEngine:
            def save(self, out_dir):
                api.calls.append(("save", out_dir))
        self.calls.append(("build", model, build_config))
        return FakeEngine()


def test_flag_mapping_and_exact_weight_hook_with_stand_in(tmp_path):
    ckpt, args, canon, _ = write_ckpt(tmp_path, "W8A16")
    api = FakeTrtllmBuildAPI()
    out = str(tmp_path / "engine")
    T.build_trtllm_engine(ckpt, out, {"use_inflight_batching": True, "max_batch_size": 3,
                                      "max_input_len": 64, "max_output_len": 64,
                                      "use_gemm_plugin": "auto"}, api=api)
    kinds = [c[0] for c in api.calls]
    assert kinds == ["make_build_config", "load_model", "build", "save"]
    r = api.calls[0][1]
    assert r == {"gemm_plugin": "float16", "gpt_attention_plugin": "float16",
                 "remove_input_padding": True, "kv_cache_type": "paged", "tokens_per_block": 64,
                 "max_batch_size": 3, "max_input_len": 64, "max_beam_width": 1,
                 "max_num_tokens": None, "max_seq_len": 128}
    assert api.calls[1] == ("load_model", ckpt, 0, True)
    assert api.calls[3] == ("save", out)
    # the hook hands the builder our exact codes, transposed to [K, N]
    p = "transformer.layers.0.attention.dense"
    assert torch.equal(api.loaded[p + ".weight"], canon[p + ".weight"].t())


def test_w4_hook_packs_along_n_with_stand_in(tmp_path):
    ckpt, args, canon, _ = write_ckpt(tmp_path, "W4A16")
    api = FakeTrtllmBuildAPI()
    T.build_trtllm_engine(ckpt, str(tmp_path / "e"), {}, api=api)
    p = "transformer.layers.1.mlp.fc"
    q = unpack_k(canon[p + ".weight"])            # [N, K]
    got = unpack_k(api.loaded[p + ".weight"])     # [K, N/2] -> [K, N]
    assert torch.equal(got, q.t())


def test_runner_generate_contract_with_stand_in():
    """TrtllmRunner.generate on a stand-in runner: output trimming/end_id handling only."""

    class FakeRunnerCpp:  # stand-in for tensorrt_llm.runtime.ModelRunnerCpp
        def generate(self, inputs, **kw):
            self.kw = kw
            b, t = len(inputs), max(len(x) for x in inputs) + kw["max_new_tokens"]
            ids = torch.zeros(b, 1, t, dtype=torch.int32)
            lens = torch.zeros(b, 1, dtype=torch.int32)
            for i, x in enumerate(inputs):
                gen = [10 + i, 11 + i, 2, 5][:kw["max_new_tokens"]]
                ids[i, 0, :len(x)] = x
                ids[i, 0, len(x):len(x) + len(gen)] = torch.tensor(gen)
                lens[i, 0] = len(x) + len(gen)
            return {"output_ids": ids, "sequence_lengths": lens}

    fake = FakeRunnerCpp()
    r = T.TrtllmRunner("/nowhere", fake, {"build_config": {"max_batch_size": 2}}, "stand-in")
    out = r.generate([[1, 5, 6], [1, 7]], max_new_tokens=4, end_id=2)
    assert out.output_ids == [[10, 11], [11, 12]]
    assert out.num_generated_tokens == 4
    assert fake.kw["end_id"] == 2 and fake.kw["top_k"] == 1
    with pytest.raises(ConfigError, match="max_batch_size"):
        r.generate([[1]] * 3, 2)


def test_tensorrt_llm_available_is_guarded(monkeypatch):
    """Missing, broken (an import that fails) and working installs: False, False, True."""
    import importlib.util
    import types

    def available(find_spec, module):
        monkeypatch.setattr(T, "_AVAILABLE", None)  # the answer is cached per process
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
        return T.tensorrt_llm_available()

    assert available(lambda name: None, None) is False
    assert available(lambda name: object(), None) is False   # `import` raises ImportError
    assert available(lambda name: object(), types.ModuleType("tensorrt_llm")) is True


# --------------------------------------------------------------------------------------------
# Tests that need TensorRT-LLM itself
# --------------------------------------------------------------------------------------------
needs_trtllm = pytest.mark.skipif(not T.tensorrt_llm_available(),
                                  reason="tensorrt_llm not installed")


@needs_trtllm
def test_real_trtllm_loads_our_checkpoint(tmp_path):
    """TensorRT-LLM's own loader accepts our checkpoint (names, shapes) for each mode."""
    from tensorrt_llm.models import LLaMAForCausalLM, PretrainedConfig
    for mode in MODES:
        if mode[1] in ("W8A16", "W4A16", "W4A16_AWQ") and not torch.cuda.is_available():
            continue
        args, tensors, quant = build_mode(mode)
        config, out = T.to_trtllm(tensors, args, quant)
        d = tmp_path / mode[0]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in out.items()}, str(d / "rank0.safetensors"))
        cfg = PretrainedConfig.from_json_file(str(d / "config.json"))
        LLaMAForCausalLM.from_checkpoint(str(d), config=cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@needs_trtllm
def test_real_trtllm_build_and_generate(tmp_path):
    ckpt, args, *_ = write_ckpt(tmp_path, "W8A16")
    out = str(tmp_path / "engine")
    T.build_trtllm_engine(ckpt, out, {"use_inflight_batching": True, "max_batch_size": 2,
                                      "max_input_len": 16, "max_output_len": 8})
    assert T.is_trtllm_engine_dir(out)
    runner = T.TrtllmRunner.from_dir(out)
    res = runner.generate([[1, 2, 3]], max_new_tokens=4)
    assert len(res.output_ids[0]) == 4
