"""Requests the engine validates (static ``generate`` and ``LLMEngine.add_request``), a request
whose step fails finished with an error while the others go on, the one stopping rule on
SmolLM2 (static = inflight), the sampling flags of the scripts, and ``--streaming`` under
``--use_inflight_batching``."""
from __future__ import annotations

import pytest
import torch

import build
import run
from llama_engine import cli
from llama_engine.config import BuildConfig, ConfigError, EngineConfig, ModelArgs, PRESETS, \
    QuantConfig
from llama_engine.runner import Engine
from llama_engine.sampling import SamplingConfig
from llama_engine.serving import FinishReason, LLMEngine

N = 10


@pytest.fixture(scope="module")
def engine():
    import weight
    from llama_engine import checkpoint as ckpt
    args = ModelArgs(**PRESETS["tiny"])
    sd = weight.random_weights(args, "float64", seed=0)
    sd = {k: (v * 4 if v.dim() == 2 else v) for k, v in sd.items()}  # far from near-ties
    b = BuildConfig(max_batch_size=4, max_input_len=32, max_output_len=16, tokens_per_block=4,
                    use_inflight_batching=True, paged_kv_cache=True)
    torch.set_num_threads(1)
    return Engine.from_tensors(EngineConfig(model=args, quant=QuantConfig(), build=b,
                                            dtype="float64"),
                               ckpt.hf_to_unified(sd, args), "cpu")


def llm(engine):
    return LLMEngine(engine, max_num_tokens=12, max_kv_cache_tokens=200)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46], [100, 3]]


@pytest.mark.parametrize("prompt,match", [
    ([5, 6.0, 7], r"token id 6.0 at position 1 is not an integer"),
    ([5, True], r"token id True at position 1 is not an integer"),
    ([5, -1], r"token id -1 at position 1 is outside the vocabulary 0..\d+"),
    ([5, 10**6], r"token id 1000000 at position 1 is outside the vocabulary"),
    ("hello", r"token ids must be a list of integers"),
])
def test_bad_token_ids_refused(engine, prompt, match):
    with pytest.raises(ConfigError, match=r"^prompt 1: " + match):
        engine.generate([[1, 2], prompt], 4)
    eng = llm(engine)
    with pytest.raises(ConfigError, match=r"^request 0: " + match):
        eng.add_request(prompt, max_tokens=4)
    assert not eng.has_unfinished()   # nothing queued: the next steps are not blocked
    with pytest.raises(ConfigError, match=r"^prompt 1: " + match):
        eng.generate([[1, 2], prompt], 4)
    assert not eng.has_unfinished()   # the good prompt was not queued either


@pytest.mark.parametrize("max_tokens,match", [(0, "max_tokens must be at least 1, got 0"),
                                              (2.5, "max_tokens must be an integer"),
                                              (True, "max_tokens must be an integer")])
def test_bad_lengths_refused(engine, max_tokens, match):
    with pytest.raises(ConfigError, match="^request 0: " + match):
        llm(engine).add_request([1, 2, 3], max_tokens=max_tokens)
    with pytest.raises(ConfigError):
        engine.generate([[1, 2, 3]], max_tokens)
    with pytest.raises(ConfigError, match="request 0: empty prompt"):
        llm(engine).add_request([], max_tokens=3)
    with pytest.raises(ConfigError, match="stop_ids: token id 4.0"):
        llm(engine).add_request([1, 2], max_tokens=3, stop_ids=[4.0])


def test_integer_tensors_are_token_ids(engine):
    t = torch.tensor([5, 6, 7])
    assert engine.generate([list(t)], 3).output_ids == engine.generate([[5, 6, 7]], 3).output_ids


def solo(engine, prompt, cfg=None):
    return llm(engine).generate([prompt], N, cfg)[0].output_ids


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_failing_request_is_finished_with_error_others_go_on(engine, monkeypatch, where):
    """A fault injected into the model's forward whenever request 2's poison token is in the
    batch: request 2 ends with FinishReason.ERROR naming it, the others equal their solo runs."""
    alone = [solo(engine, p) for p in PROMPTS]
    others = {t for i in (0, 1, 3) for t in PROMPTS[i] + alone[i]}
    seen = PROMPTS[2] if where == "decode" else []
    k = next(k for k in range(1, N) if (alone[2] if where == "decode" else PROMPTS[2])[k]
             not in others | set(seen) | set(alone[2][:k] if where == "decode" else []))
    poison = alone[2][k] if where == "decode" else PROMPTS[2][k]
    eng = llm(engine)
    real = eng.runner.forward

    def faulty(tokens, *a, **k):
        if bool((tokens == poison).any()):
            raise RuntimeError("injected fault\nsecond line")
        return real(tokens, *a, **k)
    monkeypatch.setattr(eng.runner, "forward", faulty)
    seqs = eng.generate(PROMPTS, N)
    for i, s in enumerate(seqs):
        if i == 2:
            assert s.finish_reason is FinishReason.ERROR
            assert s.error == ("request 2: failed during a step (RuntimeError: injected "
                               "fault)")
            if where == "decode":
                assert s.output_ids == alone[2][:k + 1]
            else:
                assert s.output_ids == []
        else:
            assert s.finish_reason is not FinishReason.ERROR and s.output_ids == alone[i]
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_fault_of_every_request_is_raised(engine, monkeypatch):
    """Not any one request's fault (every request fails alone too): the step raises."""
    eng = llm(engine)
    monkeypatch.setattr(eng.runner, "forward", lambda *a, **k: (_ for _ in ()).throw(
        MemoryError("out of memory")))
    with pytest.raises(MemoryError):
        eng.generate(PROMPTS[:2], N)


