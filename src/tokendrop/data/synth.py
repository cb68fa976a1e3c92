"""Synthetic high-resolution VQA: small details that live in one partition of a large image.

Each sample is one image and one question. Scenes hold 2-5 coloured shapes on a cluttered
background (noise, faint lines, faint boxes); exactly one shape carries a small glyph (a digit).
Image sizes follow the five LLaVA-NeXT grid layouts (1x2, 2x1, 2x2, 1x3, 3x1 tiles of ``TILE``
pixels), scaled by 1.0-1.5 and stretched a little along their long side, so the anyres grid varies.

The glyph is drawn about 8.5x12 pixels *at tile resolution* (a 5x7 bitmap, 1.6-1.8 pixels per
cell): readable in the high-resolution tiles, but squashed to under one pixel per stroke (2x2
grids: about 4x6 pixels) or a third of its width or height (1x3, 3x1) in the base image,
which is the whole image resized to a single tile.

Question types (one-word answers, balanced by construction):
    glyph   "What is written on the red circle?"  -> one of ``GLYPHS`` (uniform), needs detail
    color   "What color is the circle?"           -> one of ``COLORS`` (uniform), coarse
    count   "How many circles are there?"         -> "1" | "2" | "3" (uniform), global
    exists  "Is there a red circle?"              -> "yes" | "no" (50/50), hallucination style

Determinism: sample ``i`` of seed ``s`` is drawn from its own ``numpy`` generator seeded with
``(s, i)``, so the same seed gives byte-identical JSONL and PNG files (Pillow's PNG writer is
deterministic for identical pixels).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

TILE = 112  # tile side (pixels) of the default tokendrop model's vision tower
GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))  # (rows, cols) of the five standard pinpoints
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 200, 35),
    "purple": (145, 55, 185),
}
QUESTION_TYPES = ("glyph", "color", "count", "exists")
COUNTS = ("1", "2", "3")
TEMPLATES = {
    "glyph": "What is written on the {color} {shape}?",
    "color": "What color is the {shape}?",
    "count": "How many {shape}s are there?",
    "exists": "Is there a {color} {shape}?",
}
N_ANNOTATORS = 10  # synthetic "annotator" answers: the canonical answer repeated, as many as VQAv2 and TextVQA have

# 5x7 bitmaps ('#' = ink), drawn by hand for this project. Digits 2-9: 3/8, 5/6, 6/8/9 differ in
# one or two strokes, which is exactly the detail lost when the image is squashed to one tile.
_BITMAPS = {
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPHS = tuple(_BITMAPS)

# Sizes in tile-resolution pixels (multiplied by the image's scale factor when drawn).
_RADIUS = (15.0, 23.0)  # object half-size
_GLYPH_CELL = (1.6, 1.8)  # bitmap cell size -> glyph about 8.5x12 pixels
_GAP = 6.0  # minimum free space between two objects
_SCALE = (1.0, 1.5)  # image size / grid size
_STRETCH = (1.0, 1.15)  # extra length along the long side of 1x3 / 3x1 images


@dataclass
class SceneObject:
    """One shape in a scene; ``box`` is (x0, y0, x1, y1) in image pixels."""

    shape: str
    color: str
    glyph: str | None = None
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    glyph_box: tuple[float, float, float, float] | None = None  # where the glyph's ink was pasted

    def to_json(self) -> dict:
        out = {"shape": self.shape, "color": self.color, "glyph": self.glyph, "box": [round(v, 1) for v in self.box]}
        if self.glyph_box is not None:
            out["glyph_box"] = [round(v, 1) for v in self.glyph_box]
        return out


@dataclass
class Plan:
    """What a scene must contain so that its question has the intended answer."""

    qtype: str
    question: str
    answer: str
    objects: list[SceneObject] = field(default_factory=list)  # shapes/colours, not yet placed


# ----------------------------------------------------------------------------- question plans


def _other(rng: np.random.Generator, pool: tuple, exclude: set) -> str:
    choices = [p for p in pool if p not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _fillers(rng: np.random.Generator, k: int, banned_shapes: set, banned_pairs: set) -> list[SceneObject]:
    """``k`` distractor objects whose shape is not banned and whose (colour, shape) is not banned."""
    out = []
    while len(out) < k:
        shape = _other(rng, SHAPES, banned_shapes)
        color = _other(rng, tuple(COLORS), set())
        if (color, shape) not in banned_pairs:
            out.append(SceneObject(shape, color))
    return out


def _plan_glyph(rng: np.random.Generator, slot: int) -> Plan:
    glyph = GLYPHS[slot % len(GLYPHS)]
    target = SceneObject(SHAPES[int(rng.integers(len(SHAPES)))], _other(rng, tuple(COLORS), set()), glyph)
    objects = [target] + _fillers(rng, int(rng.integers(1, 5)), set(), {(target.color, target.shape)})
    question = TEMPLATES["glyph"].format(color=target.color, shape=target.shape)
    return Plan("glyph", question, glyph, objects)


def _plan_color(rng: np.random.Generator, slot: int) -> Plan:
    color = tuple(COLORS)[slot % len(COLORS)]
    target = SceneObject(SHAPES[int(rng.integers(len(SHAPES)))], color)
    objects = [target] + _fillers(rng, int(rng.integers(1, 5)), {target.shape}, set())
    return Plan("color", TEMPLATES["color"].format(shape=target.shape), color, objects)


def _plan_count(rng: np.random.Generator, slot: int) -> Plan:
    count = int(COUNTS[slot % len(COUNTS)])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    objects = [SceneObject(shape, _other(rng, tuple(COLORS), set())) for _ in range(count)]
    objects += _fillers(rng, int(rng.integers(1, 6 - count)), {shape}, set())
    return Plan("count", TEMPLATES["count"].format(shape=shape), str(count), objects)


def _plan_exists(rng: np.random.Generator, slot: int) -> Plan:
    yes = slot % 2 == 0
    shape, color = SHAPES[int(rng.integers(len(SHAPES)))], _other(rng, tuple(COLORS), set())
    objects = _fillers(rng, int(rng.integers(1, 4)), set(), {(color, shape)})
    if yes:
        objects.insert(int(rng.integers(len(objects) + 1)), SceneObject(shape, color))
    else:  # near misses: the same shape in another colour and the same colour on another shape
        objects.append(SceneObject(shape, _other(rng, tuple(COLORS), {color})))
        if rng.random() < 0.5:
            objects.append(SceneObject(_other(rng, SHAPES, {shape}), color))
    question = TEMPLATES["exists"].format(color=color, shape=shape)
    return Plan("exists", question, "yes" if yes else "no", objects)


_PLANNERS = {"glyph": _plan_glyph, "color": _plan_color, "count": _plan_count, "exists": _plan_exists}


def _ensure_one_glyph(rng: np.random.Generator, plan: Plan) -> None:
    """Every scene carries exactly one glyph (so glyph questions are not the only detailed scenes)."""
    if any(o.glyph for o in plan.objects):
        return
    plan.objects[int(rng.integers(len(plan.objects)))].glyph = GLYPHS[int(rng.integers(len(GLYPHS)))]


# ----------------------------------------------------------------------------- drawing


def _image_size(rng: np.random.Generator, grid: tuple[int, int]) -> tuple[int, int, float]:
    """(width, height, scale) of an image for which LLaVA-NeXT selects ``grid`` = (rows, cols).

    1x2 and 2x1 are selected only at exactly 2:1 (any other ratio prefers 2x2 or 1x3), 1x3 and
    3x1 tolerate extra length, 2x2 tolerates a mild aspect change either way.
    """
    rows, cols = grid
    scale = float(rng.uniform(*_SCALE))
    unit = int(round(TILE * scale))
    width, height = cols * unit, rows * unit
    if max(rows, cols) == 3:
        stretch = float(rng.uniform(*_STRETCH))
        width, height = (int(round(width * stretch)), height) if cols > rows else (width, int(round(height * stretch)))
    elif rows == cols:
        width = int(round(width * float(rng.uniform(0.92, 1.08))))
    return width, height, scale


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Light textured background: tinted grey + pixel noise + low-frequency blotches."""
    tint = rng.uniform(195, 240) + rng.uniform(-12, 12, size=3)  # (3,)
    low = rng.normal(0, 10, size=(max(2, height // 24), max(2, width // 24), 3))
    low_img = Image.fromarray(np.clip(low + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = tint + (np.asarray(low_img, dtype=np.float32) - 128) + rng.normal(0, 7, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Faint lines and box outlines, a little darker or lighter than the background."""
    for _ in range(int(rng.integers(6, 16))):
        shade = tuple(int(v) for v in rng.integers(140, 235, size=3))
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        if rng.random() < 0.7:
            draw.line([(x0, y0), (x1, y1)], fill=shade, width=1)
        else:
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=shade, width=1)


def _place(rng: np.random.Generator, objects: list[SceneObject], width: int, height: int, scale: float) -> bool:
    """Give each object a non-overlapping box (rejection sampling); False if the scene does not fit."""
    placed: list[tuple[float, float, float]] = []  # (cx, cy, r)
    for obj in objects:
        for _attempt in range(200):
            r = float(rng.uniform(*_RADIUS)) * scale
            cx, cy = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
            if all(math.hypot(cx - px, cy - py) >= r + pr + _GAP * scale for px, py, pr in placed):
                placed.append((float(cx), float(cy), r))
                obj.box = (float(cx) - r, float(cy) - r, float(cx) + r, float(cy) + r)
                break
        else:
            return False
    return True


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1 - r * 0.1), (x0, y1 - r * 0.1)], fill=rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    else:  # pragma: no cover - SHAPES and this function are kept in sync
        raise ValueError(f"unknown shape {obj.shape!r}")


def _glyph_center(obj: SceneObject) -> tuple[float, float]:
    """Where the glyph sits: the centre, a little lower for triangles (their wide part)."""
    x0, y0, x1, y1 = obj.box
    cy = (y0 + y1) / 2
    if obj.shape == "triangle":
        cy += (y1 - y0) * 0.12
    return (x0 + x1) / 2, cy


def _draw_glyph(rng: np.random.Generator, image: Image.Image, obj: SceneObject, rgb: tuple, scale: float) -> None:
    """Paste the 5x7 bitmap of ``obj.glyph``, upscaled to about 8.5x12 tile pixels, in a contrasting ink; sets ``obj.glyph_box``."""
    bitmap = np.array([[255 if c == "#" else 0 for c in row] for row in _BITMAPS[obj.glyph]], dtype=np.uint8)
    cell = float(rng.uniform(*_GLYPH_CELL)) * scale
    w, h = max(3, round(5 * cell)), max(4, round(7 * cell))
    big = Image.fromarray(bitmap).resize((5 * 8, 7 * 8), Image.NEAREST)
    mask = big.resize((w, h), Image.BOX)  # area-averaged: sharp, anti-aliased strokes
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    ink = (15, 15, 15) if luminance > 120 else (250, 250, 250)
    cx, cy = _glyph_center(obj)
    x, y = int(round(cx - w / 2)), int(round(cy - h / 2))
    image.paste(Image.new("RGB", (w, h), ink), (x, y), mask)
    obj.glyph_box = (float(x), float(y), float(x + w), float(y + h))


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in rgb)


def render(rng: np.random.Generator, plan: Plan, grid: tuple[int, int]) -> Image.Image | None:
    """Draw ``plan`` on an image sized for ``grid``; None if its objects do not fit (caller retries)."""
    width, height, scale = _image_size(rng, grid)
    if not _place(rng, plan.objects, width, height, scale):
        return None
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, width, height)
    for obj in plan.objects:
        rgb = _jitter(rng, COLORS[obj.color])
        _draw_shape(draw, obj, rgb)
        if obj.glyph:
            _draw_glyph(rng, image, obj, rgb, scale)
    return image


_SHEET_RADIUS = (9.0, 14.0)  # small objects: many glyphs per tile


def glyph_sheet(rng: np.random.Generator, size: int = TILE, n_objects: int = 10) -> tuple[Image.Image, list[SceneObject]]:
    """A ``size`` x ``size`` tile crowded with small glyph-carrying shapes, drawn like the scenes.

    Not a VQA sample: dense glyph-reading material for pre-training a vision tower (every object
    carries a glyph, drawn at the scenes' tile-resolution size). Returns the image and its objects
    (``box`` and ``glyph_box`` in its pixels); fewer than ``n_objects`` if they do not all fit.
    """
    image = _background(rng, size, size)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size, size)
    objects: list[SceneObject] = []
    for _attempt in range(4 * n_objects):
        if len(objects) == n_objects:
            break
        r = float(rng.uniform(*_SHEET_RADIUS))
        cx, cy = rng.uniform(r, size - r, size=2)
        if any(math.hypot(cx - (o.box[0] + o.box[2]) / 2, cy - (o.box[1] + o.box[3]) / 2) < r + (o.box[2] - o.box[0]) / 2 + 2
               for o in objects):
            continue
        color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
        obj = SceneObject(SHAPES[int(rng.integers(len(SHAPES)))], color, GLYPHS[int(rng.integers(len(GLYPHS)))],
                          (float(cx) - r, float(cy) - r, float(cx) + r, float(cy) + r))
        rgb = _jitter(rng, COLORS[color])
        _draw_shape(draw, obj, rgb)
        _draw_glyph(rng, image, obj, rgb, 1.0)
        objects.append(obj)
    return image, objects


# ----------------------------------------------------------------------------- samples and files


def make_sample(seed: int, index: int) -> tuple[Image.Image, dict]:
    """Sample ``index`` of dataset ``seed``: (image, JSON record without the ``image`` path).

    The question type cycles through ``QUESTION_TYPES`` and the answer through that type's classes,
    so answers are balanced per type; everything else is drawn from ``np.random.default_rng((seed, index))``.
    """
    rng = np.random.default_rng((seed, index))
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    slot = index // len(QUESTION_TYPES)
    grid = GRIDS[int(rng.integers(len(GRIDS)))]
    while True:
        plan = _PLANNERS[qtype](rng, slot)
        _ensure_one_glyph(rng, plan)
        order = rng.permutation(len(plan.objects))
        plan.objects = [plan.objects[int(k)] for k in order]  # the target is not always drawn first
        image = render(rng, plan, grid)
        if image is not None:
            break
    record = {
        "id": f"s{seed}-{index:06d}",
        "question": plan.question,
        "answers": [plan.answer] * N_ANNOTATORS,
        "answer": plan.answer,
        "type": qtype,
        "grid": list(grid),
        "objects": [o.to_json() for o in plan.objects],
    }
    return image, record


def generate_dataset(
    out_dir: str | Path, n: int, seed: int = 0, progress: Callable[[int], None] | None = None
) -> dict:
    """Write ``n`` samples to ``out_dir/images/*.png`` and ``out_dir/questions.jsonl``.

    Args:
        out_dir: dataset folder (created; existing files with the same names are overwritten).
        n: number of samples (one image and one question each), >= 1.
        seed: dataset seed; the same seed gives byte-identical files.
        progress: called with 1 after each sample (e.g. ``tqdm.update``).

    Returns:
        summary dict: ``n``, ``seed``, ``types`` {type: count}, ``answers`` {type: {answer: count}}, ``grids``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    answers: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
    grids: Counter = Counter()
    with open(out / "questions.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for index in range(n):
            image, record = make_sample(seed, index)
            record = {"id": record["id"], "image": f"images/{record['id']}.png", **{k: v for k, v in record.items() if k != "id"}}
            image.save(out / record["image"], format="PNG")
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            answers[record["type"]][record["answer"]] += 1
            grids["x".join(map(str, record["grid"]))] += 1
            if progress is not None:
                progress(1)
    return {
        "n": n,
        "seed": seed,
        "types": {t: sum(c.values()) for t, c in answers.items()},
        "answers": {t: dict(sorted(c.items())) for t, c in answers.items()},
        "grids": dict(sorted(grids.items())),
    }
