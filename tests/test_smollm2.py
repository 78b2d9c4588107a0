"""End to end on a real trained model: SmolLM2-135M-Instruct (GGUF, weights already Q4_1).

The engine's greedy summaries equal Hugging Face's (both float64, so near-ties cannot flip a
token) on real cnn_dailymail articles; summarize.py prints both ROUGE blocks; run.py and
run_hf.py print the same text."""
from __future__ import annotations

import json
import re

import pytest

import run
import run_hf
import summarize


def test_engine_summaries_equal_hf_float64(smol_engine, smollm2_gguf, shared_data, tmp_path,
                                          capsys):
    out_json = tmp_path / "sum.json"
    rc = summarize.main(["--test_trt_llm", "--test_hf", "--engine_dir", str(smol_engine),
                         "--hf_model_location", smollm2_gguf, "--data_type", "fp64",
                         "--device", "cpu", "--dataset_path",
                         str(shared_data / "cnn_dailymail" / "test_dev.jsonl"),
                         "--max_ite", "3", "--output_len", "40", "--max_input_length", "400",
                         "--use_chat_template", "--output_json", str(out_json)])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "3/3 summaries identical (PyTorch engine (ours) vs Hugging Face)" in text
    # One progress bar per side, each ending with all articles done and a tokens/s figure.
    for side in ("engine", "HF"):
        assert re.search(rf"{side}: 100%.*3/3 .*tok/s", captured.err), side
    # Both result blocks, engine first, with the four ROUGE lines each.
    eng_at = text.index("PyTorch engine (ours) beam 0 result")
    hf_at = text.index("Hugging Face beam 0 result")
    assert eng_at < hf_at
    for block in (text[eng_at:hf_at], text[hf_at:]):
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert re.search(rf"^\s+{key} : \d+\.\d+", block, re.M), key
    res = json.loads(out_json.read_text())
    arts = res["articles"]
    assert len(arts) == 3
    for a in arts:
        assert a["engine"]["output_ids"] == a["hf"]["output_ids"], a["index"]
        assert len(a["engine"]["output_ids"]) > 5
    r1 = res["results"]["engine"]["rouge"]["rouge1"]
    assert r1 == res["results"]["hf"]["rouge"]["rouge1"]


def test_run_equals_run_hf(smol_engine, smollm2_gguf, capsys):
    prompts = ["Born in north-east France, Soyer trained as a", "The capital of France is"]
    args = [a for p in prompts for a in ("--input_text", p)]
    assert run.main(["--engine_dir", str(smol_engine), "--max_output_len", "16",
                     "--device", "cpu", *args]) == 0
    ours = capsys.readouterr().out
    assert run_hf.main(["--hf_model_location", smollm2_gguf, "--max_output_len", "16",
                        "--data_type", "fp64", "--device", "cpu", *args]) == 0
    theirs = capsys.readouterr().out
    def outs(s):  # outputs may span lines
        return re.findall(r'^Output: "(.*?)"\n(?=Input: |llama-)', s, re.M | re.S)
    assert len(outs(ours)) == 2 and outs(ours) == outs(theirs)
    assert "llama-run (mean latency:" in ours and "llama-hf-run (mean latency:" in theirs


def test_summarize_inflight_batching_gives_same_rouge(smol_engine, shared_data, tmp_path):
    """summarize.py --use_inflight_batching: the same summaries and ROUGE as static batching."""
    res = {}
    for name, extra in (("static", []), ("inflight", ["--use_inflight_batching"])):
        out = tmp_path / f"{name}.json"
        assert summarize.main(["--test_trt_llm", "--engine_dir", str(smol_engine),
                               "--device", "cpu", "--dataset_path",
                               str(shared_data / "cnn_dailymail" / "test_dev.jsonl"),
                               "--max_ite", "2", "--batch_size", "2", "--output_len", "16",
                               "--max_input_length", "200", "--use_chat_template",
                               "--output_json", str(out), *extra]) == 0
        res[name] = json.loads(out.read_text())
    ids = [[a["engine"]["output_ids"] for a in r["articles"]] for r in res.values()]
    assert ids[0] == ids[1]
    assert (res["static"]["results"]["engine"]["rouge"]
            == res["inflight"]["results"]["engine"]["rouge"])


def test_run_inflight_batching_equals_static(smol_engine, capsys):
    prompts = ["Born in north-east France, Soyer trained as a", "Once upon a time"]
    args = ["--engine_dir", str(smol_engine), "--max_output_len", "12", "--device", "cpu",
            *[a for p in prompts for a in ("--input_text", p)]]
    assert run.main(args) == 0
    static = capsys.readouterr().out
    assert run.main(args + ["--use_inflight_batching"]) == 0
    inflight = capsys.readouterr().out
    cut = lambda s: s[:s.index("llama-run (mean latency")]  # noqa: E731
    assert cut(static) == cut(inflight) and cut(static).count("Output:") == 2
