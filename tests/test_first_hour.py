"""A new user's first hour: the quickstart's data check, the CPU dtype default, the note for a
half-precision engine on a CPU."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import build  # noqa: E402
import quickstart_data  # noqa: E402
import run  # noqa: E402


def _record_file(path):
    path.write_text(json.dumps({"id": "x", "article": "The cat sat.", "highlights": "Cat."}) + "\n")
    return path


def test_quickstart_data_user_file(tmp_path):
    data = _record_file(tmp_path / "mine.jsonl")
    assert quickstart_data.choose(str(data), shared_path=str(tmp_path / "none.jsonl")) == \
        f"path {data}"


def test_quickstart_data_bad_user_file_stops_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        quickstart_data.choose(str(tmp_path / "missing.jsonl"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"quickstart: error: {tmp_path / 'missing.jsonl'} does not exist"


def test_quickstart_data_shared_then_skip(tmp_path, capsys):
    shared = _record_file(tmp_path / "test_dev.jsonl")
    assert quickstart_data.choose(None, shared_path=str(shared)).startswith("path ")
    assert quickstart_data.choose(None, shared_path=str(tmp_path / "absent.jsonl"),
                                  try_hub=False) == "skip"
    err = capsys.readouterr().err
    assert "summarize.py will be skipped" in err and "bash tools/quickstart.sh FILE.jsonl" in err
    assert err.count("\n") == 1


def test_build_defaults_to_float32_on_cpu(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "eng"
    assert build.main(["--model_config", "tiny", "--output_dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "no CUDA GPU here, so the engine is float32" in capsys.readouterr().out
    # An explicit --dtype wins, silently.
    out16 = tmp_path / "eng16"
    assert build.main(["--model_config", "tiny", "--dtype", "float16",
                       "--output_dir", str(out16)]) == 0
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "float16"
    assert "no CUDA GPU" not in capsys.readouterr().out


def test_build_defaults_to_float16_with_a_gpu(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build.default_build_dtype("pytorch") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.default_build_dtype("tensorrt_llm") == "float16"


def test_half_engine_on_cpu_prints_a_note(tmp_path, capsys):
    out = tmp_path / "eng16"
    assert build.main(["--model_config", "tiny", "--dtype", "float16", "--max_input_len", "16",
                       "--max_output_len", "4", "--output_dir", str(out)]) == 0
    capsys.readouterr()
    run.load_runner(str(out), "cpu", None)
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "float16 engine on the CPU" in err and err.count("\n") == 1
    run.load_runner(str(out), "cpu", "float32")       # overridden to float32: no note
    assert capsys.readouterr().err == ""
