"""Perplexity of a reference continuation, teacher forced: summarize.py's ``--eval_ppl``.

For a prompt ``p`` and a reference ``r`` (the article's highlights), the model reads ``p + r``
once; the log probability of each reference token given everything before it is taken from
the logits of the position before it, and the perplexity is ``exp(-mean)`` of those. Both
sides (our engine's ``forward_logits`` and a Hugging Face model's ``logits``) go through
``token_log_probs``, so they differ only by their logits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def token_log_probs(logits: torch.Tensor, ids: Sequence[int], start: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t in [start, len(ids)), from ``logits`` [T, V] of ``ids``
    (row t-1 predicts token t); float64 [len(ids) - start]."""
    if not 1 <= start < len(ids):
        raise ValueError(f"start {start} must be in [1, {len(ids)})")
    rows = logits[start - 1:len(ids) - 1].double()
    target = torch.tensor(list(ids[start:]), dtype=torch.long, device=rows.device)
    return torch.log_softmax(rows, dim=-1).gather(-1, target[:, None]).squeeze(-1).cpu()


def perplexity(log_probs: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(-float(log_probs.mean()))


def engine_log_probs(engine, prompt: Sequence[int], reference: Sequence[int]) -> torch.Tensor:
    ids = list(prompt) + list(reference)
    return token_log_probs(engine.forward_logits(ids), ids, len(prompt))


def hf_log_probs(model, prompt: Sequence[int], reference: Sequence[int]) -> torch.Tensor:
    ids = list(prompt) + list(reference)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return token_log_probs(logits, ids, len(prompt))
