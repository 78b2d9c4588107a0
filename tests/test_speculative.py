"""Speculative decoding (llama_engine/speculative.py, serving/speculation.py): the prompt-lookup
proposal, the acceptance rules (greedy; rejection sampling checked statistically against the
target distribution), the KV rollback, and exactness: greedy outputs with speculation equal
those without, token for token, static and inflight (float64 tiny models; SmolLM2 on real
articles through summarize.py)."""
from __future__ import annotations

import json
import random

import pytest
import torch

import summarize
from llama_engine.config import ConfigError
from llama_engine.serving.block_manager import BlockManager
from llama_engine.serving.sequence import Sequence
from llama_engine.speculative import (SpeculativeConfig, accept_greedy, accept_sampled,
                                      propose_prompt_lookup)

BLOCK = 4
MAX_IN, MAX_OUT = 48, 24


# -- proposals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,k,expected", [
    ([1, 2, 3, 4, 1, 2], 2, [3, 4]),            # the trigram misses, the bigram 1 2 matches
    ([1, 2, 3, 4, 1, 2], 5, [3, 4, 1, 2]),      # continuation stops at the end
    ([5, 1, 2, 7, 8, 1, 2, 9, 1, 2], 1, [9]),   # the latest earlier occurrence wins
    ([7, 1, 2, 3, 9, 4, 2, 3], 3, [9, 4, 2]),   # longest n first: "2 3" beats "3"
    ([1, 2, 3], 3, []),                         # nothing repeats
    ([4, 4, 4], 2, [4]),                        # an overlapping match
    ([], 3, []), ([5], 3, []),
])
def test_prompt_lookup_proposals(tokens, k, expected):
    assert propose_prompt_lookup(tokens, k) == expected


def test_prompt_lookup_ngram_limits():
    toks = [8, 1, 2, 3, 5, 6, 9, 2, 3]
    assert propose_prompt_lookup(toks, 2, max_ngram=3) == [5, 6]
    assert propose_prompt_lookup(toks, 2, max_ngram=3, min_ngram=3) == []
    assert propose_prompt_lookup(toks, 0) == []


def test_config_rejects_bad_settings():
    for kw in (dict(mode="medusa"), dict(max_draft_len=0), dict(min_ngram=0),
               dict(mode="draft_tokens_external"), dict(draft_engine=object())):
        with pytest.raises(ConfigError):
            SpeculativeConfig(**kw)


# -- acceptance rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("draft,target,expected", [
    ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),    # all accepted, plus the bonus token
    ([5, 6, 7], [5, 9, 7, 8], [5, 9]),          # the first disagreement ends the step
    ([5, 6], [4, 6, 1], [4]),                   # nothing accepted: the target's token
    ([], [3], [3]),                             # no proposal: a plain decode
])
def test_accept_greedy(draft, target, expected):
    assert accept_greedy(draft, target) == expected


def _dist(logits, temperature=1.5, top_k=8):
    from llama_engine.sampling import SamplingConfig, probabilities
    p = probabilities(logits, SamplingConfig(temperature=temperature, top_k=top_k))
    return p / p.sum(-1, keepdim=True)


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize("with_q", [False, True], ids=["point-mass-draft", "draft-model"])
def test_rejection_sampling_matches_target_distribution(tiny_engine, with_q):
    """On the tiny model's real logits (top-k 8, so 20000 draws pin the distribution): the
    first output token is distributed as the target's p0, and the second (present when the
    first proposal was kept) as p1. An always-accept rule, or one ignoring q, fails this."""
    logits = tiny_engine.forward_logits([11, 42, 7, 300, 5, 77, 123, 9])[-3:]
    p = _dist(logits)
    ranked = p[0].argsort(descending=True).tolist()
    draft = [ranked[3], int(p[1].argmax())]     # a likely-rejected first token, then a good one
    q = None
    if with_q:  # a draft model that is wrong in a different way
        q = _dist(logits[:2].flip(-1) * 0.5 + logits[:2] * 0.5, temperature=1.0, top_k=16)
    gen = torch.Generator().manual_seed(0)
    n, vocab = 20000, p.shape[-1]
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(n):
        if with_q:  # the draft model samples its proposals from q
            draft = torch.multinomial(q, 1, generator=gen)[:, 0].tolist()
        out = accept_sampled(draft, p, q, gen)
        first[out[0]] += 1
        if len(out) > 1:   # the first proposal was kept
            second[out[1]] += 1
    assert _tv(first, p[0]) < 0.02, _tv(first, p[0])
    # Given the first proposal, the second position's output follows p1.
    assert second.sum() > 1000
    assert _tv(second, p[1]) < 0.04, _tv(second, p[1])


