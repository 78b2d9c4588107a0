"""The one summarization prompt builder (summarize.py, run_hf.py's users and calibration).

It follows TensorRT-LLM's ``examples/summarize.py`` (task ``summarize`` on cnn_dailymail):
the article gets ``" TL;DR: "`` appended, the whole string is stripped (so the prompt really
ends in ``"TL;DR:"``) and ``" n't"`` is joined to ``"n't"`` (the dataset's tokenised text
writes "did n't"). It is then tokenised with special tokens and truncated from the *left* to
``max_input_length`` tokens (TensorRT-LLM loads its tokenizer with ``truncation_side='left'``
and encodes with ``truncation=True, max_length=...``): BOS stays first and the last
``max_input_length - 1`` text tokens follow, so the ``TL;DR:`` cue always survives.

``use_chat_template=True`` is for instruct models: the article's own tokens are cut first
(keeping its beginning, where news puts the facts), then "Summarize the following news article
in 3 sentences." and the article are wrapped in the tokenizer's chat template with the
generation prompt, so the instruction and the assistant turn survive truncation.

``load_cnn_dailymail`` reads the dataset from a local file or folder, or from the HF hub via
``datasets`` when no path is given.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

from llama_engine.config import ConfigError

DEFAULT_MAX_INPUT_LENGTH = 923           # TensorRT-LLM summarize.py's --max_input_length
TLDR_SUFFIX = " TL;DR: "
CHAT_INSTRUCTION = "Summarize the following news article in 3 sentences."


def clean_article(text: str) -> str:
    """TensorRT-LLM's clean-up of one input: strip, then undo the " n't" split."""
    return text.strip().replace(" n't", "n't")


def build_summarize_prompt(article: str, tokenizer, max_input_length: int = DEFAULT_MAX_INPUT_LENGTH,
                           use_chat_template: bool = False) -> list[int]:
    """Prompt token ids for one article. ``tokenizer`` is a ``llama_engine.tokenizer.Tokenizer``."""
    if max_input_length <= 0:
        raise ConfigError(f"--max_input_length must be positive, got {max_input_length}")
    if use_chat_template:
        return _chat_prompt(article, tokenizer, max_input_length)

    # Suffix first, then clean-up: TensorRT-LLM strips the joined string (dropping the
    # suffix's trailing space).
    text = clean_article(article + TLDR_SUFFIX)
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.add_bos_token:
        keep = max_input_length - 1                     # BOS counts toward the limit
        return [tokenizer.bos_id] + (ids[-keep:] if keep > 0 else [])
    return ids[-max_input_length:]


def _chat_messages(article_text: str) -> list[dict]:
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n{article_text}"}]


def _chat_prompt(article: str, tokenizer, max_input_length: int) -> list[int]:
    if not tokenizer.has_chat_template:
        raise ConfigError(f"tokenizer {tokenizer.source} has no chat template; "
                          "drop --use_chat_template")
    text = clean_article(article)
    ids = tokenizer.encode_chat(_chat_messages(text))
    if len(ids) <= max_input_length:
        return ids
    overhead = len(tokenizer.encode_chat(_chat_messages("")))
    article_ids = tokenizer.encode(text, add_bos=False)
    budget = max_input_length - overhead
    # Decoding a cut and re-encoding it inside the template can shift a token or two at the
    # seams, so shrink the budget until the whole prompt fits.
    while budget > 0:
        ids = tokenizer.encode_chat(_chat_messages(tokenizer.decode(article_ids[:budget])))
        if len(ids) <= max_input_length:
            return ids
        budget -= len(ids) - max_input_length
    raise ConfigError(f"--max_input_length {max_input_length} leaves no room for the article: "
                      f"the chat template and instruction alone take {overhead} tokens")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
_REQUIRED = ("article", "highlights")
_FILE_EXTS = (".jsonl", ".json", ".parquet")


def load_cnn_dailymail(dataset_path: Optional[str] = None, split: str = "test",
                       limit: Optional[int] = None) -> list[dict]:
    """Records with ``article`` and ``highlights`` (and whatever else the source has, e.g. id).

    ``dataset_path``: a .jsonl/.json/.parquet file; a folder saved by ``datasets``
    (``save_to_disk``); a folder holding ``{split}*.jsonl|json|parquet`` files (searched
    recursively, as in a hub snapshot). None: ``datasets.load_dataset("cnn_dailymail",
    "3.0.0", split=split)``. Order is the source's (no shuffling).
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if dataset_path is None:
        where = f"cnn_dailymail 3.0.0 {split}"
        records = _load_from_hub(split)
    else:
        where = os.fspath(dataset_path)
        try:
            if os.path.isfile(where):
                records = _read_file(where)
            elif os.path.isdir(where):
                records = _read_dir(where, split)
            else:
                raise ConfigError(f"--dataset_path {where} does not exist")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if limit is not None:
        records = records[:limit]
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: record {i} is not an object")
        missing = [k for k in _REQUIRED if not isinstance(r.get(k), str)]
        if missing:
            raise ConfigError(f"{where}: record {i} has no text field(s) {missing} "
                              "(need 'article' and 'highlights')")
    if not records:
        raise ConfigError(f"{where}: no records")
    return records


def _read_file(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        return _read_parquet(path)
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError:
            return _read_jsonl(path)      # a .json that is really JSON lines
        if isinstance(data, dict):
            for key in ("data", "test", "validation", "train"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise ConfigError(f"{path}: JSON object without a list of records")
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a list of records")
        return data
    raise ConfigError(f"{path}: unsupported dataset file (use .jsonl, .json or .parquet)")


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("reading parquet needs pyarrow (pip install pyarrow)") from None
        return pd.read_parquet(path).to_dict(orient="records")
    return pq.read_table(path).to_pylist()


def _read_dir(path: str, split: str) -> list[dict]:
    if any(os.path.isfile(os.path.join(path, f))
           for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"{path} is a saved HF dataset; reading it needs the `datasets` "
                              "package (pip install datasets)") from None
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"{path}: no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
        return ds.to_list()
    files = sorted(f for f in glob.glob(os.path.join(path, "**", f"{split}*"), recursive=True)
                   if f.endswith(_FILE_EXTS))
    if not files:
        raise ConfigError(f"{path}: no saved dataset and no {split}*.jsonl/json/parquet files")
    records = []
    for f in files:
        records.extend(_read_file(f))
    return records


def _load_from_hub(split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("no --dataset_path given and the `datasets` package is not installed "
                          "(pip install datasets, or pass a .jsonl/.parquet file)") from None
    try:
        ds = datasets.load_dataset("cnn_dailymail", "3.0.0", split=split)
    except Exception as e:  # noqa: BLE001 - offline / hub errors come in many types
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"cannot load cnn_dailymail from the hub ({type(e).__name__}: "
                          f"{first}); pass --dataset_path") from None
    return ds.to_list()