@pytest.mark.parametrize("where", ["controls", "logprobs"])
def test_failing_sampling_is_isolated(engine, where):
    """A request whose sampling breaks mid-run, before the others draw (its controls) or after
    (its log-probs): the others, seeded samplers and one with controls, equal their solo runs
    (the failed step's draws and control updates are rewound before the rerun)."""
    seeded = SamplingConfig(temperature=1.0, top_k=0, seed=5)
    controlled = SamplingConfig(temperature=1.0, top_k=0, seed=6, repetition_penalty=1.5)
    alone = [solo(engine, PROMPTS[0], seeded), solo(engine, PROMPTS[2], controlled)]

    class Breaks(SamplingConfig):
        armed = False

        def __getattribute__(self, name):
            if Breaks.armed and name == {"controls": "has_controls",
                                         "logprobs": "logprobs"}[where]:
                raise ValueError("broken sampler")
            return super().__getattribute__(name)
    eng = llm(engine)
    ok = eng.add_request(PROMPTS[0], seeded, max_tokens=N)
    bad = eng.add_request(PROMPTS[1], Breaks(logprobs=0, repetition_penalty=1.2),
                          max_tokens=N)
    ok2 = eng.add_request(PROMPTS[2], controlled, max_tokens=N)
    done = {}
    for _ in range(3):
        done.update({o.request_id: o.sequence for o in eng.step() if o.finished})
    Breaks.armed = True
    done.update({o.request_id: o.sequence for o in eng.stream() if o.finished})
    assert [done[ok].output_ids, done[ok2].output_ids] == alone
    assert done[bad].finish_reason is FinishReason.ERROR
    assert done[bad].error == f"request {bad}: failed during a step (ValueError: broken sampler)"


# -- one stopping rule on SmolLM2 --------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_engine(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol_req") / "engine_fp64"
    assert build.main(["--gguf_file", smollm2_gguf, "--dtype", "float64", "--output_dir",
                       str(out), "--max_batch_size", "2", "--max_input_len", "128",
                       "--max_output_len", "24"]) == 0
    return out


def test_smollm2_same_text_static_and_inflight(smol_engine, capsys):
    from llama_engine.tokenizer import load_tokenizer
    tok = load_tokenizer(str(smol_engine))
    assert tok.end_ids[0] == tok.eos_id
    args = ["--engine_dir", str(smol_engine), "--max_output_len", "20", "--device", "cpu",
            "--input_text", "Write one sentence about the sea.",
            "--input_text", "The capital of France is"]
    outs = []
    for extra in ([], ["--use_inflight_batching"]):
        assert run.main(args + extra) == 0
        text = capsys.readouterr().out
        outs.append(text[:text.index("llama-run (mean latency")])
    assert outs[0] == outs[1] and outs[0].count("Output:") == 2


def test_streaming_with_inflight_batching_prints_tokens(smol_engine, capsys):
    assert run.main(["--engine_dir", str(smol_engine), "--max_output_len", "5", "--device",
                     "cpu", "--input_text", "The capital of France is",
                     "--use_inflight_batching", "--streaming"]) == 0
    out = capsys.readouterr().out
    # The text streams as it is generated (one prompt: plain text), then the usual lines.
    streamed, rest = out.split("Input:", 1)
    final = rest.split('Output: "', 1)[1].split('"\n', 1)[0]
    assert "Paris" in final and streamed == final + "\n"


def test_stop_words_flag_cuts_the_output(smol_engine, capsys):
    base = ["--engine_dir", str(smol_engine), "--max_output_len", "12", "--device", "cpu",
            "--input_text", "The capital of France is"]
    assert run.main(base) == 0
    full = capsys.readouterr().out.split('Output: "')[1]
    assert full.startswith(" Paris.")
    for extra in ([], ["--use_inflight_batching"]):
        assert run.main(base + ["--stop_words", ".,nothing"] + extra) == 0
        assert 'Output: " Paris"\n' in capsys.readouterr().out


