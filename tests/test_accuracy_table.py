"""CI smoke of tools/accuracy_table.py: 2 articles, short outputs, a subset of the rows.

Runs the real pipeline on SmolLM2-135M-Instruct (build.py, hf_llama_convert.py calibration for
the INT8 KV scales, summarize.py, teacher-forced decode steps) and checks the table's shape and
sanity: the fp32 engine agrees with itself exactly, HF fp32 agrees with it, int8 modes agree
closely. Skipped when SmolLM2 or the shared data is absent. About 2-3 min on 2 cores.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ROWS = ("hf", "fp32", "int8_wo", "int8_kv")


def _load_tool():
    spec = importlib.util.spec_from_file_location("accuracy_table",
                                                  REPO / "tools" / "accuracy_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def table(smollm2_gguf, shared_data, tmp_path_factory):
    tool = _load_tool()
    base = tmp_path_factory.mktemp("acc")
    argv = ["--gguf", smollm2_gguf,
            "--dataset_path", str(shared_data / "cnn_dailymail" / "test_dev.jsonl"),
            "--calib_dataset", str(shared_data / "cnn_dailymail" / "train_calib.jsonl"),
            "--num_articles", "2", "--output_len", "16", "--max_input_length", "256",
            "--calib_size", "4", "--calib_length", "128", "--rows", ",".join(ROWS),
            "--assets_dir", str(base / "assets"), "--work_dir", str(base / "work"),
            "--no_progress"]
    assert tool.main(argv) == 0
    return tool, argv, base / "assets"


def test_outputs_have_the_rows(table):
    tool, _, assets = table
    doc = json.loads((assets / "accuracy.json").read_text())
    assert set(doc["rows"]) == set(ROWS)
    md = (assets / "accuracy.md").read_text()
    for key in ROWS:
        assert f"| {tool.ROWS[key]} |" in md, key
    assert "Not measured yet" in md            # the rows this smoke leaves out are named
    png = (assets / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_numbers_in_range(table):
    _, _, assets = table
    rows = json.loads((assets / "accuracy.json").read_text())["rows"]
    for key, r in rows.items():
        for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert 0.0 <= r["rouge"][name] <= 100.0, (key, name)
        assert 0.0 <= r["top1"] <= 1.0, key
        assert r["kl"] >= 0.0 and math.isfinite(r["kl"]), key
        assert r["tf_positions"] > 20, key
        assert r["output_tokens"] > 0 and r["total_latency_s"] > 0, key
    for key in ("fp32", "int8_wo", "int8_kv"):
        assert rows[key]["speed_vs_hf"] > 0, key
        assert rows[key]["size_bytes"] > 0, key
    assert rows["int8_wo"]["size_bytes"] < 0.5 * rows["fp32"]["size_bytes"]
    assert rows["int8_kv"]["quant"].endswith("INT8 KV cache")


def test_agreement(table):
    _, _, assets = table
    rows = json.loads((assets / "accuracy.json").read_text())["rows"]
    # The fp32 engine against its own reference: decode steps are deterministic.
    assert rows["fp32"]["top1"] == 1.0 and rows["fp32"]["kl"] == 0.0
    # HF fp32 against our fp32 engine: the same model up to float rounding.
    assert rows["hf"]["top1"] > 0.98 and rows["hf"]["kl"] < 1e-3
    for key in ("int8_wo", "int8_kv"):
        assert rows[key]["top1"] > 0.8, key
        assert 0.0 < rows[key]["kl"] < 0.1, key


def test_resume_skips_and_settings_are_checked(table, capsys):
    tool, argv, assets = table
    before = (assets / "accuracy.json").read_text()
    assert tool.main(argv) == 0                 # every row is there: nothing recomputed
    assert "nothing to do" in capsys.readouterr().err
    after = json.loads((assets / "accuracy.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]
    other = [*argv[:argv.index("--num_articles") + 1], "3", *argv[argv.index("--num_articles") + 2:]]
    assert tool.main(other) == 2                # other settings: refused without --force
    assert "--force" in capsys.readouterr().err
