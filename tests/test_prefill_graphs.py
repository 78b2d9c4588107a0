"""Prefills replayed from CUDA graphs (llama_engine/cuda_graphs.py ``PrefillGraphs``): the
padded step they capture, run eagerly on the CPU (the padding logic is the same code with or
without a graph).

* bucket and padding rules; the run-time option and its flag;
* the padded prefill gives the logits and the KV cache of the unpadded one (float64 tiny
  model), whatever the bucket and the padding rows; padding never writes the cache;
* ``Engine.generate`` and inflight batching through the padded path equal the eager path;
* the padded step of every mode makes no host sync: with ``Tensor.item`` / ``tolist`` /
  ``__bool__`` / ``__int__`` / ``__float__`` / ``cpu`` / ``numpy`` raising, it still runs.
  That covers the runner, the network and the attention glue on the CPU (the linears take
  their torch references here). On the GPU, capturing a graph is the check for the kernels:
  CUDA refuses a synchronizing call while a stream captures, and tests/test_gpu.py captures
  every mode's prefill and compares it with the eager prefill.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

from llama_engine.cuda_graphs import (PREFILL_MIN_LEN, pad_prefill, prefill_batch_bucket,
                                      prefill_bucket)
from llama_engine.kv_cache import static_block_tables

BLOCK = 4


def build_engine(dtype="float64", mode=None, args=None, device="cpu", group_size=32):
    """A random-weight engine (block size 4, batch 4, input 48): float, or one of
    benchmark.py's modes quantized as it does (int4 with ``group_size``). tests/test_gpu.py
    builds its engines here too."""
    import weight
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, PRESETS, QuantConfig
    from llama_engine.runner import Engine
    args = args or ModelArgs(**PRESETS["tiny"])
    build = BuildConfig(max_batch_size=4, max_input_len=48, max_output_len=16,
                        tokens_per_block=BLOCK, use_inflight_batching=True,
                        paged_kv_cache=True)
    sd = weight.random_weights(args, dtype, seed=0)
    sd = {k: (v * 4 if v.dim() == 2 else v) for k, v in sd.items()}
    tensors = ckpt.hf_to_unified(sd, args)
    quant = QuantConfig()
    if mode is not None:
        import smoothquant
        from benchmarks.modes import MODES
        from llama_engine import quant as q
        flags = dict(MODES[mode][0])
        if "group_size" in flags:
            flags["group_size"] = group_size
        quant = q.validate_quant_flags(args, **flags, has_act_stats=True, has_kv_stats=True)
        calib = {}
        if quant.is_smooth_quant or quant.int8_kv_cache:
            calib = smoothquant.synthetic_calibration(args, tensors, device="cpu")
        if quant.quant_algo or quant.int8_kv_cache:
            tensors, _ = q.quantize_checkpoint(tensors, args, quant, progress=False, **calib)
    cfg = EngineConfig(model=args, quant=quant, build=build, dtype=dtype)
    torch.set_num_threads(1)
    return Engine.from_tensors(cfg, tensors, device)


def _engine(dtype="float64", mode=None):
    return build_engine(dtype, mode)


@pytest.fixture(scope="module")
def tiny():
    return _engine()


def _prompts(lens, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lens]


# -- rules ------------------------------------------------------------------------------------
def test_buckets():
    assert prefill_bucket([1], 1, 512, 4096) == PREFILL_MIN_LEN == 8
    assert prefill_bucket([8], 1, 512, 4096) == 8
    assert prefill_bucket([9, 3], 2, 512, 4096) == 16
    assert prefill_bucket([100], 4, 512, 4096) == 128
    assert prefill_bucket([100], 5, 512, 4096) is None       # 5 x 128 > 512 tokens
    assert prefill_bucket([100], 1, 512, 100) is None         # past the RoPE tables
    assert prefill_bucket([8], 1, 0, 4096) is None            # 0: always eager
    assert prefill_bucket([], 1, 512, 4096) is None
    assert [prefill_batch_bucket(b, 6) for b in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def test_pad_prefill_layout():
    bt = torch.arange(12, dtype=torch.int32).view(2, 6)
    x = pad_prefill([[5, 6, 7], [9]], bt, 8, 3, BLOCK)
    assert x["tokens"].tolist() == [5, 6, 7, 0, 0, 0, 0, 0, 9] + [0] * 15
    assert x["lens"].tolist() == [3, 1, 0]
    assert x["block_tables"].tolist() == [[0, 1], [6, 7], [0, 0]]
    narrow = pad_prefill([[5] * 7], bt[:1, :1], 8, 1, BLOCK)["block_tables"]
    assert narrow.tolist() == [[0, 0]]            # a narrower table is padded with zeros


def test_option_and_flag():
    import argparse

    from llama_engine import options
    from llama_engine.config import ConfigError
    assert options.RuntimeOptions().prefill_graph_max_tokens == 512
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="prefill_graph_max_tokens"):
            options.RuntimeOptions(prefill_graph_max_tokens=bad)
    p = argparse.ArgumentParser()
    options.add_arguments(p)
    a = p.parse_args(["--prefill_graph_max_tokens", "0"])
    assert options.from_args(a).prefill_graph_max_tokens == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--prefill_graph_max_tokens", "-3"])


# -- the padded step against the unpadded prefill ----------------------------------------------
def _slots(lens, bt):
    """Cache slots (block, offset) of each prompt's tokens in a static batch."""
    return [(int(bt[b, p // BLOCK]), p % BLOCK) for b, n in enumerate(lens) for p in range(n)]


@pytest.mark.parametrize("lens,L,batch", [([8], 8, None), ([3, 11], 16, None),
                                          ([5, 1, 7], 8, 4), ([13], 32, 2)])
def test_padded_prefill_equals_unpadded(tiny, lens, L, batch):
    r = tiny.runner
    prompts = _prompts(lens, seed=len(lens))
    b = len(prompts)
    cache = tiny.kv_cache(b, 40)
    bt = static_block_tables(b, 40, BLOCK, "cpu")
    for t in cache.k + cache.v:
        t.zero_()
    ref = r.prefill(prompts, cache, bt)
    ref_k, ref_v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    for t in cache.k + cache.v:
        t.fill_(12345.0)           # a sentinel: any slot the padded step writes shows
    got = r.prefill_padded(prompts, cache, bt, L, batch)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    real = _slots(lens, bt)
    for i in range(len(cache.k)):
        for new, old in ((cache.k[i], ref_k[i]), (cache.v[i], ref_v[i])):
            for blk, off in real:   # the prompts' K/V, as the unpadded prefill wrote them
                torch.testing.assert_close(new[blk, :, off], old[blk, :, off],
                                           rtol=1e-10, atol=1e-10)
            mask = torch.ones(new.shape[0], new.shape[2], dtype=torch.bool)
            for blk, off in real:
                mask[blk, off] = False
            # padding tokens and padding rows wrote nothing
            assert bool((new.permute(0, 2, 1, 3)[mask] == 12345.0).all())


def test_generate_through_padded_prefill(tiny):
    """Engine.generate with the prefill-graph path switched on (on the CPU it runs the
    padded step eagerly) gives the eager engine's tokens; prompts over the limit stay eager."""
    prompts = _prompts([3, 9, 14], seed=7)
    r = tiny.runner
    ref = tiny.generate(prompts, 6).output_ids
    calls = []
    orig = r.prefill_padded
    r.prefill_padded = lambda *a, **k: calls.append(a[3]) or orig(*a, **k)
    r.cuda_graphs, r.prefill_graph_max_tokens = True, 64   # 3 x 16 fits, 3 x 32 would not
    try:
        assert tiny.generate(prompts, 6).output_ids == ref
        long = _prompts([3, 30, 2], seed=8)
        ref_long = None
        r.cuda_graphs = False
        ref_long = tiny.generate(long, 4).output_ids
        r.cuda_graphs = True
        assert tiny.generate(long, 4).output_ids == ref_long
    finally:
        del r.prefill_padded
        r.cuda_graphs, r.prefill_graph_max_tokens = False, 0
    assert calls == [16]               # the long batch (3 x 32 > 64 tokens) ran eagerly


def test_inflight_batching_through_padded_prefill():
    """LLMEngine with prefill graphs on (padded step eagerly on the CPU): the same tokens as
    with every step eager, chunked prompts and mixed steps included."""
    from llama_engine.serving import LLMEngine
    eng = _engine()
    prompts = _prompts([3, 17, 6, 30, 9, 2], seed=11)
    outs, used = {}, {}
    for on in (False, True):
        llm = LLMEngine(eng, max_num_tokens=40, max_kv_cache_tokens=4 * 64)
        r = llm.runner
        r._serving_prefill_graphs, r.prefill_graph_max_tokens = on, 128
        n = []
        orig = r.prefill_padded
        r.prefill_padded = lambda *a, **k: n.append(a[3]) or orig(*a, **k)
        outs[on] = [s.output_ids for s in llm.generate(prompts, 6)]
        del r.prefill_padded
        used[on] = n
    assert outs[True] == outs[False]
    assert used[False] == [] and used[True], used


# -- no host sync in any mode's prefill step ---------------------------------------------------
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4", "int4_zp", "int8kv", "int4_int8kv",
                                  "sq"])
def test_prefill_step_has_no_host_sync(mode, monkeypatch):
    eng = _engine("float32", mode=mode)
    r = eng.runner
    prompts = _prompts([5, 8], seed=3)
    cache = eng.kv_cache(2, 24)
    bt = static_block_tables(2, 24, BLOCK, "cpu")
    ref = r.prefill(prompts, cache, bt)
    x = pad_prefill(prompts, bt, 8, 2, BLOCK)
    seen = []

    def refuse(name):
        def f(self, *a, **k):
            seen.append(name)
            raise AssertionError(f"host sync in the prefill step: Tensor.{name}")
        return f

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    got = r._prefill_step(x, cache)
    monkeypatch.undo()
    assert not seen, seen
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)
    # the check can fail: a step whose metadata lacks the host copy of the context lengths
    # reads them from the tensor (AttentionMeta.context_lens_host), and that is caught
    from llama_engine.attention import AttentionMeta
    n = x["tokens"].shape[0]
    meta = AttentionMeta(positions=torch.arange(n) % 8, slot_mapping=torch.full((n,), -1),
                         block_tables=x["block_tables"],
                         context_lens=torch.tensor([8, 8], dtype=torch.int32),
                         query_lens=[8, 8], is_decode=False)
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    with pytest.raises(AssertionError, match="host sync"):
        r.model(x["tokens"], meta, cache)


# -- benchmark.py --prefill (a dry run of the flow on the CPU) ---------------------------------
def test_benchmark_prefill_rows(tmp_path, monkeypatch):
    import json

    import benchmark
    from benchmarks import latency
    monkeypatch.setattr(latency, "PREFILL_SHAPES", [(1, 8), (2, 16)])
    rc = benchmark.main(["--device", "cpu", "--model_config", "tiny", "--prefill", "--modes",
                         "fp16,int8", "--out_json", str(tmp_path / "b.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())["prefill"]
    assert set(rows) == {f"prefill {m} b{b} i{n}" for m in ("fp16", "int8")
                         for b, n in ((1, 8), (2, 16))}
    for key, r in rows.items():
        assert r["graphs"]["prefill_ms"] > 0 and r["eager"]["prefill_ms"] > 0 and r["speedup"] > 0
        assert ("e2e_o50_graphs" in r) == (" b1 " in key)
    assert "runs alone" in benchmark.validate(benchmark.build_parser().parse_args(
        ["--device", "cpu", "--prefill", "--serving"]), 1)


def test_prefill_graphs_capture_a_shape_seen_twice(monkeypatch):
    """PrefillGraphs' bookkeeping with the capture faked (CUDA-free): a shape's first run is
    left to the caller (None), its second captures over copies of the inputs, later runs copy
    their inputs into those buffers and replay; another shape has its own graph."""
    from llama_engine import cuda_graphs as cg
    captured = []

    class FakeGraph:
        def __init__(self, step, bufs):
            self.step, self.bufs, self.out = step, bufs, torch.zeros(bufs["lens"].shape[0])

        def replay(self):
            self.out.copy_(self.step(self.bufs))

    def fake_capture(step, inputs, pool, warmup, restore=None):
        captured.append({k: v.clone() for k, v in inputs.items()})
        g = FakeGraph(step, inputs)
        return g, g.out

    monkeypatch.setattr(cg, "_capture", fake_capture)
    step = lambda x: x["tokens"].view(x["lens"].shape[0], -1).sum(1).double()  # noqa: E731
    pg = cg.PrefillGraphs(step, None, "cpu", 1)
    bt = torch.zeros(4, 4, dtype=torch.int32)
    x1 = pad_prefill([[1, 2], [3]], bt, 8, 2, BLOCK)
    assert pg.run(x1) is None and not captured             # first sight: eager
    assert pg.run(x1).tolist() == [3.0, 3.0] and len(captured) == 1
    x2 = pad_prefill([[5, 5, 5], [1]], bt, 8, 2, BLOCK)
    assert pg.run(x2).tolist() == [15.0, 1.0] and len(captured) == 1   # replayed, new inputs
    x3 = pad_prefill([[1] * 9], bt, 16, 1, BLOCK)
    assert pg.run(x3) is None and pg.run(x3).tolist() == [9.0]
    assert sorted(pg.graphs) == [(1, 16), (2, 8)]


def test_prefill_graph_capture_failure_falls_back_to_eager(monkeypatch, caplog):
    from llama_engine import cuda_graphs as cg

    def broken(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cg, "_capture", broken)
    # run.py's --log_level (default error) sets the llama_engine logger's level for the
    # rest of the process; an earlier test's run.main() would hide this warning
    caplog.set_level(logging.WARNING, logger="llama_engine.cuda_graphs")
    pg = cg.PrefillGraphs(lambda x: x["lens"], None, "cpu", 1)
    x = pad_prefill([[1, 2]], torch.zeros(1, 2, dtype=torch.int32), 8, 1, BLOCK)
    assert pg.run(x) is None and pg.run(x) is None and pg.failed
    assert "prefilling eagerly" in caplog.text
    assert pg.run(pad_prefill([[1] * 9], torch.zeros(1, 4, dtype=torch.int32), 16, 1,
                              BLOCK)) is None
