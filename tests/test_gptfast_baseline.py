"""benchmarks/gptfast.py, the gpt-fast baseline of benchmark.py --gptfast, on tiny random
LLaMAs: its float network equals our engine (logits at prefill and through its static cache,
greedy tokens), its int8 and int4 paths equal float references of their dequantized weights,
and the --gptfast section runs on the CPU and writes the rows and table the report reads.
The CUDA tests (tinygemm's packed layout, the compiled decode) run only where a GPU is."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmark  # noqa: E402
import weight  # noqa: E402
from benchmarks import gptfast as gf  # noqa: E402
from llama_engine.checkpoint import hf_to_unified  # noqa: E402
from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, QuantConfig  # noqa: E402
from llama_engine.runner import Engine  # noqa: E402

IDS = [5, 17, 300, 42, 7, 99, 3, 250, 11, 64]
needs_cpu_int4 = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    reason="this torch has no _weight_int4pack_mm_for_cpu (the CPU twin of tinygemm's op)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (tinygemm's int4 kernel, CUDA graphs)")


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset (4 heads, 2 KV heads) in float32 with random norm gains, so that a
    mixed-up norm or projection shows in the logits."""
    args = ModelArgs.from_preset("tiny")
    t = hf_to_unified(weight.random_weights(args, "float32", seed=1), args)
    g = torch.Generator().manual_seed(3)
    for k in t:
        if k.endswith("layernorm.weight") or k.endswith("ln_f.weight"):
            t[k] = 1 + 0.3 * torch.randn(t[k].shape, generator=g)
        elif t[k].dim() == 2:
            t[k] = t[k] * 5  # sharper logits: greedy tokens far from ties
    return args, t


def engine(args, tensors) -> Engine:
    cfg = EngineConfig(model=args, quant=QuantConfig(), dtype="float32",
                       build=BuildConfig(max_batch_size=2, max_input_len=16, max_output_len=16))
    return Engine.from_tensors(cfg, tensors, "cpu")


def logits_through_cache(model, ids: list, prompt_len: int) -> torch.Tensor:
    """Prefill ``prompt_len`` tokens, then one token at a time: float32 logits [T, V]."""
    model.setup_caches(1, len(ids))
    x = torch.tensor([ids])
    out = [model(x[:, :prompt_len], torch.arange(prompt_len))[0]]
    for i in range(prompt_len, len(ids)):
        out.append(model(x[:, i:i + 1], torch.tensor([i]))[0])
    return torch.cat(out).float()


def test_float_network_equals_our_engine(tiny):
    args, t = tiny
    eng = engine(args, t)
    model = gf.from_unified(t, args, "fp16")  # "fp16" is the unquantized mode, here float32
    want = eng.forward_logits(IDS)
    torch.testing.assert_close(logits_through_cache(model, IDS, 6), want, atol=1e-4, rtol=1e-4)
    prompts = [IDS[:7], IDS[3:]]
    tokens, prefill_s = gf.Generator(model, compile=False).generate(torch.tensor(prompts), 8)
    assert tokens.tolist() == eng.generate(prompts, 8).output_ids and prefill_s > 0


def test_rope_rows_are_interleaved_per_head():
    w = torch.arange(2 * 8, dtype=torch.float32)[:, None]      # 2 heads of dim 8, one column
    got = gf.interleave_rope_rows(w, 2, 8).flatten().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_int8_linear_equals_its_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 80, generator=g), torch.randn(3, 80, generator=g)
    lin = gf.Int8Linear(w)
    q, s = lin.weight, lin.scales
    assert q.dtype == torch.int8 and s.shape == (48,)
    torch.testing.assert_close(s, w.abs().amax(1) / 127.5)
    deq = q.float() * s[:, None]
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-6
    torch.testing.assert_close(lin(x), x @ deq.t(), atol=1e-5, rtol=1e-5)


def dequantized(tensors: dict, args: ModelArgs, deq) -> dict:
    """Every linear weight (lm_head too) replaced by ``deq(w)``."""
    return {k: deq(v) if v.dim() == 2 and "vocab_embedding" not in k else v
            for k, v in tensors.items()}


def test_int8_model_equals_float_model_of_dequantized_weights(tiny):
    args, t = tiny
    ref = gf.from_unified(dequantized(t, args, lambda w: (lambda q, s: q.float() * s[:, None])(
        *gf.quantize_int8(w))), args, "fp16")
    got = gf.from_unified(t, args, "int8")
    torch.testing.assert_close(logits_through_cache(got, IDS, 4),
                               logits_through_cache(ref, IDS, 4), atol=1e-5, rtol=1e-5)


@needs_cpu_int4
@pytest.mark.parametrize("group", gf.INT4_GROUPS)
@pytest.mark.parametrize("k", [512, 160])  # 160: not tileable, zero-padded to 1024
def test_int4_linear_equals_its_dequantized_weights(group, k):
    if k % group:
        group = 32
    g = torch.Generator().manual_seed(group + k)
    w, x = torch.randn(32, k, generator=g), torch.randn(5, k, generator=g)
    q, s, z = gf.quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and s.dtype == z.dtype == torch.bfloat16
    deq = gf.dequantize_int4(q, s, z, group)
    step = s.float().repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step * 0.51 + 1e-2).all()  # bf16 scale/zero rounding aside
    lin = gf.Int4Linear(w, group, torch.float32)
    assert (lin.padded == k) == (k == 512)
    torch.testing.assert_close(lin(x), x @ deq.t(), atol=2e-3, rtol=2e-3)


