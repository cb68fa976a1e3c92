"""Training of tokendrop's default model (a small stock LLaVA-NeXT) on the synthetic VQA data.

The prompt format is fixed and shared by training, ``tokendrop run`` and ``tokendrop eval``::

    "<image>\\nQ: {question} A:"   ->   the model answers " {answer}</s>"

Use ``format_prompt(question)`` to build it. Heavy modules (torch, transformers) are imported lazily.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "<image>\nQ: {question} A:"
ANSWER_TEMPLATE = " {answer}"  # followed by the eos token "</s>"


#: The same prompt as a chat template, saved with the processor so that `apply_chat_template`
#: (what `tokendrop run` / `eval` use for any model) writes exactly PROMPT_TEMPLATE.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for part in message['content'] if part['type'] == 'image' -%}"
    "{{ '<image>\\n' }}{%- endfor -%}Q: {% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endfor %} A:{%- endfor -%}"
)


def format_prompt(question: str) -> str:
    """The model's prompt for ``question`` (with its single ``<image>`` placeholder)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


__all__ = ["PROMPT_TEMPLATE", "ANSWER_TEMPLATE", "CHAT_TEMPLATE", "format_prompt"]
