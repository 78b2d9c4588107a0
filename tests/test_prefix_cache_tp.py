"""Prefix caching with an INT8 KV cache and under tensor parallelism (2 gloo ranks launched by
torchrun against one process, as tests/test_tp.py does): tiny float64 GQA LLaMAs (fp64 KV and
INT8 KV with synthetic scales), greedy tokens identical with caching on and off, equal on
every rank and to one process's, and the hit count the shared prefix implies.

Log-probs show how exact that is. fp64: on = off exactly. INT8: a cached prefix is read back
dequantized (as a chunked prefill reads its earlier chunks), while a prompt computed whole
attends to its own K/V before quantization (attention.py, TensorRT-LLM's context attention
too), so on and off differ by the cache's quantization noise (~1e-3 in log-prob here; it
flips no greedy token of this model).

This file is also the ranks' program: ``torchrun ... tests/test_prefix_cache_tp.py --worker
OUT ENGINE...``.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BLOCK = 4
SHARED_BLOCKS = 3
NEW_TOKENS = 6


def prompts() -> list:
    rng = random.Random(5)
    shared = [rng.randrange(3, 500) for _ in range(SHARED_BLOCKS * BLOCK)]
    return [shared + [rng.randrange(3, 500) for _ in range(rng.randint(1, 7))]
            for _ in range(5)]


def on_and_off(engine) -> dict:
    """Greedy tokens with prefix caching off and on (the first prompt alone first, so its
    prefix is cached), the blocks found cached, and the blocks still held afterwards."""
    from llama_engine.sampling import SamplingConfig
    from llama_engine.serving import LLMEngine
    ps, res, greedy = prompts(), {}, SamplingConfig(logprobs=0)
    for on in (False, True):
        llm = LLMEngine(engine, max_num_tokens=16, max_kv_cache_tokens=BLOCK * 48,
                        enable_prefix_caching=on)
        seqs = llm.generate(ps[:1], NEW_TOKENS, greedy) + llm.generate(ps[1:], NEW_TOKENS,
                                                                       greedy)
        bm = llm.block_manager
        res["on" if on else "off"] = {"tokens": [s.output_ids for s in seqs],
                                      "logprobs": [s.logprobs for s in seqs],
                                      "hit_blocks": bm.prefix_hit_blocks,
                                      "used_after": bm.num_used_blocks}
    return res


def worker(out_dir: str, engine_dirs: list) -> None:
    from llama_engine import parallel
    from llama_engine.runner import Engine
    for d in engine_dirs:
        res = on_and_off(Engine.from_dir(d, device="cpu"))   # joins the torchrun group
        name = os.path.basename(d)
        with open(os.path.join(out_dir, f"{name}.rank{parallel.get_rank()}.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3:])
    sys.exit(0)

# -------------------------------------------------------------------------------------------
import pytest  # noqa: E402

import build  # noqa: E402

pytestmark = pytest.mark.dist
ENGINES = {"gqa-fp64": (), "gqa-int8kv": ("--int8_kv_cache",)}
TP2_ENGINES = ["gqa-int8kv"]      # INT8 KV and TP at once: one torchrun, fewer builds
MODEL = dict(vocab_size=510, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
             max_position_embeddings=128, rms_norm_eps=1e-6, num_attention_heads=4,
             num_key_value_heads=2)


def build_engine(tmp: Path, name: str, tp: int) -> str:
    cfg = tmp / "model.json"
    cfg.write_text(json.dumps(MODEL))
    out = tmp / f"tp{tp}" / name
    assert build.main(["--model_config", str(cfg), "--dtype", "float64", "--seed", "3",
                       "--output_dir", str(out), "--max_batch_size", "4",
                       "--max_input_len", "32", "--max_output_len", "8",
                       "--tokens_per_block", str(BLOCK), "--tp_size", str(tp),
                       *ENGINES[name]]) == 0
    return str(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{tp: {engine: [per-rank results]}} for tp 1 (this process) and 2 (torchrun)."""
    import torch

    from llama_engine.runner import Engine
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pc_tp")
    out = {1: {n: [on_and_off(Engine.from_dir(build_engine(tmp, n, 1), device="cpu"))]
               for n in ENGINES}}
    dirs = [build_engine(tmp, n, 2) for n in TP2_ENGINES]
    res_dir = tmp / "res2"
    res_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(Path(__file__).resolve()), "--worker",
                           str(res_dir), *dirs], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out[2] = {n: [json.loads((res_dir / f"{n}.rank{r}.json").read_text()) for r in range(2)]
              for n in TP2_ENGINES}
    return out


@pytest.mark.parametrize("name,tp", [(n, 1) for n in ENGINES] +
                         [(n, 2) for n in TP2_ENGINES])
def test_caching_on_off_identical_with_the_hits_the_prefix_implies(results, name, tp):
    for rank, res in enumerate(results[tp][name]):
        on, off = res["on"], res["off"]
        assert on["tokens"] == off["tokens"], (name, tp, rank)
        # the 4 prompts after the first find its SHARED_BLOCKS full blocks cached
        assert on["hit_blocks"] == (len(prompts()) - 1) * SHARED_BLOCKS
        assert off["hit_blocks"] == 0
        assert on["used_after"] == off["used_after"] == 0
        assert all(len(t) == NEW_TOKENS for t in on["tokens"])
        diff = max(abs(a - b) for x, y in zip(on["logprobs"], off["logprobs"])
                   for a, b in zip(x, y))
        if "int8" in name:
            fp = results[1]["gqa-fp64"][0]["on"]["logprobs"]
            assert 0 < diff < 5e-3, diff             # quantization noise, no more
            assert fp != on["logprobs"]              # the INT8 cache is really in use
        else:
            assert diff == 0, diff
    if tp > 1:   # every rank the same tokens, and one process's
        assert all(r["on"]["tokens"] == results[1][name][0]["on"]["tokens"]
                   for r in results[tp][name])
