#!/usr/bin/env python3
"""Which cnn_dailymail data the quickstart's summarize step can use, decided before any long
work. Prints one line for tools/quickstart.sh:

    path FILE     a file or folder to pass as --dataset_path (the user's, or ../shared's)
    hub           no file, but `datasets` can load cnn_dailymail 3.0.0 (its cache or the hub)
    skip          nothing usable: summarize is skipped (a one-line reason goes to stderr)

Exit status 2 when the user named a dataset that cannot be read (the reason on stderr).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_engine.config import ConfigError  # noqa: E402
from llama_engine.prompts import load_cnn_dailymail  # noqa: E402

# Beside the repository, as the project's test data is laid out (never a machine's path).
SHARED_DEV = os.path.join(ROOT, "..", "shared", "data", "cnn_dailymail", "test_dev.jsonl")


def choose(user_path: str | None, shared_path: str = SHARED_DEV, try_hub: bool = True) -> str:
    if user_path:
        try:
            load_cnn_dailymail(user_path, limit=5)
        except ConfigError as e:
            print(f"quickstart: error: {str(e).replace('--dataset_path ', '')}", file=sys.stderr)
            sys.exit(2)
        return f"path {user_path}"
    if os.path.isfile(shared_path):
        return f"path {os.path.relpath(shared_path)}"
    if try_hub:
        try:
            load_cnn_dailymail(None, limit=5)
            return "hub"
        except ConfigError as e:
            reason = str(e).replace("; pass --dataset_path", "")
    else:
        reason = "no hub lookup"
    print(f"quickstart: no cnn_dailymail data ({os.path.relpath(shared_path)} is absent; "
          f"{reason}): summarize.py will be skipped; give it data with "
          "`bash tools/quickstart.sh FILE.jsonl`", file=sys.stderr)
    return "skip"


if __name__ == "__main__":
    print(choose(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None))
