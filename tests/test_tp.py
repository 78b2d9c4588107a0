"""Tensor parallelism on the CPU: 2 and 4 gloo ranks launched by torchrun against one process.

Tiny random LLaMAs, MHA, GQA with fewer KV heads (2) than ranks (4) and MQA with tied
embeddings, a vocabulary (510)
that 4 ranks must pad: logits at prefill and decode equal one process's (fp32, 1e-5), greedy
tokens equal (float64) and agree on every rank, int8 weight-only too; the embedding gathered
whole (2 ranks, the default) or vocabulary-parallel (4); the sharding of the
quantized tensors, the TensorRT-LLM export per rank, and the build errors.

This file is also the ranks' program: ``torchrun ... tests/test_tp.py --worker OUT ENGINE...``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tp_models import (DECODE_TOKENS, ENGINES, MODELS, NEW_TOKENS, PROMPTS,  # noqa: E402,F401
                       build_engine, model_config, probe)


def worker(out_dir: str, engine_dirs: list) -> None:
    from llama_engine import parallel
    from llama_engine.runner import Engine, SamplingConfig
    for d in engine_dirs:
        eng = Engine.from_dir(d, device="cpu")  # joins the torchrun group (gloo)
        res = probe(eng)
        # Unseeded sampling: the ranks' global RNGs were synchronised at load.
        sampled = eng.generate(PROMPTS, NEW_TOKENS, SamplingConfig(top_k=50)).output_ids
        rank, name = parallel.get_rank(), os.path.basename(d)
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump({"greedy": res["greedy"], "sampled": sampled,
                       "kv_heads": eng.config.model.num_key_value_heads,
                       "embedding": type(eng.model.embed).__name__}, f)
        if rank == 0:
            torch.save(res, os.path.join(out_dir, f"{name}.pt"))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3:])
    sys.exit(0)

# -------------------------------------------------------------------------------------------
import pytest  # noqa: E402

import build  # noqa: E402
from llama_engine import parallel  # noqa: E402
from llama_engine.config import ConfigError, ModelArgs, QuantConfig  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{tp: {engine name: probe results}} for tp 1 (this process), 2 and 4 (torchrun)."""
    from llama_engine.runner import Engine
    tmp = tmp_path_factory.mktemp("tp")
    out = {1: {n: probe(Engine.from_dir(build_engine(tmp, n, 1), device="cpu"))
               for n in ENGINES}}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for tp in (2, 4):
        dirs = [d for d in (build_engine(tmp, n, tp) for n in ENGINES) if d]
        res_dir = tmp / f"res{tp}"
        res_dir.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={tp}", str(Path(__file__).resolve()), "--worker",
               str(res_dir), *dirs]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[tp] = {}
        for n in ENGINES:
            if not (res_dir / f"{n}.pt").exists():
                continue
            out[tp][n] = torch.load(res_dir / f"{n}.pt")
            ranks = [json.loads((res_dir / f"{n}.rank{r}.json").read_text()) for r in range(tp)]
            out[tp][n]["rank_greedy"] = [r["greedy"] for r in ranks]
            out[tp][n]["kv_heads"] = [r["kv_heads"] for r in ranks]
            out[tp][n]["rank_sampled"] = [r["sampled"] for r in ranks]
            out[tp][n]["embedding"] = {r["embedding"] for r in ranks}
    return out


@pytest.mark.parametrize("name,tp", [(n, tp) for tp in (2, 4) for n in (
    "mha-fp32", "gqa-fp32", "gqa-int8", "mqa-tied-fp32", "gqa-int4g32", "gqa-sq", "gqa-int8kv")
    if not (tp > 2 and "int4" in n)])
