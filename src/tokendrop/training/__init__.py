"""Training of tokendrop's default model (a small stock LLaVA-NeXT) on the synthetic VQA data.

The prompt format is fixed and shared by training, ``tokendrop run`` and ``tokendrop eval``::

    "<image>\\nQ: {question} A:"   ->   the model answers " {answer}</s>"

Use ``format_prompt(question)`` to build it. Heavy modules (torch, transformers) are imported lazily.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "<image>\nQ: {question} A:"
ANSWER_TEMPLATE = " {answer}"  # followed by the eos token "</s>"


def format_prompt(question: str) -> str:
    """The model's prompt for ``question`` (with its single ``<image>`` placeholder)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


__all__ = ["PROMPT_TEMPLATE", "ANSWER_TEMPLATE", "format_prompt"]
