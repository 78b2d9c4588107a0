"""Run-time options: the choices a user makes when running an engine (not when building it).

One frozen object, passed explicitly (``Engine.from_dir(..., options=)``,
``LLMEngine(..., options=)``) and applied where the engine loads; ``run.py`` and
``summarize.py`` fill it from their flags (``--tp_allreduce``, ``--pdl``,
``--no_cuda_graphs``, ``--prefill_graph_max_tokens``). Choices fixed at build time live in
the engine's ``config.json`` (``BuildConfig``, e.g. ``use_parallel_embedding``). Imports
``config``, ``cli`` (a flag's type).
"""
from __future__ import annotations

from dataclasses import dataclass

from .cli import non_negative_int
from .config import ConfigError

# Tensor-parallel all-reduce of small CUDA tensors (llama_engine/parallel.py): "auto" takes
# the one-shot kernel where every rank can run it, else NCCL; "oneshot" insists; "nccl" opts out.
TP_ALLREDUCE_MODES = ("auto", "oneshot", "nccl")
# Programmatic dependent launch of the decode kernels (llama_engine/kernels/pdl.py).
PDL_MODES = ("auto", "on", "off")
# Prefills up to this many padded tokens are launch-bound enough to replay from CUDA graphs
# (model_runner.py); at 512 tokens LLaMA-7B's kernels already take tens of milliseconds.
DEFAULT_PREFILL_GRAPH_MAX_TOKENS = 512


@dataclass(frozen=True)
class RuntimeOptions:
    tp_allreduce: str = "auto"
    pdl: str = "auto"
    cuda_graphs: bool = True    # replay decode steps from CUDA graphs (CUDA only)
    # Where CUDA graphs are on, prefills of at most this many tokens (prompts padded to a
    # power-of-two length, times the batch) replay graphs too; 0 runs every prefill eagerly.
    prefill_graph_max_tokens: int = DEFAULT_PREFILL_GRAPH_MAX_TOKENS

    def __post_init__(self):
        if self.tp_allreduce not in TP_ALLREDUCE_MODES:
            raise ConfigError(f"tp_allreduce must be one of {', '.join(TP_ALLREDUCE_MODES)}, "
                              f"got {self.tp_allreduce!r}")
        if self.pdl not in PDL_MODES:
            raise ConfigError(f"pdl must be one of {', '.join(PDL_MODES)}, got {self.pdl!r}")
        if (not isinstance(self.prefill_graph_max_tokens, int)
                or isinstance(self.prefill_graph_max_tokens, bool)
                or self.prefill_graph_max_tokens < 0):
            raise ConfigError("prefill_graph_max_tokens must be an integer >= 0 (0: prefill "
                              f"eagerly), got {self.prefill_graph_max_tokens!r}")


def add_arguments(parser) -> None:
    """The run-time flags of run.py and summarize.py (argparse validates the choices)."""
    g = parser.add_argument_group("run-time options")
    g.add_argument("--tp_allreduce", default="auto", choices=TP_ALLREDUCE_MODES,
                   help="tensor-parallel all-reduce: auto (one-shot kernel where every rank "
                        "can run it, else NCCL), oneshot (insist), nccl")
    g.add_argument("--pdl", default="auto", choices=PDL_MODES,
                   help="programmatic dependent launch of decode kernels (Hopper+): auto|on|off")
    g.add_argument("--prefill_graph_max_tokens", type=non_negative_int,
                   default=DEFAULT_PREFILL_GRAPH_MAX_TOKENS,
                   help="with CUDA graphs, prefills of at most this many tokens (batch x "
                        "prompt length padded to a power of two) replay CUDA graphs; 0: "
                        "prefill eagerly")


def from_args(args, cuda_graphs: bool = True) -> RuntimeOptions:
    return RuntimeOptions(tp_allreduce=args.tp_allreduce, pdl=args.pdl, cuda_graphs=cuda_graphs,
                          prefill_graph_max_tokens=args.prefill_graph_max_tokens)
