"""Helpers shared by the command-line scripts (run.py, run_hf.py, summarize.py).

Prompt input (``--input_text`` / ``--input_file``), the ``Input: "…"`` / ``Output: "…"`` lines
and the latency lines in TensorRT-LLM's examples' style, dtype-name parsing and the one-line
error convention (``error: …`` on stderr, exit code 2).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from llama_engine.config import ConfigError

DEFAULT_INPUT_TEXT = "Born in north-east France, Soyer trained as a"

# Short and long dtype names -> the long names used in engine configs (config.DTYPES).
DTYPE_ALIASES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp64": "float64", "float64": "float64", "double": "float64",
}
DTYPE_CHOICES = ("fp32", "fp16", "bf16", "fp64", "float32", "float16", "bfloat16", "float64")


def die(msg: str) -> NoReturn:
    """Print ``error: msg`` to stderr and exit with status 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run_main(body: Callable[[], int]) -> int:
    """Run a script body, turning a ConfigError into ``error: …`` and return code 2."""
    try:
        return body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# -- dtypes ---------------------------------------------------------------------------------
def parse_dtype(name: str) -> str:
    """'fp16' / 'float16' / ... -> 'float16' (ConfigError for unknown names)."""
    key = str(name).lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ConfigError(f"unknown data type {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_ALIASES[key]


def torch_dtype(name: str):
    import torch

    return getattr(torch, parse_dtype(name))


def resolve_device(name: Optional[str]) -> str:
    """None/'auto' -> 'cuda' when available else 'cpu'; checks that CUDA exists if asked."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return str(name)


def default_dtype_for(device: str) -> str:
    """fp16 on CUDA (TensorRT-LLM's default), fp32 on CPU (CPU half matmuls are slow/inexact)."""
    return "float16" if device.startswith("cuda") else "float32"


# -- prompts --------------------------------------------------------------------------------
def add_prompt_args(parser) -> None:
    """--input_text (repeatable) and --input_file, as run.py and run_hf.py take them."""
    parser.add_argument("--input_text", action="append", default=None,
                        help=f"a prompt; repeat for a batch (default: {DEFAULT_INPUT_TEXT!r})")
    parser.add_argument("--input_file", default=None,
                        help="prompts from a file: .txt (one per line) or .jsonl/.json "
                             "(objects with 'prompt' or 'text', or plain strings)")


def read_prompts(input_texts: Optional[Sequence[str]], input_file: Optional[str]) -> list[str]:
    """The prompts to run: the file's when ``input_file`` is given, else the texts, else the
    default prompt."""
    if input_file:
        prompts = _read_prompt_file(input_file)
    elif input_texts:
        prompts = list(input_texts)
    else:
        prompts = [DEFAULT_INPUT_TEXT]
    if not prompts:
        raise ConfigError(f"{input_file}: no prompts in the file")
    return prompts


def _prompt_of(obj, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("prompt", "text", "input_text", "input"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise ConfigError(f"{where}: expected a string or an object with 'prompt' or 'text'")


def _read_prompt_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"--input_file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    out.append(_prompt_of(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if path.endswith(".json"):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        items = data if isinstance(data, list) else [data]
        return [_prompt_of(x, path) for x in items]
    # Plain text: one prompt per non-empty line (trailing newline/CR removed, spaces kept).
    return [line.rstrip("\r") for line in content.split("\n") if line.strip()]


# -- printing -------------------------------------------------------------------------------
def print_io(input_text: str, output_text: str, file=None) -> None:
    """The two lines per prompt that run.py and run_hf.py print."""
    file = file or sys.stdout
    print(f'Input: "{input_text}"', file=file)
    print(f'Output: "{output_text}"', file=file)


def print_timing(name: str, mean_latency_s: float, generated_tokens: int, file=None) -> None:
    """``<name> (mean latency: X sec)`` and ``<name> (tokens per second: Y)``.

    ``generated_tokens`` is the count of one run (all prompts of the batch)."""
    file = file or sys.stdout
    print(f"{name} (mean latency: {mean_latency_s:.6f} sec)", file=file)
    tps = generated_tokens / mean_latency_s if mean_latency_s > 0 else float("nan")
    print(f"{name} (tokens per second: {tps:.2f})", file=file)


def strip_at_end(ids: Sequence[int], end_ids: Sequence[int]) -> list[int]:
    """Generated ids up to (not including) the first end id."""
    ends = set(end_ids)
    out = []
    for t in ids:
        t = int(t)
        if t in ends:
            break
        out.append(t)
    return out
