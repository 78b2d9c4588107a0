#!/usr/bin/env python3
"""Acceptance of speculative decoding on SmolLM2-135M-Instruct: mean tokens per verify step.

For every cnn_dailymail dev article (chat template, greedy, ``--output_len`` tokens) the
engine generates once without speculation. Under greedy decoding speculation outputs exactly
these tokens, so prompt lookup's acceptance for each k follows from them alone: starting at
each step's position, the proposal (``speculative.propose_prompt_lookup`` over prompt +
output so far) is kept up to its first token that differs from the output, and the step
gains that many tokens plus one. This gives every k = 2..8 from one generation per article.
``--check_k`` also runs the real speculative loop (``Engine.generate(speculative=...)``) at
that k on every article and checks both that its output equals the plain one token for token
and that its measured tokens per step equal the computed ones. ``--draft_engine_dir`` runs a
draft engine (e.g. an int4 build of the same model) for real at each of ``--draft_ks``.

Mean tokens per step is (tokens generated) / (verify steps), per article, then averaged over
articles (and pooled: all tokens / all steps). It bounds the speed-up a verify step allows:
speed-up = tokens_per_step * t_decode / t_verify(k+1).

    python tools/spec_acceptance.py                      # 50 articles, k = 2..8, fp32 CPU
    python tools/spec_acceptance.py --num_articles 5 --check_k 4 --out /tmp/acc.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)          # a tool run from anywhere imports the scripts
sys.path.insert(0, os.path.join(REPO, "tools"))

import build  # noqa: E402
from fetch_smollm2 import find_smollm2_gguf  # noqa: E402
from llama_engine.prompts import build_summarize_prompt, load_cnn_dailymail  # noqa: E402
from llama_engine.runner import Engine  # noqa: E402
from llama_engine.speculative import SpeculativeConfig, propose_prompt_lookup  # noqa: E402
from llama_engine.tokenizer import load_tokenizer  # noqa: E402


def simulate_prompt_lookup(prompt: list, output: list, k: int, max_ngram: int = 3) -> int:
    """Verify steps greedy prompt lookup with ``k`` takes to produce ``output`` (the plain
    greedy tokens) after ``prompt``; the first token comes from the prefill, not a step."""
    steps, t, n = 0, 1, len(output)
    while t < n:
        kmax = min(k, n - t - 1)
        draft = propose_prompt_lookup(prompt + output[:t], kmax, max_ngram) if kmax else []
        a = 0
        while a < len(draft) and draft[a] == output[t + a]:
            a += 1
        t += a + 1
        steps += 1
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="default: the fetched SmolLM2 GGUF")
    p.add_argument("--dataset_path", default=os.path.join(
        REPO, "..", "shared", "data", "cnn_dailymail", "test_dev.jsonl"))
    p.add_argument("--num_articles", type=int, default=50)
    p.add_argument("--output_len", type=int, default=100)
    p.add_argument("--max_input_length", type=int, default=923)
    p.add_argument("--ks", default="2,3,4,5,6,7,8")
    p.add_argument("--check_k", type=int, default=0, help="also run the real loop at this k")
    p.add_argument("--draft_engine_dir", default=None)
    p.add_argument("--draft_ks", default="2,4")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--out", default=os.path.join(REPO, "assets", "spec_acceptance.json"))
    a = p.parse_args(argv)
    gguf = a.gguf or find_smollm2_gguf()
    if not gguf:
        print("error: SmolLM2 GGUF not found (tools/fetch_smollm2.py)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    work = tempfile.mkdtemp(prefix="spec_acc_")
    eng_dir = os.path.join(work, "engine")
    assert build.main(["--gguf_file", str(gguf), "--dtype", a.dtype, "--output_dir", eng_dir,
                       "--max_batch_size", "1", "--max_input_len", str(a.max_input_length),
                       "--max_output_len", str(a.output_len)]) == 0
    engine = Engine.from_dir(eng_dir, device="cpu")
    tok = load_tokenizer(eng_dir)
    records = load_cnn_dailymail(a.dataset_path, split="test", limit=a.num_articles)
    prompts = [build_summarize_prompt(r["article"], tok, a.max_input_length,
                                      use_chat_template=True) for r in records]
    ks = [int(x) for x in a.ks.split(",")]
    draft = Engine.from_dir(a.draft_engine_dir, device="cpu") if a.draft_engine_dir else None
    per_k = {k: [] for k in ks}
    pooled = {k: [0, 0] for k in ks}
    checks, draft_rows = [], {}
    t_plain = t_spec = 0.0
    t0 = time.time()
    for i, prompt in enumerate(prompts):
        ts = time.perf_counter()
        out = engine.generate([prompt], a.output_len, end_id=tok.eos_id).output_ids[0]
        t_plain += time.perf_counter() - ts
        for k in ks:
            steps = simulate_prompt_lookup(prompt, out, k)
            if steps:
                per_k[k].append((len(out) - 1) / steps)
            pooled[k][0] += len(out) - 1
            pooled[k][1] += steps
        if a.check_k:
            ts = time.perf_counter()
            r = engine.generate([prompt], a.output_len, end_id=tok.eos_id,
                                speculative=SpeculativeConfig(max_draft_len=a.check_k))
            t_spec += time.perf_counter() - ts
            # the loop counts the step that produced the end id; the simulation stops before it
            checks.append({"equal": r.output_ids[0] == out,
                           "steps": r.num_steps,
                           "simulated": simulate_prompt_lookup(prompt, out, a.check_k)})
        if draft is not None:
            for k in (int(x) for x in a.draft_ks.split(",")):
                r = engine.generate([prompt], a.output_len, end_id=tok.eos_id,
                                    speculative=SpeculativeConfig("draft_tokens_external", k,
                                                                  draft))
                d = draft_rows.setdefault(k, {"equal": 0, "tps": []})
                d["equal"] += r.output_ids[0] == out
                d["tps"].append(r.tokens_per_step)
        print(f"\r{i + 1}/{len(prompts)} articles, {time.time() - t0:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    res = {"model": os.path.basename(str(gguf)), "dtype": a.dtype,
           "articles": len(prompts), "output_len": a.output_len, "chat_template": True,
           "prompt_lookup": {str(k): {"mean_tokens_per_step": statistics.mean(per_k[k]),
                                      "pooled_tokens_per_step": pooled[k][0] / max(pooled[k][1], 1)}
                             for k in ks},
           "plain_s": t_plain}
    if checks:
        res["check"] = {"k": a.check_k, "outputs_equal": sum(c["equal"] for c in checks),
                        "of": len(checks), "spec_s": t_spec,
                        "steps_match": sum(c["steps"] - c["simulated"] in (0, 1)
                                           for c in checks)}
    if draft_rows:
        res["draft"] = {str(k): {"outputs_equal": d["equal"],
                                 "mean_tokens_per_step": statistics.mean(d["tps"])}
                        for k, d in draft_rows.items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("k  mean tokens/step  pooled")
    for k in ks:
        r = res["prompt_lookup"][str(k)]
        print(f"{k}  {r['mean_tokens_per_step']:.3f}  {r['pooled_tokens_per_step']:.3f}")
    print(json.dumps({x: res[x] for x in ("check", "draft") if x in res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
