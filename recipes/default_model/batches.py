"""Turn dataset samples into model inputs: LM training batches (right padding) and vision-only batches.

Dimension letters: B images, V views of one image (base + tiles), T total views in a batch, L tokens,
K multi-label classes.
"""

from __future__ import annotations

import numpy as np
import torch

from tokendrop.data import Sample
from tokendrop.data.synth import SHAPES

from recipes.default_model import ANSWER_TEMPLATE, PROMPT_TEMPLATE, format_prompt
from recipes.default_model.targets import (
    CAPTION_QUESTION,
    TALLY_MARKS,
    caption,
    centre_targets,
    extra_turns,
    focus,
    focus_mask,
    match_centres,
    match_mask,
    matches,
    patch_targets,
    sheet_targets,
    view_targets,
)

IGNORE = -100
_LEAD_WINDOW = 10  # tokens before the answer-predicting one searched for the question's shape word


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(ANSWER_TEMPLATE.format(answer=answer), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def _turn_ids(tokenizer, question: str) -> list[int]:
    """A follow-up question: the prompt without its image placeholder."""
    text = PROMPT_TEMPLATE.replace("<image>", "").format(question=question)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _shape_word_ids(tokenizer) -> set[int]:
    """Token ids of the shape words as they follow a space, singular and plural (first token)."""
    return {tokenizer(f" {s}{plural}", add_special_tokens=False)["input_ids"][0] for s in SHAPES for plural in ("", "s")}


def encode_example(
    processor, sample: Sample, rng: np.random.Generator, n_extra: int, tile: int, with_caption: bool = False,
    lead: bool = False, tally: bool = False, tally_mark: str = "objects",
) -> dict:
    """One training example: the sample's question first, then ``n_extra`` derived turns, then
    (optionally) a caption turn. The caption comes last so that no question can be answered by
    reading it: every answer has to come from the image.

    Returns a dict with ``input_ids``/``labels`` (L,) lists, ``pixel_values`` (V, 3, tile, tile),
    ``image_size`` (height, width), the [CLS] ``targets``/``mask`` (V, K), ``patch_targets``
    (V, N, 3), ``focus``: for every templated question, (position of the token that predicts its
    answer, (V, N) bool mask of the patches that answer is about), and ``tally``: (position, (V, N)
    bool mask, n) for the same positions (empty without ``tally``). ``lead``, ``tally`` and
    ``tally_mark``: see ``_ground_turn``.
    """
    if tally_mark not in TALLY_MARKS:
        raise ValueError(f"tally_mark must be one of {TALLY_MARKS}, got {tally_mark!r}")
    image = sample.load_image()
    enc = processor(text=[format_prompt(sample.question)], images=[image], return_tensors="pt")
    tok = processor.tokenizer
    ids = enc["input_ids"][0].tolist()
    labels = [IGNORE] * len(ids)
    objects = sample.meta.get("objects") or []
    turns = _turns(sample, objects, rng, n_extra, with_caption)
    classes = patch_targets(objects, image.height, image.width, tile) if objects else None
    shape_ids = _shape_word_ids(tok) if lead else set()
    found = {"focus": [], "lead": [], "tally": [], "tally_lead": []}
    for k, (question, reply) in enumerate(turns):
        prompt = [] if k == 0 else _turn_ids(tok, question)  # the first prompt is already in ids
        answer = _answer_ids(tok, reply)
        ids, labels = ids + prompt, labels + [IGNORE] * len(prompt)
        about = focus(question) if classes is not None else None
        if about is not None:
            mask = torch.from_numpy(focus_mask(classes, *about))
            match = _tally_match(objects, about, classes, image, tile, tally_mark) if tally else None
            _ground_turn(found, ids, shape_ids, mask, match)
        ids, labels = ids + answer, labels + answer
    example = {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": enc["pixel_values"][0],  # (Vmax=V, 3, tile, tile): one image, no padding
        "image_size": (image.height, image.width),
        "focus": found["focus"] + found["lead"],
        "tally": found["tally"] + found["tally_lead"],
    }
    if objects:
        targets, mask = view_targets(objects, image.height, image.width, tile)
        example["targets"], example["mask"] = torch.from_numpy(targets), torch.from_numpy(mask)
        example["patch_targets"] = torch.from_numpy(classes)
    return example


def _turns(sample: Sample, objects: list[dict], rng: np.random.Generator, n_extra: int,
           with_caption: bool) -> list[tuple[str, str]]:
    """(question, answer) turns of one example: the sample's own, the derived ones, the caption."""
    turns = [(sample.question, sample.answer)]
    if objects and n_extra:
        turns += [t for t in extra_turns(objects, rng, n_extra) if t[0] != sample.question]
    if objects and with_caption:
        turns.append((CAPTION_QUESTION, caption(objects)))
    return turns


def _tally_match(objects: list[dict], about: tuple, classes: np.ndarray, image, tile: int,
                 tally_mark: str) -> tuple[int, torch.Tensor]:
    """(n, (V, N) bool mask): how many objects match the question exactly, and their tally tokens."""
    n = matches(objects, *about)
    match = (match_centres(objects, *about, image.height, image.width, tile) if tally_mark == "centres"
             else match_mask(classes, *about))
    return n, torch.from_numpy(match)


def _ground_turn(found: dict, ids: list[int], shape_ids: set[int], mask: torch.Tensor,
                 match: tuple[int, torch.Tensor] | None) -> None:
    """Record the grounding targets of the templated question whose answer the last token of ``ids``
    predicts: its patch ``mask`` (when not empty) and, with ``match``, its tally targets.

    With ``lead`` (``shape_ids`` not empty), the question's shape word and the tokens after it up to
    the answer-predicting one are grounded too (same mask, appended after the answer positions): a
    query that holds the shape word itself is the easy case, from which the grounded head learns the
    word-to-patch match before the answer position has learned to gather the word.

    With ``tally`` (``match`` given), the tally targets are the patches of the objects that match the
    question exactly (its shape, and its colour when it names one; empty when none does) and how many
    objects match (see ``losses.tally_loss``). With ``tally_mark="centres"`` the mask holds only the
    patch with each matching object's centre, one per view that shows it (``targets.match_centres``):
    the same number of tokens per object, whatever its size.
    """
    pos = len(ids) - 1  # predicts the answer
    back = range(pos - 1, max(0, pos - 1 - _LEAD_WINDOW), -1)
    word = next((i for i in back if ids[i] in shape_ids), None)
    leads = range(word, pos) if word is not None else range(0)
    if mask.any():
        found["focus"].append((pos, mask))
        found["lead"] += [(i, mask) for i in leads]
    if match is not None:
        n, objects_mask = match
        if n == 0 or objects_mask.any():
            found["tally"].append((pos, objects_mask, n))
            found["tally_lead"] += [(i, objects_mask, n) for i in leads]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch for ``model(**batch["inputs"], labels=batch["labels"])`` + [CLS] targets."""
    length = max(len(e["input_ids"]) for e in examples)
    n_views = max(e["pixel_values"].shape[0] for e in examples)
    B = len(examples)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    pixel_values = torch.zeros((B, n_views) + tuple(examples[0]["pixel_values"].shape[1:]))  # (B, V, 3, t, t)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        attention[b, :n] = 1
        pixel_values[b, : e["pixel_values"].shape[0]] = e["pixel_values"]
    batch = {
        "inputs": {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor([e["image_size"] for e in examples]),
        },
        "labels": labels,
        "views": [e["pixel_values"].shape[0] for e in examples],  # views (base + tiles) of each image
        "focus": [e.get("focus", []) for e in examples],  # per example: [(answer-predicting position, (V, N) mask)]
        "tally": [e.get("tally", []) for e in examples],  # per example: [(position, (V, N) mask, matching objects)]
    }
    if all("targets" in e for e in examples):
        batch["targets"] = torch.cat([e["targets"] for e in examples])  # (T, K), views in tower order
        batch["mask"] = torch.cat([e["mask"] for e in examples])
        batch["patch_targets"] = torch.cat([e["patch_targets"] for e in examples])  # (T, N, 3)
    return batch


def encode_views(image_processor, samples: list[Sample], tile: int, centres: bool = False) -> dict:
    """Vision-only batch: every view of every image, flattened, with its [CLS] targets.

    Returns ``pixel_values`` (T, 3, tile, tile), ``targets`` and ``mask`` (T, K), ``patch_targets`` (T, N, 3),
    and with ``centres`` the ``centre_targets`` (T, N) bool.
    """
    views, targets, masks, patches, marks = [], [], [], [], []
    for sample in samples:
        image = sample.load_image()
        pv = image_processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (V, 3, t, t)
        t, m = view_targets(sample.meta["objects"], image.height, image.width, tile)
        patches.append(torch.from_numpy(patch_targets(sample.meta["objects"], image.height, image.width, tile)))
        if centres:
            marks.append(torch.from_numpy(centre_targets(sample.meta["objects"], image.height, image.width, tile)))
        views.append(pv)
        targets.append(torch.from_numpy(t))
        masks.append(torch.from_numpy(m))
    batch = {
        "pixel_values": torch.cat(views),
        "targets": torch.cat(targets),
        "mask": torch.cat(masks),
        "patch_targets": torch.cat(patches),
    }
    if centres:
        batch["centre_targets"] = torch.cat(marks)
    return batch


def encode_sheets(image_processor, rng: np.random.Generator, n: int, tile: int) -> dict:
    """``n`` fresh glyph sheets (``tokendrop.data.synth.glyph_sheet``), normalised like the processor's views.

    Returns ``pixel_values`` (n, 3, tile, tile) and ``glyph_targets`` (n, N) patch classes.
    """
    from tokendrop.data.synth import glyph_sheet

    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    pixels, labels = [], []
    for _ in range(n):
        image, objects = glyph_sheet(rng, tile)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) * image_processor.rescale_factor
        pixels.append((x - mean) / std)  # (3, tile, tile)
        labels.append(torch.from_numpy(sheet_targets(objects, tile)))
    return {"pixel_values": torch.stack(pixels), "glyph_targets": torch.stack(labels)}
