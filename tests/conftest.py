"""Shared fixtures: repo paths, the shared data folder, SmolLM2, tiny random HF models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_interpreted_json(script: str, *args: str, timeout: int = 600):
    """Run ``python script *args`` in a fresh process under Triton's interpreter (the
    variable must be set before triton is imported), one OpenMP thread, the repo importable;
    fail with the tails of its output if it exits non-zero, else return the JSON of its last
    stdout line (the kernel checks print their list of failures there)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{os.path.basename(script)} {' '.join(args)} crashed:\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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
        pytest.skip("SmolLM2 GGUF not fetched: run tools/fetch_smollm2.py (or set SMOLLM2_GGUF)")
    return p


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
