"""Run-time engine choices benchmark.py takes as flags (``--tp_allreduce``, ``--pdl``) and the
one place that hands them to the engine.

``engine_kwargs`` is that place: every engine benchmark.py makes is built with
``**engine_kwargs(...)``'s result. Today the engine reads these choices from the process
(LLAMA_ENGINE_TP_ALLREDUCE, ``kernels.pdl.set_mode``); once ``llama_engine.options.RuntimeOptions``
exists, this function returns ``{"options": RuntimeOptions(...)}`` instead and nothing else
changes."""
from __future__ import annotations

import os
from typing import Optional

from llama_engine.kernels import pdl as pdl_kernels

TP_ALLREDUCE_CHOICES = ("auto", "oneshot", "nccl")
PDL_CHOICES = {"auto": "auto", "on": "1", "off": "0"}


def engine_kwargs(tp_allreduce: Optional[str] = None, pdl: Optional[str] = None) -> dict:
    """Keyword arguments for Engine.from_tensors / Engine.from_dir carrying the run-time
    choices; None leaves the engine's default. Call it before parallel.init_from_env: the
    all-reduce path is chosen when the first engine sets up its collectives."""
    if tp_allreduce is not None:
        os.environ["LLAMA_ENGINE_TP_ALLREDUCE"] = tp_allreduce
    if pdl is not None:
        pdl_kernels.set_mode(PDL_CHOICES[pdl])
    return {}
