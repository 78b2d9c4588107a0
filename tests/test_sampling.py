"""Sampling controls against Hugging Face ``generate`` with the same control (a tiny random
LLaMA, float64 on the CPU, greedy), OpenAI penalties against a direct reference, stop and bad
words, log-probs, seeds; each in the static batch and under inflight batching."""
from __future__ import annotations

import pytest
import torch

import build
from llama_engine.config import ConfigError
from llama_engine.logits_processors import Controls
from llama_engine.runner import Engine
from llama_engine.sampling import SamplingConfig, cut_at_stop, held_back
from llama_engine.serving import LLMEngine

N = 16          # new tokens per prompt
PROMPTS = [[1, 17, 93, 5, 61, 200, 34], [1, 250, 8, 8, 140, 77, 3, 9, 42]]
EOS = 2


@pytest.fixture(scope="module")
def models(tiny_hf_factory, tmp_path_factory):
    from transformers import LlamaForCausalLM
    torch.set_num_threads(1)
    src = tiny_hf_factory(2, False)
    out = tmp_path_factory.mktemp("sampling") / "eng"
    assert build.main(["--model_dir", str(src), "--dtype", "float64", "--output_dir", str(out),
                       "--max_batch_size", "4", "--max_input_len", "64",
                       "--max_output_len", "32"]) == 0
    engine = Engine.from_dir(str(out), device="cpu")
    hf = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float64).eval()
    return engine, hf


