"""The words of the default model: the text its tokenizer is trained on, and the class words'
token ids (the projector's word alignment and the word-matcher start of the grounded heads use them)."""

from __future__ import annotations

import torch

from tokendrop.data import Sample
from tokendrop.data.synth import COLORS, GLYPHS, SHAPES, TEMPLATES

from recipes.default_model import ANSWER_TEMPLATE, PROMPT_TEMPLATE
from recipes.default_model.targets import CAPTION_QUESTION, PATCH_FIELDS, caption


def tokenizer_corpus(samples: list[Sample]) -> list[str]:
    """Text the tokenizer is trained on: every template filled in, the prompt, and all answers."""
    texts = [PROMPT_TEMPLATE.replace("<image>", "")]
    for s in SHAPES:
        for c in COLORS:
            texts += [t.format(shape=s, color=c) for t in TEMPLATES.values()]
    answers = list(COLORS) + list(GLYPHS) + ["yes", "no", "0", "1", "2", "3", "4", "5"]
    texts += [ANSWER_TEMPLATE.format(answer=a) for a in answers]
    texts += [CAPTION_QUESTION] + [ANSWER_TEMPLATE.format(answer=caption(s.meta["objects"])) for s in samples[:2000] if "objects" in s.meta]
    texts += [s.question for s in samples[:2000]] + [ANSWER_TEMPLATE.format(answer=s.answer) for s in samples[:2000]]
    return texts


def word_ids(tokenizer) -> list[torch.Tensor]:
    """Token id of each class word of each ``PATCH_FIELDS`` field ("none" excluded), as it follows a space."""
    out = []
    for values in PATCH_FIELDS.values():
        ids = [tokenizer(" " + v, add_special_tokens=False)["input_ids"] for v in values[:-1]]
        if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
            raise ValueError(f"every class word must be its own token, got {dict(zip(values, ids))}")
        out.append(torch.tensor([i[0] for i in ids]))
    return out

