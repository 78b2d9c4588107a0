"""TensorRT-LLM's flags on our scripts: docs/flags.md is complete and current, every
TensorRT-LLM flag parses (or is refused in one line naming it), the output files have its
layout, --streaming prints text, and --eval_ppl's perplexity equals Hugging Face's."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import flags_table  # noqa: E402
from llama_engine import cli_compat, outputs  # noqa: E402
from llama_engine.text_stream import TextStream  # noqa: E402


@pytest.fixture(scope="module")
def parsers():
    return flags_table.parsers()


def test_flags_md_is_current():
    """A flag added to a script (or a TensorRT-LLM flag added to the lists) without
    regenerating the table fails here."""
    text = (REPO / "docs" / "flags.md").read_text(encoding="utf-8")
    assert text == flags_table.render(), \
        "docs/flags.md is stale: run python tools/flags_table.py --write"


def test_every_tensorrt_llm_flag_has_a_status(parsers):
    for script, parser in parsers.items():
        rows = flags_table.rows_for(script, parser)
        missing = [f for f, _, status in rows if status == "MISSING"]
        assert not missing, f"{script} lacks TensorRT-LLM flags {missing}"
        assert all(f"`{f}`" in (REPO / "docs" / "flags.md").read_text() for f, _, _ in rows)


def _refused(parsers):
    for script, parser in parsers.items():
        for flag, action in parser._option_string_actions.items():
            if isinstance(action, cli_compat.Refused):
                yield script, parser, flag


def test_refused_flags_give_one_line_naming_the_flag(parsers, capsys):
    seen = 0
    for script, parser, flag in _refused(parsers):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([flag, "x"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "not supported" in err[0], (script, err)
        seen += 1
    assert seen > 50


def test_run_takes_beam_flags(parsers, capsys):
    from llama_engine import cli_compat
    p = parsers["run.py"]
    base = ["--engine_dir", "e", "--max_output_len", "4"]
    a = p.parse_args(base + ["--num_beams", "4", "--length_penalty", "0.5",
                             "--early_stopping", "never", "--num_return_sequences", "2"])
    assert cli_compat.beam_settings(a) == dict(num_beams=4, num_return_sequences=2,
                                               length_penalty=0.5, early_stopping="never")
    a = p.parse_args(base + ["--num_beams", "3", "--early_stopping", "0"])
    assert cli_compat.beam_settings(a)["num_return_sequences"] == 3
    assert a.early_stopping is False
    for bad in (["--early_stopping", "sometimes"], ["--num_beams", "0"],
                ["--beam_search_diversity_rate", "0.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(base + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad[0] in err[-1], err
    a = p.parse_args(base + ["--num_beams", "2", "--num_return_sequences", "3"])
    with pytest.raises(SystemExit):
        cli_compat.beam_settings(a)
    assert "--num_return_sequences 3 is more than --num_beams 2" in capsys.readouterr().err


def test_aliases_and_several_prompts(parsers):
    run = parsers["run.py"]
    a = run.parse_args(["--engine_dir", "e", "--max_output_len", "4", "--input_text", "a",
                        "b", "--input_text", "c", "--hf_model_dir", "m", "--log_level",
                        "warning", "--use_py_session", "--kv_cache_free_gpu_memory_fraction",
                        "0.5"])
    assert a.input_text == ["a", "b", "c"] and a.hf_model_dir == "m"
    s = parsers["summarize.py"].parse_args(["--hf_model_dir", "m", "--dataset_dir", "d",
                                            "--hf_data_type", "fp16", "--eval_ppl"])
    assert (s.hf_model_location, s.dataset_path, s.data_type) == ("m", "d", "fp16")
    b = parsers["build.py"].parse_args(["--checkpoint_dir", "c", "--paged_kv_cache",
                                        "enable", "--gemm_plugin", "float16",
                                        "--remove_input_padding", "enable"])
    assert b.ckpt_dir == "c" and b.use_gemm_plugin == "float16"
    c = parsers["convert_checkpoint.py"].parse_args(["--model_dir", "m", "-sq", "0.5",
                                                     "--int8_kv_cache"])
    assert c.smoothquant == 0.5 and c.int8_kv_cache
    h = parsers["hf_llama_convert.py"].parse_args(["-i", "x", "-o", "y", "-t", "fp16",
                                                   "-tp", "2", "-p", "4"])
    assert (h.dtype, h.tp_size) == ("fp16", 2)


def test_output_files_layout(tmp_path):
    inputs, outs = [[1, 5, 6], [1, 7]], [[9, 10], [11, 12, 13]]
    lps = [[-0.5, -1.0], [-0.25, -0.25, -2.0]]
    written = outputs.write_outputs(
        inputs, outs, 4, pad_id=2, output_csv=str(tmp_path / "o" / "out.csv"),
        output_npy=str(tmp_path / "out.npy"), log_probs=lps,
        output_log_probs_npy=str(tmp_path / "lp.npy"),
        output_cum_log_probs_npy=str(tmp_path / "cum.npy"))
    assert len(written) == 4
    rows = [[int(x) for x in r] for r in csv.reader(open(tmp_path / "o" / "out.csv"))]
    assert rows == [[1, 5, 6, 9, 10, 2, 2], [1, 7, 11, 12, 13, 2, 2]]   # width 3 + 4
    ids = np.load(tmp_path / "out.npy")
    assert ids.dtype == np.int32 and ids.tolist() == rows
    lp = np.load(tmp_path / "lp.npy")
    assert lp.shape == (2, 1, 4) and lp.dtype == np.float32
    assert lp[1, 0].tolist() == [-0.25, -0.25, -2.0, 0.0]
    cum = np.load(tmp_path / "cum.npy")
    assert cum.shape == (2, 1) and cum[:, 0].tolist() == [-1.5, -2.5]
    # Token files read back: the csv and the npy give the prompts again (pad dropped).
    np.save(tmp_path / "in.npy", np.array([[1, 5, 6], [1, 7, 2]], dtype=np.int32))
    assert outputs.read_token_file(str(tmp_path / "in.npy"), 2, 923) == [[1, 5, 6], [1, 7]]
    assert outputs.read_token_file(str(tmp_path / "o" / "out.csv"), None, 3) == \
        [[10, 2, 2], [13, 2, 2]]


class _ByteTokenizer:
    """ids are bytes: a multi-byte character arrives over several tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_prints_text_incrementally():
    buf = io.StringIO()
    text = "café ok"
    data = list(text.encode())
    stream = TextStream(_ByteTokenizer(), [[0]], end_ids=[0], file=buf)
    seen = []
    for step, t in enumerate(data + [0, 65]):
        stream.step(step, [t])
        seen.append(buf.getvalue())
    stream.close()
    assert buf.getvalue() == text + "\n"              # nothing after the end id
    assert "\ufffd" not in "".join(seen)              # half a character is never shown
    assert seen[2] == "caf" and seen[4] == "café"


