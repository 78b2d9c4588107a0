"""Tests of the text side: tokenizer, summarization prompt, ROUGE, dataset and CLI helpers,
run_hf.py and summarize.py (HF side on SmolLM2; engine side against a stand-in engine).

Real data (LLaMA's tokenizer.model, cnn_dailymail articles) is read from ``../shared/data``
(or ``$LLAMA_SHARED_DATA``); SmolLM2 from ``tools/fetch_smollm2.py``'s cache. Tests that need
them skip with the reason when they are absent. Mechanics use a SentencePiece model trained
here on sentences written below.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama_engine import cli, prompts, rouge  # noqa: E402
from llama_engine.config import ConfigError  # noqa: E402
from llama_engine.tokenizer import (find_tokenizer_source, load_tokenizer,  # noqa: E402
                                    save_tokenizer)

SHARED = Path(os.environ.get("LLAMA_SHARED_DATA") or (REPO / ".." / "shared" / "data"))
LLAMA_SPM = SHARED / "llama_tokenizer" / "tokenizer.model"
CNN_DEV = SHARED / "cnn_dailymail" / "test_dev.jsonl"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} not found (shared data absent; set LLAMA_SHARED_DATA)")
    return path


def _smollm2() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_smollm2",
                                                  REPO / "tools" / "fetch_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = mod.find_smollm2_gguf()
    if p is None:
        pytest.skip("SmolLM2 GGUF not fetched (run: python tools/fetch_smollm2.py)")
    return p


# ---------------------------------------------------------------------------------------------
# A small SentencePiece model trained on our own sentences
# ---------------------------------------------------------------------------------------------
_WORDS = ("the a cat dog chef city court river market school teacher doctor storm train "
          "minister player season report police family garden museum").split()
_VERBS = "saw visited trained opened closed found said built moved called".split()
_TAILS = ["on Monday.", "in the north-east.", "after the match!", "near the old bridge,",
          "didn't stop.", "wasn't ready?", "in 2014 and 2015.", "for 3.5 hours;",
          "with \"quotes\" and (brackets).", "TL;DR: short."]


def _corpus() -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(400):
        w = rng.choice(_WORDS, 4)
        out.append(f"{w[0].capitalize()} {w[1]} {rng.choice(_VERBS)} the {w[2]} and "
                   f"{w[3]} {_TAILS[i % len(_TAILS)]}")
    out.append("Born in north-east France, Soyer trained as a chef. Summarize news articles "
               "in 3 sentences:\n\nx y z q j k v w ' - ; : ! ? , . 0 1 2 3 4 5 6 7 8 9")
    return out


@pytest.fixture(scope="session")
def small_spm(tmp_path_factory) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=200,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|user|>", "<|assistant|>"], minloglevel=2,
        # As LLaMA's model: no normalization, spaces and newlines kept.
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    d = tmp_path_factory.mktemp("spm_only")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d / "tokenizer.model"


@pytest.fixture()
def spm_dir(small_spm, tmp_path) -> Path:
    d = tmp_path / "spm_dir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(small_spm.read_bytes())
    return d


CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _write_hf_tokenizer(folder: Path, add_bos_token=None, chat_template=CHAT_TEMPLATE) -> None:
    """A HF fast tokenizer (word level, so its ids differ from SentencePiece's) saved to folder."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(set(" ".join(_corpus()).replace(".", " ").split())):
        vocab.setdefault(w, len(vocab))
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(folder)
    if add_bos_token is not None:
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["add_bos_token"] = add_bos_token
        cfg_path.write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def test_llama_tokenizer_equals_sentencepiece():
    import sentencepiece as spm

    model = _need(LLAMA_SPM)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for src in (model.parent, model):          # a folder holding only tokenizer.model, the file
        tok = load_tokenizer(src)
        assert tok.kind == "sentencepiece"
        assert tok.encode("Born") == [1, 19298]
        text = cli.DEFAULT_INPUT_TEXT
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 32000)
        assert tok.decode(tok.encode(text)) == text
        assert tok.apply_chat_template([{"role": "user", "content": "x"}]) is None
    if CNN_DEV.is_file():
        tok = load_tokenizer(model.parent)
        for line in CNN_DEV.read_text().splitlines()[:5]:
            article = json.loads(line)["article"]
            assert tok.encode(article) == [1] + sp.encode(article)