def hf_generate(hf, prompt, end_id=EOS, **kw) -> list:
    """HF greedy tokens after ``prompt`` (the end id cut, as our output has it)."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=N, do_sample=False, eos_token_id=end_id,
                      pad_token_id=end_id, attention_mask=torch.ones_like(ids), **kw)
    return cut_at_stop(out[0, len(prompt):].tolist(), [end_id])[0]


def ours(engine, cfg, end_id=EOS, prompts=PROMPTS) -> list:
    static = engine.generate(prompts, N, cfg, end_id=end_id)
    llm = LLMEngine(engine, max_num_tokens=8, max_kv_cache_tokens=256)
    seqs = llm.generate(prompts, N, cfg, stop_ids=[] if end_id is None else [end_id])
    inflight = [s.output_ids for s in seqs]
    assert static.output_ids == inflight, "static and inflight batching differ"
    return static.output_ids


@pytest.fixture(scope="module")
def plain(models):
    """Unconstrained greedy outputs (no end id), the base the tests pick tokens from."""
    engine, hf = models
    outs = ours(engine, SamplingConfig(), end_id=None)
    assert outs == [hf_generate(hf, p, end_id=None) for p in PROMPTS]
    return outs


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.8), dict(repetition_penalty=0.6),
                                dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
                                dict(no_repeat_ngram_size=3)],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_control_equals_hf(models, plain, kw):
    engine, hf = models
    got = ours(engine, SamplingConfig(**kw))
    want = [hf_generate(hf, p, **kw) for p in PROMPTS]
    assert got == want
    if kw.get("no_repeat_ngram_size", 0) >= 2 or kw.get("repetition_penalty", 1) > 1:
        assert got != [x[:len(g)] for x, g in zip(plain, got)], "the control changed nothing"


def test_min_length_is_hf_min_new_tokens(models, plain):
    engine, hf = models
    k = next(i for i in range(2, N) if plain[0][i] not in plain[0][:i])
    end = plain[0][k]                       # greedy would end prompt 0 after k tokens
    assert len(ours(engine, SamplingConfig(), end_id=end)[0]) == k < 6
    got = ours(engine, SamplingConfig(min_length=6), end_id=end)
    assert len(got[0]) >= 6
    assert got == [hf_generate(hf, p, end_id=end, min_new_tokens=6) for p in PROMPTS]


def test_end_id_overrides_the_models(models, plain):
    engine, _ = models
    end = plain[1][4]
    got = ours(engine, SamplingConfig(end_id=end), end_id=EOS)
    assert got[1] == plain[1][:plain[1].index(end)] and len(got[1]) <= 4


def test_bad_words_equal_hf_and_never_appear(models, plain):
    engine, hf = models
    single, pair = [plain[0][1]], [plain[1][3], plain[1][4]]
    bad = [single, pair]
    got = ours(engine, SamplingConfig(bad_words=bad))
    assert got == [hf_generate(hf, p, bad_words_ids=bad) for p in PROMPTS]
    for row in got:
        assert single[0] not in row
        assert all(row[i:i + 2] != pair for i in range(len(row) - 1))


def test_stop_words_cut_exactly_at_the_word(models, plain):
    engine, _ = models
    word = plain[0][3:5]                    # two tokens: spans a token boundary
    got = ours(engine, SamplingConfig(stop_words=[word, [999 % 256, 7]]), end_id=None)
    assert got[0] == plain[0][:3]
    assert got[1] == cut_at_stop(plain[1], [], [word])[0]
    # A one-token stop word, also under inflight batching, streams nothing of the word.
    llm = LLMEngine(engine, max_num_tokens=8, max_kv_cache_tokens=256)
    streamed: dict = {}
    seqs = llm.generate(PROMPTS, N, SamplingConfig(stop_words=[word]),
                        streamer=lambda o: streamed.setdefault(o.index, []).extend(
                            o.new_token_ids))
    assert seqs[0].output_ids == plain[0][:3] and streamed[0] == plain[0][:3]
    assert seqs[0].finish_reason.value == "stop"


def test_presence_frequency_penalties_equal_a_direct_reference(models):
    engine, hf = models
    cfg = SamplingConfig(presence_penalty=0.7, frequency_penalty=0.9)
    got = ours(engine, cfg, end_id=None)
    for prompt, row in zip(PROMPTS, got):
        seq, out = list(prompt), []
        with torch.no_grad():
            for _ in range(N):
                logits = hf(torch.tensor([seq])).logits[0, -1].clone()
                for t in set(out):   # OpenAI: over the generated tokens
                    logits[t] -= cfg.presence_penalty + cfg.frequency_penalty * out.count(t)
                tok = int(logits.argmax())
                out.append(tok)
                seq.append(tok)
        assert row == out


def test_logprobs_equal_hf_scores(models):
    engine, hf = models
    cfg = SamplingConfig(logprobs=3, repetition_penalty=1.3)
    res = engine.generate(PROMPTS, N, cfg, end_id=EOS)
    llm = LLMEngine(engine, max_num_tokens=8, max_kv_cache_tokens=256)
    seqs = llm.generate(PROMPTS, N, cfg, stop_ids=[EOS])
    for p, ids, lps, top, seq in zip(PROMPTS, res.output_ids, res.log_probs,
                                     res.top_logprobs, seqs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False,
                          eos_token_id=EOS, pad_token_id=EOS, repetition_penalty=1.3,
                          output_scores=True, return_dict_in_generate=True)
        toks = ref.sequences[0, len(p):].tolist()[:len(ids)]
        assert toks == ids
        want = [float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(ref.scores, toks)]
        assert lps == pytest.approx(want, abs=1e-5)
        assert seq.logprobs == pytest.approx(want, abs=1e-5)
        assert len(top[0]) == 3 and top[0][0][0] == ids[0]
        assert top[0][0][1] == pytest.approx(lps[0], abs=1e-9)
    assert res.cum_log_probs[0] == pytest.approx(sum(res.log_probs[0]))


def test_seed_gives_the_same_tokens_across_runs(models):
    engine, _ = models
    cfg = SamplingConfig(temperature=1.5, top_k=0, seed=11, repetition_penalty=1.2)
    a = engine.generate(PROMPTS, N, cfg).output_ids
    b = engine.generate(PROMPTS, N, cfg).output_ids
    c = engine.generate(PROMPTS, N, SamplingConfig(temperature=1.5, top_k=0, seed=12,
                                                   repetition_penalty=1.2)).output_ids
    assert a == b and a != c
    runs = []
    for _ in range(2):
        llm = LLMEngine(engine, max_num_tokens=8, max_kv_cache_tokens=256)
        runs.append([s.output_ids for s in llm.generate(PROMPTS, N, cfg)])
    assert runs[0] == runs[1]


def test_no_controls_adds_no_state(models, monkeypatch):
    """The plain greedy path builds no Controls (no extra kernels)."""
    engine, _ = models
    import llama_engine.runner as runner_mod

    def boom(*a, **k):
        raise AssertionError("Controls built without a control")
    monkeypatch.setattr(runner_mod, "Controls", boom)
    engine.generate(PROMPTS, 4, SamplingConfig(), end_id=EOS)
    engine.generate(PROMPTS, 4, SamplingConfig(logprobs=0), end_id=EOS)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=1.5), "top_p must be <= 1"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=3.0), "presence_penalty must be <= 2"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0"),
    (dict(end_id=256), r"end_id must be in 0..255"),
    (dict(stop_words=[[3, 300]]), "stop_words\\[0\\]: token id 300 at position 1 is outside"),
    (dict(bad_words=[[]]), "bad_words\\[0\\] must be a non-empty list"),
    (dict(stop_words="abc"), "stop_words must be a list"),
    (dict(logprobs=21), "logprobs must be in 0..20"),
])
def test_bad_sampling_is_one_line_error(models, kw, match):
    engine, _ = models
    with pytest.raises(ConfigError, match=match) as e:
        engine.generate(PROMPTS, 4, SamplingConfig(**kw))
    assert "\n" not in str(e.value)
    llm = LLMEngine(engine, max_num_tokens=8, max_kv_cache_tokens=256)
    with pytest.raises(ConfigError, match="^request 0: " + match):
        llm.add_request(PROMPTS[0], SamplingConfig(**kw), max_tokens=4)
    assert not llm.has_unfinished()


def test_cut_at_stop_and_held_back():
    assert cut_at_stop([5, 6, 7, 8], [8], [[6, 7]]) == ([5], True)
    assert cut_at_stop([5, 6, 8, 7], [8], [[6, 7]]) == ([5, 6], True)
    assert cut_at_stop([5, 6], [8], [[6, 7]]) == ([5, 6], False)
    assert held_back([4, 6], [[6, 7, 9]]) == 1
    assert held_back([6, 7], [[6, 7, 9]]) == 2
    assert held_back([6, 5], [[6, 7, 9]]) == 0


def test_mixed_controls_in_one_inflight_batch_equal_their_solo_runs(models):
    """Requests with different controls (and none) share every step; each gets what it gets
    alone in the static engine. More requests than the engine's batch: slots are reused."""
    engine, _ = models
    cfgs = [SamplingConfig(repetition_penalty=1.8), SamplingConfig(),
            SamplingConfig(no_repeat_ngram_size=2, bad_words=[[7], [40, 41]]),
            SamplingConfig(presence_penalty=0.7, frequency_penalty=0.2, min_length=4,
                           logprobs=1),
            SamplingConfig(no_repeat_ngram_size=3, repetition_penalty=1.3),
            SamplingConfig(stop_words=[[9, 9]], repetition_penalty=0.9)]
    prompts = [PROMPTS[i % 2][:5 + i] for i in range(len(cfgs))]
    solo = [engine.generate([p], N, c, end_id=EOS).output_ids[0]
            for p, c in zip(prompts, cfgs)]
    llm = LLMEngine(engine, max_num_tokens=12, max_kv_cache_tokens=256)
    # One slot to start with: the state grows (and is copied) as requests arrive.
    llm.runner._controls = Controls(engine.config.model.vocab_size,
                                    engine.config.build.max_seq_len, "cpu", capacity=1)
    rids = [llm.add_request(p, c, max_tokens=N, stop_ids=[EOS]) for p, c in zip(prompts, cfgs)]
    done = {o.request_id: o.sequence for o in llm.stream() if o.finished}
    assert [done[r].output_ids for r in rids] == solo
    assert len(done[rids[3]].logprobs) == len(solo[3])
    assert llm.runner._controls.capacity >= 4 and not llm.runner._controls.info  # released
