"""Sampling: the settings of a request (``SamplingConfig``), the result of a static batch
(``GenerationOutput``) and the sampler turning fp32 logits into token ids. Shared by our
runner and the TensorRT-LLM backend's runner; imports only torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingConfig:
    """TensorRT-LLM's defaults: top_k=1 is greedy."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0


@dataclass
class GenerationOutput:
    output_ids: list            # per prompt, generated tokens only (end_id excluded)
    num_generated_tokens: int = 0
    latency_s: float = 0.0
    prefill_s: float = 0.0


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits fp32 [B, V] -> token ids int64 [B]."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, cfg), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits fp32 [B, V] -> the distribution ``sample`` draws from (temperature, top-k,
    top-p applied) [B, V]; speculative decoding's rejection rule needs it explicitly."""
    logits = logits / max(cfg.temperature, 1e-5)
    if cfg.top_k > 1:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop tokens once the mass before them already reaches top_p (keep at least one).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs
