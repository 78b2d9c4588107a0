"""Shared fixtures: repo paths, the shared data folder, SmolLM2, tiny random HF models; the
markers (every test gets one: ``unit``, ``interp``, ``dist``, ``e2e`` or ``gpu``, by its file
unless it names one itself; a test that loads SmolLM2 is ``e2e``); Triton's interpreter switched on when the machine has no CUDA
device.

Triton decides whether it interprets when a kernel is decorated (at import), so the variable
is set here, before any test module imports torch or triton. Ops called with CPU tensors and
``impl="auto"`` still take the torch reference; only ``impl="triton"`` runs the interpreter.
"""
from __future__ import annotations

import os

if not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


MARKERS = {
    "unit": "fast CPU tests of one part (the default): `pytest -m unit` runs in about a minute",
    "interp": "Triton kernels under TRITON_INTERPRET=1 against their PyTorch references",
    "dist": "tensor parallelism: several gloo ranks (torchrun) against one process",
    "e2e": "whole scripts and real models (SmolLM2 against Hugging Face)",
    "gpu": "needs a CUDA GPU (run with -m gpu on the GPU machine; skipped elsewhere, saying so)",
}
# Test files whose tests are not unit tests; every other file's tests are `unit`.
FILE_MARKERS = {
    "test_kernels_attn.py": "interp", "test_kernels_comm.py": "interp",
    "test_kernels_linear.py": "interp", "test_kernels_norm.py": "interp",
    "test_kernels_pdl.py": "interp", "test_model_triton.py": "interp",
    "test_tp.py": "dist",
    "test_smollm2.py": "e2e", "test_accuracy_table.py": "e2e", "test_text.py": "e2e",
    "test_gpu.py": "gpu",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(m) for m in MARKERS):
            continue
        mark = FILE_MARKERS.get(item.path.name, "unit")
        if mark == "unit" and "smollm2_gguf" in getattr(item, "fixturenames", ()):
            mark = "e2e"            # a real model: not a fast unit test, whatever its file
        item.add_marker(getattr(pytest.mark, mark))


def interpreter_on() -> bool:
    """Whether this process's Triton interprets (the kernel tests need it, or a GPU)."""
    from llama_engine.envs import interpreting
    return interpreting()


def shared_data_dir() -> Path:
    env = os.environ.get("LLAMA_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def smollm2_gguf_path():
    sys.path.insert(0, str(REPO / "tools"))
    from fetch_smollm2 import find_smollm2_gguf
    p = find_smollm2_gguf()
    return str(p) if p else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "cnn_dailymail" / "test_dev.jsonl").is_file():
        pytest.skip(f"shared data not found at {d} (set LLAMA_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    p = smollm2_gguf_path()
    if not p:
        pytest.skip("SmolLM2 GGUF not fetched: run python tools/fetch_smollm2.py "
                    "(or set SMOLLM2_GGUF)")
    return p


@pytest.fixture(scope="session")
def smol_engine(smollm2_gguf, tmp_path_factory):
    """SmolLM2 as a float64 engine (exactly HF's arithmetic on the CPU), built once per test
    session: batch 2, input 512, output 64. Files that need other limits build their own."""
    import build
    out = tmp_path_factory.mktemp("smol") / "engine_fp64"
    assert build.main(["--gguf_file", smollm2_gguf, "--dtype", "float64", "--output_dir",
                       str(out), "--max_batch_size", "2", "--max_input_len", "512",
                       "--max_output_len", "64"]) == 0
    return out


def make_tiny_hf(path: Path, num_kv_heads: int = 2, tie: bool = False, seed: int = 0,
                 vocab_size: int = 256, dtype=None) -> Path:
    """A tiny random LlamaForCausalLM saved with save_pretrained (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    # Larger-than-default weights so logits are far from uniform and greedy paths are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory):
    cache = {}

    def get(num_kv_heads: int = 2, tie: bool = False) -> Path:
        key = (num_kv_heads, tie)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny_hf_kv{num_kv_heads}_tie{int(tie)}")
            cache[key] = make_tiny_hf(d, num_kv_heads, tie)
        return cache[key]
    return get