# -- tiny engines ---------------------------------------------------------------------------------
def _tiny(dtype="float64", seed=0):
    import weight
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, PRESETS, QuantConfig
    from llama_engine.runner import Engine
    args = ModelArgs(**PRESETS["tiny"])
    sd = weight.random_weights(args, dtype, seed=seed)
    sd = {k: (v * 4 if v.dim() == 2 else v) for k, v in sd.items()}
    build = BuildConfig(max_batch_size=4, max_input_len=MAX_IN, max_output_len=MAX_OUT,
                        tokens_per_block=BLOCK, use_inflight_batching=True, paged_kv_cache=True)
    cfg = EngineConfig(model=args, quant=QuantConfig(), build=build, dtype=dtype)
    torch.set_num_threads(1)
    return Engine.from_tensors(cfg, ckpt.hf_to_unified(sd, args), "cpu")


@pytest.fixture(scope="module")
def tiny_engine():
    return _tiny()


@pytest.fixture(scope="module")
def draft_same(tiny_engine):
    return _tiny()          # the same weights: every proposal is right


@pytest.fixture(scope="module")
def draft_other():
    return _tiny(seed=1)    # other weights: proposals mostly wrong


def _prompts(n, seed=0, vocab=40):
    # A small id range makes repeats (prompt-lookup matches) common.
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, MAX_IN))] for _ in range(n)]


def _specs(request, names):
    out = {"lookup-k1": SpeculativeConfig(max_draft_len=1),
           "lookup-k4": SpeculativeConfig(max_draft_len=4),
           "lookup-k8": SpeculativeConfig(max_draft_len=8)}
    if "draft-same" in names:
        out["draft-same"] = SpeculativeConfig("draft_tokens_external", 3,
                                              request.getfixturevalue("draft_same"))
    if "draft-other" in names:
        out["draft-other"] = SpeculativeConfig("draft_tokens_external", 3,
                                               request.getfixturevalue("draft_other"))
    return {k: v for k, v in out.items() if k in names}


ALL = ("lookup-k1", "lookup-k4", "lookup-k8", "draft-same", "draft-other")


@pytest.mark.parametrize("name", ALL)
def test_static_greedy_equals_plain(tiny_engine, request, name):
    spec = _specs(request, [name])[name]
    prompts = _prompts(4, seed=2)
    for end_id in (None, 17):
        ref = tiny_engine.generate(prompts, MAX_OUT, end_id=end_id)
        out = tiny_engine.generate(prompts, MAX_OUT, end_id=end_id, speculative=spec)
        assert out.output_ids == ref.output_ids
        assert out.num_generated_tokens == ref.num_generated_tokens
        assert out.num_emitted >= out.num_steps > 0
    if name == "draft-same":
        assert out.num_accepted == out.num_proposed > 0   # a perfect draft is always kept
    else:
        assert out.num_accepted < out.num_proposed


def test_static_streamer_sees_every_position(tiny_engine):
    prompts = _prompts(3, seed=4)
    plain, spec = [], []
    tiny_engine.generate(prompts, 12, end_id=17, streamer=lambda i, t: plain.append((i, t)))
    tiny_engine.generate(prompts, 12, end_id=17, streamer=lambda i, t: spec.append((i, t)),
                         speculative=SpeculativeConfig(max_draft_len=4))
    assert [i for i, _ in spec] == list(range(len(spec)))
    # Positions both reached agree (the plain loop may run on past every row's end id).
    assert spec == plain[:len(spec)]


def _cached(runner, table, length):
    from llama_engine.attention import gather_context
    c = runner.cache
    return [gather_context(t, table, length, None, torch.float64) for t in c.k + c.v]