# -- the flags ---------------------------------------------------------------------------------
class FakeTok:
    vocab_size = 100

    def encode(self, text, add_bos=True):
        return [ord(c) % 100 for c in text]


def test_sampling_from_args():
    p = cli.make_parser("x")
    cli.add_sampling_args(p)
    args = p.parse_args(["--repetition_penalty", "1.2", "--presence_penalty", "0.5",
                         "--frequency_penalty", "-0.5", "--no_repeat_ngram_size", "3",
                         "--min_length", "4", "--end_id", "7", "--pad_id", "0",
                         "--stop_words", 'ab,"c,d",,e', "--bad_words", "x",
                         "--random_seed", "9", "--top_k", "5", "--temperature", "0.7"])
    cfg = cli.sampling_from_args(args, FakeTok())
    assert cfg == SamplingConfig(temperature=0.7, top_k=5, top_p=0.0, seed=9,
                                 repetition_penalty=1.2, presence_penalty=0.5,
                                 frequency_penalty=-0.5, no_repeat_ngram_size=3, min_length=4,
                                 end_id=7, pad_id=0,
                                 stop_words=[[97, 98], [99, 44, 0], [1]], bad_words=[[20]])


@pytest.mark.parametrize("flags,expected", [
    (["--repetition_penalty", "0"], "argument --repetition_penalty: must be in (0.0, inf]"),
    (["--presence_penalty", "2.5"], "argument --presence_penalty: must be in [-2.0, 2.0]"),
    (["--frequency_penalty", "nan"], "must be a finite number"),
    (["--no_repeat_ngram_size", "-1"], "argument --no_repeat_ngram_size: must be >= 0"),
    (["--min_length", "1.5"], "argument --min_length: not an integer"),
    (["--end_id", "-2"], "argument --end_id: must be >= 0"),
])
def test_bad_sampling_flags(capsys, flags, expected):
    with pytest.raises(SystemExit) as e:
        run.main(["--engine_dir", "x", "--max_output_len", "4", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_trtllm_runner_uses_the_same_stopping_rule():
    """The TensorRT-LLM runner (a stand-in for ModelRunnerCpp): every end id and stop word
    cuts the output as in our engine, and the controls reach TensorRT-LLM's arguments."""
    from llama_engine import trtllm as T

    class Stand:
        def generate(self, inputs, **kw):
            self.kw = kw
            gen = [10, 11, 12, 2, 5]
            t = max(len(x) for x in inputs) + len(gen)
            ids = torch.zeros(len(inputs), 1, t, dtype=torch.int32)
            lens = torch.zeros(len(inputs), 1, dtype=torch.int32)
            for i, x in enumerate(inputs):
                ids[i, 0, :len(x)] = x
                ids[i, 0, len(x):len(x) + len(gen)] = torch.tensor(gen)
                lens[i, 0] = len(x) + len(gen)
            return {"output_ids": ids, "sequence_lengths": lens}

    fake = Stand()
    r = T.TrtllmRunner("/nowhere", fake, {"build_config": {"max_batch_size": 2}}, "stand-in")
    assert r.generate([[1, 3]], 5, end_id=[2]).output_ids == [[10, 11, 12]]
    assert r.generate([[1, 3]], 5, end_id=[2, 12]).output_ids == [[10, 11]]
    assert fake.kw["end_id"] == 2 and fake.kw["stop_words_list"].tolist() == [[[12], [1]]]
    cfg = SamplingConfig(end_id=11, repetition_penalty=1.1, bad_words=[[7, 8]])
    assert r.generate([[1, 3]], 5, cfg, end_id=[2]).output_ids == [[10]]
    assert fake.kw["end_id"] == 11 and fake.kw["repetition_penalty"] == 1.1
    assert fake.kw["bad_words_list"].tolist() == [[[7, 8], [2, -1]]]
    cfg = SamplingConfig(stop_words=[[11, 12]])
    assert r.generate([[1, 3]], 5, cfg, end_id=[2]).output_ids == [[10]]


def test_tokenizer_larger_than_the_engine_is_one_line_error(smol_engine, tmp_path, capsys):
    """A tokenizer whose ids go past the engine's vocabulary: a one-line error, exit 2."""
    tiny = tmp_path / "tiny"
    assert build.main(["--model_config", "tiny", "--dtype", "float32", "--max_input_len", "32",
                       "--max_output_len", "8", "--output_dir", str(tiny)]) == 0
    capsys.readouterr()
    rc = run.main(["--engine_dir", str(tiny), "--tokenizer_dir", str(smol_engine),
                   "--max_output_len", "4", "--device", "cpu",
                   "--input_text", "The capital of France is"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: prompt 0: token id ") and "outside the vocabulary 0..511" \
        in err[0]
