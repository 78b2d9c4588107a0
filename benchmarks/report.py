"""benchmark.py's results: the JSON file every call merges into (section by section, row by
row, so a table can be built over several GPU calls) and the markdown tables made from it.
No torch and no engine: tools and tests use it on any machine.

Schema: {"meta": {gpu, date, torch, read_TBps, ablation_model, ...}, "ablation": {row: ...},
"<grid section>": {row: time_engine row}, "profile": {...}, "memory": {mode: ...},
"serving": {scenario key: ..., "poisson": {rate: ...}}, "gptfast": {row: {"gptfast": ...,
"ours": ..., "ours_speedup", "token_agreement", "common_prefix"}}}."""
from __future__ import annotations

import json
import os

from . import plots
from .modes import ABLATION

NAN = float("nan")
# Grid sections the report knows, with their titles (rows: latency.time_engine's dicts).
LATENCY_SECTIONS = (
    ("grid", "Batch sweep (input 128, output 128)"),
    ("kv_long", "INT8 KV cache at long context"),
    ("prefill", "Prefill, batch 1, 2048 tokens"),
    ("tp", "Tensor parallelism (rows ending tpN ran on N GPUs)"),
    ("tp_h200", "Tensor parallelism on 2x NVIDIA H200 (one-GPU rows on one of the same GPUs; "
     "oneshot: the one-shot all-reduce, +norm: fused with the next RMSNorm; no suffix: NCCL)"),
    ("tp_h200_pdl", "Tensor parallelism on 2x NVIDIA H200 with programmatic dependent launch "
     "(run 7 call g; oneshot: the one-shot all-reduce, not fused; no suffix: NCCL)"),
    ("tp_h100_run8", "Tensor parallelism on 2x NVIDIA H100 80GB HBM3, run 8 (final code; call "
     "f: one GPU and the default one-shot + fused norm; call g: NCCL)"),
    ("tp_h200_run8", "Tensor parallelism on 2x NVIDIA H200, run 8 (RoPE in decode attention, "
     "one-shot logits all-gather, embedding gathered; call d, pemb rows call c with "
     "LLAMA_ENGINE_TP_PARALLEL_EMBEDDING=1; oneshot: not fused with the norm; +norm: the "
     "default; no suffix: NCCL)"),
    ("fp8", "FP8 W8A8 against fp16 (batch 1 and 64, input 128, output 128)"),
    ("fp8kv_b32", "FP8 KV cache against fp16's (batch 32, input 1920, output 128)"),
    ("fp8_inline", "FP8 W8A8 against fp16, run 11 call b: the GEMV quantizes its own "
     "activations, built-in launch configs (batch 1 and 64, input 128, output 128)"),
    ("fp8_swept", "FP8 W8A8 against fp16, run 11 call c: the swept GEMV launches (batch 1 is "
     "the current code; batch 64 ran lm_head's M = 64 launch on every linear, fixed since)"),
)
MODEL_NAMES = {"llama-7b": "LLaMA-7B", "llama-13b": "LLaMA-13B"}