def test_sentencepiece_folder_mechanics(spm_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = load_tokenizer(spm_dir)
    text = "The chef saw the river didn't stop."
    assert tok.kind == "sentencepiece" and tok.add_bos_token
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 200 and tok.pad_id == tok.eos_id == 2
    assert tok.end_ids == [2]
    assert not tok.has_chat_template
    with pytest.raises(ConfigError):
        tok.encode_chat([{"role": "user", "content": "x"}])


def test_hf_dir_disagreeing_with_tokenizer_model_uses_sentencepiece(spm_dir, capsys):
    import sentencepiece as spm

    _write_hf_tokenizer(spm_dir, add_bos_token=True)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = load_tokenizer(spm_dir)
    assert "using SentencePiece" in capsys.readouterr().err
    assert tok.kind == "sentencepiece"
    assert tok.encode("the cat saw the dog") == [1] + sp.encode("the cat saw the dog")
    # The chat template still comes from the HF tokenizer; SentencePiece encodes its text.
    ids = tok.encode_chat([{"role": "user", "content": "the cat"}])
    assert ids == sp.encode("<|user|>the cat<|assistant|>")
    assert ids[-1] == sp.piece_to_id("<|assistant|>")


def test_hf_dir_declared_bos_is_added(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    _write_hf_tokenizer(d, add_bos_token=True)   # its post-processor adds no BOS
    tok = load_tokenizer(d)
    assert tok.kind == "hf" and tok.add_bos_token and tok.bos_id == 1
    ids = tok.encode("the cat saw the dog")
    assert ids[0] == 1 and ids[1:] == tok.hf.encode("the cat saw the dog",
                                                    add_special_tokens=False)
    assert tok.encode("the cat", add_bos=False)[0] != 1

    d2 = tmp_path / "hf_nobos"
    d2.mkdir()
    _write_hf_tokenizer(d2, add_bos_token=None)   # nothing declared, nothing added
    tok2 = load_tokenizer(d2)
    assert not tok2.add_bos_token and tok2.encode("the cat")[0] != 1


def test_save_tokenizer_roundtrip(spm_dir, tmp_path):
    (spm_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (spm_dir / "config.json").write_text("{}")          # model files are not copied
    assert find_tokenizer_source(spm_dir) == str(spm_dir)
    assert find_tokenizer_source(tmp_path / "nothing_here") is None
    engine = tmp_path / "engine"
    written = save_tokenizer(load_tokenizer(spm_dir), str(engine))
    assert written == ["tokenizer.model", "generation_config.json"]
    assert not (engine / "config.json").exists()
    a, b = load_tokenizer(spm_dir), load_tokenizer(engine)
    assert a.encode("the market opened") == b.encode("the market opened")
    assert b.end_ids == [2, 7]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="SentencePiece"):
        load_tokenizer(bad)


def test_smollm2_gguf_tokenizer(tmp_path):
    gguf = _smollm2()
    tok = load_tokenizer(gguf)
    # transformers 5.17 reports eos = <|im_start|> (1); the GGUF metadata says <|im_end|> (2).
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id) == ("gguf", 1, 2, 2)
    assert not tok.add_bos_token and tok.has_chat_template
    ids = tok.encode(cli.DEFAULT_INPUT_TEXT)
    assert ids[0] != tok.bos_id and tok.decode(ids) == cli.DEFAULT_INPUT_TEXT
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == 1 and tok.decode(chat[-3:], skip_special_tokens=False).endswith(
        "assistant\n")
    save_tokenizer(tok, str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert again.encode(cli.DEFAULT_INPUT_TEXT) == ids
    assert (again.bos_id, again.eos_id, again.add_bos_token) == (1, 2, False)
    assert again.encode_chat([{"role": "user", "content": "hi"}]) == chat


# ---------------------------------------------------------------------------------------------
# Summarization prompt
# ---------------------------------------------------------------------------------------------
def test_prompt_cleanup_and_suffix(spm_dir):
    tok = load_tokenizer(spm_dir)
    article = "  The chef did n't stop and the court was n't ready.  "
    ids = prompts.build_summarize_prompt(article, tok)
    # As TensorRT-LLM: only the ends of article + " TL;DR: " are stripped.
    expected_text = "The chef didn't stop and the court wasn't ready.   TL;DR:"
    assert ids == tok.encode(expected_text)
    assert tok.decode(ids) == expected_text


def test_prompt_keeps_last_tokens(spm_dir):
    tok = load_tokenizer(spm_dir)
    article = " ".join(_corpus()[:20])
    full = tok.encode(prompts.clean_article(article + prompts.TLDR_SUFFIX), add_bos=False)
    ids = prompts.build_summarize_prompt(article, tok, max_input_length=25)
    assert len(ids) == 25 and ids[0] == tok.bos_id and ids[1:] == full[-24:]
    assert tok.decode(ids).endswith("TL;DR:")
    short = prompts.build_summarize_prompt("The cat.", tok, max_input_length=25)
    assert short == [tok.bos_id] + tok.encode("The cat. TL;DR:", add_bos=False)


def test_chat_prompt_keeps_instruction(spm_dir):
    _write_hf_tokenizer(spm_dir)           # adds a chat template (SentencePiece still encodes)
    tok = load_tokenizer(spm_dir)
    article = " ".join(_corpus()[:30])
    ids = prompts.build_summarize_prompt(article, tok, max_input_length=80,
                                         use_chat_template=True)
    assert 70 <= len(ids) <= 80
    text = tok.decode(ids)
    assert text.startswith("<|user|>" + prompts.CHAT_INSTRUCTION)
    assert text.endswith("<|assistant|>")
    body = text[len("<|user|>" + prompts.CHAT_INSTRUCTION):-len("<|assistant|>")].strip()
    assert article.startswith(body)                # the article's beginning is kept
    short = prompts.build_summarize_prompt("The cat.", tok, use_chat_template=True)
    assert tok.decode(short) == ("<|user|>" + prompts.CHAT_INSTRUCTION
                                 + "\n\nThe cat.<|assistant|>")
    with pytest.raises(ConfigError, match="no room"):
        prompts.build_summarize_prompt(article, tok, max_input_length=5,
                                       use_chat_template=True)
    with pytest.raises(ConfigError, match="no chat template"):
        prompts.build_summarize_prompt(article, load_tokenizer(spm_dir / "tokenizer.model"),
                                       use_chat_template=True)


def test_prompts_on_real_articles():
    model = _need(LLAMA_SPM)
    records = prompts.load_cnn_dailymail(str(_need(CNN_DEV)))
    assert len(records) == 50 and all(r["id"] for r in records)
    tok = load_tokenizer(model)
    tail = tok.encode("TL;DR:", add_bos=False)[1:]   # drop the word-start piece
    lengths = []
    for r in records:
        ids = prompts.build_summarize_prompt(r["article"], tok)
        assert ids[0] == 1 and len(ids) <= 923 and ids[-len(tail):] == tail
        lengths.append(len(ids))
    assert max(lengths) == 923 and min(lengths) < 923   # some were cut, some not


# ---------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------
PAIRS = [
    ("the cat sat on the mat", "the cat was sitting on the mat"),
    ("police found the missing boy in the city", "the boy was found by police.\nhe is safe"),
    ("a storm closed the school", "schools closed on monday after a storm"),
    ("totally unrelated words", "the minister opened the museum"),
]


def test_rouge_equals_rouge_score_bootstrap():
    from rouge_score import rouge_scorer, scoring

    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    scorer = rouge_scorer.RougeScorer(list(rouge.ROUGE_TYPES), use_stemmer=False)
    agg = scoring.BootstrapAggregator()
    for p, r in PAIRS:
        agg.add_scores(scorer.score(r, p))
    np.random.seed(0)
    expected = {k: v.mid.fmeasure for k, v in agg.aggregate().items()}

    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    got = rouge.compute_rouge(preds, refs)
    assert np.random.random() == before               # caller's random state untouched
    assert got.scores == expected
    per = [scorer.score(r, p) for p, r in PAIRS]
    for k in rouge.ROUGE_TYPES:
        assert got.mean[k] == pytest.approx(np.mean([s[k].fmeasure for s in per]))
    assert got.num_examples == 4 and len(got.per_example) == 4


def test_rouge_known_values():
    same = rouge.compute_rouge(["the cat sat on the mat"] * 3, ["the cat sat on the mat"] * 3)
    assert same.scaled() == {k: 100.0 for k in rouge.ROUGE_TYPES}
    # unigrams: P = 3/3, R = 3/6 -> F = 2/3; bigrams: P = 2/2, R = 2/5 -> F = 4/7
    r = rouge.compute_rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r.scores["rouge1"] == pytest.approx(2 / 3)
    assert r.scores["rouge2"] == pytest.approx(4 / 7)
    assert r.mean["rougeL"] == pytest.approx(2 / 3)
    none = rouge.compute_rouge(["xyz"], ["abc"])
    assert none.scaled()["rouge1"] == 0.0
    lines = rouge.format_rouge(r)
    assert lines[0].startswith("  rouge1 : 66.66") and lines[3].startswith("  rougeLsum : ")
    assert "mean of per-article F1" in lines[4]
    multi = rouge.compute_rouge(["the cat sat"], [["dogs run", "the cat sat"]])
    assert multi.scaled()["rouge1"] == 100.0
    with pytest.raises(ConfigError):
        rouge.compute_rouge(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------
RECORDS = [{"id": str(i), "article": f"Article {i} text.", "highlights": f"Summary {i}."}
           for i in range(5)]


def test_load_cnn_dailymail_files(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert prompts.load_cnn_dailymail(str(jl)) == RECORDS
    assert prompts.load_cnn_dailymail(str(jl), limit=2) == RECORDS[:2]
    js = tmp_path / "d.json"
    js.write_text(json.dumps(RECORDS))
    assert prompts.load_cnn_dailymail(str(js)) == RECORDS
    sub = tmp_path / "snap" / "3.0.0"
    sub.mkdir(parents=True)
    (sub / "test-00000.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:3]))
    (sub / "train-00000.jsonl").write_text(json.dumps(RECORDS[4]))
    assert prompts.load_cnn_dailymail(str(tmp_path / "snap")) == RECORDS[:3]
    assert prompts.load_cnn_dailymail(str(tmp_path / "snap"), split="train") == RECORDS[4:]


def test_load_cnn_dailymail_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (parquet reading)")
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert prompts.load_cnn_dailymail(str(path)) == RECORDS


def test_load_cnn_dailymail_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        prompts.load_cnn_dailymail(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"article": "x"}) + "\n")
    with pytest.raises(ConfigError, match="highlights"):
        prompts.load_cnn_dailymail(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ConfigError, match="broken.jsonl:1"):
        prompts.load_cnn_dailymail(str(broken))
    monkeypatch.setitem(sys.modules, "datasets", None)      # as if not installed
    with pytest.raises(ConfigError, match="datasets"):
        prompts.load_cnn_dailymail(None)


# ---------------------------------------------------------------------------------------------
# CLI helpers
# ---------------------------------------------------------------------------------------------
def test_cli_helpers(tmp_path, capsys):
    assert cli.read_prompts(None, None) == [cli.DEFAULT_INPUT_TEXT]
    assert cli.read_prompts(["a", "b"], None) == ["a", "b"]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n second \r\n")
    assert cli.read_prompts(["ignored"], str(txt)) == ["first prompt", " second "]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x"}\n{"text": "y"}\n"z"\n')
    assert cli.read_prompts(None, str(jl)) == ["x", "y", "z"]
    with pytest.raises(ConfigError):
        cli.read_prompts(None, str(tmp_path / "missing.txt"))
    assert cli.parse_dtype("fp16") == "float16" and cli.parse_dtype("bfloat16") == "bfloat16"
    assert cli.parse_dtype("fp64") == "float64"
    with pytest.raises(ConfigError, match="unknown data type"):
        cli.parse_dtype("int3")
    assert cli.strip_at_end([5, 6, 2, 7], [2]) == [5, 6]
    cli.print_io("in", "out")
    cli.print_timing("llama-run", 0.5, 10)
    out = capsys.readouterr().out.splitlines()
    assert out == ['Input: "in"', 'Output: "out"', "llama-run (mean latency: 0.500000 sec)",
                   "llama-run (tokens per second: 20.00)"]
    with pytest.raises(SystemExit) as e:
        cli.die("bad thing")
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad thing\n"


# ---------------------------------------------------------------------------------------------
# run_hf.py and summarize.py
# ---------------------------------------------------------------------------------------------
def test_run_hf_bad_input(tmp_path, capsys):
    import run_hf

    rc = run_hf.main(["--hf_model_location", str(tmp_path / "none"), "--max_output_len", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_run_hf_smollm2(capsys):
    import run_hf

    gguf = _smollm2()
    rc = run_hf.main(["--hf_model_location", str(gguf), "--max_output_len", "3",
                      "--input_text", cli.DEFAULT_INPUT_TEXT, "--input_text", "The capital of",
                      "--data_type", "fp32", "--device", "cpu"])
    assert rc == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l]
    assert lines[0] == f'Input: "{cli.DEFAULT_INPUT_TEXT}"'
    assert lines[1].startswith('Output: "') and len(lines[1]) > len('Output: ""')
    assert lines[2] == 'Input: "The capital of"' and lines[3].startswith('Output: "')
    assert lines[4].startswith("llama-hf-run (mean latency: ") and lines[4].endswith(" sec)")
    assert lines[5].startswith("llama-hf-run (tokens per second: ")


class _EchoEngine:
    """Stands in for llama_engine.runner.Engine: 'summarizes' by echoing the prompt's first
    tokens after BOS (a lead-3-like baseline), so ROUGE is non-trivial and known."""

    calls = []

    def __init__(self, engine_dir):
        self.config = types.SimpleNamespace(build=types.SimpleNamespace(
            max_input_len=4096, max_output_len=512, max_batch_size=8))

    @classmethod
    def from_dir(cls, engine_dir, device=None, dtype=None, options=None):
        return cls(engine_dir)

    def enable_cuda_graphs(self):
        pass

    def generate(self, batch_input_ids, max_new_tokens, sampling=None, end_id=None,
                 streamer=None):
        _EchoEngine.calls.append(len(batch_input_ids))
        outs = [list(ids[1:1 + max_new_tokens]) for ids in batch_input_ids]
        return types.SimpleNamespace(output_ids=outs,
                                     num_generated_tokens=sum(map(len, outs)), latency_s=0.0)


def test_summarize_engine_side_with_stand_in(spm_dir, tmp_path, monkeypatch, capsys):
    import summarize

    fake = types.ModuleType("llama_engine.runner")
    fake.Engine = _EchoEngine
    monkeypatch.setitem(sys.modules, "llama_engine.runner", fake)
    engine_dir = tmp_path / "engine"
    save_tokenizer(str(spm_dir), str(engine_dir))
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"id": str(i), "article": s, "highlights": s})
                              for i, s in enumerate(_corpus()[:6])))
    out_json = tmp_path / "out.json"
    base = ["--test_trt_llm", "--engine_dir", str(engine_dir), "--dataset_path", str(data),
            "--batch_size", "2", "--max_ite", "2", "--output_len", "6"]
    rc = summarize.main(base + ["--check_accuracy", "--output_json", str(out_json)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    name = summarize.ENGINE_BACKEND_NAME
    i = out.index(f"{name} beam 0 result")
    assert out[i - 3].startswith(f"{name} (total latency: ")
    assert out[i - 2] == f"{name} (total output tokens: 24)"
    assert out[i - 1].startswith(f"{name} (tokens per second: ")
    assert [l.split(" : ")[0] for l in out[i + 1:i + 5]] == [
        "  rouge1", "  rouge2", "  rougeL", "  rougeLsum"]
    assert "mean of per-article F1" in out[i + 5] and out[-1].startswith("[PASSED]")
    assert _EchoEngine.calls == [1, 2, 2]                 # warm-up, then 2 batches of 2
    doc = json.loads(out_json.read_text())
    assert len(doc["articles"]) == 4 and doc["results"]["engine"]["backend"] == name
    assert doc["articles"][0]["engine"]["output_ids"] and "rouge1" in doc["results"]["engine"][
        "rouge"]

    rc = summarize.main(base + ["--check_accuracy", "--tensorrt_llm_rouge1_threshold", "101"])
    assert rc == 1 and "[FAILED]" in capsys.readouterr().out
    rc = summarize.main(["--dataset_path", str(data)])
    assert rc == 2 and "nothing to do" in capsys.readouterr().err
    rc = summarize.main(base + ["--ppl_of", "output"])            # without --eval_ppl
    assert rc == 2 and "pass --eval_ppl too" in capsys.readouterr().err
    rc = summarize.main(base + ["--output_len", "600"])        # beyond the engine's limit
    assert rc == 2 and "max_output_len=512" in capsys.readouterr().err


def test_summarize_hf_smollm2(tmp_path, capsys):
    import summarize

    gguf = _smollm2()
    data = _need(CNN_DEV)
    out_json = tmp_path / "s.json"
    rc = summarize.main(["--test_hf", "--hf_model_location", str(gguf), "--dataset_path",
                         str(data), "--max_ite", "2", "--output_len", "4", "--data_type", "fp32",
                         "--device", "cpu", "--use_chat_template", "--output_json",
                         str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Hugging Face (total latency: " in out and "Hugging Face beam 0 result" in out
    assert "  rouge1 : " in out and "  rougeLsum : " in out
    doc = json.loads(out_json.read_text())
    assert [a["id"] for a in doc["articles"]] == [
        json.loads(l)["id"] for l in data.read_text().splitlines()[:2]]
    assert all(0 < len(a["hf"]["output_ids"]) <= 4 for a in doc["articles"])
