"""Bad inputs give one ``error: …`` line and exit status 2: engines checked against their
tensors, required config fields, flags out of range, unreadable files, tokenizer symlinks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import build
import run
from llama_engine import cli
from llama_engine.config import ConfigError, ModelArgs
from llama_engine.runner import Engine
from llama_engine.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eng") / "e"
    assert build.main(["--model_config", "tiny", "--dtype", "float32", "--max_input_len", "16",
                       "--max_output_len", "8", "--output_dir", str(d)]) == 0
    return d


def edited(engine_dir, tmp_path, edit) -> Path:
    """A copy of the engine whose config.json went through ``edit(dict)``."""
    d = tmp_path / "edited"
    d.mkdir()
    for f in os.listdir(engine_dir):
        (d / f).write_bytes((engine_dir / f).read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def load_error(d) -> str:
    with pytest.raises(ConfigError) as e:
        Engine.from_dir(str(d), "cpu")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["model"].update(num_hidden_layers=1),
     "config.json says num_hidden_layers 1 but the weights hold 2 layers"),
    (lambda c: c["model"].update(num_hidden_layers=3),
     "config.json says num_hidden_layers 3 but the weights hold 2 layers"),
    (lambda c: c["model"].update(vocab_size=600),
     "transformer.vocab_embedding.weight has shape (512, 64) but config.json (vocab_size) "
     "implies (600, 64)"),
    (lambda c: c["model"].update(num_key_value_heads=4),
     "attention.qkv.weight has shape (128, 64) but config.json (num_attention_heads / "
     "num_key_value_heads / head_dim) implies (192, 64)"),
    (lambda c: c["model"].update(intermediate_size=100), "implies (100, 64)"),
    (lambda c: c["build_config"].update(tokens_per_block=0),
     "build_config.tokens_per_block must be positive, got 0"),
    (lambda c: c["build_config"].pop("max_input_len"),
     "required field build_config.max_input_len is missing; rebuild the engine"),
    (lambda c: c["model"].pop("vocab_size"),
     "required field model.vocab_size is missing; rebuild the engine"),
    (lambda c: c.pop("quantization"), "required field quantization is missing"),
    (lambda c: c["build_config"].update(max_input_len="256"),
     "build_config.max_input_len must be int, got '256'"),
    (lambda c: c.update(format_version="1"),
     "format_version must be an integer (this code reads 1), got '1'; rebuild the engine"),
    (lambda c: c.update(format_version=99), "engine format version 99 is newer than this code"),
    (lambda c: c.update(format_version=0), "unknown engine format version 0"),
])
def test_engine_checked_against_its_tensors(engine_dir, tmp_path, edit, expected):
    assert expected in load_error(edited(engine_dir, tmp_path, edit))


def test_unedited_engine_loads(engine_dir):
    assert Engine.from_dir(str(engine_dir), "cpu").config.build.max_input_len == 16


def test_hf_config_without_vocab_size():
    with pytest.raises(ConfigError, match="^HF config.json has no vocab_size; not a complete"):
        ModelArgs.from_hf_config({"hidden_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4})


# -- the command line --------------------------------------------------------------------------
def run_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        rc = run.main(list(argv))
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "nan"], "argument --temperature: must be a finite number, got 'nan'"),
    (["--temperature", "-0.5"], "argument --temperature: must be >= 0, got -0.5"),
    (["--top_p", "1.5"], "argument --top_p: must be in [0, 1], got 1.5"),
    (["--top_p", "-0.1"], "argument --top_p: must be in [0, 1], got -0.1"),
    (["--top_k", "0"], "argument --top_k: must be positive, got 0"),
    (["--top_k", "-3"], "argument --top_k: must be positive, got -3"),
    (["--max_out", "5"], "unrecognized arguments: --max_out 5"),
])
def test_bad_flags(engine_dir, capsys, flags, expected):
    argv = ["--engine_dir", str(engine_dir), "--max_output_len", "4"] + flags
    line = run_error(capsys, *argv)
    assert line.startswith("error: ") and expected in line


def test_every_script_refuses_abbreviations():
    import hf_llama_convert
    import run_hf
    import summarize
    parsers = [run.build_parser(), run_hf.build_parser(), summarize.build_parser(),
               hf_llama_convert.build_parser()]
    assert all(not p.allow_abbrev for p in parsers)
    with pytest.raises(SystemExit):
        build.parse_args(["--model_conf", "tiny"])


def test_unknown_device(engine_dir, capsys):
    assert run_error(capsys, "--engine_dir", str(engine_dir), "--max_output_len", "2",
                     "--device", "tpu") == (
        "error: --device tpu: unknown device; use cpu, cuda or cuda:N")


def test_missing_engine_dir_is_named(tmp_path, capsys):
    assert run_error(capsys, "--engine_dir", str(tmp_path / "nope"), "--max_output_len", "2") == (
        f"error: --engine_dir {tmp_path / 'nope'} does not exist; build an engine with build.py")


def test_input_file_directory_and_non_utf8(engine_dir, tmp_path, capsys):
    base = ["--engine_dir", str(engine_dir), "--max_output_len", "2", "--device", "cpu"]
    assert run_error(capsys, *base, "--input_file", str(tmp_path)) == (
        f"error: --input_file {tmp_path} is a directory; give a .txt, .jsonl or .json file")
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert run_error(capsys, *base, "--input_file", str(bad)) == (
        f"error: {bad}: not UTF-8 text (byte 0xe9 at offset 3)")


def test_non_utf8_dataset(tmp_path):
    from llama_engine.prompts import load_cnn_dailymail
    bad = tmp_path / "test.jsonl"
    bad.write_bytes(b'{"article": "caf\xe9", "highlights": "x"}\n')
    with pytest.raises(ConfigError, match=r"test.jsonl: not UTF-8 text \(invalid "):
        load_cnn_dailymail(str(bad))


def test_float_token_ids_are_refused():
    assert cli.strip_at_end([5, 6, 2, 7], [2]) == [5, 6]
    with pytest.raises(ConfigError, match="^token id 3.7 is not an integer$"):
        cli.strip_at_end([5, 3.7], [2])


# -- tokenizer symbolic links ------------------------------------------------------------------
def test_tokenizer_symlink_inside_source_is_copied_as_a_file(tmp_path):
    src = tmp_path / "src"
    (src / "blobs").mkdir(parents=True)
    (src / "blobs" / "tok").write_text('{"model_max_length": 8}')
    os.symlink("blobs/tok", src / "tokenizer_config.json")
    out = tmp_path / "out"
    assert save_tokenizer(str(src), str(out)) == ["tokenizer_config.json"]
    copied = out / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_text() == '{"model_max_length": 8}'


def test_tokenizer_symlink_leaving_source_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(secret, src / "tokenizer.json")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"^tokenizer file .*tokenizer.json is a symbolic link "
                                          r"to .*secret.txt, outside .*src; refusing to copy it"):
        save_tokenizer(str(src), str(out))
    assert not (out / "tokenizer.json").exists()


def test_converters_name_a_missing_source(tmp_path, capsys):
    """A path that does not exist is reported as missing, not as an unknown preset."""
    import convert_checkpoint
    import hf_llama_convert
    missing = str(tmp_path / "no_such_model")
    assert hf_llama_convert.main(["-i", missing, "-o", str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: model source {missing} does not exist (a model directory, .gguf file, "
        "config.json or preset name)")
    assert convert_checkpoint.main(["--model_dir", missing, "--output_dir",
                                    str(tmp_path / "ck2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck2").exists()
