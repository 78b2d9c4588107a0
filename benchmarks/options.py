"""Run-time engine choices benchmark.py takes as flags (``--tp_allreduce``, ``--pdl``) and the
one place that hands them to the engine: every engine benchmark.py makes is built with
``**engine_kwargs(...)``'s result, a ``llama_engine.options.RuntimeOptions``."""
from __future__ import annotations

from typing import Optional

from llama_engine.options import PDL_MODES, TP_ALLREDUCE_MODES, RuntimeOptions

TP_ALLREDUCE_CHOICES = TP_ALLREDUCE_MODES
PDL_CHOICES = PDL_MODES


def engine_kwargs(tp_allreduce: Optional[str] = None, pdl: Optional[str] = None) -> dict:
    """Keyword arguments for Engine.from_tensors / Engine.from_dir carrying the run-time
    choices; None takes the engine's default. CUDA graphs are left to the timing code, which
    switches them on where it measures with them."""
    return {"options": RuntimeOptions(tp_allreduce=tp_allreduce or "auto", pdl=pdl or "auto",
                                      cuda_graphs=False)}
