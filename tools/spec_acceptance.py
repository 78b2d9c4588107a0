#!/usr/bin/env python3
"""Acceptance of speculative decoding on SmolLM2-135M-Instruct: mean tokens per verify step.

For every cnn_dailymail dev article (chat template, greedy, ``--output_len`` tokens) the
target engine generates once without speculation. Under greedy decoding speculation outputs
exactly these tokens, so each proposer's acceptance for every k follows from them alone
(``simulate``: starting at each step's position, the proposal is kept up to its first token
that differs from the output, and the step gains that many tokens plus one):

* prompt lookup: the proposal is ``speculative.propose_prompt_lookup`` over prompt + output
  so far;
* a draft model (``--draft_mode``): a greedy draft proposes its argmax after the accepted
  tokens, and while its proposals agree with the output it is fed the output itself, so the
  draft's run of agreement from position t is the run of positions j >= t where its argmax
  after prompt + output[:j] is output[j]. One teacher-forced forward of the draft over prompt
  + output (``ModelRunner.forward``) gives that for every position and every k.

``--check_k`` also runs the real speculative loop (``Engine.generate(speculative=...)``) at
that k, for prompt lookup and each draft, on the first ``--check_articles``, and checks that its output equals the plain one token for token and
that its step count equals the simulated one (the real loop's draft runs its decode path, the
simulation its prefill path: a near-tie may round differently, so a step count may differ).

Draft modes, each an engine built from the same GGUF (``DRAFT_MODES``): ``q4_1_kept`` (the
GGUF's Q4_1 linears as they are: the *same* weights as the target, which is built from the
dequantized GGUF), ``int4_g32_zp`` (int4 group 32 with zero points quantized from the
dequantized weights: the Q4_1 grid again, so nearly the same weights), and the ones that
differ: ``int4_g64`` (int4 RTN group 64, symmetric; SmolLM2's width 576 takes no group 128)
and ``int8`` (weight-only int8 per channel). ``--draft_engine_dir`` adds an engine built elsewhere.

Mean tokens per step is (tokens generated) / (verify steps), per article, then averaged over
articles (and pooled: all tokens / all steps). It bounds the speed-up a verify step allows:
prompt lookup: tokens_per_step * t_decode / t_verify(k+1); a draft model:
tokens_per_step * t_decode / (k * t_draft_decode + t_verify(k+1)).

    python tools/spec_acceptance.py                      # 50 articles, k = 2..8, fp32 CPU
    python tools/spec_acceptance.py --num_articles 5 --check_k 4 --out /tmp/acc.json
    python tools/spec_acceptance.py --draft_mode q4_1_kept,int4_g64,int8 --check_k 4 \\
        --check_articles 3 --out assets/spec_acceptance_draft.json
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
from llama_engine.kv_cache import static_block_tables  # noqa: E402
from llama_engine.prompts import build_summarize_prompt, load_cnn_dailymail  # noqa: E402
from llama_engine.runner import Engine  # noqa: E402
from llama_engine.speculative import SpeculativeConfig, propose_prompt_lookup  # noqa: E402
from llama_engine.tokenizer import load_tokenizer  # noqa: E402

DRAFT_MODES = {
    "q4_1_kept": ["--keep_gguf_quantization"],
    "int4_g32_zp": ["--use_weight_only", "--weight_only_precision", "int4", "--group_size",
                    "32", "--has_zero_point"],
    "int4_g64": ["--use_weight_only", "--weight_only_precision", "int4", "--group_size", "64"],
    "int8": ["--use_weight_only", "--weight_only_precision", "int8"],
}


def simulate(n: int, k: int, run_length) -> int:
    """Verify steps to produce ``n`` output tokens when a step at position t (tokens output so
    far) proposes at most min(k, n - t - 1) and ``run_length(t, kmax)`` of them agree with
    the output; the first token comes from the prefill, not a step."""
    steps, t = 0, 1
    while t < n:
        kmax = min(k, n - t - 1)
        t += (run_length(t, kmax) if kmax else 0) + 1
        steps += 1
    return steps


def simulate_prompt_lookup(prompt: list, output: list, k: int, max_ngram: int = 3) -> int:
    """Verify steps greedy prompt lookup with ``k`` takes to produce ``output`` (the plain
    greedy tokens) after ``prompt``."""
    def run(t, kmax):
        draft = propose_prompt_lookup(prompt + output[:t], kmax, max_ngram)
        a = 0
        while a < len(draft) and draft[a] == output[t + a]:
            a += 1
        return a
    return simulate(len(output), k, run)


def simulate_draft(agree: list, k: int) -> int:
    """Verify steps a greedy draft with ``k`` takes; ``agree[j]``: the draft's argmax after
    prompt + output[:j] is output[j] (``agree[0]`` unused: the prefill's token)."""
    n = len(agree)
    # run[j]: how many positions from j on agree in a row
    run = [0] * (n + 1)
    for j in range(n - 1, -1, -1):
        run[j] = run[j + 1] + 1 if agree[j] else 0
    return simulate(n, k, lambda t, kmax: min(run[t], kmax))


@torch.inference_mode()
def draft_agreement(draft: Engine, prompt: list, output: list) -> list:
    """Teacher-forced: per output position j, whether the draft's argmax after prompt +
    output[:j] is output[j]."""
    seq = prompt + output[:-1]
    cache = draft.kv_cache(1, len(seq))
    tables = static_block_tables(1, len(seq), draft.block_size, draft.device)
    n = len(seq)
    positions = torch.arange(n)
    pred = draft.runner.forward(   # logits of the output positions only
        torch.tensor(seq), positions, torch.zeros_like(positions), tables, [n], [n], False,
        torch.arange(len(prompt) - 1, n), cache).argmax(-1).tolist()
    return [p == t for p, t in zip(pred, output)]


def build_engine(gguf: str, out_dir: str, dtype: str, extra: list, max_in: int,
                 max_out: int) -> Engine:
    assert build.main(["--gguf_file", gguf, "--dtype", dtype, "--output_dir", out_dir,
                       "--max_batch_size", "1", "--max_input_len", str(max_in),
                       "--max_output_len", str(max_out)] + extra) == 0
    return Engine.from_dir(out_dir, device="cpu")


def per_k_stats(counts: dict) -> dict:
    """{k: [(tokens, steps) per article]} -> {k: mean and pooled tokens per step}."""
    return {str(k): {"mean_tokens_per_step": statistics.mean(t / s for t, s in rows if s),
                     "pooled_tokens_per_step": sum(t for t, _ in rows)
                     / max(sum(s for _, s in rows), 1)}
            for k, rows in counts.items()}


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
    p.add_argument("--check_articles", type=int, default=3,
                   help="with --check_k: how many articles run the real loop")
    p.add_argument("--draft_mode", default="",
                   help=f"comma-separated drafts built from the GGUF: {', '.join(DRAFT_MODES)}")
    p.add_argument("--draft_engine_dir", default=None, help="one more draft, built elsewhere")
    p.add_argument("--outputs", default=None,
                   help="a JSON file of the plain outputs: read if it exists (skips the "
                        "target's generation), else written")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--out", default=os.path.join(REPO, "assets", "spec_acceptance.json"))
    a = p.parse_args(argv)
    gguf = a.gguf or find_smollm2_gguf()
    if not gguf:
        print("error: SmolLM2 GGUF not found (tools/fetch_smollm2.py)", file=sys.stderr)
        return 2
    modes = [m for m in a.draft_mode.split(",") if m]
    bad = [m for m in modes if m not in DRAFT_MODES]
    if bad:
        print(f"error: --draft_mode {bad[0]!r}: choose from {', '.join(DRAFT_MODES)}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    work = tempfile.mkdtemp(prefix="spec_acc_")
    span = (a.max_input_length, a.output_len + 16)   # drafts: room for k ahead
    engine = build_engine(str(gguf), os.path.join(work, "engine"), a.dtype, [], *span)
    tok = load_tokenizer(os.path.join(work, "engine"))
    records = load_cnn_dailymail(a.dataset_path, split="test", limit=a.num_articles)
    prompts = [build_summarize_prompt(r["article"], tok, a.max_input_length,
                                      use_chat_template=True) for r in records]
    ks = [int(x) for x in a.ks.split(",")]
    drafts = {m: build_engine(str(gguf), os.path.join(work, m), a.dtype, DRAFT_MODES[m], *span)
              for m in modes}
    if a.draft_engine_dir:
        drafts["engine_dir"] = Engine.from_dir(a.draft_engine_dir, device="cpu")

    outs = None
    if a.outputs and os.path.isfile(a.outputs):
        with open(a.outputs) as f:
            outs = json.load(f)["outputs"][:len(prompts)]
        if len(outs) < len(prompts):
            outs = None
    t_plain, t0 = 0.0, time.time()
    if outs is None:
        outs = []
        for i, prompt in enumerate(prompts):
            ts = time.perf_counter()
            outs.append(engine.generate([prompt], a.output_len, end_id=tok.eos_id)
                        .output_ids[0])
            t_plain += time.perf_counter() - ts
            print(f"plain {i + 1}/{len(prompts)} articles, {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
        if a.outputs:
            with open(a.outputs, "w") as f:
                json.dump({"dtype": a.dtype, "output_len": a.output_len, "outputs": outs}, f)

    lookup = {k: [] for k in ks}
    by_draft = {m: {k: [] for k in ks} for m in drafts}
    agree_rate = {m: [] for m in drafts}
    checks: dict = {}

    def save(done: int) -> dict:
        """Write the results over the first ``done`` articles (after each one: a run cut
        short keeps what it measured)."""
        res = {"model": os.path.basename(str(gguf)), "dtype": a.dtype,
               "articles": done, "output_len": a.output_len, "chat_template": True,
               "prompt_lookup": per_k_stats(lookup)}
        if drafts:
            res["draft"] = {m: {"build_flags": " ".join(DRAFT_MODES.get(m, ["--draft_engine_dir"])),
                                "argmax_agreement": statistics.mean(agree_rate[m]),
                                **per_k_stats(by_draft[m])} for m in drafts}
        if t_plain:
            res["plain_s"] = t_plain
        if checks:
            # The real loop counts the step that produced the end id; the simulation stops
            # before it, so a difference of one is the same run.
            res["check"] = {m: {**{x: c[x] for x in ("k", "outputs_equal", "of")},
                                "steps_match": sum(s - t in (0, 1) for s, t in
                                                   zip(c["steps"], c["simulated"]))}
                            for m, c in checks.items()}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return res

    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        n = len(out)
        for k in ks:
            lookup[k].append((n - 1, simulate_prompt_lookup(prompt, out, k)))
        for m, d in drafts.items():
            agree = draft_agreement(d, prompt, out)
            agree_rate[m].append(sum(agree[1:]) / max(n - 1, 1))
            for k in ks:
                by_draft[m][k].append((n - 1, simulate_draft(agree, k)))
            if a.check_k and i < a.check_articles:
                r = engine.generate([prompt], a.output_len, end_id=tok.eos_id,
                                    speculative=SpeculativeConfig("draft_tokens_external",
                                                                  a.check_k, d))
                c = checks.setdefault(m, {"k": a.check_k, "outputs_equal": 0, "of": 0,
                                          "steps": [], "simulated": []})
                c["outputs_equal"] += r.output_ids[0] == out
                c["of"] += 1
                c["steps"].append(r.num_steps)
                c["simulated"].append(simulate_draft(agree, a.check_k))
        if a.check_k and i < a.check_articles:
            r = engine.generate([prompt], a.output_len, end_id=tok.eos_id,
                                speculative=SpeculativeConfig(max_draft_len=a.check_k))
            c = checks.setdefault("prompt_lookup", {"k": a.check_k, "outputs_equal": 0,
                                                    "of": 0, "steps": [], "simulated": []})
            c["outputs_equal"] += r.output_ids[0] == out
            c["of"] += 1
            c["steps"].append(r.num_steps)
            c["simulated"].append(simulate_prompt_lookup(prompt, out, a.check_k))
        save(i + 1)
        print(f"acceptance {i + 1}/{len(prompts)} articles, {time.time() - t0:.0f}s",
              file=sys.stderr, flush=True)
    res = save(len(prompts))
    names = ["prompt_lookup"] + list(drafts)
    print("mean tokens/step (pooled)")
    print("k  " + "  ".join(f"{m:>20}" for m in names))
    for k in ks:
        cells = [res["prompt_lookup"][str(k)]] + [res["draft"][m][str(k)] for m in drafts]
        print(f"{k}  " + "  ".join(f"{c['mean_tokens_per_step']:>11.3f} ({c['pooled_tokens_per_step']:.3f})"
                                   for c in cells))
    if checks:
        print(json.dumps(res["check"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
