"""The one module of ``llama_engine`` that reads the process environment.

What it owns:

* ``interpreting()``: whether Triton runs its kernels in the CPU interpreter
  (``TRITON_INTERPRET``, read as Triton reads it). Every kernel module asks here, so they
  cannot disagree about it.
* torchrun's description of this process (``torchrun_env()``: WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE) and ``set_default(name, value)`` for the variables NCCL / PyTorch read
  themselves (``parallel.SAFE_CUDA_ENV``).
* ``check_environment()``: a set ``LLAMA_ENGINE_*`` variable that is not a known debugging
  switch is a ``ConfigError`` (a misspelt or retired switch must not be silently ignored).
  Choices a user makes are build options (the engine's ``config.json``) or run-time options,
  never environment variables. ``llama_engine.kernels`` calls the check once, when the
  kernels are first imported.

Imports: ``llama_engine.config`` (``ConfigError``) only.
"""
from __future__ import annotations

import functools
import os

from .config import ConfigError

PREFIX = "LLAMA_ENGINE_"

# Debugging switches the package reads through this module: name -> what it does. None today.
DEBUG_SWITCHES: dict[str, str] = {}

# Values Triton's own knob (triton.knobs.runtime.interpret) takes as true.
_TRUE = ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether Triton interprets kernels on the CPU (``TRITON_INTERPRET``). Triton decides when
    a kernel is decorated, i.e. at import: the answer is read once and kept."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def torchrun_env() -> tuple[int, int, int]:
    """(WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them; (1, 0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                               world))


def set_default(name: str, value: str) -> None:
    """Set a variable that a library below us reads (NCCL, symmetric memory) unless the user
    set it."""
    os.environ.setdefault(name, value)


def unknown_switches(environ=None) -> list[str]:
    """The set ``LLAMA_ENGINE_*`` names that nothing reads, sorted."""
    env = os.environ if environ is None else environ
    known = set(DEBUG_SWITCHES)
    return sorted(k for k in env if k.startswith(PREFIX) and k not in known)


def check_environment(environ=None) -> None:
    """Raise ``ConfigError`` naming every set ``LLAMA_ENGINE_*`` variable that is not known."""
    bad = unknown_switches(environ)
    if bad:
        known = ", ".join(sorted(DEBUG_SWITCHES)) or "none"
        raise ConfigError(f"unknown environment switch(es) {', '.join(bad)}: engine choices are "
                          f"options now (known debugging switches: {known})")