def test_static_kv_rollback_leaves_cache_as_plain(tiny_engine):
    """After a speculative run, every sequence's cached K/V (the positions a later step would
    read) equals a plain run's: rejected proposals left nothing behind that counts."""
    from llama_engine.kv_cache import static_block_tables
    prompts = _prompts(2, seed=5)
    n_out = 20

    def snapshot(spec):
        out = tiny_engine.generate(prompts, n_out, speculative=spec)
        extra = spec.max_draft_len if spec else 0
        max_seq = max(map(len, prompts)) + n_out + extra
        tables = static_block_tables(len(prompts), max_seq, BLOCK, "cpu")
        return [_cached(tiny_engine.runner, tables[b], len(p) + n_out - 1)
                for b, p in enumerate(prompts)], out
    plain, _ = snapshot(None)
    spec, out = snapshot(SpeculativeConfig(max_draft_len=4))
    assert out.num_accepted < out.num_proposed      # some proposals were rolled back
    for a, b in zip(plain, spec):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_static_sampling_runs_and_is_seeded(tiny_engine):
    from llama_engine.sampling import SamplingConfig
    s = SamplingConfig(temperature=1.0, top_k=20, seed=3)
    spec = SpeculativeConfig(max_draft_len=3)
    a = tiny_engine.generate(_prompts(2), 16, s, speculative=spec)
    b = tiny_engine.generate(_prompts(2), 16, s, speculative=spec)
    assert a.output_ids == b.output_ids and all(len(r) == 16 for r in a.output_ids)


def _count_syncs(monkeypatch) -> list:
    """Count the host reads of device values (``.tolist()`` and ``.item()``) outside the
    kernels (the CPU reference attention reads its longest context; on CUDA the decode
    kernel, replayed from a graph, does not)."""
    import sys
    calls = []
    for name in ("tolist", "item"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **kw):
            where = sys._getframe(1).f_code.co_filename
            if "llama_engine/kernels/" not in where.replace("\\", "/"):
                calls.append((_name, where))
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


@pytest.mark.parametrize("name", ("lookup-k4", "draft-same", "draft-other"))
def test_static_greedy_one_host_sync_per_verify(tiny_engine, request, monkeypatch, name):
    """The greedy loop reads the device once per verify step (plus once after the prefill);
    a draft engine reads its k proposals back once per step, not once per draft token."""
    spec = _specs(request, [name])[name]
    prompt = _prompts(1, seed=4)
    calls = _count_syncs(monkeypatch)
    out = tiny_engine.generate(prompt, MAX_OUT, speculative=spec)
    per_step = 1 if name.startswith("lookup") else 2
    assert out.num_steps > 0
    assert 1 + out.num_steps <= len(calls) <= 1 + per_step * out.num_steps


def test_inflight_greedy_step_syncs_once(tiny_engine, monkeypatch):
    """A speculative step over several greedy sequences reads their argmax back in one go."""
    eng = _llm(tiny_engine, SpeculativeConfig(max_draft_len=4))
    stepper = eng.speculation
    per_call = []
    orig = stepper.step

    def step(out):
        calls = _count_syncs(monkeypatch)
        done = orig(out)
        if done:      # a step without proposals returns before the verify (and its sync)
            per_call.append((len(out.seqs), len(calls)))
        monkeypatch.undo()
        return done
    stepper.step = step
    eng.generate(_prompts(3, seed=5), 10)
    assert any(n > 1 for n, _ in per_call)
    assert all(c == 1 for _, c in per_call), per_call


# -- inflight batching ------------------------------------------------------------------------------
def _llm(engine, spec, **kw):
    from llama_engine.serving import LLMEngine
    kw.setdefault("max_num_tokens", 16)
    kw.setdefault("max_kv_cache_tokens", 4 * (MAX_IN + MAX_OUT))
    return LLMEngine(engine, speculative=spec, **kw)


@pytest.mark.parametrize("name", ("lookup-k4", "draft-same", "draft-other"))
@pytest.mark.parametrize("kv_tokens", [4 * (MAX_IN + MAX_OUT), MAX_IN + MAX_OUT],
                         ids=["roomy-cache", "tiny-cache-preempts"])
def test_inflight_greedy_equals_alone(tiny_engine, request, name, kv_tokens):
    spec = _specs(request, [name])[name]
    prompts = _prompts(8, seed=1)
    limits = [random.Random(i).randint(1, MAX_OUT) for i in range(len(prompts))]
    alone = [tiny_engine.generate([p], m).output_ids[0] for p, m in zip(prompts, limits)]
    eng = _llm(tiny_engine, spec, max_kv_cache_tokens=kv_tokens)
    seqs = eng.generate(prompts, limits, stop_ids=[17])
    for seq, ref in zip(seqs, alone):
        ref = ref[:ref.index(17)] if 17 in ref else ref
        assert seq.output_ids == ref
    st = eng.speculation.stats
    assert st["verify_steps"] > 0 and st["emitted"] >= st["seq_steps"]
    if name != "draft-other":   # a wrong draft may never be right; the others help
        assert st["emitted"] > st["seq_steps"]
    if kv_tokens == MAX_IN + MAX_OUT:
        assert eng.scheduler.num_preemptions > 0
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_inflight_large_batches_decode_plainly(tiny_engine):
    """Above the threshold a step is a plain decode; outputs stay exact either way."""
    prompts = _prompts(4, seed=7)
    alone = [tiny_engine.generate([p], 12).output_ids[0] for p in prompts]
    eng = _llm(tiny_engine, SpeculativeConfig(max_draft_len=4, max_batch_size=2))
    seqs = eng.generate(prompts, 12)
    assert [s.output_ids for s in seqs] == alone
    assert eng.speculation.stats["plain_steps"] > 0


