"""Evaluation: answer metrics (``tokendrop.evaluation.metrics``)."""

from tokendrop.evaluation.metrics import (
    METRICS,
    RULES,
    anls,
    exact_match,
    get_metric,
    normalize_answer,
    relaxed_accuracy,
    vqa_accuracy,
    vqa_normalize,
)

__all__ = ["METRICS", "RULES", "anls", "exact_match", "get_metric", "normalize_answer", "relaxed_accuracy", "vqa_accuracy", "vqa_normalize"]
