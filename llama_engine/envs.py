"""The one module of ``llama_engine`` that reads the process environment.

What it owns:

* ``interpreting()``: whether Triton runs its kernels in the CPU interpreter
  (``TRITON_INTERPRET``, read as Triton reads it). Every kernel module asks here, so they
  cannot disagree about it.
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

# Still read by llama_engine/parallel.py until the run-time options object replaces them (the
# parallel/runner redesign); remove each name here when its read goes.
_READ_ELSEWHERE_FOR_NOW = ("LLAMA_ENGINE_TP_ALLREDUCE", "LLAMA_ENGINE_TP_PARALLEL_EMBEDDING")

# Values Triton's own knob (triton.knobs.runtime.interpret) takes as true.
_TRUE = ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether Triton interprets kernels on the CPU (``TRITON_INTERPRET``). Triton decides when
    a kernel is decorated, i.e. at import: the answer is read once and kept."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def unknown_switches(environ=None) -> list[str]:
    """The set ``LLAMA_ENGINE_*`` names that nothing reads, sorted."""
    env = os.environ if environ is None else environ
    known = set(DEBUG_SWITCHES) | set(_READ_ELSEWHERE_FOR_NOW)
    return sorted(k for k in env if k.startswith(PREFIX) and k not in known)


def check_environment(environ=None) -> None:
    """Raise ``ConfigError`` naming every set ``LLAMA_ENGINE_*`` variable that is not known."""
    bad = unknown_switches(environ)
    if bad:
        known = ", ".join(sorted(DEBUG_SWITCHES)) or "none"
        raise ConfigError(f"unknown environment switch(es) {', '.join(bad)}: engine choices are "
                          f"options now (known debugging switches: {known})")
