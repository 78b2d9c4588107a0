"""Perplexity, teacher forced: summarize.py's ``--eval_ppl``, in two forms.

``--ppl_of reference`` (the default): for a prompt ``p`` and a reference ``r`` (the article's
highlights), the model reads ``p + r`` once; the log probability of each reference token given
everything before it is taken from the logits of the position before it, and the perplexity
is ``exp(-mean)`` of those.

``--ppl_of output``: what TensorRT-LLM's ``summarize.py --eval_ppl`` computes: the side's own
generated ids ``o`` after the prompt, scored over every position of ``p + o`` after the first
(its context logits joined to its generation logits, predicting ids ``[1:]``). Each side
scores its own output, so two sides agree only as far as their outputs do.

Both sides (our engine's ``forward_logits`` and a Hugging Face model's ``logits``) go through
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


def scored_from(prompt: Sequence[int], whole_sequence: bool) -> int:
    """First scored position: after the prompt, or (``whole_sequence``, TensorRT-LLM's form)
    every position after the first token."""
    return 1 if whole_sequence else len(prompt)


def engine_log_probs(engine, prompt: Sequence[int], reference: Sequence[int],
                     whole_sequence: bool = False) -> torch.Tensor:
    ids = list(prompt) + list(reference)
    return token_log_probs(engine.forward_logits(ids), ids, scored_from(prompt, whole_sequence))


def hf_log_probs(model, prompt: Sequence[int], reference: Sequence[int],
                 whole_sequence: bool = False) -> torch.Tensor:
    ids = list(prompt) + list(reference)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    return token_log_probs(logits, ids, scored_from(prompt, whole_sequence))