def write_json_atomic(path: str, doc: dict, **dump_kw) -> None:
    """Write ``doc`` through a temporary file, so that a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, **dump_kw)
    os.replace(tmp, path)


def merge(old: dict, new: dict) -> dict:
    """``new`` merged into ``old`` (in place): a section's rows are replaced one by one (a
    re-measured row drops its old keys, e.g. an old error); ``meta``'s dict values are
    updated key by key; a section that is not a dict on both sides is replaced."""
    for section, rows in new.items():
        if isinstance(rows, dict) and isinstance(old.get(section), dict):
            for k, v in rows.items():
                if section == "meta" and isinstance(v, dict) and isinstance(
                        old[section].get(k), dict):
                    old[section][k].update(v)
                else:
                    old[section][k] = v
        else:
            old[section] = rows
    return old


def merge_json(path: str, new: dict) -> dict:
    """Merge ``new`` into the JSON at ``path`` (see ``merge``); -> the merged document."""
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    merge(old, new)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, old, indent=2)
    return old


def _ablation_row(key: str, r: dict, base) -> str:
    if "error" in r:
        return f"| {r.get('label', key)} | failed: {r['error'][:120]} | - | - | - | - | - |"
    sp = f"{base / r['latency_s']:.2f}x" if base else "-"
    dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
    floor = f"{r['pct_floor']:.0f}%" if "pct_floor" in r else "-"
    wb = f"{r['weight_gib']:.2f}" if "weight_gib" in r else "-"
    return (f"| {r.get('label', key)} | {r['latency_s']:.3f} | {dec} | {sp} | {floor} "
            f"| {wb} | {r.get('peak_mem_gib', NAN):.1f} |")


def ablation_markdown(res: dict) -> str:
    rows = res.get("ablation", {})
    meta = res.get("meta", {})
    base = rows.get("hf_eager", {}).get("latency_s")
    model = meta.get("ablation_model", "llama-7b")
    lines = [f"{MODEL_NAMES.get(model, model)} shapes, random weights, batch 1, input 8, output "
             f"50; {meta.get('gpu', '?')}, {meta.get('date', '?')}; read bandwidth "
             f"{meta.get('read_TBps', NAN):.2f} TB/s measured in the same run.", "",
             "| configuration | latency (s) | decode tok/s | speedup vs HF eager | % of floor |"
             " weight bytes (GiB) | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for key in ABLATION + [k for k in rows if k not in ABLATION]:
        if rows.get(key):
            lines.append(_ablation_row(key, rows[key], base))
    return "\n".join(lines)


def latency_markdown(res: dict) -> list:
    out = []
    for section, title in LATENCY_SECTIONS:
        rows = res.get(section) or {}
        if rows:
            out += ["", f"### {title}", "",
                    "| run | latency (s) | prefill (ms) | decode tok/s | peak mem (GiB) |",
                    "|---|---|---|---|---|"]
            out += [f"| {k} | {r['latency_s']:.3f} | {1e3 * r['prefill_s']:.1f} | "
                    f"{r['decode_tok_s']:.0f} | {r.get('peak_mem_gib', NAN):.1f} |"
                    for k, r in rows.items()]
    return out


def memory_markdown(res: dict) -> list:
    out = []
    for mode, r in (res.get("memory") or {}).items():
        out += ["", "### Memory", "", f"{mode}: weights {r['weight_gib']:.2f} GiB, peak "
                f"{r['peak_mem_gib']:.2f} GiB (torch.cuda.max_memory_allocated) at batch 1 with "
                f"a {r['context']}-token sequence."]
    return out


def profile_markdown(res: dict) -> list:
    prof = res.get("profile") or {}
    if not prof:
        return []
    out = ["", "### Profile (GPU time per kernel category over one generate call, ms)", ""]
    cats = sorted({c for r in prof.values() for c in r["by_category_ms"]})
    out += ["| run | wall | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    out += [f"| {k} | {r['wall_ms']:.1f} | " + " | ".join(
        f"{r['by_category_ms'].get(c, 0.0):.1f}" for c in cats) + " |"
        for k, r in prof.items()]
    return out


def _serving_row(k: str, r: dict) -> str:
    st = r.get("steps") or {}
    dec, mix = st.get("decode"), st.get("mixed")
    return (f"| {k} | {r['num_requests']} | {r['tokens_per_s']:.0f} | "
            f"{r.get('ttft_p50_s', NAN):.2f} / {r.get('ttft_p99_s', NAN):.2f}"
            f" | {1e3 * r.get('tpot_p50_s', NAN):.1f} | {r.get('num_preempted', '-')} | "
            + (f"{dec['ms_per_step']:.1f} ({dec['seqs_per_step']:.0f})" if dec else "-") + " | "
            + (f"{mix['ms_per_step']:.1f} ({mix['tokens_per_step']:.0f})" if mix else "-")
            + " |")


def _serving_notes(serving: dict) -> list:
    out = []
    m = serving.get("mixed")
    if m:
        out += ["", f"Mixed lengths ({m['num_requests']} requests, inputs 32-1024, outputs "
                f"16-512, batch limit {m['max_batch']}): inflight "
                f"{m['inflight']['tokens_per_s']:.0f} tok/s, our static batching "
                f"{m['static_tok_s']:.0f} tok/s ({m['inflight_vs_static']:.2f}x)."]
    for key, what in (("hf_batch32_128_128", "HF padded static batch 32 (input 128, "
                       "output 128)"),
                      ("hf_batch32_128_128_run4", "The same HF baseline in a later call")):
        h = serving.get(key)
        if h:
            out.append(f"{what}: {h['e2e_tok_s']:.0f} tok/s.")
    if "uniform_vs_hf" in serving:
        out.append(f"Ours (uniform_128_128) / HF batch 32 in the same call: "
                   f"{serving['uniform_vs_hf']:.2f}x.")
    if "http_vs_direct" in serving:
        out.append(f"HTTP / LLMEngine directly (the uniform rows, same call): "
                   f"{serving['http_vs_direct']:.3f} (target >= 0.95).")
    pr = serving.get("http_prefix_ratios")
    if pr:
        out.append(f"Prefix reuse over HTTP ({pr['num_requests']} requests, a "
                   f"{pr['prefix']}-token shared prefix + {pr['suffix']}, {pr['output']} out): "
                   f"throughput {pr['throughput_ratio']:.2f}x (target >= 2), mean TTFT "
                   f"{pr['mean_ttft_ratio']:.2f}x (target <= 0.5) of no reuse.")
    hm = serving.get("hf_batch32_mixed")
    if hm:
        out.append(f"HF padded static batch of the first 32 mixed requests: "
                   f"{hm['useful_tok_s']:.0f} useful tok/s.")
    return out


def _poisson_table(pts: dict) -> list:
    if not pts:
        return []
    out = ["", "Poisson arrivals (input 128, output 128):", "",
           "| rate (req/s) | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
           "|---|---|---|---|"]
    for r in sorted(pts.values(), key=lambda r: r["rate_per_s"]):
        out.append(f"| {r['rate_per_s']:g} | {r['tokens_per_s']:.0f} | "
                   f"{1e3 * r['ttft_p50_s']:.0f} / {1e3 * r['ttft_p99_s']:.0f} | "
                   f"{1e3 * r['tpot_p50_s']:.1f} / {1e3 * r['tpot_p99_s']:.1f} |")
    return out


def serving_markdown(res: dict) -> list:
    serving = res.get("serving") or {}
    if not serving:
        return []
    out = ["", "### Inflight batching (fp16 unless the run's name says otherwise)", "",
           "| run | requests | output tok/s | TTFT p50 / p99 (s) | TPOT p50 (ms) | "
           "preempted | decode steps: ms (seqs) | mixed steps: ms (tokens) |",
           "|---|---|---|---|---|---|---|---|"]
    for k, r in serving.items():
        # a mixed row's inflight half; rows without throughput (ratios, HF) are notes below
        r = (r.get("inflight") if isinstance(r, dict) and "inflight" in r else r)
        if isinstance(r, dict) and "tokens_per_s" in r:
            out.append(_serving_row(k, r))
    return out + _serving_notes(serving) + _poisson_table(serving.get("poisson") or {})


def gptfast_markdown(res: dict) -> list:
    """benchmark.py --gptfast: gpt-fast's design against our engine, the same mode, weights and
    prompts in the same process (benchmarks/gptfast.py)."""
    rows = res.get("gptfast") or {}
    if not rows:
        return []
    meta = (res.get("meta") or {}).get("gptfast") or {}
    pre = "compiled" if meta.get("compile_prefill") else "eager"
    how = (f"decode under torch.compile reduce-overhead, prefill {pre}"
           if meta.get("compiled", True) else "not compiled: a CPU dry run")
    out = ["", f"### Against gpt-fast (its design rebuilt in benchmarks/gptfast.py: {how}; "
           f"int4 g{meta.get('int4_group', 128)} on both sides, gpt-fast's through torch's "
           "tinygemm op, in bfloat16 on the GPU)", "",
           "| run | latency (s) gpt-fast / ours | ours faster | prefill (ms) gpt-fast / ours |"
           " decode tok/s gpt-fast / ours | gpt-fast compile (s) | equal greedy tokens |",
           "|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        g, o = r["gptfast"], r["ours"]
        if "error" in g:
            out.append(f"| {k} | failed: {g['error'][:120]} / {o['latency_s']:.3f} | - | - / "
                       f"{1e3 * o['prefill_s']:.1f} | - / {o['decode_tok_s']:.0f} | - | - |")
            continue
        out.append(f"| {k} | {g['latency_s']:.3f} / {o['latency_s']:.3f} | "
                   f"{r['ours_speedup']:.2f}x | {1e3 * g['prefill_s']:.1f} / "
                   f"{1e3 * o['prefill_s']:.1f} | {g['decode_tok_s']:.0f} / "
                   f"{o['decode_tok_s']:.0f} | {g.get('compile_s', NAN):.0f} | "
                   f"{100 * r['token_agreement']:.0f}% (first {r['common_prefix']}) |")
    return out


def speculative_markdown(res: dict) -> list:
    """``--speculative``: the verify step of k+1 tokens against a decode step at batch 1, and
    the tokens per second that SmolLM2's measured acceptance projects from it."""
    spec = res.get("speculative") or {}
    out = []
    for mode, r in spec.items():
        if not isinstance(r, dict) or "verify_ms" not in r:
            continue
        if not out:
            out += ["### Speculative decoding: verify step at batch 1 (projection)", ""]
        out += [f"{mode}: decode step {r['decode_ms']:.3f} ms at context {r.get('context')} "
                f"({r.get('plain_tok_s', NAN):.1f} tok/s), CUDA graphs "
                f"{'yes' if r.get('graphs') else 'no'}", "",
                "| k+1 | verify ms | x decode | tokens/step (SmolLM2, prompt lookup) | "
                "projected tok/s |", "|---|---|---|---|---|"]
        tps, proj = r.get("tokens_per_step") or {}, r.get("projected_tok_s") or {}
        for k1, ms in r["verify_ms"].items():
            k = str(int(k1) - 1)
            out.append(f"| {k1} | {ms:.3f} | {r['ratio'][k1]:.3f} | "
                       f"{tps[k]:.3f} | {proj[k]:.1f} |" if k in tps and k in proj else
                       f"| {k1} | {ms:.3f} | {r['ratio'][k1]:.3f} | - | - |")
        out.append("")
    if out:
        out += ["projected tok/s(k) = tokens per verify step at draft length k (SmolLM2, 50 dev "
                "articles, tools/spec_acceptance.py) x 1000 / verify ms at k+1 tokens: a "
                "projection from two measurements, not a run of a trained 7B model.", ""]
    return out


def sections_markdown(res: dict) -> str:
    """The non-ablation sections as small tables."""
    return "\n".join(latency_markdown(res) + memory_markdown(res) + profile_markdown(res)
                     + serving_markdown(res) + gptfast_markdown(res)
                     + speculative_markdown(res))


def markdown(res: dict) -> str:
    """assets/benchmark.md: the ablation table, then every other section."""
    return ablation_markdown(res) + "\n" + sections_markdown(res)


def write_report(res: dict, assets: str) -> None:
    """benchmark.md (also printed), benchmark.png and serving.png into ``assets``."""
    os.makedirs(assets, exist_ok=True)
    plots.serving_plot(res, os.path.join(assets, "serving.png"))
    md = markdown(res)
    with open(os.path.join(assets, "benchmark.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    plots.ablation_plot(res, os.path.join(assets, "benchmark.png"))
