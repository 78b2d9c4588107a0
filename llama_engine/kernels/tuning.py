"""Tuned launch configurations as DATA: one JSON file per GPU under ``configs/``, named after
``torch.cuda.get_device_name()`` with spaces as ``_`` (``NVIDIA_H100_80GB_HBM3.json``), and a
fallback for every other device (the heuristics below). The tuning tools
(``tools/gpu_linear_sweep.py``, ``tools/gpu_attn_sweep.py``) write these files with
``save_table``; nothing rewrites source code.

A file holds

* ``skinny_gemv``: rows ``{kind, m, n, k, kernel, block_n, block_k, ...}``: the launch of the
  skinny GEMV (``kernel`` "dot" / "fma": a ``SkinnyCfg``) or of the tiled GEMM ("gemm": a
  ``GemmCfg``) for weight kind ``kind``, M bucket ``m`` (1, 4, 16, 64) and weight ``[n, k]``.
  Other shapes take the row nearest in (log N, log K) for their kind and M bucket; a kind
  with no rows takes ``heuristic_skinny``. Extra keys (``GBps``, ``measured_on``) are notes.
* ``decode_attention``: the decode-attention launch parameters (keys of
  ``FALLBACK_DECODE_CONFIG``; missing keys take the fallback's value).

Which file a tensor's device uses, and the large-M GEMM tiles (``pick_gemm``), are decided
here; ``linear.py`` and ``attn.py`` ask. CPU tensors (the interpreter) use the fallback.

Imports: ``llama_engine.config``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Weight kinds (the kernels' constexpr WKIND) and their names in the files.
FP, I8, I4, I4G, A8, F8 = 0, 1, 2, 3, 4, 5
KIND_NAMES = {FP: "fp", I8: "w8a16", I4: "w4a16", I4G: "w4a16g", A8: "w8a8", F8: "fp8"}
_KIND_BY_NAME = {v: k for k, v in KIND_NAMES.items()}
M_BUCKETS = (1, 4, 16, 64)


@dataclass(frozen=True)
class SkinnyCfg:
    """One launch of a skinny (M <= 64) kernel. block_k counts unpacked K elements."""
    kernel: str            # "dot" (tensor cores, swap-AB), "fma" (elementwise GEMV) or "dot8"
    #                        (FP8 tensor cores on e4m3 operands; the FP8 GEMV only)
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class GemmCfg:
    """One launch of the tiled GEMM (large M)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Decode-attention launch parameters where no file has them (swept on an H100: the H100 file
# holds the same values).
FALLBACK_DECODE_CONFIG = {
    "block_n": 64,          # tokens per inner tile (fp16/bf16/fp32 caches)
    # int8: swept on an H100 at batch 32, context 2,048 (tools/gpu_attn_sweep.py): 128-token
    # tiles and no forced split, 233 us a layer (2.30 TB/s of K/V) vs 264 us for 64 / 512
    "block_n_int8": 128,    # tokens per inner tile for int8 caches
    "num_warps": 4,
    "num_stages": 3,
    "num_warps_int8": 4,
    "num_stages_int8": 2,
    "max_partition": 2048,  # upper bound of tokens per split (B*Hkv >= 2 x SMs: no split)
    "max_partition_int8": 2048,
    "max_splits": 64,       # the merge kernel holds all splits of a head in registers
    "dot_min_group": 1,     # query heads per KV head from which tl.dot is used (else FMA)
    "int8_magic": True,     # int8 -> fp16 by bit tricks instead of conversion instructions
    "target_programs": 0,   # programs to aim for when picking the split; 0: 2 x SM count
}


def m_bucket(M: int) -> int:
    """Rows are tuned at M = 1, 4, 16, 64; other M use the next bucket up."""
    for b in M_BUCKETS:
        if M <= b:
            return b
    return 128


# ---------------------------------------------------------------------------------------------
# The files: names, validation, loading, saving
# ---------------------------------------------------------------------------------------------
def file_for(device_name: str) -> Path:
    return CONFIG_DIR / (device_name.strip().replace(" ", "_") + ".json")


def cfg_from_row(row: dict) -> Union[SkinnyCfg, GemmCfg]:
    """A ``skinny_gemv`` row's launch, checked (ConfigError naming the bad field)."""
    kernel = row.get("kernel")
    if kernel in ("dot", "fma", "dot8"):
        fields = {f: row[f] for f in ("block_n", "block_k", "split_k", "num_warps", "num_stages")
                  if f in row}
        cfg = SkinnyCfg(kernel, **fields)
    elif kernel == "gemm":
        fields = {f: row[f] for f in ("block_m", "block_n", "block_k", "group_m", "num_warps",
                                      "num_stages") if f in row}
        cfg = GemmCfg(**fields)
    else:
        raise ConfigError(f"skinny_gemv row {row}: kernel must be dot, dot8, fma or gemm")
    for name, v in asdict(cfg).items():
        if name == "kernel":
            continue
        if type(v) is not int or v < 1 or (name != "num_stages" and v & (v - 1)):
            raise ConfigError(f"skinny_gemv row {row}: {name}={v!r} must be a power of two"
                              if name != "num_stages" else
                              f"skinny_gemv row {row}: num_stages={v!r} must be an int >= 1")
    return cfg


def _key_of(row: dict) -> tuple:
    if row.get("kind") not in _KIND_BY_NAME:
        raise ConfigError(f"skinny_gemv row {row}: kind must be one of {sorted(_KIND_BY_NAME)}")
    if row.get("m") not in M_BUCKETS:
        raise ConfigError(f"skinny_gemv row {row}: m must be one of {M_BUCKETS}")
    for f in ("n", "k"):
        if type(row.get(f)) is not int or row[f] < 1:
            raise ConfigError(f"skinny_gemv row {row}: {f} must be a positive int")
    return (_KIND_BY_NAME[row["kind"]], row["m"], row["n"], row["k"])


def check_decode_config(over: dict) -> dict:
    """Validated decode-attention entries (keys of FALLBACK_DECODE_CONFIG) merged over the
    fallback."""
    if not isinstance(over, dict):
        raise ConfigError("decode_attention must be a JSON object, e.g. {\"block_n_int8\": 128}")
    unknown = sorted(set(over) - set(FALLBACK_DECODE_CONFIG))
    if unknown:
        raise ConfigError(f"decode_attention: unknown keys {unknown}; known: "
                          f"{sorted(FALLBACK_DECODE_CONFIG)}")
    for k, v in over.items():
        if type(v) is not type(FALLBACK_DECODE_CONFIG[k]) or (isinstance(v, int) and v < 0):
            raise ConfigError(f"decode_attention: {k}={v!r} must be a "
                              f"{type(FALLBACK_DECODE_CONFIG[k]).__name__} >= 0")
        if k.startswith(("block_n", "max_partition", "num_warps")) and (v < 1 or v & (v - 1)):
            raise ConfigError(f"decode_attention: {k}={v} must be a power of two")
    merged = {**FALLBACK_DECODE_CONFIG, **over}
    for sfx in ("", "_int8"):
        if merged["max_partition" + sfx] < merged["block_n" + sfx]:
            raise ConfigError(f"decode_attention: max_partition{sfx} must be at least "
                              f"block_n{sfx}")
    return merged


@dataclass(frozen=True)
class Table:
    """One device's configs: ``skinny`` (key (kind, M bucket, N, K) -> launch, in file order)
    and ``decode`` (the full decode-attention parameters)."""
    source: str
    skinny: dict
    decode: dict


FALLBACK = Table("fallback", {}, dict(FALLBACK_DECODE_CONFIG))


def parse_table(doc: dict, source: str) -> Table:
    """A file's JSON -> Table, every row checked."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a tuning file is a JSON object")
    skinny = {}
    for row in doc.get("skinny_gemv", []):
        key, cfg = _key_of(row), cfg_from_row(row)
        if getattr(cfg, "kernel", None) == "dot8" and key[0] != F8:
            raise ConfigError(f"skinny_gemv row {row}: dot8 (FP8 tensor cores) is for kind "
                              f"{KIND_NAMES[F8]!r} only")
        skinny[key] = cfg
    return Table(source, skinny, check_decode_config(doc.get("decode_attention", {})))


_TABLES: dict = {}


def table_for_name(device_name: Optional[str]) -> Table:
    """The table of the GPU named ``device_name`` (its file), or the fallback."""
    if device_name is None:
        return FALLBACK
    if device_name not in _TABLES:
        path = file_for(device_name)
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"{path}: not JSON: {e}") from None
            _TABLES[device_name] = parse_table(doc, str(path))
        else:
            _TABLES[device_name] = FALLBACK
    return _TABLES[device_name]


_BY_INDEX: dict = {}


def table_for(device: torch.device) -> Table:
    """The table of a tensor's device: its GPU's file, the fallback for CPU tensors."""
    if device.type != "cuda":
        return FALLBACK
    idx = device.index if device.index is not None else torch.cuda.current_device()
    t = _BY_INDEX.get(idx)
    if t is None:
        t = _BY_INDEX[idx] = table_for_name(torch.cuda.get_device_name(idx))
    return t


def forget_loaded() -> None:
    """Drop the loaded tables (a tool that wrote a file reads it again)."""
    _TABLES.clear()
    _BY_INDEX.clear()


def row_of(kind: int, M: int, N: int, K: int, cfg: Union[SkinnyCfg, GemmCfg], **notes) -> dict:
    """A ``skinny_gemv`` row for ``save_table``."""
    c = asdict(cfg)
    if isinstance(cfg, GemmCfg):
        c = {"kernel": "gemm", **c}
    return {"kind": KIND_NAMES[kind], "m": m_bucket(M), "n": N, "k": K, **c, **notes}


def save_table(device_name: str, skinny_rows: Optional[list] = None,
               decode: Optional[dict] = None) -> Path:
    """Write rows into ``device_name``'s file (created from nothing if absent): each row
    replaces the row of its key, new keys are appended; ``decode`` entries replace the file's.
    Everything is validated before the write."""
    path = file_for(device_name)
    doc = json.loads(path.read_text()) if path.is_file() else {"device": device_name}
    rows = list(doc.get("skinny_gemv", []))
    for new in skinny_rows or []:
        key = _key_of(new)
        rows = [r for r in rows if _key_of(r) != key] + [new]
    doc["skinny_gemv"] = rows
    if decode:
        doc["decode_attention"] = {**doc.get("decode_attention", {}), **decode}
    parse_table(doc, str(path))
    path.write_text(dumps(doc))
    forget_loaded()
    return path


def dumps(doc: dict) -> str:
    """JSON with one skinny_gemv row per line (diffs stay readable)."""
    head = {k: v for k, v in doc.items() if k not in ("skinny_gemv", "decode_attention")}
    parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    rows = ",\n".join(f"    {json.dumps(r)}" for r in doc.get("skinny_gemv", []))
    parts.append(f'  "skinny_gemv": [\n{rows}\n  ]')
    if "decode_attention" in doc:
        parts.append(f'  "decode_attention": {json.dumps(doc["decode_attention"])}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


# ---------------------------------------------------------------------------------------------
# Which launch for which shape
# ---------------------------------------------------------------------------------------------
def heuristic_skinny(kind: int, M: int, N: int, K: int) -> SkinnyCfg:
    """When the table has nothing for this kind: ~16 KB weight tiles, split-K until there are
    about two programs per SM."""
    wbytes = {FP: 2, I8: 1, A8: 1, F8: 1, I4: 0.5, I4G: 0.5}[kind]
    bn, bk = 64, int(256 / wbytes)
    n_blocks, k_blocks = -(-N // bn), -(-K // bk)
    split = 1
    while n_blocks * split < 264 and split * 2 <= k_blocks // 2:
        split *= 2
    return SkinnyCfg("dot", bn, bk, split, 4, 3)


def pick_skinny(table: Table, kind: int, M: int, N: int, K: int):
    """The tuned launch for (kind, M bucket, N, K), else the nearest tuned shape, else the
    heuristic. May name the tiled GEMM (a GemmCfg)."""
    b = m_bucket(M)
    cfg = table.skinny.get((kind, b, N, K))
    if cfg is not None:
        return cfg
    near = [(abs(math.log(N / n)) + abs(math.log(K / k)), c)
            for (kd, mb, n, k), c in table.skinny.items() if kd == kind and mb == b]
    if near:
        return min(near, key=lambda t: t[0])[1]
    return heuristic_skinny(kind, M, N, K)


def pick_gemm(kind: int, M: int, N: int, K: int) -> GemmCfg:
    """Large-M tiles, from H100 measurements at M = 128, 512, 2048."""
    if kind == I4G:
        return GemmCfg(128, 128, 128, 8, 8, 4)
    if kind in (I8, I4):
        return GemmCfg(64, 128, 64, 8, 4, 4) if M <= 512 else GemmCfg(128, 128, 64, 8, 8, 3)
    if kind == A8:
        return GemmCfg(128, 128, 64, 8, 8, 4)
    return GemmCfg(128, 128, 64, 8, 8, 3)
