"""Helpers shared by the command-line scripts (build.py, run.py, run_hf.py, summarize.py, ...).

The parser every script uses (no abbreviated flags; a bad flag is one ``error: …`` line),
argument types with ranges (sampling parameters), prompt input (``--input_text`` / ``--input_file``), the ``Input: "…"`` / ``Output: "…"`` lines
and the latency lines in TensorRT-LLM's examples' style, dtype-name parsing and the one-line
error convention (``error: …`` on stderr, exit code 2).
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
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


# -- parsers -------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--max_out`` is not ``--max_output_len``) whose errors
    are one ``error: …`` line with exit status 2, like every other error of the scripts."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        die(f"{message} (see {self.prog} --help)")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default to show: not for None, False or an
    option whose help already says what its default is."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def make_parser(doc: Optional[str], **kwargs) -> ArgumentParser:
    """The parser of a script whose module docstring is ``doc`` (its first paragraph is the
    description)."""
    return ArgumentParser(description=(doc or "").split("\n\n")[0], **kwargs)


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def unit_interval(text: str) -> float:
    v = _number(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _ranged(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        v = _number(text)
        if (v <= lo if lo_open else v < lo) or v > hi:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {text}")
        return v
    parse.__name__ = "number"
    return parse


def add_sampling_args(parser) -> None:
    """The sampling flags of TensorRT-LLM's run.py / summarize.py, each checked against its
    range at parse time; ``sampling_from_args`` turns them into a ``SamplingConfig``."""
    parser.add_argument("--temperature", type=non_negative_float, default=1.0)
    parser.add_argument("--top_k", type=positive_int, default=1, help="1 = greedy")
    parser.add_argument("--top_p", type=unit_interval, default=0.0, help="0 = off")
    parser.add_argument("--repetition_penalty", type=_ranged(0.0, math.inf, lo_open=True),
                        default=1.0, help="HF's: > 1 discourages tokens already seen; 1 = off")
    parser.add_argument("--presence_penalty", type=_ranged(-2.0, 2.0), default=0.0,
                        help="OpenAI's: subtracted once from every token generated; 0 = off")
    parser.add_argument("--frequency_penalty", type=_ranged(-2.0, 2.0), default=0.0,
                        help="OpenAI's: subtracted per time a token was generated; 0 = off")
    parser.add_argument("--no_repeat_ngram_size", type=non_negative_int, default=0,
                        help="no n-gram of this size occurs twice; 0 = off")
    parser.add_argument("--min_length", type=non_negative_int, default=0,
                        help="generate at least this many tokens before an end id (HF's "
                             "min_new_tokens)")
    parser.add_argument("--end_id", type=non_negative_int, default=None,
                        help="stop at this id instead of the model's end ids")
    parser.add_argument("--pad_id", type=non_negative_int, default=None,
                        help="fill padded outputs with this id (default: the end id)")
    parser.add_argument("--stop_words", default=None,
                        help='comma-separated words ending generation, e.g. "\n\n,User:" '
                             "(not output)")
    parser.add_argument("--bad_words", default=None,
                        help="comma-separated words never generated")
    parser.add_argument("--random_seed", type=int, default=None,
                        help="sampling seed (default 0 where a script had --seed)")


def word_list(text: Optional[str], tokenizer, flag: str) -> list:
    """A comma-separated ``--stop_words`` / ``--bad_words`` string as token-id words, the way
    TensorRT-LLM's ``to_word_list_format`` reads it (CSV fields, each encoded without special
    tokens or BOS; an empty field is skipped)."""
    import csv

    if not text:
        return []
    words = []
    for row in csv.reader([text]):
        for word in row:
            if not word:
                continue
            ids = tokenizer.encode(word, add_bos=False)
            if not ids:
                raise ConfigError(f"{flag}: {word!r} encodes to no tokens")
            words.append(ids)
    return words


def sampling_from_args(args, tokenizer):
    """The ``SamplingConfig`` of the flags ``add_sampling_args`` added (``--random_seed``, or
    a script's own ``--seed``), stop/bad words tokenized with ``tokenizer``; checked against
    the engine (a one-line ``ConfigError`` for values out of its range)."""
    from llama_engine.sampling import SamplingConfig

    seed = getattr(args, "random_seed", None)
    if seed is None:
        seed = getattr(args, "seed", None)
    cfg = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, min_length=args.min_length,
        end_id=args.end_id, pad_id=args.pad_id,
        stop_words=word_list(args.stop_words, tokenizer, "--stop_words"),
        bad_words=word_list(args.bad_words, tokenizer, "--bad_words"))
    return cfg


def add_prefix_caching_arg(parser) -> None:
    """--enable_prefix_caching (inflight batching: reuse the KV blocks of shared prefixes),
    the one definition run.py, summarize.py, benchmark.py and serve.py share."""
    parser.add_argument("--enable_prefix_caching", action="store_true",
                        help="with inflight batching: reuse the KV cache blocks of prompt "
                             "prefixes seen before (only the rest of a prompt is prefilled)")


def add_speculative_args(parser) -> None:
    """Speculative decoding (llama_engine/speculative.py), TensorRT-LLM's flag names;
    ``speculative.config_from_args`` turns them into a config."""
    g = parser.add_argument_group("speculative decoding")
    g.add_argument("--speculative_decoding_mode", default=None,
                   choices=("prompt_lookup", "draft_tokens_external"),
                   help="propose tokens from the prompt and output so far (prompt_lookup) or "
                        "with a draft engine (draft_tokens_external); verify them in one step")
    g.add_argument("--max_draft_len", type=positive_int, default=4,
                   help="tokens proposed per step (k)")
    g.add_argument("--draft_engine_dir", default=None,
                   help="the draft engine (same tokenizer) for draft_tokens_external")
    g.add_argument("--speculative_max_batch_size", type=positive_int, default=8,
                   help="inflight batching: decode steps of more sequences run without "
                        "speculation")


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
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise ConfigError(f"--device {name}: unknown device; use cpu, cuda or cuda:N")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return str(name)


def default_dtype_for(device: str) -> str:
    """fp16 on CUDA (TensorRT-LLM's default), fp32 on CPU (CPU half matmuls are slow/inexact)."""
    return "float16" if device.startswith("cuda") else "float32"


# -- prompts --------------------------------------------------------------------------------
def add_prompt_args(parser) -> None:
    """--input_text (repeatable) and --input_file, as run.py and run_hf.py take them."""
    parser.add_argument("--input_text", action="extend", nargs="+", default=None,
                        help="one or more prompts (the flag may repeat) "
                             f"(default: {DEFAULT_INPUT_TEXT!r})")
    parser.add_argument("--input_file", "--input_tokens", dest="input_file", default=None,
                        help="prompts from a file: .txt (one per line) or .jsonl/.json "
                             "(objects with 'prompt' or 'text', or plain strings); "
                             "token ids from .csv (a row per prompt) or .npy")


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
    if os.path.isdir(path):
        raise ConfigError(f"--input_file {path} is a directory; give a .txt, .jsonl or .json file")
    if not os.path.isfile(path):
        raise ConfigError(f"--input_file {path} does not exist")
    content = read_utf8(path)
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


def read_utf8(path: str) -> str:
    """The file's text; a one-line ConfigError (where the first bad byte is) if not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start})") from None


def check_engine_dir(path: str) -> None:
    """A missing or wrong ``--engine_dir`` named as such (not as a missing tokenizer)."""
    if not os.path.exists(path):
        raise ConfigError(f"--engine_dir {path} does not exist; build an engine with build.py")
    if not os.path.isdir(path):
        raise ConfigError(f"--engine_dir {path} is not a directory")


def token_id(t) -> int:
    """``t`` as a token id: integers only (a float such as 3.7 is an error, not 3)."""
    if isinstance(t, numbers.Integral) and not isinstance(t, bool):
        return int(t)
    if getattr(t, "ndim", None) == 0 and re.fullmatch(r"torch\.u?int\d+", str(t.dtype)):
        return int(t)  # a 0-d integer tensor, as tolist() of a tensor never gives
    raise ConfigError(f"token id {t!r} is not an integer")


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
        t = token_id(t)
        if t in ends:
            break
        out.append(t)
    return out
