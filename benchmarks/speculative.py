"""The speculative-decoding section of benchmark.py (``--speculative``).

* **Step cost at batch 1, per mode.** The engine prefills one random prompt of ``context``
  tokens, then times a decode step (``ModelRunner.decode``) and verify steps of k+1 = 2..9
  tokens (``ModelRunner.verify``) at the same context, each replayed from its CUDA graph
  (captured on the first call; ``graphs`` in the result says whether every timed step
  replayed one), as the mean over ``reps`` back-to-back steps after warm-up (the tokens are
  on the device beforehand, so nothing waits on the host). ``loop_ms`` times the verify step
  as the speculative loop runs it: the step, then the one ``.tolist()`` of its argmax.
* **Projection.** Random weights cannot measure acceptance, so tokens per step come from
  ``tools/spec_acceptance.py``'s JSON files (SmolLM2): prompt lookup,
  tok/s(k) = tokens_per_step(k) / t_verify(k+1); a draft engine (``draft``: the timed mode
  whose decode step the draft costs, and the acceptance entry it is measured by),
  tok/s(k) = tokens_per_step(k) / (k * t_decode(draft) + t_verify(k+1)) (the draft catches
  up on the accepted tokens in one step and decodes k-1 more: k draft steps per verify).
  Against plain decoding's 1 / t_decode. A projection from two measurements, not a run.
* **Batch 32 under inflight batching** (``serving_rows``): ``batch`` requests at once
  (prompts of ``context`` tokens that repeat a 32-token phrase, so prompt lookup always has
  something to propose; output lengths mixed around ``output_len``, end id ignored) through
  ``LLMEngine`` with speculation off, on with the default ``--speculative_max_batch_size``
  (large steps decode plainly) and on in every step (the cost speculation would have
  without that limit); output tokens per second of each, in the same call.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Optional

import torch

from llama_engine.kv_cache import static_block_tables
from llama_engine.serving.llm_engine import LLMEngine
from llama_engine.speculative import DEFAULT_MAX_BATCH_SIZE, SpeculativeConfig

from .device import free_memory, random_prompts, sync
from .weights import Weights

WIDTHS = tuple(range(2, 10))       # k + 1 = 2..9
DEFAULT_DRAFT = "int4:int4_g64"    # the draft's cost: int4's decode step; acceptance: int4_g64


def time_steps(engine, context: int, widths=WIDTHS, reps: int = 50) -> dict:
    """-> {"decode_ms": t, "verify_ms": {k+1: t}, "loop_ms": {k+1: t}, "graphs": bool} at
    batch 1 after ``context`` tokens."""
    dev, runner = engine.device, engine.runner
    engine.enable_cuda_graphs()
    max_seq = context + max(widths) + 1
    cache = engine.kv_cache(1, max_seq)
    tables = static_block_tables(1, max_seq, engine.block_size, dev)
    vocab = engine.config.model.vocab_size
    engine.prefill(random_prompts(1, context, vocab), cache, tables)
    ctx = torch.tensor([context], dtype=torch.int32, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = torch.randint(3, vocab, (reps + 4, max(widths)), generator=gen).to(dev)

    def step(i: int, width: int):
        tokens = pool[i % pool.shape[0], :width].unsqueeze(0)
        if width == 1:
            return runner.decode(tokens[:, 0], ctx.clone(), tables, cache)
        return runner.verify(tokens, ctx, tables, cache)

    def timed(width: int, host: bool = False) -> float:
        for i in range(3):               # capture + warm-up
            step(i, width)
        sync(dev)
        t0 = time.perf_counter()
        for i in range(reps):
            logits = step(i, width)
            if host:                     # the loop's one host sync per step
                logits.argmax(dim=-1).tolist()
        sync(dev)
        return 1e3 * (time.perf_counter() - t0) / reps

    decode = timed(1)
    verify = {w: timed(w) for w in widths}
    loop = {w: timed(w, host=True) for w in widths}
    decode = min(decode, timed(1))       # again after the others: clocks and caches warm
    width = tables.shape[1]
    graphs = runner._static_graphs.get(width) if dev.type == "cuda" else None
    replayed = graphs is not None and all(w in graphs.graphs for w in (1,) + tuple(widths))
    return {"context": context, "decode_ms": decode, "verify_ms": verify, "loop_ms": loop,
            "ratio": {w: v / decode for w, v in verify.items()}, "graphs": replayed}


def acceptance(paths: Optional[str]) -> dict:
    """tools/spec_acceptance.py's JSON files (comma-separated; missing ones skipped) ->
    {"prompt_lookup": {k: pooled tokens/step}, "draft": {name: {k: ...}}}; later files add
    to earlier ones."""
    out: dict = {"prompt_lookup": {}, "draft": {}}
    for path in (paths or "").split(","):
        if not path or not os.path.isfile(path):
            continue
        with open(path) as f:
            doc = json.load(f)
        for k, r in doc.get("prompt_lookup", {}).items():
            out["prompt_lookup"].setdefault(int(k), r["pooled_tokens_per_step"])
        for name, rows in doc.get("draft", {}).items():
            out["draft"][name] = {int(k): r["pooled_tokens_per_step"] for k, r in rows.items()
                                  if k.isdigit()}
    return out


def project(r: dict, tps: dict, draft_ms: Optional[float] = None) -> dict:
    """k -> projected tok/s: tps[k] / (k * draft_ms + t_verify(k+1)) (draft_ms None: prompt
    lookup, no draft cost)."""
    return {k: t * 1e3 / ((k * draft_ms if draft_ms else 0.0) + r["verify_ms"][k + 1])
            for k, t in tps.items() if k + 1 in r["verify_ms"]}


def run_speculative(model_config: str, modes: list, device: str, engine_kw: dict,
                    context: int, acceptance_json: Optional[str], reps: int = 50,
                    draft: str = DEFAULT_DRAFT, batch: int = 32, output_len: int = 128,
                    max_draft_len: int = 4) -> dict:
    """The section: per mode the step timings and projected tokens/s; then the batch rows."""
    weights = Weights(model_config, device, engine_kw=engine_kw)
    acc = acceptance(acceptance_json)
    draft_mode, _, draft_acc = draft.partition(":")
    out: dict = {}
    for mode in modes:
        engine = weights.engine(mode, 1, context + 16, 16)
        out[mode] = time_steps(engine, context, reps=reps)
        del engine
        free_memory(device)
    for mode, r in out.items():
        r["plain_tok_s"] = 1e3 / r["decode_ms"]
        r["tokens_per_step"] = acc["prompt_lookup"]
        r["projected_tok_s"] = project(r, acc["prompt_lookup"])
        d_tps = acc["draft"].get(draft_acc)
        if draft_mode in out and draft_mode != mode and d_tps:
            d_ms = out[draft_mode]["decode_ms"]
            r["draft"] = {"engine": draft_mode, "acceptance": draft_acc, "decode_ms": d_ms,
                          "tokens_per_step": d_tps, "projected_tok_s": project(r, d_tps, d_ms)}
        print(format_rows(mode, r), flush=True)
    if batch:
        out["serving"] = serving_rows(weights, modes[0], batch, context, output_len,
                                      max_draft_len)
        print(format_serving(modes[0], out["serving"]), flush=True)
    return out


def repeating_prompts(n: int, length: int, vocab: int) -> list:
    """``n`` prompts of ``length`` tokens, each a random 32-token phrase over and over."""
    return [(p * (length // 32 + 1))[:length] for p in random_prompts(n, 32, vocab, seed=5)]


def serving_rows(weights: Weights, mode: str, batch: int, context: int, output_len: int,
                 k: int) -> dict:
    """``batch`` requests at once through LLMEngine: speculation off, on with the default
    batch limit, on at every batch size. -> {row: tok/s, steps, tokens per step}."""
    dev = weights.device
    rng = random.Random(7)
    outs = [rng.randint(max(1, output_len // 2), output_len * 3 // 2) for _ in range(batch)]
    prompts = repeating_prompts(batch, context, weights.args.vocab_size)
    rows_max = max(batch, DEFAULT_MAX_BATCH_SIZE * (k + 1))  # verify rows replay graphs
    engine = weights.engine(mode, rows_max, context + 16, max(outs) + k + 16)
    specs = {"off": None,
             f"on (max batch {DEFAULT_MAX_BATCH_SIZE})": SpeculativeConfig(max_draft_len=k),
             "on (every step)": SpeculativeConfig(max_draft_len=k, max_batch_size=batch)}
    res: dict = {"batch": batch, "context": context, "output_tokens": sum(outs), "k": k}
    for name, spec in specs.items():
        llm = LLMEngine(engine, max_batch_size=rows_max, speculative=spec)
        llm.generate(prompts[:2], 4)                   # warm-up (graphs, kernels)
        if llm.speculation is not None:
            llm.speculation.reset_stats()
        sync(dev)
        t0 = time.perf_counter()
        seqs = llm.generate(prompts, outs)
        sync(dev)
        wall = time.perf_counter() - t0
        row = {"tok_s": sum(len(s.output_ids) for s in seqs) / wall, "wall_s": wall}
        if llm.speculation is not None:
            st = llm.speculation.stats
            row.update(verify_steps=st["verify_steps"], plain_steps=st["plain_steps"],
                       tokens_per_step=llm.speculation.tokens_per_step)
        res[name] = row
        del llm
        free_memory(dev)
    return res


def format_rows(mode: str, r: dict) -> str:
    lines = [f"{mode}: decode step {r['decode_ms']:.3f} ms at context {r['context']} "
             f"({r['plain_tok_s']:.1f} tok/s), CUDA graphs: {'yes' if r['graphs'] else 'no'}",
             "  k+1  verify ms  x decode  +tolist ms  tokens/step  projected tok/s"]
    for w, v in r["verify_ms"].items():
        k = w - 1
        tps = r["tokens_per_step"].get(k)
        proj = r["projected_tok_s"].get(k)
        lines.append(f"  {w:>3}  {v:9.3f}  {r['ratio'][w]:8.3f}  {r['loop_ms'][w]:10.3f}  "
                     f"{'' if tps is None else f'{tps:11.3f}':>11}  "
                     f"{'' if proj is None else f'{proj:15.1f}':>15}")
    lines.append("  prompt lookup: projected tok/s(k) = tokens_per_step(k) [SmolLM2, "
                 "pooled] * 1000 / verify_ms(k+1)")
    d = r.get("draft")
    if d:
        lines.append(f"  draft engine {d['engine']} (decode {d['decode_ms']:.3f} ms), "
                     f"acceptance of SmolLM2's {d['acceptance']} draft:")
        lines.append("  projected tok/s(k) = tokens_per_step(k) * 1000 / "
                     "(k * draft decode_ms + verify_ms(k+1))")
        for k, t in d["projected_tok_s"].items():
            lines.append(f"    k={k}: {d['tokens_per_step'][k]:.3f} tokens/step * 1000 / "
                         f"({k} * {d['decode_ms']:.3f} + {r['verify_ms'][k + 1]:.3f}) = "
                         f"{t:.1f} tok/s")
    return "\n".join(lines)


def format_serving(mode: str, r: dict) -> str:
    lines = [f"{mode}, inflight batching: {r['batch']} requests at once, prompts of "
             f"{r['context']} tokens, {r['output_tokens']} output tokens, prompt lookup k="
             f"{r['k']}",
             "  speculation           tok/s   wall s  verify steps  plain steps  tokens/step"]
    for name, row in r.items():
        if not isinstance(row, dict):
            continue
        extra = (f"  {row['verify_steps']:>12}  {row['plain_steps']:>11}  "
                 f"{row['tokens_per_step']:>11.3f}" if "verify_steps" in row else "")
        lines.append(f"  {name:<20} {row['tok_s']:7.1f}  {row['wall_s']:7.2f}{extra}")
    return "\n".join(lines)