@needs_cpu_int4
def test_int4_model_equals_float_model_of_dequantized_weights(tiny):
    args, t = tiny

    def deq(w):
        wp = torch.nn.functional.pad(w, (0, -w.shape[1] % 1024)) if w.shape[1] % 128 else w
        return gf.dequantize_int4(*gf.quantize_int4(wp, 32), 32)[:, :w.shape[1]]

    ref = gf.from_unified(dequantized(t, args, deq), args, "fp16")
    got = gf.from_unified(t, args, "int4", group=32, dtype=torch.float32)
    torch.testing.assert_close(logits_through_cache(got, IDS, 5),
                               logits_through_cache(ref, IDS, 5), atol=2e-3, rtol=2e-3)


def test_agreement_counts_equal_positions_and_common_prefix():
    r = gf.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 0, 4], [5, 6, 7, 8]])
    assert r == {"token_agreement": 7 / 8, "common_prefix": 2}


def test_bad_mode_and_group_are_one_line_errors(tiny):
    args, t = tiny
    with pytest.raises(gf.ConfigError, match="one of fp16, int8, int4"):
        gf.from_unified(t, args, "int3")
    with pytest.raises(gf.ConfigError, match="group size 48"):
        gf.from_unified(t, args, "int4", group=48)


@needs_cpu_int4
def test_benchmark_gptfast_section_on_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = benchmark.main(["--device", "cpu", "--model_config", "tiny", "--gptfast", "fp16,int4",
                         "--gptfast_group", "32", "--output_len", "6", "--out_json", str(out),
                         "--assets", str(tmp_path)])
    assert rc == 0
    d = json.loads(out.read_text())
    rows = d["gptfast"]
    assert set(rows) == {"tiny fp16 b1 i8 o6", "tiny int4 b1 i8 o6"}
    for r in rows.values():
        for side in ("gptfast", "ours"):
            assert r[side]["latency_s"] > r[side]["prefill_s"] > 0 and r[side]["decode_tok_s"] > 0
        assert r["ours_speedup"] == pytest.approx(r["gptfast"]["latency_s"]
                                                  / r["ours"]["latency_s"])
    assert rows["tiny fp16 b1 i8 o6"]["token_agreement"] == 1.0  # same weights, same dtype
    assert d["meta"]["gptfast"] == {"int4_group": 32, "compile_prefill": False,
                                    "compiled": False, "model": "tiny"}
    md = (tmp_path / "benchmark.md").read_text()
    assert "### Against gpt-fast" in md and "| tiny int4 b1 i8 o6 |" in md


def test_a_failing_gptfast_side_is_reported_in_its_row(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("inductor fell over\nsecond line")
    monkeypatch.setattr(gf, "time_generator", broken)
    out = tmp_path / "b.json"
    assert benchmark.main(["--device", "cpu", "--model_config", "tiny", "--gptfast", "fp16",
                           "--output_len", "3", "--out_json", str(out),
                           "--assets", str(tmp_path)]) == 0
    r = json.loads(out.read_text())["gptfast"]["tiny fp16 b1 i8 o3"]
    assert r["gptfast"]["error"] == "RuntimeError: inductor fell over"
    assert r["ours"]["latency_s"] > 0 and "ours_speedup" not in r
    assert "| tiny fp16 b1 i8 o3 | failed: RuntimeError" in (tmp_path / "benchmark.md").read_text()


@pytest.mark.parametrize("flags,msg", [
    (["--gptfast", "fp16,sq"], "--gptfast: unknown sq"),
    (["--gptfast", "--ablation"], "--gptfast runs alone"),
    (["--gptfast_compile_prefill"], "go with --gptfast"),
])
def test_bad_gptfast_flags_are_one_line_errors(tmp_path, capsys, flags, msg):
    rc = benchmark.main(["--device", "cpu", "--model_config", "tiny", *flags,
                         "--out_json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1


@needs_cuda
@pytest.mark.parametrize("group", [32, 128])
def test_cuda_int4_linear_equals_its_dequantized_weights(group):
    g = torch.Generator().manual_seed(group)
    w, x = torch.randn(64, 1024, generator=g), torch.randn(3, 1024, generator=g)
    deq = gf.dequantize_int4(*gf.quantize_int4(w, group), group)
    lin = gf.Int4Linear(w.cuda(), group, torch.bfloat16)
    want = x.bfloat16().float() @ deq.t()
    torch.testing.assert_close(lin(x.cuda().bfloat16()).float().cpu(), want, atol=0.15,
                               rtol=0.02)


@needs_cuda
def test_cuda_compiled_decode_equals_eager(tiny):
    args, t = tiny
    tc = {k: v.cuda() for k, v in t.items()}
    prompts = torch.tensor([IDS[:8]], device="cuda")
    want, _ = gf.Generator(gf.from_unified(tc, args, "fp16"), compile=False).generate(prompts, 8)
    gen = gf.Generator(gf.from_unified(tc, args, "fp16"), compile=True)
    for _ in range(3):  # compile, record the CUDA graphs, replay them
        got, _ = gen.generate(prompts, 8)
    torch._dynamo.reset()
    assert got.tolist() == want.tolist()
