"""Output files in the layout of TensorRT-LLM's run.py: ``--output_csv``, ``--output_npy``,
``--output_log_probs_npy``, ``--output_cum_log_probs_npy``; and token-id prompt files
(``--input_file x.csv | x.npy``) read back the same way.

Layout (one beam per prompt): a row per prompt holding the prompt's ids, then its generated
ids, then ``pad_id`` up to ``max input length + max_output_len`` (the width TensorRT-LLM's
output tensor has). The npy of ids is int32 ``[batch, width]``; per-token log probs are
float32 ``[batch, 1, max_output_len]`` (zeros past each sequence's end); cumulative log probs
float32 ``[batch, 1]``. Writers take plain lists, so any runner's output fits.
"""
from __future__ import annotations

import csv
import os
from typing import Optional, Sequence

import numpy as np

from llama_engine.config import ConfigError


def _parent(path: str, flag: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None


def id_rows(inputs: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
            max_output_len: int, pad_id: int) -> list[list[int]]:
    """Prompt + generated ids per prompt, padded with ``pad_id`` to one width."""
    if len(inputs) != len(outputs):
        raise ConfigError(f"{len(inputs)} prompts but {len(outputs)} outputs")
    width = max(len(x) for x in inputs) + max_output_len
    rows = []
    for inp, out in zip(inputs, outputs):
        row = [int(t) for t in inp] + [int(t) for t in out][:max_output_len]
        rows.append(row + [int(pad_id)] * (width - len(row)))
    return rows


def write_csv(path: str, rows: Sequence[Sequence[int]]) -> None:
    _parent(path, "--output_csv")
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=",").writerows(rows)


def write_ids_npy(path: str, rows: Sequence[Sequence[int]]) -> None:
    _parent(path, "--output_npy")
    np.save(path, np.asarray(rows, dtype=np.int32))


def log_probs_array(log_probs: Sequence[Sequence[float]], max_output_len: int) -> np.ndarray:
    """Per-token log probs of each prompt's generated tokens -> float32 [B, 1, max_output_len]."""
    arr = np.zeros((len(log_probs), 1, max_output_len), dtype=np.float32)
    for i, lp in enumerate(log_probs):
        lp = np.asarray(lp, dtype=np.float32)[:max_output_len]
        arr[i, 0, :len(lp)] = lp
    return arr


def write_log_probs_npy(path: str, log_probs: Sequence[Sequence[float]],
                        max_output_len: int) -> None:
    _parent(path, "--output_log_probs_npy")
    np.save(path, log_probs_array(log_probs, max_output_len))


def write_cum_log_probs_npy(path: str, log_probs: Sequence[Sequence[float]]) -> None:
    """The sum of each prompt's generated tokens' log probs -> float32 [B, 1]."""
    _parent(path, "--output_cum_log_probs_npy")
    cum = [[float(np.sum(np.asarray(lp, dtype=np.float64)))] for lp in log_probs]
    np.save(path, np.asarray(cum, dtype=np.float32))


def write_outputs(inputs, outputs, max_output_len: int, pad_id: int, *,
                  output_csv: Optional[str] = None, output_npy: Optional[str] = None,
                  log_probs=None, output_log_probs_npy: Optional[str] = None,
                  output_cum_log_probs_npy: Optional[str] = None) -> list[str]:
    """Write every file asked for; -> the paths written."""
    written = []
    if output_csv or output_npy:
        rows = id_rows(inputs, outputs, max_output_len, pad_id)
        if output_csv:
            write_csv(output_csv, rows)
            written.append(output_csv)
        if output_npy:
            write_ids_npy(output_npy, rows)
            written.append(output_npy)
    if output_log_probs_npy or output_cum_log_probs_npy:
        if log_probs is None:
            raise ConfigError("no per-token log probs from this runner")
        if output_log_probs_npy:
            write_log_probs_npy(output_log_probs_npy, log_probs, max_output_len)
            written.append(output_log_probs_npy)
        if output_cum_log_probs_npy:
            write_cum_log_probs_npy(output_cum_log_probs_npy, log_probs)
            written.append(output_cum_log_probs_npy)
    return written


def read_token_file(path: str, pad_id: Optional[int], max_input_length: int) -> list[list[int]]:
    """Prompts as token ids from a .csv (one prompt per row) or .npy ([batch, len], ``pad_id``
    entries dropped); each keeps its last ``max_input_length`` ids, as TensorRT-LLM does."""
    if not os.path.isfile(path):
        raise ConfigError(f"--input_file {path} does not exist")
    out = []
    try:
        if path.endswith(".csv"):
            with open(path, newline="") as f:
                for n, row in enumerate(csv.reader(f), 1):
                    ids = [int(x) for x in row if x.strip()]
                    if ids:
                        out.append(ids[-max_input_length:])
        else:
            arr = np.load(path)
            arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
            for row in arr:
                ids = [int(x) for x in row if pad_id is None or int(x) != pad_id]
                out.append(ids[-max_input_length:])
    except ValueError as e:
        raise ConfigError(f"--input_file {path}: not token ids ({e})") from None
    if not out:
        raise ConfigError(f"--input_file {path}: no prompts in the file")
    return out
