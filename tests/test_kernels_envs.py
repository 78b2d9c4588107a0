"""llama_engine/envs.py: the one module reading the environment. TRITON_INTERPRET as Triton
reads it, and an unknown LLAMA_ENGINE_* variable is a ConfigError (checked when the kernels
are first imported)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llama_engine import envs
from llama_engine.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_switches_are_named_in_one_error():
    env = {"LLAMA_ENGINE_FUSED_SWIGLU": "1", "LLAMA_ENGINE_PDL": "0", "PATH": "/bin"}
    assert envs.unknown_switches(env) == ["LLAMA_ENGINE_FUSED_SWIGLU", "LLAMA_ENGINE_PDL"]
    with pytest.raises(ConfigError, match="LLAMA_ENGINE_FUSED_SWIGLU, LLAMA_ENGINE_PDL"):
        envs.check_environment(env)
    envs.check_environment({"PATH": "/bin", "TRITON_INTERPRET": "1"})   # nothing to say


def test_importing_the_kernels_checks_the_environment():
    env = dict(os.environ, LLAMA_ENGINE_FAST_CVT="0", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", "import llama_engine.kernels.ops"], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "LLAMA_ENGINE_FAST_CVT" in p.stderr


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("On", True), ("0", False),
                                      ("", False), ("no", False)])
def test_interpreting_reads_triton_interpret_as_triton_does(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    envs.interpreting.cache_clear()
    try:
        assert envs.interpreting() is on
    finally:
        envs.interpreting.cache_clear()
