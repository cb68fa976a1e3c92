"""Evaluation: answer metrics (``tokendrop.evaluation.metrics``)."""

from tokendrop.evaluation.metrics import (
    METRICS,
    anls,
    exact_match,
    get_metric,
    normalize_answer,
    relaxed_accuracy,
    vqa_accuracy,
)

__all__ = ["METRICS", "anls", "exact_match", "get_metric", "normalize_answer", "relaxed_accuracy", "vqa_accuracy"]