def test_streaming_run_prints_text(smol_engine_fp32, capsys):
    import run
    assert run.main(["--engine_dir", str(smol_engine_fp32), "--max_output_len", "8",
                     "--streaming"]) == 0
    static = capsys.readouterr().out
    assert run.main(["--engine_dir", str(smol_engine_fp32), "--max_output_len", "8",
                     "--streaming", "--use_inflight_batching"]) == 0
    inflight = capsys.readouterr().out
    for out in (static, inflight):
        streamed, rest = out.split("\nInput: ", 1)
        final = rest.split('Output: "', 1)[1].split('"\n', 1)[0]
        assert streamed == final and "[step" not in out


@pytest.fixture(scope="module")
def smol_engine_fp32(smollm2_gguf, tmp_path_factory):
    import build
    out = tmp_path_factory.mktemp("smol32") / "engine_fp32"
    assert build.main(["--gguf_file", smollm2_gguf, "--dtype", "float32", "--output_dir",
                       str(out), "--max_batch_size", "2", "--max_input_len", "512",
                       "--max_output_len", "64"]) == 0
    return out


def test_run_writes_trtllm_outputs(smol_engine_fp32, tmp_path, capsys):
    import run
    assert run.main(["--engine_dir", str(smol_engine_fp32), "--max_output_len", "6",
                     "--input_text", "The capital of France is", "Born in", "--output_npy",
                     str(tmp_path / "o.npy"), "--output_log_probs_npy", str(tmp_path / "lp.npy"),
                     "--output_cum_log_probs_npy", str(tmp_path / "c.npy")]) == 0
    assert "Output:" not in capsys.readouterr().out     # as TensorRT-LLM: files, no text
    ids, lp, cum = (np.load(tmp_path / n) for n in ("o.npy", "lp.npy", "c.npy"))
    assert ids.shape[0] == 2 and lp.shape == (2, 1, 6) and cum.shape == (2, 1)
    assert (lp <= 0).all() and np.allclose(lp.sum(axis=(1, 2)), cum[:, 0], atol=1e-5)


def test_perplexity_engine_equals_hf_fp32(smol_engine_fp32, smollm2_gguf, shared_data):
    """--eval_ppl's two sides: our fp32 engine and HF's fp32 model, same prompt + reference."""
    import torch

    import run_hf
    from llama_engine.perplexity import engine_log_probs, hf_log_probs, perplexity
    from llama_engine.prompts import build_summarize_prompt, load_cnn_dailymail
    from llama_engine.runner import Engine
    from llama_engine.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(str(smol_engine_fp32))
    engine = Engine.from_dir(str(smol_engine_fp32), device="cpu")
    hf = run_hf.load_hf_model(smollm2_gguf, "float32", "cpu")
    records = load_cnn_dailymail(str(shared_data / "cnn_dailymail" / "test_dev.jsonl"),
                                 split="test", limit=2)
    for r in records:
        prompt = build_summarize_prompt(r["article"], tok, 400)
        ref = tok.encode(r["highlights"], add_bos=False)[:64]
        ours, theirs = perplexity(engine_log_probs(engine, prompt, ref)), \
            perplexity(hf_log_probs(hf, prompt, ref))
        assert 1.0 < ours < 1e4
        assert abs(ours - theirs) / theirs < 1e-4, (ours, theirs)
        # --ppl_of output (TensorRT-LLM's form): every position after the first token; its
        # tail is the reference form's log-probs, and HF agrees the same way.
        whole = engine_log_probs(engine, prompt, ref, whole_sequence=True)
        assert whole.shape[0] == len(prompt) + len(ref) - 1
        assert torch.allclose(whole[-len(ref):], engine_log_probs(engine, prompt, ref),
                              atol=1e-9, rtol=0)
        w_theirs = perplexity(hf_log_probs(hf, prompt, ref, whole_sequence=True))
        assert abs(perplexity(whole) - w_theirs) / w_theirs < 1e-4