def test_inflight_kv_rollback_leaves_cache_as_plain(tiny_engine):
    """Mid-generation, a request's cached K/V equals a plain run's over the tokens both have
    computed, and its block table holds no block past its computed tokens."""
    from llama_engine.serving.block_manager import cdiv
    prompt = _prompts(1, seed=9)[0]
    state = {}
    for name, spec in (("plain", None), ("spec", SpeculativeConfig(max_draft_len=4))):
        eng = _llm(tiny_engine, spec)
        rid = eng.add_request(prompt, max_tokens=MAX_OUT)
        seq = eng.scheduler.get(rid)
        while seq.num_output_tokens < MAX_OUT - 6:
            eng.step()
            if spec is not None and seq.num_output_tokens > 1:
                assert len(seq.block_table) == cdiv(seq.num_computed_tokens, BLOCK)
        n = seq.num_computed_tokens
        state[name] = (n, _cached(tiny_engine.runner, torch.tensor(seq.block_table), n))
        if spec is not None:
            assert eng.speculation.stats["accepted"] < eng.speculation.stats["proposed"]
    n = min(state["plain"][0], state["spec"][0])
    for x, y in zip(state["plain"][1], state["spec"][1]):
        torch.testing.assert_close(x[:n], y[:n], rtol=1e-12, atol=1e-12)


def test_block_manager_truncate():
    bm = BlockManager(8, 4)
    seq = Sequence(0, [1] * 10, 10)
    bm.allocate(seq, 15)
    assert len(seq.block_table) == 4
    bm.truncate(seq, 9)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.truncate(seq, 12)              # nothing past the table: no change
    assert len(seq.block_table) == 3
    bm.free(seq)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)


# -- SmolLM2 and the scripts ----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--use_inflight_batching"]], ids=["static", "inflight"])
def test_smollm2_summaries_equal_with_prompt_lookup(smol_engine, shared_data, tmp_path, extra):
    """Real articles, chat template, float64: the same summaries token for token."""
    ids = {}
    for name, spec in (("plain", []), ("spec", ["--speculative_decoding_mode", "prompt_lookup",
                                                "--max_draft_len", "4"])):
        out = tmp_path / f"{name}.json"
        assert summarize.main(["--test_trt_llm", "--engine_dir", str(smol_engine),
                               "--device", "cpu", "--dataset_path",
                               str(shared_data / "cnn_dailymail" / "test_dev.jsonl"),
                               "--max_ite", "2", "--output_len", "40",
                               "--max_input_length", "400", "--use_chat_template",
                               "--output_json", str(out), *extra, *spec]) == 0
        ids[name] = [a["engine"]["output_ids"]
                     for a in json.loads(out.read_text())["articles"]]
    assert ids["spec"] == ids["plain"] and all(len(x) > 5 for x in ids["plain"])


@pytest.mark.parametrize("args,match", [
    (["--draft_engine_dir", "x"], "needs --speculative_decoding_mode"),
    (["--speculative_decoding_mode", "draft_tokens_external"], "needs --draft_engine_dir"),
    (["--speculative_decoding_mode", "ngram"], "invalid choice"),
    (["--speculative_decoding_mode", "prompt_lookup", "--max_draft_len", "0"], "positive"),
])
def test_run_py_speculative_flag_errors(smol_engine, capsys, args, match):
    import run
    try:
        rc = run.main(["--engine_dir", str(smol_engine), "--max_output_len", "4",
                       "--device", "cpu", *args])
    except SystemExit as e:   # argparse's errors exit at parse time
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_run_py_prompt_lookup_equals_plain(smol_engine, capsys):
    import run
    base = ["--engine_dir", str(smol_engine), "--max_output_len", "24", "--device", "cpu",
            "--input_text", "Repeat after me: the cat sat on the mat, the cat sat on the mat."]
    assert run.main(base) == 0
    plain = capsys.readouterr().out.split("llama-run")[0]
    assert run.main(base + ["--speculative_decoding_mode", "prompt_lookup"]) == 0
    assert capsys.readouterr().out.split("llama-run")[0] == plain


