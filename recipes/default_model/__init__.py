"""Training of tokendrop's default model (a small stock LLaVA-NeXT) on the synthetic VQA data.

The recipe that trained ``src/tokendrop/assets/model`` (docs/training_recipe.md), kept in the
repository and not installed with the library; ``python -m recipes.default_model train ...`` runs it
from the root of a clone (``__main__``; the flags are defined in ``cli``). Modules:

- ``model``: the model, processor and tokenizer builders (stock ``transformers`` classes, small sizes)
- ``config``: ``TrainConfig``, everything a run depends on
- ``train``: ``train(cfg)``, both stages end to end, and ``build`` (a fresh run's model)
- ``stage1`` / ``stage2``: the two training loops; ``schedule``: learning rate and one update
- ``vision_heads``: the stage-1 losses; ``losses``: the stage-2 word-alignment, grounding and tally losses
- ``targets``: targets derived from the scene metadata; ``token_patches``: the same over a batch's tokens
- ``batches``: samples to model inputs; ``data_order``: the seeded batch streams; ``words``: tokenizer
  corpus and class-word ids; ``match_init``: the word-matcher start of the grounded heads
- ``checkpoint``: saving the model, saving and loading stage 1; ``cli``: the command line (``train``)
- tools: ``python -m recipes.default_model.grounding`` (where a trained model's answers look) and
  ``python -m recipes.default_model.steptime`` (vanilla against PyramidDrop step time)

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
