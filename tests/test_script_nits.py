"""First-hour nits of the scripts: --help of the converters imports no torch, the calibration
default is repository-relative (never this machine's path), and loading or decoding with a
tokenizer prints no clean_up_tokenization_spaces warning."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_converter_parsers_import_no_torch():
    code = ("import sys, hf_llama_convert, convert_checkpoint; "
            "hf_llama_convert.build_parser(); convert_checkpoint.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_calibration_default_is_repository_relative(capsys):
    import convert_checkpoint
    import hf_llama_convert
    from llama_engine import smoothquant
    assert smoothquant.DEFAULT_CALIB_DATASET is None        # the library takes a path
    for parser in (hf_llama_convert.build_parser(), convert_checkpoint.build_parser()):
        text = " ".join(parser.format_help().split())
        assert "../shared/data/cnn_dailymail/train_calib.jsonl" in text
        assert "/work/" not in text and str(REPO.parent) not in text
    found = hf_llama_convert.default_calib_dataset()
    expected = REPO.parent / "shared" / "data" / "cnn_dailymail" / "train_calib.jsonl"
    assert found == (str(expected) if expected.is_file() else None)


def test_tokenizer_prints_no_clean_up_warning(smollm2_gguf, capfd):
    from llama_engine.tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_gguf)
    text = "Hello , world ! It 's a test ."
    assert tok.decode(tok.encode(text, add_bos=False)) == text   # spaces kept as written
    assert "clean_up_tokenization_spaces" not in capfd.readouterr().err