def test_logits_equal_one_process(results, tp, name):
    one, many = results[1][name], results[tp][name]
    assert many["prefill"].shape == one["prefill"].shape == (2, 510)
    torch.testing.assert_close(many["prefill"], one["prefill"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many["decode"], one["decode"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["mha-fp64", "gqa-fp64", "gqa-int8", "gqa-int8kv"])
def test_greedy_tokens_equal_and_agree_on_all_ranks(results, tp, name):
    one, many = results[1][name], results[tp][name]
    if name.endswith("fp64") or name.endswith("int8kv"):
        # float64 engines still accumulate norms in fp32: equal to ~1e-7
        torch.testing.assert_close(many["prefill"], one["prefill"], atol=1e-6, rtol=1e-6)
    assert many["greedy"] == one["greedy"]
    assert all(g == one["greedy"] for g in many["rank_greedy"])
    assert all(g == many["rank_sampled"][0] for g in many["rank_sampled"])


def test_embedding_gathered_or_vocab_parallel(results):
    # use_parallel_embedding (build.py): off (tp=2 here) whole table per rank, on (tp=4) shards
    for name in ("mha-fp32", "mqa-tied-fp32"):
        assert results[2][name]["embedding"] == {"Embedding"}
        assert results[4][name]["embedding"] == {"VocabParallelEmbedding"}


def test_kv_heads_per_rank(results):
    # GQA with 2 KV heads: 2 ranks hold one each; 4 ranks hold one each (each replicated twice).
    assert results[2]["gqa-fp32"]["kv_heads"] == [1, 1]
    assert results[4]["gqa-fp32"]["kv_heads"] == [1] * 4
    assert results[4]["mha-fp32"]["kv_heads"] == [1] * 4


# -- sharding without processes --------------------------------------------------------------
def test_qkv_rows_replicate_kv_heads_as_trtllm():
    a = ModelArgs(**{k: v for k, v in MODELS["gqa"].items() if k != "rms_norm_eps"})
    d = a.head_dim
    for r in range(4):  # q head r; KV head r // 2 (TensorRT-LLM's dup_kv_weight + split)
        rows = parallel.qkv_rows(a, 4, r)
        want = torch.cat([torch.arange(r * d, (r + 1) * d),
                          a.q_size + (r // 2) * d + torch.arange(d),
                          a.q_size + a.kv_size + (r // 2) * d + torch.arange(d)])
        assert torch.equal(rows, want)


def test_kv_channel_scales_follow_kv_heads():
    """Per-(KV head, channel) INT8 KV scales shard like the KV heads of attention.qkv (a block
    of heads per rank, or the one shared head replicated); the per-layer scale replicates."""
    for model, tp in (("gqa", 2), ("gqa", 4), ("mha", 4), ("tied", 2), ("tied", 4)):
        a = ModelArgs(**{k: v for k, v in MODELS[model].items() if k != "rms_norm_eps"})
        d = a.head_dim
        lp = "transformer.layers.0.attention."
        ks = torch.arange(a.kv_size, dtype=torch.float32) + 1.0
        t = {lp + "kv_cache_scaling_factor": torch.tensor([0.5]),
             lp + "k_cache_scale": ks, lp + "v_cache_scale": ks * 10}
        for r in range(tp):
            shard = parallel.shard_checkpoint(t, a, None, tp, r)
            heads = parallel.kv_heads_of_rank(a, tp, r)
            want = torch.cat([ks[h * d:(h + 1) * d] for h in heads])
            assert torch.equal(shard[lp + "k_cache_scale"], want), (model, tp, r)
            assert torch.equal(shard[lp + "v_cache_scale"], want * 10)
            assert shard[lp + "k_cache_scale"].numel() == parallel.local_args(a, tp).kv_size
            assert torch.equal(shard[lp + "kv_cache_scaling_factor"], torch.tensor([0.5]))
            # the rank's qkv K rows are the same heads, in the same order
            rows = parallel.qkv_rows(a, tp, r)
            hl = a.num_attention_heads // tp
            k_rows = rows[hl * d:hl * d + len(heads) * d] - a.q_size
            assert torch.equal(k_rows, parallel.kv_channel_rows(a, tp, r))
    bad = {"transformer.layers.0.attention.k_cache_scale": torch.ones(3)}
    with pytest.raises(ConfigError, match="expected Hkv\\*D"):
        parallel.shard_checkpoint(bad, a, None, 2, 0)


def test_int4_groupwise_and_smoothquant_shards_reassemble():
    from llama_engine.quant import (SmoothQuantLinear, WeightOnlyInt4Linear,
                                    quantize_int8_per_channel)
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    full = WeightOnlyInt4Linear.from_float(w, 32)
    g = full.checkpoint_tensors()
    q = QuantConfig(quant_algo="W4A16_AWQ", group_size=32)
    rows = [WeightOnlyInt4Linear.from_checkpoint(parallel._shard_row("p", g, 2, r), q)
            for r in range(2)]
    torch.testing.assert_close(torch.cat([m.dequantized() for m in rows], 1), full.dequantized())
    cols = [WeightOnlyInt4Linear.from_checkpoint(parallel._shard_column("p", g, None, 2, r, 48), q)
            for r in range(2)]
    torch.testing.assert_close(torch.cat([m.dequantized() for m in cols], 0), full.dequantized())
    # SmoothQuant row-parallel: smoother splits with the input, per-channel scales replicate.
    qw, s, _ = quantize_int8_per_channel(w, torch.float32)
    sm = torch.rand(1, 128) + 0.5
    sq = {"weight": qw, "per_channel_scale": s.reshape(1, -1), "smoother": sm,
          "act_scale": torch.tensor([[0.02]])}
    ref = SmoothQuantLinear(qw, s.reshape(1, -1), False, sq["act_scale"], sm).dequantized()
    parts = [SmoothQuantLinear.from_checkpoint(parallel._shard_row("p", sq, 2, r), QuantConfig(
        quant_algo="W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN")).dequantized() for r in range(2)]
    torch.testing.assert_close(torch.cat(parts, 1), ref)


def test_trtllm_export_writes_rank_files(tmp_path):
    for tp in (1, 2):
        rc = build.main(["--model_config", model_config(tmp_path, "gqa"), "--dtype", "float32",
                         "--output_dir", str(tmp_path / f"ck{tp}"), "--backend", "tensorrt_llm",
                         "--checkpoint_only", "--world_size", str(tp)])
        assert rc == 0
    from safetensors.torch import load_file
    cfg = json.loads((tmp_path / "ck2" / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["use_parallel_embedding"] and cfg["embedding_sharding_dim"] == 0
    full = load_file(str(tmp_path / "ck1" / "rank0.safetensors"))
    a = ModelArgs(**{k: v for k, v in MODELS["gqa"].items() if k != "rms_norm_eps"})
    name = "transformer.layers.0.attention.qkv.weight"
    for r in range(2):
        shard = load_file(str(tmp_path / "ck2" / f"rank{r}.safetensors"))
        assert torch.equal(shard[name], full[name][parallel.qkv_rows(a, 2, r)])
        assert shard["lm_head.weight"].shape == (255, 64)
        d = "transformer.layers.1.mlp.proj.weight"
        assert torch.equal(shard[d], full[d].chunk(2, 1)[r])


def test_build_errors(tmp_path, capsys):
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(MODELS["gqa"]))
    rc = build.main(["--model_config", str(cfg), "--output_dir", str(tmp_path / "e"),
                     "--dtype", "float32", "--tp_size", "3"])
    assert rc == 2
    assert "num_attention_heads 4 is not divisible by --tp_size 3" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    with pytest.raises(SystemExit):
        build.main(["--model_config", str(cfg), "--world_size", "2", "--tp_size", "4"])
    a = ModelArgs(vocab_size=64, hidden_size=96, num_hidden_layers=1, num_attention_heads=6,
                  num_key_value_heads=3, intermediate_size=96)
    with pytest.raises(ConfigError, match="num_key_value_heads 3 is not divisible"):
        parallel.check_tp(a, None, 2)
    with pytest.raises(ConfigError, match="not a multiple of --group_size 64"):
        parallel.check_tp(a, QuantConfig(quant_algo="W4A16_AWQ", group_size=64), 3)


def test_tp_engine_needs_torchrun(tmp_path):
    from llama_engine.runner import Engine
    d = build_engine(tmp_path, "gqa-fp32", 2)
    assert sorted(os.listdir(d)) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    assert json.loads(open(os.path.join(d, "config.json")).read())["world_size"] == 2
    with pytest.raises(ConfigError, match="built for 2 ranks.*torchrun --nproc_per_node 2"):
        Engine.from_dir(d, device="cpu")
