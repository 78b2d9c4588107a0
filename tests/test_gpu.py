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


# -- prefill CUDA graphs (llama_engine/cuda_graphs.py PrefillGraphs) ---------------------------
PREFILL_MODES = ["fp16", "int8", "int4", "int4_zp", "int8kv", "int4_int8kv", "sq"]


def _gpu_args():
    from llama_engine.config import ModelArgs
    # head dim 64 (the Triton kernels want a power of two), widths divisible by 128 (int4 g128)
    return ModelArgs(vocab_size=512, hidden_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                     max_position_embeddings=512, norm_epsilon=1e-6)


@pytest.mark.parametrize("mode", PREFILL_MODES)
def test_prefill_graph_equals_eager_on_gpu(mode):
    """Every mode's padded prefill step runs under torch.cuda.set_sync_debug_mode("error")
    (no host sync), is captured (a synchronizing kernel path would fail the capture), and its
    replay gives the eager padded step's logits and cache bit for bit, the unpadded eager
    prefill's within fp16 rounding; padding writes no cache slot; a second replay with other
    prompts of the same bucket takes its new inputs."""
    from test_prefill_graphs import BLOCK, build_engine

    from llama_engine.cuda_graphs import pad_prefill
    from llama_engine.kv_cache import static_block_tables
    eng = build_engine("float16", mode, _gpu_args(), "cuda", group_size=128)
    r = eng.runner
    r.prefill_graph_max_tokens = 512
    g = torch.Generator().manual_seed(0)
    lens = [5, 8, 13]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lens]
    cache = eng.kv_cache(3, 40)
    bt = static_block_tables(3, 40, BLOCK, "cuda")

    def fresh():
        for t in cache.k + cache.v:
            t.fill_(7)

    fresh()
    eager = r.prefill(prompts, cache, bt).clone()          # graphs off: unpadded, eager
    ref_k = [t.clone() for t in cache.k]
    fresh()
    x = {k: v.cuda() for k, v in pad_prefill(prompts, bt, 16, 3, BLOCK).items()}
    r._prefill_step(x, cache)                               # compile, then the checked run
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        padded = r._prefill_step(x, cache).clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    padded_k = [t.clone() for t in cache.k]
    fresh()
    r.enable_cuda_graphs()
    first = r.prefill(prompts, cache, bt).clone()           # a shape's first prefill: eager
    assert not r._prefill_graphs.graphs and torch.equal(first, padded)
    fresh()
    graph = r.prefill(prompts, cache, bt).clone()           # its second: captured, replayed
    assert list(r._prefill_graphs.graphs) == [(3, 16)]
    assert torch.equal(graph, padded), (graph - padded).abs().max()
    for a, b in zip(cache.k, padded_k):
        assert torch.equal(a, b)
    torch.testing.assert_close(graph, eager, atol=5e-2, rtol=5e-2)
    real = torch.zeros(cache.k[0].shape[0], BLOCK, dtype=torch.bool, device="cuda")
    for b, n in enumerate(lens):
        for p in range(n):
            real[int(bt[b, p // BLOCK]), p % BLOCK] = True
    for a, e in zip(cache.k, ref_k):
        kv = a.permute(0, 2, 1, 3)
        assert bool((kv[~real] == 7).all())                 # padding wrote nothing
        torch.testing.assert_close(kv[real].float(), e.permute(0, 2, 1, 3)[real].float(),
                                   atol=5e-2, rtol=5e-2)
    other = [list(reversed(p)) for p in prompts]
    again = r.prefill(other, cache, bt).clone()
    r.cuda_graphs = False
    fresh()
    x2 = {k: v.cuda() for k, v in pad_prefill(other, bt, 16, 3, BLOCK).items()}
    assert torch.equal(again, r._prefill_step(x2, cache))


def test_inflight_prefill_graphs_on_gpu():
    """LLMEngine (float32) with prefill graphs on and off: the same greedy tokens."""
    from test_prefill_graphs import build_engine

    from llama_engine.serving import LLMEngine
    eng = build_engine("float32", None, _gpu_args(), "cuda")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 17, 6, 30, 9)]
    outs = {}
    for limit in (0, 512):
        eng.runner.prefill_graph_max_tokens = limit
        llm = LLMEngine(eng, max_num_tokens=64, max_kv_cache_tokens=4 * 128)
        # twice: a step shape's first prefill runs eagerly, the second is captured
        outs[limit] = [[s.output_ids for s in llm.generate(prompts, 8)] for _ in range(2)]
        if limit:
            assert llm.runner._prefill_graphs is not None and llm.runner._prefill_graphs.graphs
    assert outs[0][0] == outs[0][1] == outs[512][0] == outs[512][1]


# -- speculative decoding, fp16 on the GPU (issue 22's exactness on a tiny model) -------------
@pytest.mark.parametrize("k", [2, 4])
def test_speculative_greedy_equals_plain_fp16_on_gpu(k):
    """fp16, CUDA graphs: prompt-lookup speculation gives plain greedy decoding's tokens, in the
    static engine and under inflight batching (the verify step runs k+1 rows through the
    skinny kernels where plain decoding runs one; the weights are scaled up (x4, as every
    engine here) so the logits' argmax is not a near-tie for fp16 to flip)."""
    import random as _random

    from test_prefill_graphs import build_engine

    from llama_engine.serving import LLMEngine
    from llama_engine.speculative import SpeculativeConfig
    eng = build_engine("float16", None, _gpu_args(), "cuda")
    rng = _random.Random(3)
    # repeated phrases, so prompt lookup proposes often
    prompts = [([rng.randrange(3, 60) for _ in range(6)] * 5)[:rng.randint(12, 30)]
               for _ in range(4)]
    spec = SpeculativeConfig(max_draft_len=k)
    ref = eng.generate(prompts, 12)
    out = eng.generate(prompts, 12, speculative=spec)
    assert out.output_ids == ref.output_ids
    assert out.num_proposed > 0
    alone = [eng.generate([p], 12).output_ids[0] for p in prompts]
    llm = LLMEngine(eng, speculative=SpeculativeConfig(max_draft_len=k, max_batch_size=4),
                    max_num_tokens=64, max_kv_cache_tokens=4 * 128)
    seqs = llm.generate(prompts, 12)
    assert [s.output_ids for s in seqs] == alone
    assert llm.speculation.stats["verify_steps"] > 0


@pytest.mark.parametrize("fmt", ["int4", "int4_pc", "int8", "int4_zp", "int8_group"])
def test_long_prefill_dequant_path_on_gpu(fmt):
    """From DEQUANT_MIN_M rows the quantized linears dequantize (kernels/dequant.py) and call
    cuBLAS: the result equals the fp32 reference within fp16 rounding."""
    from llama_engine.kernels import dequant as D
    from llama_engine.kernels import int4_zp as Z
    from llama_engine.kernels import int8_group as IG
    from llama_engine.kernels import linear as L
    from llama_engine.kernels import reference as R
    g = torch.Generator(device="cuda").manual_seed(0)
    M, N, K, G = D.DEQUANT_MIN_M + 37, 384, 1024, 128
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
    bits = 8 if fmt.startswith("int8") else 4
    q = torch.randint(-128, 128, (N, K // (2 if bits == 4 else 1)), device="cuda",
                      generator=g).to(torch.int8)
    ng = 1 if fmt in ("int4_pc", "int8") else K // G
    s = (torch.rand(ng, N, device="cuda", generator=g) * 0.02 + 0.001).half()
    z = (torch.randn(ng, N, device="cuda", generator=g) * 0.02).half()
    if fmt == "int4":
        got, want = L.linear_w4a16(x, q, s, G), R.linear_w4a16_ref(x.float(), q, s.float(), G)
    elif fmt == "int4_pc":
        got, want = L.linear_w4a16(x, q, s, K), R.linear_w4a16_ref(x.float(), q, s.float(), K)
    elif fmt == "int8":
        got = L.linear_w8a16(x, q, s.reshape(N))
        want = R.linear_w8a16_ref(x.float(), q, s.reshape(N).float())
    elif fmt == "int4_zp":
        got = Z.linear_w4a16_zp(x, q, s, z, G)
        want = Z.linear_w4a16_zp_ref(x.float(), q, s.float(), z.float(), G)
    else:
        got = IG.linear_w8a16_group(x, q, s, z, G)
        want = IG.linear_w8a16_group_ref(x.float(), q, s.float(), z.float(), G)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 2e-3, (fmt, err)
