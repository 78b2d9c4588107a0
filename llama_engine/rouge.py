"""Offline ROUGE that equals ``evaluate.load("rouge").compute(predictions, references)``.

ROUGE (Lin, 2004) as implemented by Google's ``rouge_score`` package, which is what the
``evaluate`` metric wraps: ``RougeScorer(['rouge1', 'rouge2', 'rougeL', 'rougeLsum'],
use_stemmer=False)`` scores each (reference, prediction) pair, a ``BootstrapAggregator``
(1000 resamples, 95 % interval) aggregates them, and the reported number is the bootstrap
median ("mid") of the F-measure. ``evaluate`` needs the hub to fetch its metric script; this
module needs only ``rouge_score``.

The bootstrap draws from NumPy's global generator. TensorRT-LLM's summarize.py seeds it with
``np.random.seed(0)`` (and sets the metric's seed to 0) before computing; we do the same inside
a context that restores the caller's random state afterwards. We also return the plain mean of
the per-example F-measures, which involves no randomness.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from llama_engine.config import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class RougeResult:
    """Scores in [0, 1]; multiply by 100 for printing (``scaled``)."""

    scores: dict                    # rouge type -> bootstrap mid F-measure (evaluate's numbers)
    mean: dict                      # rouge type -> plain mean of per-example F-measures
    per_example: list = field(default_factory=list)   # one {type: F-measure} per pair
    num_examples: int = 0
    seed: int = 0

    def scaled(self) -> dict:
        return {k: v * 100 for k, v in self.scores.items()}

    def mean_scaled(self) -> dict:
        return {k: v * 100 for k, v in self.mean.items()}

    def to_json(self) -> dict:
        return {"rouge": self.scaled(), "rouge_mean": self.mean_scaled(),
                "per_example": self.per_example, "num_examples": self.num_examples,
                "seed": self.seed}


@contextlib.contextmanager
def _seeded(seed: int):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _scorer(rouge_types: Sequence[str]):
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("ROUGE needs the rouge_score package (pip install rouge_score)") from None
    return rouge_scorer.RougeScorer(rouge_types=list(rouge_types), use_stemmer=False)


def compute_rouge(predictions: Sequence[str],
                  references: Sequence[Union[str, Sequence[str]]],
                  seed: int = 0, rouge_types: Sequence[str] = ROUGE_TYPES) -> RougeResult:
    """ROUGE of ``predictions`` against ``references`` (a string or a list of strings each)."""
    from rouge_score import scoring

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ConfigError(f"ROUGE: {len(predictions)} predictions but "
                          f"{len(references)} references")
    if not predictions:
        raise ConfigError("ROUGE: nothing to score")
    scorer = _scorer(rouge_types)
    aggregator = scoring.BootstrapAggregator()
    per_example = []
    # evaluate decides single vs multiple references from the first reference.
    multi_ref = isinstance(references[0], (list, tuple))
    for ref, pred in zip(references, predictions):
        score = scorer.score_multi(ref, pred) if multi_ref else scorer.score(ref, pred)
        aggregator.add_scores(score)
        per_example.append({k: float(s.fmeasure) for k, s in score.items()})
    with _seeded(seed):
        aggregated = aggregator.aggregate()
    scores = {k: float(aggregated[k].mid.fmeasure) for k in rouge_types}
    mean = {k: float(np.mean([p[k] for p in per_example])) for k in rouge_types}
    return RougeResult(scores=scores, mean=mean, per_example=per_example,
                       num_examples=len(predictions), seed=seed)


def format_rouge(result: RougeResult) -> list[str]:
    """The result lines of summarize.py: one per type (x100), then the plain mean."""
    lines = [f"  {k} : {v}" for k, v in result.scaled().items()]
    means = ", ".join(f"{k} {v:.4f}" for k, v in result.mean_scaled().items())
    lines.append(f"  mean of per-article F1 (no bootstrap): {means}")
    return lines
