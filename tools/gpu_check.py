#!/usr/bin/env python3
"""Correctness of the engine on a GPU against Hugging Face (run on the GPU machine).

Tiny random LLaMAs (GQA and MHA): our engine's logits at prefill and at every decode step,
with and without CUDA graphs, against HF on the same device, in fp32 and fp16; greedy text
equal in fp32; quantized engines against the same engine on the CPU reference path.
Prints one line per check and exits non-zero on any failure. The same checks run as pytest on
the GPU machine: ``pytest -m gpu tests/test_gpu.py`` (with the kernels' self-check
correctness rows of tools/gpu_kernel_check.py).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import build  # noqa: E402
from llama_engine.kv_cache import static_block_tables  # noqa: E402
from llama_engine.runner import Engine  # noqa: E402

FAILS = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def make_hf(path: str, kv_heads: int, hidden: int = 256, heads: int = 4, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden + 128,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            (p.normal_(0, 0.06) if p.dim() == 2 else p.uniform_(0.8, 1.2))
    m.save_pretrained(path)


def logits_vs_hf(src: str, dtype: str, graphs: bool, tol: float, tag: str, extra=()) -> None:
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
        assert build.main(["--model_dir", src, "--dtype", dtype, "--output_dir", d,
                           "--max_batch_size", "4", "--max_input_len", "256",
                           "--max_output_len", "64", *extra]) == 0
        eng = Engine.from_dir(d, "cuda")
    if graphs:
        eng.enable_cuda_graphs()
    td = getattr(torch, dtype)
    ref = LlamaForCausalLM.from_pretrained(src, dtype=td).cuda().eval()
    torch.manual_seed(1)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (37, 5, 130)]
    steps = 12
    cache = eng.kv_cache(len(prompts), 130 + steps)
    bt = static_block_tables(len(prompts), 130 + steps, eng.block_size, eng.device)
    logits = eng.prefill(prompts, cache, bt)
    seqs = [list(p) for p in prompts]
    ctx = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device="cuda")
    worst = 0.0
    for step in range(steps + 1):
        with torch.no_grad():
            for b, s in enumerate(seqs):
                want = ref(torch.tensor([s], device="cuda")).logits[0, -1].float()
                err = ((logits[b] - want).norm() / want.norm()).item()
                worst = max(worst, err)
        nxt = logits.argmax(-1)
        for b in range(len(seqs)):
            seqs[b].append(int(nxt[b]))
        if step < steps:
            logits = eng.decode_step(nxt, ctx, bt, cache)
    check(f"logits vs HF {tag}", worst < tol, f"worst rel err {worst:.2e} (tol {tol})")


def quant_vs_cpu(src: str, flags: list, tag: str, tol: float) -> None:
    """The CUDA kernels of a quantized engine against its CPU reference path. ``src``: an HF
    model dir, or a model config JSON (random weights)."""
    with tempfile.TemporaryDirectory() as d:
        model = ["--model_config" if src.endswith(".json") else "--model_dir", src]
        assert build.main([*model, "--dtype", "float16", "--output_dir", d,
                           "--max_batch_size", "4", "--max_input_len", "256",
                           "--max_output_len", "64", *flags]) == 0
        gpu = Engine.from_dir(d, "cuda")
        cpu = Engine.from_dir(d, "cpu", dtype="float32")
    # 85 tokens: the large-M kernels; 40: the skinny (decode-size) ones
    for ids in (list(range(5, 90)), list(range(7, 47))):
        a = gpu.forward_logits(ids).float().cpu()
        b = cpu.forward_logits(ids).float()
        err = ((a - b).norm() / b.norm()).item()
        check(f"{tag} CUDA vs CPU reference (prefill {len(ids)})", err < tol,
              f"rel err {err:.2e}")
    outg = gpu.generate([ids[:20], ids[:7]], 16).output_ids
    outc = cpu.generate([ids[:20], ids[:7]], 16).output_ids
    # fp16 kernels vs the fp32 reference: a near-tie may flip a later token (and everything
    # after it), so only the first tokens must agree; the count is printed for the record.
    same = sum(x == y for g, c in zip(outg, outc) for x, y in zip(g, c))
    total = sum(len(c) for c in outc)
    first = all(g[:4] == c[:4] for g, c in zip(outg, outc))
    check(f"{tag} greedy tokens CUDA vs CPU", first, f"first 4 equal: {first}; {same}/{total} "
          "equal overall")


def make_cases(root: str) -> dict:
    """Check name -> a function running it (it reports through ``check``); the HF models and
    the SmoothQuant config are written under ``root`` first. tests/test_gpu.py runs the same
    dict as pytest cases."""
    for kv in (2, 4):
        make_hf(os.path.join(root, f"hf_kv{kv}"), kv)
    # SmoothQuant needs calibration: random weights with build.py's synthetic calibration
    cfg = os.path.join(root, "tiny_gqa.json")
    with open(cfg, "w") as f:
        json.dump({"architecture": "LlamaForCausalLM", "hidden_size": 256,
                   "intermediate_size": 688, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                   "max_position_embeddings": 512}, f)
    cases = {}
    for kv in (2, 4):
        src = os.path.join(root, f"hf_kv{kv}")
        cases[f"fp32-kv{kv}-eager"] = lambda src=src, kv=kv: logits_vs_hf(
            src, "float32", False, 2e-3, f"fp32 kv{kv} eager")
        cases[f"fp32-kv{kv}-graphs"] = lambda src=src, kv=kv: logits_vs_hf(
            src, "float32", True, 2e-3, f"fp32 kv{kv} cuda-graphs")
        cases[f"fp16-kv{kv}-graphs"] = lambda src=src, kv=kv: logits_vs_hf(
            src, "float16", True, 2e-2, f"fp16 kv{kv} cuda-graphs")
    src = os.path.join(root, "hf_kv2")
    cases["int8-wo"] = lambda: quant_vs_cpu(
        src, ["--use_weight_only", "--weight_only_precision", "int8"], "int8 WO", 2e-2)
    cases["int4-g128-wo"] = lambda: quant_vs_cpu(
        src, ["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "128"],
        "int4 g128 WO", 2e-2)
    cases["int4-pc-wo"] = lambda: quant_vs_cpu(
        src, ["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "0"],
        "int4 per-channel WO", 2e-2)
    cases["sq-per-token-per-channel"] = lambda: quant_vs_cpu(
        cfg, ["--use_smooth_quant", "--per_token", "--per_channel"],
        "SmoothQuant per-token/per-channel", 3e-2)
    cases["sq-per-tensor"] = lambda: quant_vs_cpu(cfg, ["--use_smooth_quant"],
                                                  "SmoothQuant per-tensor", 3e-2)
    return cases


def main() -> int:
    with tempfile.TemporaryDirectory() as root:
        for run in make_cases(root).values():
            run()
    print(f"{len(FAILS)} failed: {FAILS}" if FAILS else "all GPU checks passed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
