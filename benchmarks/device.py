"""Device primitives every measurement shares: synchronise before reading a clock, peak
memory, giving cached blocks back; and the random prompts every timed run feeds.

Each takes the device explicitly ("cuda", "cpu" or a torch.device): on the CPU (dry runs of
the flow) the CUDA calls are skipped and peak memory is NaN."""
from __future__ import annotations

import gc

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda(device) else float("nan")


def free_memory(device) -> None:
    """Return cached GPU blocks, so that an engine sized from free memory sees them."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list:
    """``batch`` lists of ``length`` token ids in [3, vocab) (0-2: special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()