def test_draft_engine_must_be_separate(tiny_engine):
    spec = SpeculativeConfig("draft_tokens_external", 2, tiny_engine)
    with pytest.raises(ConfigError, match="separate Engine"):
        tiny_engine.generate(_prompts(1), 4, speculative=spec)


def test_benchmark_speculative_section_on_cpu(tmp_path):
    """benchmark.py --speculative's flow (a CPU dry run on the tiny model): a decode step and
    verify steps of k+1 = 2..9 timed per mode, tokens/s projected from acceptance files
    (prompt lookup: over the verify step; a draft: k of the draft mode's decode steps added),
    and 32 requests under inflight batching with speculation off and on."""
    import benchmark
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"prompt_lookup": {"4": {"pooled_tokens_per_step": 2.0}}}))
    acc_d = tmp_path / "acc_draft.json"
    acc_d.write_text(json.dumps({"draft": {"int4_g64": {
        "build_flags": "", "argmax_agreement": 0.5, "3": {"pooled_tokens_per_step": 3.0}}}}))
    out = tmp_path / "b.json"
    assert benchmark.main(["--device", "cpu", "--model_config", "tiny", "--speculative",
                           "--modes", "fp16,int8", "--spec_draft", "int8:int4_g64",
                           "--spec_context", "32", "--spec_output_len", "6",
                           "--out_json", str(out),
                           "--spec_acceptance", f"{acc},{acc_d}"]) == 0
    res = json.loads(out.read_text())["speculative"]
    r = res["fp16"]
    assert sorted(map(int, r["verify_ms"])) == list(range(2, 10))
    assert sorted(map(int, r["loop_ms"])) == list(range(2, 10))
    assert r["decode_ms"] > 0 and set(r["projected_tok_s"]) == {"4"}
    assert r["graphs"] is False                                  # CPU: no CUDA graphs
    assert r["projected_tok_s"]["4"] == pytest.approx(2.0 * 1e3 / r["verify_ms"]["5"])
    d = r["draft"]
    assert d["engine"] == "int8" and d["decode_ms"] == res["int8"]["decode_ms"]
    assert d["projected_tok_s"]["3"] == pytest.approx(
        3.0 * 1e3 / (3 * d["decode_ms"] + r["verify_ms"]["4"]))
    assert "draft" not in res["int8"]                # a mode does not draft for itself
    srv = res["serving"]
    assert srv["batch"] == 32
    off, gated, always = srv["off"], srv["on (max batch 8)"], srv["on (every step)"]
    assert min(off["tok_s"], gated["tok_s"], always["tok_s"]) > 0
    # plain steps: too large to speculate, or nobody had a proposal (random weights rarely
    # continue their prompt's phrase)
    assert gated["plain_steps"] > 0 and always["verify_steps"] > 0


def test_benchmark_spec_draft_flag_is_checked(capsys):
    import benchmark
    assert benchmark.main(["--device", "cpu", "--model_config", "tiny", "--speculative",
                           "--spec_draft", "int3:x"]) == 2
    assert "--spec_draft" in capsys.readouterr().err


def test_backoff_skips_proposals_after_rejections_and_recovers(tiny_engine):
    """A sequence whose proposals keep being rejected sits out 2, 4, ... steps (no draft, so a
    step where nobody proposes runs plainly); one accepted token resets it."""
    stepper = _llm(tiny_engine, SpeculativeConfig(max_draft_len=4)).speculation
    rid = 7
    seq = type("S", (), {"request_id": rid})()
    stepper._judge(rid, False)
    assert stepper._backoff[rid] == (1, 0)                 # one miss: keeps proposing
    stepper._judge(rid, False)
    assert stepper._backoff[rid] == (2, 2)                 # two in a row: sits out 2 steps
    stepper._tick([seq], [[]])
    stepper._tick([seq], [[]])
    assert stepper._backoff[rid] == (2, 0)
    stepper._judge(rid, False)
    assert stepper._backoff[rid] == (3, 4)
    for _ in range(100):
        stepper._judge(rid, False)
    assert stepper._backoff[rid][1] == stepper.BACKOFF_MAX
    stepper._judge(rid, True)
    assert stepper._backoff[rid] == (0, 0)
