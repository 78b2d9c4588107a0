"""Our engine against Hugging Face on tiny random LLaMAs: logits at prefill and every decode
step (MHA and GQA, tied and untied embeddings), greedy text, and the build/load errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

import build
from llama_engine.runner import Engine
from llama_engine.kv_cache import static_block_tables

CASES = [pytest.param(4, False, id="mha-untied"), pytest.param(2, False, id="gqa-untied"),
         pytest.param(2, True, id="gqa-tied"), pytest.param(1, True, id="mqa-tied")]


def hf_model(path, dtype):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def build_engine(src, out, dtype="float32", extra=()):
    rc = build.main(["--model_dir", str(src), "--dtype", dtype, "--output_dir", str(out),
                     "--max_batch_size", "4", "--max_input_len", "64", "--max_output_len", "32",
                     *extra])
    assert rc == 0
    return out


@pytest.mark.parametrize("kv_heads,tie", CASES)
def test_logits_match_hf_prefill_and_decode(tiny_hf_factory, tmp_path, kv_heads, tie):
    src = tiny_hf_factory(kv_heads, tie)
    engine = Engine.from_dir(str(build_engine(src, tmp_path / "eng")), device="cpu")
    ref = hf_model(src, torch.float32)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 5)]  # a ragged batch
    steps = 6
    # Reference: HF over each prompt extended by the tokens our engine feeds back.
    cache = engine.kv_cache(len(prompts), 9 + steps)
    bt = static_block_tables(len(prompts), 9 + steps, engine.block_size, engine.device)
    logits = engine.prefill(prompts, cache, bt)
    seqs = [list(p) for p in prompts]
    ctx = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    for step in range(steps + 1):
        with torch.no_grad():
            for b, s in enumerate(seqs):
                want = ref(torch.tensor([s])).logits[0, -1]
                torch.testing.assert_close(logits[b], want, atol=1e-4, rtol=1e-4,
                                           msg=f"seq {b} step {step}")
        nxt = logits.argmax(-1)
        for b in range(len(seqs)):
            seqs[b].append(int(nxt[b]))
        if step < steps:
            logits = engine.decode_step(nxt, ctx, bt, cache)


def test_teacher_forced_logits_match_hf(tiny_hf_factory, tmp_path):
    src = tiny_hf_factory(2, False)
    engine = Engine.from_dir(str(build_engine(src, tmp_path / "eng")), device="cpu")
    ids = list(range(3, 40))
    with torch.no_grad():
        want = hf_model(src, torch.float32)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.forward_logits(ids), want, atol=1e-4, rtol=1e-4)


def test_greedy_generate_equals_hf_float64(tiny_hf_factory, tmp_path):
    src = tiny_hf_factory(2, False)
    engine = Engine.from_dir(str(build_engine(src, tmp_path / "eng", "float64")), device="cpu")
    ref = hf_model(src, torch.float64)
    prompts = [[1, 17, 33, 99, 4], [1, 200, 7]]
    out = engine.generate(prompts, max_new_tokens=12)
    for p, got in zip(prompts, out.output_ids):
        want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == want


def test_engine_dir_contents(tiny_hf_factory, tmp_path):
    eng = build_engine(tiny_hf_factory(2, True), tmp_path / "eng", "float16")
    cfg = json.load(open(eng / "config.json"))
    assert cfg["backend"] == "pytorch" and cfg["format_version"] == 1
    assert cfg["dtype"] == "float16"
    assert cfg["build_config"]["max_input_len"] == 64
    assert cfg["pretrained_config"]["architecture"] == "LlamaForCausalLM"
    assert (eng / "rank0.safetensors").is_file()


# -- bad input ----------------------------------------------------------------------------------
def test_prompt_over_max_input_len_is_a_clear_error(tiny_hf_factory, tmp_path):
    from llama_engine.runner import EngineLimitError
    engine = Engine.from_dir(str(build_engine(tiny_hf_factory(2, False), tmp_path / "e")), "cpu")
    with pytest.raises(EngineLimitError, match="max_input_len 64"):
        engine.generate([[5] * 65], max_new_tokens=2)
    with pytest.raises(EngineLimitError, match="max_batch_size 4"):
        engine.generate([[5]] * 5, max_new_tokens=2)


def test_newer_engine_format_is_rejected(tiny_hf_factory, tmp_path):
    from llama_engine.config import ConfigError
    eng = build_engine(tiny_hf_factory(2, False), tmp_path / "e")
    cfg = json.load(open(eng / "config.json"))
    cfg["format_version"] = 99
    json.dump(cfg, open(eng / "config.json", "w"))
    with pytest.raises(ConfigError, match="newer"):
        Engine.from_dir(str(eng), "cpu")


def test_corrupt_weights_fail_cleanly_and_keep_existing_output(tiny_hf_factory, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = tiny_hf_factory(2, False)
    for f in os.listdir(good):
        (src / f).write_bytes((good / f).read_bytes())
    out = build_engine(src, tmp_path / "out")
    before = sorted(os.listdir(out)), (out / "rank0.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    rc = build.main(["--model_dir", str(src), "--dtype", "float32", "--output_dir", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model.safetensors" in err[0]
    assert (sorted(os.listdir(out)), (out / "rank0.safetensors").read_bytes()) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    rc = build.main(["--model_config", "llama-3b", "--output_dir", str(tmp_path / "x")])
    assert rc == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_conflicting_sources_rejected(tmp_path):
    with pytest.raises(SystemExit) as e:
        build.main(["--model_dir", "a", "--meta_ckpt_dir", "b"])
    assert e.value.code == 2



def test_float64_engine_on_cuda_is_a_clear_error(tmp_path):
    # Raised before anything touches a GPU, so it is checked on CPU-only machines too.
    from llama_engine.config import ConfigError
    d = tmp_path / "e64"
    assert build.main(["--model_config", "tiny", "--dtype", "float64", "--output_dir", str(d)]) == 0
    with pytest.raises(ConfigError, match="float64 engines run on the CPU only"):
        Engine.from_dir(str(d), device="cuda")
    assert Engine.from_dir(str(d), device="cpu").dtype == torch.float64


# -- options: run time (RuntimeOptions) and build time (config.json) ----------------------------
def test_runtime_options_are_validated_and_reach_the_engine(tiny_hf_factory, tmp_path,
                                                            monkeypatch):
    import run
    from llama_engine import runner
    from llama_engine.config import ConfigError
    from llama_engine.options import RuntimeOptions
    with pytest.raises(ConfigError, match="pdl must be one of"):
        RuntimeOptions(pdl="fast")
    with pytest.raises(ConfigError, match="tp_allreduce must be one of"):
        RuntimeOptions(tp_allreduce="ring")
    with pytest.raises(SystemExit):  # argparse choices: a misspelt value is an error
        run.build_parser().parse_args(["--engine_dir", "e", "--max_output_len", "4",
                                     "--pdl", "maybe"])
    a = run.build_parser().parse_args(["--engine_dir", "e", "--max_output_len", "4", "--pdl", "off",
                                       "--tp_allreduce", "nccl"])
    assert (a.pdl, a.tp_allreduce) == ("off", "nccl")
    modes = []
    monkeypatch.setattr(runner.pdl, "set_mode", modes.append)
    d = str(build_engine(tiny_hf_factory(2, False), tmp_path / "eng"))
    eng = Engine.from_dir(d, device="cpu", options=RuntimeOptions(pdl="off"))
    assert modes == ["off"]
    Engine.from_dir(d, device="cpu")  # no options: the process's PDL mode is left alone
    assert modes == ["off"]
    assert eng.runner.cuda_graphs is False  # CUDA graphs are CUDA only


def test_build_options_live_in_config_json(tiny_hf_factory, tmp_path):
    from llama_engine.config import EngineConfig
    d = build_engine(tiny_hf_factory(2, False), tmp_path / "eng")
    cfg = json.loads((d / "config.json").read_text())
    build_cfg = cfg["build_config"]
    assert build_cfg["use_parallel_embedding"] is False
    # plugin flags choose TensorRT-LLM's kernels only; our engine does not store them
    for retired in ("gemm_plugin", "gpt_attention_plugin", "max_beam_width"):
        assert retired not in build_cfg
    # an engine written before they were dropped still loads
    build_cfg.update(gemm_plugin="auto", gpt_attention_plugin="auto", max_beam_width=1)
    (d / "config.json").write_text(json.dumps(cfg))
    assert EngineConfig.load(str(d)).build.use_parallel_embedding is False
