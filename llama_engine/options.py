"""Run-time options: the choices a user makes when running an engine (not when building it).

One frozen object, passed explicitly (``Engine.from_dir(..., options=)``,
``LLMEngine(..., options=)``) and applied where the engine loads; ``run.py`` and
``summarize.py`` fill it from their flags (``--tp_allreduce``, ``--pdl``,
``--no_cuda_graphs``). Choices fixed at build time live in the engine's ``config.json``
(``BuildConfig``, e.g. ``use_parallel_embedding``). Imports only ``config``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError

# Tensor-parallel all-reduce of small CUDA tensors (llama_engine/parallel.py): "auto" takes
# the one-shot kernel where every rank can run it, else NCCL; "oneshot" insists; "nccl" opts out.
TP_ALLREDUCE_MODES = ("auto", "oneshot", "nccl")
# Programmatic dependent launch of the decode kernels (llama_engine/kernels/pdl.py).
PDL_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class RuntimeOptions:
    tp_allreduce: str = "auto"
    pdl: str = "auto"
    cuda_graphs: bool = True    # replay decode steps from CUDA graphs (CUDA only)

    def __post_init__(self):
        if self.tp_allreduce not in TP_ALLREDUCE_MODES:
            raise ConfigError(f"tp_allreduce must be one of {', '.join(TP_ALLREDUCE_MODES)}, "
                              f"got {self.tp_allreduce!r}")
        if self.pdl not in PDL_MODES:
            raise ConfigError(f"pdl must be one of {', '.join(PDL_MODES)}, got {self.pdl!r}")


def add_arguments(parser) -> None:
    """The run-time flags of run.py and summarize.py (argparse validates the choices)."""
    g = parser.add_argument_group("run-time options")
    g.add_argument("--tp_allreduce", default="auto", choices=TP_ALLREDUCE_MODES,
                   help="tensor-parallel all-reduce: auto (one-shot kernel where every rank "
                        "can run it, else NCCL), oneshot (insist), nccl")
    g.add_argument("--pdl", default="auto", choices=PDL_MODES,
                   help="programmatic dependent launch of decode kernels (Hopper+): auto|on|off")


def from_args(args, cuda_graphs: bool = True) -> RuntimeOptions:
    return RuntimeOptions(tp_allreduce=args.tp_allreduce, pdl=args.pdl, cuda_graphs=cuda_graphs)
